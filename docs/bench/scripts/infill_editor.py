#!/usr/bin/env python3
"""Editor-plugin code completion through llama.cpp's `/infill`, speculation on and off.

Sends each infill item (from `make_infill.py`) to a running `sibyl serve` as llama.vim
sends a completion (`input_prefix`, `input_suffix`, top-k 40, top-p 0.90, samplers
`top_k, top_p, infill`, a seed per item), once with speculation and once without, in
alternating order, and compares the decoding rates the responses report
(`timings.predicted_n / predicted_ms`). The two texts of an item must be identical:
seeded sampling is lossless.

    infill_editor.py http://127.0.0.1:8080 infill.jsonl 16 96 [greedy]
"""
import json
import math
import sys
import urllib.request


def infill(url, item, n_predict, seed, speculation, greedy):
    body = {
        "input_prefix": item["prompt"],
        "input_suffix": item["suffix"],
        "prompt": "",
        "n_predict": n_predict,
        "top_k": 40,
        "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"],
        "seed": seed,
        "speculation": {"enabled": speculation},
    }
    if greedy:
        body.update({"temperature": 0, "samplers": ["top_k", "top_p", "temperature"]})
    request = urllib.request.Request(
        url + "/infill",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.load(response)
    timings = answer["timings"]
    return answer["content"], timings["predicted_n"], timings["predicted_ms"], timings


def main(url, path, limit, n_predict, greedy):
    items = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()][:limit]
    ratios, totals = [], {True: [0, 0.0], False: [0, 0.0]}
    identical = 0
    for i, item in enumerate(items):
        runs = {}
        order = [True, False] if i % 2 == 0 else [False, True]
        for speculation in order:
            runs[speculation] = infill(url, item, n_predict, 1000 + i, speculation, greedy)
        (on_text, on_n, on_ms, on_t), (off_text, off_n, off_ms, _) = runs[True], runs[False]
        identical += on_text == off_text
        for speculation, (_, n, ms, _) in runs.items():
            totals[speculation][0] += n
            totals[speculation][1] += ms
        ratio = (on_n / on_ms) / (off_n / off_ms) if on_ms > 0 and off_ms > 0 and on_n else None
        if ratio:
            ratios.append(ratio)
        print(
            f"{item['id']}: {on_n} tokens, speculation {on_n / max(on_ms, 1e-9) * 1e3:.2f} "
            f"against {off_n / max(off_ms, 1e-9) * 1e3:.2f} tokens/s"
            + (f" ({ratio:.2f}x)" if ratio else "")
            + f", drafted {on_t.get('draft_n')} accepted {on_t.get('draft_n_accepted')}, "
            + ("same text" if on_text == off_text else "TEXTS DIFFER"),
            flush=True,
        )
    mean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
    rate = {s: n / ms * 1e3 for s, (n, ms) in totals.items() if ms > 0}
    print(
        f"\n{len(items)} items, {'greedy' if greedy else 'sampled as llama.vim'}: "
        f"speculation {mean:.2f}x (geometric mean of per-item ratios, "
        f"{min(ratios):.2f}x-{max(ratios):.2f}x); "
        f"{rate.get(True, 0):.2f} against {rate.get(False, 0):.2f} tokens/s over all; "
        f"{identical} of {len(items)} texts identical"
    )
    if identical != len(items):
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), len(sys.argv) == 6)
