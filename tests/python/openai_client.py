"""Drives a sibyl gateway with the official `openai` package, as a user would.

Usage: python openai_client.py BASE_URL MODEL
Exits non-zero with a message on the first failed check.
"""

import json
import sys
import urllib.error
import urllib.request

import openai


def raw_post(url: str, body: bytes) -> tuple[int, dict]:
    """POSTs `body` as is; returns the status and the parsed JSON answer."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]

    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=64, temperature=0
    )
    text = whole.choices[0].message.content
    assert text, "empty completion"
    assert whole.usage.completion_tokens > 0, whole.usage
    details = whole.usage.completion_tokens_details
    assert details.accepted_prediction_tokens is not None, whole.usage
    assert details.rejected_prediction_tokens is not None, whole.usage
    # A predicted output is drafted from; the answer stays the model's.
    predicted = client.chat.completions.create(
        model=model, messages=messages, max_tokens=64, temperature=0,
        prediction={"type": "content", "content": text},
    )
    assert predicted.choices[0].message.content == text, predicted
    # SmolLM2 has no fill-in-the-middle tokens: `suffix` is refused by name.
    try:
        client.completions.create(model=model, prompt="def f(", suffix="):", max_tokens=4)
    except openai.BadRequestError as error:
        assert error.body.get("param") == "suffix", error.body
    else:
        raise AssertionError("a suffix was accepted by a model without FIM tokens")

    pieces = []
    finish = None
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(pieces)
    assert streamed == text, f"streamed {streamed!r} != whole {text!r}"
    assert finish == whole.choices[0].finish_reason, (finish, whole.choices[0].finish_reason)
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
    # The same prompt again: all of it but its last token comes from the prefix cache.
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached == whole.usage.prompt_tokens - 1, (usage, whole.usage)

    # The next turn starts from the first turn's prompt and answer; without the cache it
    # computes everything and says the same.
    turn = messages + [
        {"role": "assistant", "content": text},
        {"role": "user", "content": "Now make it a one-liner."},
    ]
    second = client.chat.completions.create(
        model=model, messages=turn, max_tokens=32, temperature=0
    )
    assert second.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens, (
        second.usage,
        whole.usage,
    )
    uncached = client.chat.completions.create(
        model=model,
        messages=turn,
        max_tokens=32,
        temperature=0,
        extra_body={"prefix_cache": False},
    )
    assert uncached.usage.prompt_tokens_details.cached_tokens == 0, uncached.usage
    assert uncached.choices[0].message.content == second.choices[0].message.content

    completion = client.completions.create(
        model=model, prompt="def add(a, b):", max_tokens=16, temperature=0
    )
    assert completion.choices[0].text, completion
    stop = client.completions.create(
        model=model, prompt="def add(a, b):", max_tokens=16, temperature=0, stop=["b"]
    )
    assert "b" not in stop.choices[0].text and completion.choices[0].text.startswith(
        stop.choices[0].text
    ), (stop.choices[0].text, completion.choices[0].text)
    # A batch of prompts: a choice per prompt, in order, each as the prompt alone gives.
    batch = client.completions.create(
        model=model, prompt=["def add(a, b):", "def sub(a, b):"], max_tokens=16, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1], batch
    assert batch.choices[0].text == completion.choices[0].text, batch
    # A prefilled answer the model goes on from (vLLM's fields).
    prefilled = client.chat.completions.create(
        model=model,
        messages=messages + [{"role": "assistant", "content": text[: len(text) // 2]}],
        max_tokens=8,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True},
    )
    assert prefilled.choices[0].message.content.startswith(text[: len(text) // 2]), prefilled

    off = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=64,
        temperature=0,
        extra_body={"speculation": {"enabled": False}},
    )
    assert off.choices[0].message.content == text, "speculation off changed the text"
    assert off.usage.completion_tokens_details.accepted_prediction_tokens == 0, off.usage

    # Log probabilities in the client's own types: one per token, the chosen token the
    # most likely one (greedy), streamed as in the whole response.
    scored = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content
    assert len(content) == scored.usage.completion_tokens, (len(content), scored.usage)
    assert b"".join(bytes(t.bytes) for t in content).decode() == scored.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob == token.logprob, token
    streamed_content = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, logprobs=True,
        top_logprobs=2, stream=True,
    ):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                streamed_content.extend(choice.logprobs.content)
    assert [t.model_dump() for t in streamed_content] == [t.model_dump() for t in content]
    legacy = client.completions.create(
        model=model, prompt="def add(a, b):", max_tokens=8, temperature=0, logprobs=1
    )
    assert "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text, legacy

    several = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=1, seed=5, n=2
    )
    assert [c.index for c in several.choices] == [0, 1], several

    # Penalties as the client sends them: the same text with and without speculation.
    penalised = [
        client.completions.create(
            model=model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
            frequency_penalty=1.0, presence_penalty=0.5, logit_bias={"11": -100},
            extra_body={"speculation": {"enabled": speculate}},
        ).choices[0].text
        for speculate in (True, False)
    ]
    assert penalised[0] == penalised[1], penalised

    # Structured output as the client sends it: the content parses and has the keys.
    structured = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name a colour as JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": {
            "type": "object", "properties": {"colour": {"type": "string", "maxLength": 16}},
            "required": ["colour"], "additionalProperties": False,
        }}},
    )
    assert list(json.loads(structured.choices[0].message.content)) == ["colour"], structured

    assert [m.id for m in client.models.list()] == [model]

    # The Responses API: the chat's answer, whole and streamed. The 64 tokens cut the
    # answer short: `incomplete`, and the stream ends with `response.incomplete` (where
    # the package's `responses.stream` helper, which waits for `response.completed`, has
    # no final response: OpenAI's own streams end so too).
    response = client.responses.create(
        model=model, input=messages, max_output_tokens=64, temperature=0
    )
    assert response.output_text == text, (response.output_text, text)
    assert response.usage.output_tokens == whole.usage.completion_tokens, response.usage
    assert response.status == ("incomplete" if finish == "length" else "completed"), response
    events = list(client.responses.create(
        model=model, input=messages, max_output_tokens=64, temperature=0, stream=True
    ))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response
    assert events[-1].type == f"response.{response.status}", events[-1].type
    assert "".join(deltas) == text == final.output_text, (deltas, final.output_text)
    with client.responses.stream(
        model=model, input=messages, max_output_tokens=256, temperature=0
    ) as stream:
        completed = stream.get_final_response()
    assert completed.status == "completed" and completed.output_text.startswith(text), completed
    scored_response = client.responses.create(
        model=model, input=messages, max_output_tokens=16, temperature=0,
        include=["message.output_text.logprobs"], top_logprobs=2,
    )
    response_logprobs = scored_response.output[0].content[0].logprobs
    assert [(t.token, t.logprob) for t in response_logprobs] == [
        (t.token, t.logprob) for t in content
    ], (response_logprobs, content)
    try:
        client.responses.create(model=model, input="Hi", previous_response_id=response.id)
    except openai.BadRequestError as error:
        assert error.body.get("param") == "previous_response_id", error.body
    else:
        raise AssertionError("previous_response_id was accepted")

    for kwargs, status in [
        ({"model": "no-such-model"}, 404),
        ({"max_tokens": 10**6}, 400),
        ({"temperature": 5}, 400),
        ({"messages": [{"role": "user", "content": "word " * 20000}]}, 400),
        ({"n": 9}, 400),
        ({"frequency_penalty": 3}, 400),
    ]:
        request = {"model": model, "messages": messages, "max_tokens": 8, **kwargs}
        try:
            client.chat.completions.create(**request)
        except openai.APIStatusError as error:
            assert error.status_code == status, (kwargs, error.status_code, error.message)
            assert error.body and error.body.get("message"), error.body
        else:
            raise AssertionError(f"{kwargs} was accepted")
    chat_url = base_url.rstrip("/") + "/chat/completions"
    for body, status in [
        (b"{not json", 400),
        (b'{"messages": "hello"}', 400),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', 400),
        (b" " * (5 * 1024 * 1024), 413),
    ]:
        code, answer = raw_post(chat_url, body)
        assert code == status, (body[:40], code, answer)
        assert answer["error"]["message"], answer
    code, answer = raw_post(base_url.rstrip("/") + "/no/such/route", b"{}")
    assert code == 404 and answer["error"]["message"], (code, answer)
    print("ok")


if __name__ == "__main__":
    main()
