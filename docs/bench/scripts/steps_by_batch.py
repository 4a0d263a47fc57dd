#!/usr/bin/env python3
"""A run's batched steps grouped by how many sessions they carried and whether they held
prompt tokens: per group, steps, rows, draft tokens, tokens given and expected, measured
and estimated milliseconds, tokens per second, and the milliseconds before each pass
(drafting and planning: the time since the previous step's line, less this pass's own).

Reads the stderr of a `sibyl bench` or a server run with `SIBYL_LOG=sibyl_decode=trace`,
whose scheduler writes one "batched step" line per forward pass.

Usage: steps_by_batch.py LOG...
"""
import collections
import sys

from step_mix import steps

FIELDS = ["rows", "draft_tokens", "tokens", "expected_tokens", "elapsed_ms", "estimated_ms"]

# A longer time between two step lines is a pause between runs, not time before a pass.
PAUSE_MS = 5000.0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        groups = collections.defaultdict(lambda: collections.Counter())
        all_steps = list(steps(path))
        for before, step in zip([None] + all_steps, all_steps):
            key = (int(step["sessions"]), "prompt" if step["prompt_tokens"] > 0 else "decode")
            groups[key]["steps"] += 1
            for field in FIELDS:
                groups[key][field] += step.get(field, 0.0)
            if before is not None:
                pre = 1e3 * (step["t"] - before["t"]) - step["elapsed_ms"]
                if 0.0 <= pre < PAUSE_MS:
                    groups[key]["pre_ms"] += pre
                    groups[key]["timed"] += 1
        total_ms = sum(s["elapsed_ms"] for s in all_steps)
        print(f"{path}: {len(all_steps)} steps, {total_ms / 1e3:.1f} s")
        pre = sum(g["pre_ms"] for g in groups.values())
        print(f"{path}: {pre / 1e3:.1f} s before the passes (drafting, planning)")
        print(
            "sessions kind    steps  rows/step drafts/step tok/step expected ms/step est.ms tok/s"
            " pre.ms"
        )
        for (sessions, kind), g in sorted(groups.items()):
            n = g["steps"]
            print(
                f"{sessions:8} {kind:7} {n:6} {g['rows'] / n:10.2f} {g['draft_tokens'] / n:11.2f}"
                f" {g['tokens'] / n:8.2f} {g['expected_tokens'] / n:8.2f}"
                f" {g['elapsed_ms'] / n:7.1f} {g['estimated_ms'] / n:6.1f}"
                f" {1e3 * g['tokens'] / g['elapsed_ms']:5.1f}"
                f" {g['pre_ms'] / max(g['timed'], 1):6.2f}"
            )


if __name__ == "__main__":
    main()
