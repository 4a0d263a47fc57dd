#!/usr/bin/env python3
"""Where a server's time went, step by step: prompt-only, mixed and decode-only steps.

Reads the log of a `sibyl serve` (or `sibyl verifier`) started with
`SIBYL_LOG=sibyl_decode=trace,info`, whose scheduler writes one "batched step" line per
forward pass, and prints for each stretch of batched work (from the prompt steps that open
it through the last step before the next request runs alone) how many steps of each kind
ran, their time, their prompt tokens and decoding rows, and the estimate each step was
planned with.

Usage: step_mix.py SERVE_LOG
"""
import datetime
import re
import sys


def steps(path):
    for line in open(path):
        if "batched step" not in line:
            continue
        fields = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
        stamp = line.split()[0].rstrip("Z")
        fields["t"] = datetime.datetime.fromisoformat(stamp).timestamp()
        yield fields


def prompt_only(step):
    return step["rows"] == step["prompt_tokens"]


def stretches(all_steps):
    """Index ranges of batched work: from the prompt-only steps before the first step of
    several sessions to the last step before the next prompt-only step that follows it."""
    i = 0
    while i < len(all_steps):
        if all_steps[i]["sessions"] <= 1:
            i += 1
            continue
        start = i
        while start > 0 and prompt_only(all_steps[start - 1]):
            start -= 1
        last = i
        end = i + 1
        while end < len(all_steps):
            if all_steps[end]["sessions"] > 1:
                last = end
            elif prompt_only(all_steps[end]) and end > last + 1:
                break
            end += 1
        yield start, end
        i = end


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    all_steps = list(steps(sys.argv[1]))
    for start, end in stretches(all_steps):
        run = all_steps[start:end]
        wall = run[-1]["t"] - run[0]["t"] + run[0]["elapsed_ms"] / 1e3
        print(f"stretch of {len(run)} steps, {wall:.2f} s")
        kinds = {}
        for s in run:
            decoding = s["rows"] - s["prompt_tokens"]
            kind = "prompt" if decoding == 0 else ("mixed" if s["prompt_tokens"] > 0 else "decode")
            k = kinds.setdefault(kind, dict(n=0, ms=0.0, est=0.0, prompt=0, rows=0, sessions=0))
            k["n"] += 1
            k["ms"] += s["elapsed_ms"]
            k["est"] += s["estimated_ms"]
            k["prompt"] += s["prompt_tokens"]
            k["rows"] += decoding
            k["sessions"] += s["sessions"]
        for kind, k in kinds.items():
            n = k["n"]
            print(
                f"  {kind:6s} {n:4d} steps {k['ms'] / 1e3:6.2f} s: {k['prompt']:5.0f} prompt tokens,"
                f" {k['rows']:5.0f} decoding rows; per step {k['ms'] / n:6.1f} ms"
                f" (estimated {k['est'] / n:6.1f}), {k['sessions'] / n:.2f} sessions,"
                f" {k['prompt'] / n:5.1f} prompt tokens"
            )


if __name__ == "__main__":
    main()
