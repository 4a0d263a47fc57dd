#!/usr/bin/env python3
"""Predicted outputs against the n-gram drafter alone, with `sibyl generate`: each item is
asked as a chat once with `--draft ngram` and once with a predicted output
(`--prediction-file`) too, in alternating order, and the decode speeds and outputs compared.

    prediction_edits.py SIBYL fix humanevalfix.jsonl [ITEMS] [MAX_TOKENS]
        the bug fix of each item, predicted to be its buggy code (which the prompt holds)
    prediction_edits.py SIBYL regenerate humaneval.jsonl [ITEMS] [MAX_TOKENS]
        each problem asked again with one more instruction, predicted to be the answer to
        the first asking (which the second prompt does not hold)
"""
import json
import re
import subprocess
import sys
import tempfile

SPEED = re.compile(r"generated (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\)")
AGAIN = "\nUse descriptive variable names."


def run(binary, prompt, max_tokens, draft="ngram", prediction=None):
    command = [binary, "generate", "--chat", "--draft", draft, "--max-tokens",
               str(max_tokens), "--prompt", prompt]
    if prediction:
        command += ["--prediction-file", prediction]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    tokens, speed = SPEED.search(done.stderr).groups()
    return done.stdout, int(tokens), float(speed)


def main(binary, mode, path, items=8, max_tokens=256):
    ratios = []
    with open(path, encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()][:items]
    for number, row in enumerate(rows):
        if mode == "fix":
            prompt, predicted = row["prompt"], row["buggy_code"]
        elif mode == "regenerate":
            prompt = row["chat_prompt"] + AGAIN
            predicted = run(binary, row["chat_prompt"], max_tokens, draft="none")[0]
        else:
            sys.exit(f"unknown mode {mode}: fix or regenerate")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as file:
            file.write(predicted)
        order = [None, file.name] if number % 2 == 0 else [file.name, None]
        results = {p: run(binary, prompt, max_tokens, prediction=p) for p in order}
        (plain, tokens, alone), (with_it, _, faster) = results[None], results[file.name]
        ratio = faster / alone
        ratios.append(ratio)
        same = "identical" if plain == with_it else "DIFFERENT"
        print(f"{row['id']}: {tokens} tokens, ngram {alone:.2f} tok/s, "
              f"ngram+prediction {faster:.2f} tok/s, {ratio:.2f}x, {same}", flush=True)
    product = 1.0
    for ratio in ratios:
        product *= ratio
    print(f"geometric mean {product ** (1 / len(ratios)):.2f}x over {len(ratios)} items")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:6]))
