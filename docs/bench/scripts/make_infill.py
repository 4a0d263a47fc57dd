#!/usr/bin/env python3
"""Fill-in-the-middle items for `sibyl bench` from HumanEval-style JSONL.

Each problem's reference solution is cut into three runs of lines: the prompt and the first
run are the code before the gap, the last run the code after it (`suffix`), and the middle
run is what the model is asked to write, as in HumanEval's multi-line infilling. Problems
whose solution has fewer than three lines are left out.

    make_infill.py humaneval.jsonl > infill.jsonl
    sibyl bench --dataset infill.jsonl --configs plain,ngram --max-tokens 96
"""
import json
import sys


def main(path):
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            item = json.loads(line)
            body = item["reference"].splitlines(keepends=True)
            if len(body) < 3:
                continue
            start = len(body) // 3
            end = start + max(1, len(body) // 3)
            print(json.dumps({
                "id": f"{item['id']}-infill",
                "category": "python_infill",
                "format": "infill",
                "prompt": item["prompt"] + "".join(body[:start]),
                "suffix": "".join(body[end:]),
            }))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
