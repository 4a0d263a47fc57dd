"""A decoding stream's inter-token gaps while another request's long prompt is processed.

Usage: python long_prompt_gap.py BASE_URL PROMPTS.jsonl [--prompt-tokens 4000]

BASE_URL is a sibyl gateway's OpenAI API (http://127.0.0.1:8080/v1). PROMPTS.jsonl is any
JSONL file whose lines have a "prompt" (or "turns") field; the long prompt is their texts
joined until it is about --prompt-tokens tokens long. Needs the `openai` package.

1. Alone: a plain (speculation off) completion that counts upwards streams 120 tokens; the
   median gap between its deltas is the solo step time.
2. Together: the same stream starts again; after 20 deltas the long prompt is sent with
   max_tokens 1, opting out of the prefix cache. The stream's gaps from that moment until
   the long prompt's answer came are the gaps under load. Prints their p50, p99 and max
   against the solo step time.
"""

import argparse
import json
import statistics
import threading
import time

import openai

COUNTING = "".join(f"{i}\n" for i in range(1, 21))


def texts(path):
    with open(path) as f:
        for line in f:
            item = json.loads(line)
            if "prompt" in item:
                yield item["prompt"]
            else:
                yield from item.get("turns", [])


def stream(client, model, max_tokens, times, stop):
    response = client.completions.create(
        model=model,
        prompt=COUNTING,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"speculation": {"enabled": False}},
    )
    for chunk in response:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if stop.is_set():
            response.close()
            return


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("prompts")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="none", timeout=3600)
    model = client.models.list().data[0].id

    times = []
    stream(client, model, 120, times, threading.Event())
    solo = statistics.median(b - a for a, b in zip(times[10:], times[11:]))
    print(f"solo step: {solo * 1e3:.1f} ms (median of {len(times) - 11} gaps)")

    # About 3.5 characters a token for code and prose; the answer's usage says exactly.
    long_prompt = ""
    for text in texts(args.prompts):
        if len(long_prompt) >= 3.5 * args.prompt_tokens:
            break
        long_prompt += text + "\n\n"
    times, stop = [], threading.Event()
    reader = threading.Thread(target=stream, args=(client, model, 4000, times, stop))
    reader.start()
    while len(times) < 20:
        time.sleep(0.01)
    sent = time.perf_counter()
    # Opting out of the prefix cache makes every run compute the whole prompt, also a
    # second run against the same server.
    answer = client.completions.create(
        model=model,
        prompt=long_prompt,
        max_tokens=1,
        temperature=0,
        extra_body={"prefix_cache": False},
    )
    done = time.perf_counter()
    stop.set()
    reader.join()
    during = [t for t in times if sent <= t <= done]
    gaps = [b - a for a, b in zip(during, during[1:])]
    print(
        f"long prompt: {answer.usage.prompt_tokens} tokens, answered after "
        f"{done - sent:.1f} s; the stream gave {len(during)} tokens meanwhile"
    )
    if not gaps:
        print("no gaps under load to measure")
        return
    p50, p99, top = percentile(gaps, 0.5), percentile(gaps, 0.99), max(gaps)
    print(
        f"gaps under load: p50 {p50 * 1e3:.1f} ms ({p50 / solo:.2f}x solo), "
        f"p99 {p99 * 1e3:.1f} ms ({p99 / solo:.2f}x), max {top * 1e3:.1f} ms ({top / solo:.2f}x)"
    )


if __name__ == "__main__":
    main()
