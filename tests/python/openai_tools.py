"""Tool calling through the official `openai` package, as a user would write it: a
required call, the same call streamed (the package's stream helper assembles it), and
the next turn with the call's result.

Usage: python openai_tools.py BASE_URL MODEL
Exits non-zero with a message on the first failed check.
"""

import json
import sys

import openai

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    asked = dict(model=model, messages=messages, tools=TOOLS, max_tokens=48, temperature=0)

    whole = client.chat.completions.create(tool_choice="required", **asked)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and calls[0].type == "function", choice.message
    assert calls[0].function.name == "get_weather", calls
    arguments = json.loads(calls[0].function.arguments)
    assert isinstance(arguments.get("city"), str), arguments

    with client.chat.completions.stream(tool_choice="required", **asked) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ], (streamed, calls)
    assert final.choices[0].finish_reason == "tool_calls", final

    # The next turn: the call as the package returned it, and its result.
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append(
        {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"celsius": 21})}
    )
    answer = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, max_tokens=24, temperature=0
    )
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls, answer

    # The same through the Responses API: its function tools, the call as an output item,
    # and the next turn with the call and its output as input items.
    function = TOOLS[0]["function"]
    tools = [{"type": "function", "name": function["name"], "description": function["description"],
              "parameters": function["parameters"]}]
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    response = client.responses.create(
        model=model, input=question, tools=tools, tool_choice="required",
        max_output_tokens=48, temperature=0,
    )
    made = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in made] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ], (response.output, calls)
    with client.responses.stream(
        model=model, input=question, tools=tools, tool_choice="required",
        max_output_tokens=48, temperature=0,
    ) as events:
        for _ in events:
            pass
        final = events.get_final_response()
    streamed = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in made]
    following = question + [item.model_dump(exclude_none=True) for item in made] + [
        {"type": "function_call_output", "call_id": made[0].call_id,
         "output": json.dumps({"celsius": 21})}
    ]
    after = client.responses.create(
        model=model, input=following, tools=tools, max_output_tokens=24, temperature=0
    )
    assert after.output, after
    # The next turn is the chat completion of the same conversation.
    assert after.output_text == (answer.choices[0].message.content or ""), (
        after.output_text, answer.choices[0].message.content)
    print("tool calls: ok", calls[0].function.name, arguments)

    # A code model fills in the middle between `prompt` and `suffix`.
    filled = client.completions.create(
        model=model, prompt="def is_even(n):\n    ", suffix="\n    return result\n",
        max_tokens=32, temperature=0,
    )
    choice = filled.choices[0]
    assert choice.text.startswith("result ="), choice
    print("fill in the middle: ok", repr(choice.text))


if __name__ == "__main__":
    main()
