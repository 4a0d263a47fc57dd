#!/usr/bin/env python3
"""Bug fixes through Anthropic's Messages API, speculation off and on.

Streams each of the first N HumanEvalFix items (`humanevalfix.jsonl`) to a running
`sibyl serve` with the `anthropic` package, as a coding agent would ask ("fix the bug"),
greedy (`temperature: 0` as an extra field), the prefix cache off so that both runs compute
the whole prompt, first without speculation, then with it. Prints each run's wall time and
output tokens, and the aggregate tokens per second of both (prefill included) and their
ratio. The two texts of an item must be identical.

    messages_bugfix.py http://127.0.0.1:8080 humanevalfix.jsonl 4 [MODEL]
"""
import json
import sys
import time

import anthropic


def main() -> None:
    url, path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = sys.argv[4] if len(sys.argv) > 4 else "qwen2.5-coder-1.5b"
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=600)
    with open(path) as lines:
        items = [json.loads(line) for line in lines][:count]
    totals = {False: [0.0, 0], True: [0.0, 0]}
    for item in items:
        texts = {}
        for speculation in (False, True):
            extra = {"temperature": 0, "speculation": {"enabled": speculation},
                     "prefix_cache": False}
            ask = "Fix the bug in this code and give the whole corrected function:\n\n"
            started = time.perf_counter()
            with client.messages.stream(
                model=model, max_tokens=128, system="You are a careful Python programmer.",
                messages=[{"role": "user", "content": ask + item["prompt"]}],
                extra_body=extra,
            ) as stream:
                texts[speculation] = "".join(stream.text_stream)
                message = stream.get_final_message()
            seconds = time.perf_counter() - started
            totals[speculation][0] += seconds
            totals[speculation][1] += message.usage.output_tokens
            label = "speculation" if speculation else "plain"
            print(f"{item['id']} {label} {seconds:.2f}s {message.usage.output_tokens} tokens "
                  f"{message.stop_reason}", flush=True)
        assert texts[True] == texts[False], f"{item['id']}: the texts differ"
    rate = {s: tokens / seconds for s, (seconds, tokens) in totals.items()}
    print(f"plain {rate[False]:.2f} tokens/s, speculation {rate[True]:.2f} tokens/s, "
          f"{rate[True] / rate[False]:.2f}x")


if __name__ == "__main__":
    main()
