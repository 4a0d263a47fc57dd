"""A decoding stream's inter-token gaps while another request's long prompt is processed.

Usage: python long_prompt_gap.py BASE_URL PROMPTS.jsonl [--prompt-tokens 4000]

BASE_URL is a sibyl gateway's OpenAI API (http://127.0.0.1:8080/v1). PROMPTS.jsonl is any
JSONL file whose lines have a "prompt" (or "turns") field; the long prompt is their texts
joined until it is about --prompt-tokens tokens long. Needs the `openai` package.

1. A plain (speculation off) completion that counts upwards streams. After 10 deltas,
   the median gap between the next 60 is the solo step time before.
2. Then the long prompt is sent with max_tokens 1, opting out of the prefix cache. The
   stream's gaps from that moment until the long prompt's answer came are the gaps under
   load.
3. The stream stops; a new one streams 70 deltas, and the median gap between its last 60
   is the solo step time after. Prints the gaps' p50, p99 and max against the solo step
   before and after: measured a few minutes apart at most, so that a machine whose speed
   drifts shows it as a difference between the two.
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

    # About 3.5 characters a token for code and prose; the answer's usage says exactly.
    long_prompt = ""
    for text in texts(args.prompts):
        if len(long_prompt) >= 3.5 * args.prompt_tokens:
            break
        long_prompt += text + "\n\n"
    times, stop = [], threading.Event()
    reader = threading.Thread(target=stream, args=(client, model, 4096, times, stop))
    reader.start()
    wait_for(times, 70)
    before = median_gap(times[10:70])
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
    solo = []
    stream(client, model, 70, solo, threading.Event())
    after = median_gap(solo[10:70])
    gaps = [b - a for a, b in zip(during, during[1:])]
    print(
        f"solo step: {before * 1e3:.1f} ms before, {after * 1e3:.1f} ms after "
        "(medians of 59 gaps each)"
    )
    print(
        f"long prompt: {answer.usage.prompt_tokens} tokens, answered after "
        f"{done - sent:.1f} s; the stream gave {len(during)} tokens meanwhile"
    )
    if not gaps:
        print("no gaps under load to measure")
        return
    for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        gap = percentile(gaps, q)
        print(
            f"gaps under load, {name}: {gap * 1e3:.1f} ms, {gap / before:.2f}x the solo step "
            f"before, {gap / after:.2f}x after"
        )


def wait_for(times, count):
    """Waits until the stream has given `count` deltas."""
    while len(times) < count:
        time.sleep(0.01)


def median_gap(times):
    return statistics.median(b - a for a, b in zip(times, times[1:]))


if __name__ == "__main__":
    main()
