"""Writes over-long prompts for `run.sh`: python3 make_prompts.py CODE_FILE OUT_DIR.

CODE_FILE: any ASCII source code of 600 KB or more (the run used Python's standard
library, concatenated). Every prompt is over the 1.5B model's 32,768-token window.
"""
import json
import random
import sys

code_file, out = sys.argv[1], sys.argv[2]
random.seed(5)


def save(name, text, chat=False):
    body = {"model": "qwen2.5-coder-1.5b", "max_tokens": 4}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    with open(f"{out}/{name}.json", "w") as f:
        json.dump(body, f)


letters = "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(400_000))
for kb in (64, 70, 100, 200, 340):
    save(f"letters{kb}k", letters[: kb * 1000])
save("chat-letters100k", letters[:100_000], chat=True)
words = ["function", "self", "the", "xyzzy", "qwertyuiop"]
joined = "".join(random.choice(words) for _ in range(80_000))
for kb in (110, 200, 300):
    save(f"words{kb}k", joined[: kb * 1000])
indent = "\n        x" * 40_000
for kb in (120, 300):
    save(f"indent{kb}k", indent[: kb * 1000])
code = open(code_file).read()
save("code200k", code[:200_000])
save("code3m", (code * 6)[:3_000_000])
spaced = "x" + " " * 100
save("xsp1200k", (spaced * 20_000)[:1_200_000])
save("xsp2m", (spaced * 40_000)[:2_000_000])
save("nlsp2m", (("\n" + " " * 100 + "x") * 40_000)[:2_000_000])
cyrillic = "абвгдежзийклмнопрстуфхцчшщыьэюя"
words = ["".join(random.choice(cyrillic) for _ in range(random.randint(2, 9))) for _ in range(3000)]
save("cyr200k", " ".join(random.choice(words) for _ in range(200_000))[:100_000])
save("greekword300k", "".join(random.choice("αβγδεζηθικλμνξοπρστυφχψω") for _ in range(150_000)))
save("han300k", "".join(chr(random.randint(0x4E00, 0x9FA5)) for _ in range(100_000)))
