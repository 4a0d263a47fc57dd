"""Drives a sibyl gateway's Messages API with the official `anthropic` package, as a user
of a coding agent or of the SDK would: a message whole and streamed, the assistant's
prefill, stop sequences, the token limit, counting tokens, a tool call and its result,
and refusals. The answers are checked against the chat completion of the same
conversation, which must be the same text.

Usage: python anthropic_client.py BASE_URL MODEL   (BASE_URL as for `openai`, ending /v1)
Exits non-zero with a message on the first failed check.
"""

import json
import sys
import urllib.request

import anthropic

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def chat(base_url: str, body: dict) -> dict:
    """The OpenAI chat completion of `body`, over plain HTTP."""
    request = urllib.request.Request(
        base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def text_of(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    root = base_url.removesuffix("/v1")
    client = anthropic.Anthropic(base_url=root, api_key="unused", max_retries=0)
    system = "You are a terse Python programmer."
    user = {"role": "user", "content": "Write a Python function that reverses a string."}
    # Current SDKs no longer list `temperature`: it goes as an extra field.
    greedy = {"temperature": 0}
    asked = dict(model=model, max_tokens=48, system=system, messages=[user], extra_body=greedy)

    # The model list reads as this API's.
    listed = [card.id for card in client.models.list()]
    assert listed == [model], listed

    whole = client.messages.create(**asked)
    text = text_of(whole)
    assert text, whole
    assert whole.type == "message" and whole.role == "assistant", whole
    assert whole.stop_reason in ("end_turn", "max_tokens"), whole
    assert whole.usage.output_tokens > 0, whole.usage
    prompt = whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    # The chat completion of the same conversation is the same text.
    same = chat(base_url, {
        "model": model, "max_tokens": 48, "temperature": 0,
        "messages": [{"role": "system", "content": system}, user],
    })
    assert same["choices"][0]["message"]["content"] == text, (same, text)
    assert same["usage"]["prompt_tokens"] == prompt, (same["usage"], whole.usage)
    counted = client.messages.count_tokens(model=model, system=system, messages=[user])
    assert counted.input_tokens == prompt, (counted, whole.usage)

    # Streamed: the same text, ending the same way; the SDK checks the events' order.
    with client.messages.stream(**asked) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text, (streamed, text)
    assert text_of(final) == text, final
    assert final.stop_reason == whole.stop_reason, final
    assert final.usage.output_tokens == whole.usage.output_tokens, final.usage
    streamed_prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert streamed_prompt == prompt, final.usage
    # The conversation was computed before: its prefix comes from the cache.
    assert final.usage.cache_read_input_tokens > 0, final.usage

    # The assistant's prefill: the answer goes on from it, as a continued chat message.
    start = "def reverse_string("
    prefilled = client.messages.create(
        **{**asked, "messages": [user, {"role": "assistant", "content": start}]}
    )
    continued = chat(base_url, {
        "model": model, "max_tokens": 48, "temperature": 0,
        "messages": [{"role": "system", "content": system}, user,
                     {"role": "assistant", "content": start}],
        "continue_final_message": True, "add_generation_prompt": False,
    })
    assert text_of(prefilled) == continued["choices"][0]["message"]["content"], (
        prefilled, continued)

    # A stop sequence from inside the text: the answer ends before it, and says which.
    cut = len(text) // 2
    stop = text[cut:cut + 4]
    if stop.strip():
        stopped = client.messages.create(**asked, stop_sequences=["@@never@@", stop])
        assert stopped.stop_reason == "stop_sequence", stopped
        assert stopped.stop_sequence == stop, stopped
        assert text_of(stopped) == text[: text.index(stop)], (stopped, text)

    short = client.messages.create(**{**asked, "max_tokens": 3})
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3, short

    # A call the model must make, whole and streamed, then its result.
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = dict(model=model, max_tokens=48, extra_body=greedy, messages=weather,
                  tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    called = client.messages.create(**forced)
    assert called.stop_reason == "tool_use", called
    uses = [block for block in called.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather", called
    assert isinstance(uses[0].input.get("city"), str), uses[0]
    with client.messages.stream(**forced) as stream:
        final = stream.get_final_message()
    streamed_uses = [(b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert streamed_uses == [(uses[0].name, uses[0].input)], (final, uses)
    assert final.stop_reason == "tool_use", final
    answer = client.messages.create(
        model=model, max_tokens=32, extra_body=greedy, tools=[WEATHER],
        messages=weather + [
            {"role": "assistant", "content": [b.model_dump() for b in called.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                          "content": json.dumps({"celsius": 21})}]},
        ],
    )
    assert answer.content and answer.usage.output_tokens > 0, answer

    # Structured output: the answer holds to the schema.
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"], "additionalProperties": False}
    shaped = client.messages.create(
        model=model, max_tokens=32, extra_body=greedy,
        messages=[{"role": "user", "content": "Name a fruit, as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    assert isinstance(json.loads(text_of(shaped))["name"], str), shaped

    # Shaped as coding agents send it, through the beta API (`?beta=true`, beta headers):
    # system blocks and tools with cache hints, thinking asked for, thinking cleared from
    # older turns, a user id; the text is the chat completion's all the same.
    with client.beta.messages.stream(
        model=model, max_tokens=48, extra_body=greedy, betas=["context-management-2025-06-27"],
        system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [
            {"type": "text", "text": user["content"], "cache_control": {"type": "ephemeral"}}]}],
        tools=[{**WEATHER, "cache_control": {"type": "ephemeral"}}], tool_choice={"type": "none"},
        thinking={"type": "adaptive"}, metadata={"user_id": "user-1"},
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    ) as stream:
        agent = "".join(stream.text_stream)
    assert agent == text, (agent, text)

    # Refusals have this API's error shape and name the field.
    try:
        client.messages.create(
            model=model, max_tokens=8,
            messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0KGgo="}}]}],
        )
    except anthropic.BadRequestError as error:
        assert error.body["type"] == "error", error.body
        assert error.body["error"]["type"] == "invalid_request_error", error.body
        assert "image" in error.body["error"]["message"], error.body
    else:
        raise AssertionError("an image block was not refused")
    try:
        client.messages.create(model="no-such-model", max_tokens=8, messages=[user])
    except anthropic.NotFoundError as error:
        assert error.body["error"]["type"] == "not_found_error", error.body
    else:
        raise AssertionError("an unknown model was not refused")
    print("ok")


if __name__ == "__main__":
    main()
