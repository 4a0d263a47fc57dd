//! Tool calling through the OpenAI API, on a model whose chat template takes tools
//! (Qwen2.5-Coder-0.5B): the tools reach the prompt as the template writes them, calls
//! come back as `tool_calls`, a call can be required, and a conversation with calls and
//! their results is rendered for the next turn.

use serde_json::{json, Value};
use sibyl_tests::{assert_bad_param, post, sse_data, Cluster, ClusterOptions};

const MODEL: &str = "qwen2.5-coder-0.5b";

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city"]}}},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": {"type": "object",
                "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
    ])
}

fn chat(question: &str, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 64,
        "temperature": 0,
        "tools": weather_tools(),
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// The calls of a whole chat response: name and parsed arguments of each.
fn calls(message: &Value) -> Vec<(String, Value)> {
    message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|call| {
            assert_eq!(call["type"], "function", "{call}");
            assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
            let arguments = call["function"]["arguments"].as_str().unwrap();
            (
                call["function"]["name"].as_str().unwrap().to_string(),
                serde_json::from_str(arguments).unwrap(),
            )
        })
        .collect()
}

/// The calls a stream's chunks add up to, as a client library assembles them (by
/// `index`, arguments concatenated), its text, and its last finish reason.
fn streamed(body: &str) -> (Vec<(String, Value)>, String, String) {
    let mut names: Vec<String> = Vec::new();
    let mut arguments: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut finish = String::new();
    for chunk in sse_data(body) {
        let choice = &chunk["choices"][0];
        if let Some(content) = choice["delta"]["content"].as_str() {
            text.push_str(content);
        }
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = call["index"].as_u64().unwrap() as usize;
            if index == names.len() {
                names.push(String::new());
                arguments.push(String::new());
            }
            names[index].push_str(call["function"]["name"].as_str().unwrap_or(""));
            arguments[index].push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    let calls = names
        .into_iter()
        .zip(arguments)
        .map(|(name, arguments)| (name, serde_json::from_str(&arguments).unwrap()))
        .collect();
    (calls, text, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_offered_called_required_and_their_results_rendered() {
    let cluster = Cluster::start(ClusterOptions {
        model: MODEL,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let question = "What is the weather like in Paris right now?";

    // Required: the answer is calls, each of a defined function with arguments that
    // match its schema; speculation does not change them; streamed, the same calls.
    let required = |speculate: bool, stream: bool| {
        chat(
            question,
            json!({"tool_choice": "required", "speculation": {"enabled": speculate},
                "stream": stream}),
        )
    };
    let response = post(
        &cluster,
        "/v1/chat/completions",
        &[],
        &required(true, false),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert_eq!(choice["message"]["content"], Value::Null, "{body}");
    let made = calls(&choice["message"]);
    assert!(!made.is_empty(), "{body}");
    for (name, arguments) in &made {
        match name.as_str() {
            "get_weather" => {
                assert!(arguments["city"].is_string(), "{arguments}");
                if let Some(unit) = arguments.get("unit") {
                    assert!(unit == "celsius" || unit == "fahrenheit", "{arguments}");
                }
            }
            "get_time" => assert!(arguments["zone"].is_string(), "{arguments}"),
            other => panic!("a call of `{other}`, which is not defined: {body}"),
        }
    }
    let plain = post(
        &cluster,
        "/v1/chat/completions",
        &[],
        &required(false, false),
    )
    .await;
    assert_eq!(calls(&plain.json()["choices"][0]["message"]), made);
    let stream = post(&cluster, "/v1/chat/completions", &[], &required(true, true)).await;
    assert_eq!(stream.status, 200, "{}", stream.body);
    let (streamed_calls, text, finish) = streamed(&stream.body);
    assert_eq!(streamed_calls, made);
    assert_eq!((text.as_str(), finish.as_str()), ("", "tool_calls"));

    // A named function, one call at most: exactly that call.
    let named = chat(
        question,
        json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "parallel_tool_calls": false}),
    );
    let response = post(&cluster, "/v1/chat/completions", &[], &named).await;
    let body = response.json();
    let made_named = calls(&body["choices"][0]["message"]);
    assert_eq!(made_named.len(), 1, "{body}");
    assert_eq!(made_named[0].0, "get_time");
    assert!(made_named[0].1["zone"].is_string(), "{body}");

    // A tool whose parameters refer to their own definitions, as pydantic writes nested
    // models: required, its call still matches them.
    let booking = json!([{"type": "function", "function": {"name": "book_flight",
        "parameters": {"type": "object",
            "$defs": {"Airport": {"type": "object",
                "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 3}},
                "required": ["code"]}},
            "properties": {"origin": {"$ref": "#/$defs/Airport"},
                "destination": {"$ref": "#/$defs/Airport"}},
            "required": ["origin", "destination"]}}}]);
    let body = json!({"messages": [{"role": "user", "content": "Book me a flight from Paris to Oslo."}],
        "tools": booking, "tool_choice": "required", "max_tokens": 64, "temperature": 0});
    let response = post(&cluster, "/v1/chat/completions", &[], &body).await;
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    let booked = calls(&body["choices"][0]["message"]);
    assert_eq!(booked[0].0, "book_flight", "{body}");
    for end in ["origin", "destination"] {
        let code = booked[0].1[end]["code"].as_str().unwrap_or_default();
        assert_eq!(code.chars().count(), 3, "{body}");
    }

    // Auto: what the model answers, read the same way whole and streamed.
    let auto = |stream: bool| chat(question, json!({"stream": stream}));
    let whole = post(&cluster, "/v1/chat/completions", &[], &auto(false)).await;
    let whole = whole.json();
    let stream = post(&cluster, "/v1/chat/completions", &[], &auto(true)).await;
    let (streamed_calls, text, finish) = streamed(&stream.body);
    let message = &whole["choices"][0]["message"];
    assert_eq!(streamed_calls, calls(message), "{whole}");
    assert_eq!(text, message["content"].as_str().unwrap_or(""), "{whole}");
    assert_eq!(
        finish,
        whole["choices"][0]["finish_reason"].as_str().unwrap()
    );

    // The tools reach the prompt (as the template writes them: Python's separators, the
    // client's key order), and with `tool_choice: "none"` they do not.
    let tokens = |body: Value| {
        let cluster = &cluster;
        async move {
            let response = post(cluster, "/tokenize", &[], &body).await;
            assert_eq!(response.status, 200, "{}", response.body);
            let ids = response.json()["tokens"].clone();
            let text = post(cluster, "/detokenize", &[], &json!({"tokens": ids})).await;
            text.json()["prompt"].as_str().unwrap().to_string()
        }
    };
    let messages = json!([{"role": "user", "content": question}]);
    let prompt = tokens(json!({"messages": messages, "tools": weather_tools()})).await;
    assert!(
        prompt
            .contains(r#"{"type": "function", "function": {"name": "get_weather", "description""#),
        "{prompt}"
    );
    let none = chat(question, json!({"tool_choice": "none", "max_tokens": 1}));
    let none = post(&cluster, "/v1/chat/completions", &[], &none)
        .await
        .json();
    let without = tokens(json!({"messages": messages})).await;
    let without_count = post(&cluster, "/tokenize", &[], &json!({"messages": messages}))
        .await
        .json()["count"]
        .clone();
    assert!(!without.contains("get_weather"));
    assert_eq!(none["usage"]["prompt_tokens"], without_count, "{none}");
    assert!(
        none["choices"][0]["message"].get("tool_calls").is_none(),
        "{none}"
    );

    // The next turn: the assistant's call and the tool's result, rendered by the template
    // (arguments as JSON, not as a string), and answered.
    let conversation = json!([
        {"role": "user", "content": question},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}
    ]);
    let prompt = tokens(json!({"messages": conversation, "tools": weather_tools()})).await;
    assert!(
        prompt.contains(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        ),
        "{prompt}"
    );
    assert!(
        prompt.contains(
            "<tool_response>\n{\"temperature\": 21, \"sky\": \"clear\"}\n</tool_response>"
        ),
        "{prompt}"
    );
    let answer = json!({"messages": conversation, "tools": weather_tools(), "max_tokens": 24,
        "temperature": 0});
    let answer = post(&cluster, "/v1/chat/completions", &[], &answer).await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    // Bad input, refused by field: arguments that are not JSON, a call of an undefined
    // function, a required call and a response format at once, tools on completions.
    let mut broken = conversation.clone();
    broken[1]["tool_calls"][0]["function"]["arguments"] = json!("{city: Paris");
    let refused = [
        (
            "messages",
            "/v1/chat/completions",
            json!({"messages": broken}),
        ),
        (
            "tool_choice",
            "/v1/chat/completions",
            chat(
                question,
                json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}),
            ),
        ),
        (
            "tool_choice",
            "/v1/chat/completions",
            chat(
                question,
                json!({"tool_choice": "required",
                "response_format": {"type": "json_object"}}),
            ),
        ),
        (
            "tools",
            "/v1/completions",
            json!({"prompt": "hi", "tools": weather_tools()}),
        ),
    ];
    for (param, path, body) in refused {
        assert_bad_param(&cluster, path, &body, param).await;
    }
    cluster.stop().await;
}
