"""The solo step of long_prompt_gap.py, three times: a plain (speculation off) completion
that counts upwards streams 120 tokens; prints the median and mean gap after the 10th delta.

Usage: python solo_step.py BASE_URL   (a sibyl gateway's OpenAI API; needs `openai`)
"""

import statistics
import sys
import threading
import time

import openai

from long_prompt_gap import stream

client = openai.OpenAI(base_url=sys.argv[1], api_key="none", timeout=600)
model = client.models.list().data[0].id
# The gateway answers before the verifier has loaded its model: wait for a first answer.
for _ in range(300):
    try:
        client.completions.create(model=model, prompt="1", max_tokens=1)
        break
    except openai.InternalServerError:
        time.sleep(1)
for _ in range(3):
    times = []
    stream(client, model, 120, times, threading.Event())
    gaps = [b - a for a, b in zip(times[10:], times[11:])]
    print(
        f"solo median {statistics.median(gaps) * 1e3:.1f} ms "
        f"mean {statistics.mean(gaps) * 1e3:.1f} n={len(times)}"
    )
