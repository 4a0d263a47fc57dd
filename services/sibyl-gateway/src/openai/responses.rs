//! OpenAI's Responses API (`POST /v1/responses`), answered statelessly, as vLLM answers it
//! without a store: the whole conversation comes in `input` each time (messages, function
//! calls and their outputs, earlier thinking), and nothing is kept (`previous_response_id`
//! is refused, `store` is false in every answer). Underneath, a response is a chat
//! completion of the same conversation: the same template, tools, grammar, sampling and
//! output; with a reasoning parser, the thinking is a `reasoning` item before the message.
//! A stream is the API's typed events, from `response.created` to `response.completed`
//! (or `response.incomplete`, `response.failed`).

use super::request::{ChatRequest, PassedOn};
use super::response::{AnswerText, ChoiceLogprobs, Meta};
use super::tools::Call;
use super::unsupported::{neutral, refuse_first};
use super::{new_id, next_output, parse, sse, start_chat, Body, Key, Merged};
use crate::generation::{Gateway, GatewayError, Output, Summary};
use crate::params::{FinishReason, Logprobs};
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A Responses API request: what sibyl reads of it.
#[derive(Debug, Deserialize)]
pub(super) struct ResponsesRequest {
    /// A string (a user's message) or a list of items.
    input: Value,
    /// A system message before the input.
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    /// The model, `temperature`, `top_p`; extensions, as on the chat endpoint (`top_k`,
    /// `seed`, `speculation`, `prefix_cache`).
    #[serde(flatten)]
    passed: PassedOn,
    #[serde(default)]
    stream: bool,
    /// Function tools, as this API defines them (`name` beside `type`).
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
    text: Option<TextOptions>,
    /// `["message.output_text.logprobs"]` asks for the output's log probabilities.
    include: Option<Value>,
    /// How many alternatives at each token, with the log probabilities (0 to 20).
    top_logprobs: Option<Value>,
    /// Repeated in the answer, as the API does.
    metadata: Option<Map<String, Value>>,
    user: Option<String>,
    #[serde(flatten)]
    refused: Refused,
}

#[derive(Debug, Deserialize)]
struct TextOptions {
    format: Option<Value>,
}

/// Fields of this API that a stateless server of text models cannot honour: each is
/// refused with a 400 naming it unless it is absent or neutral.
#[derive(Debug, Default, Deserialize)]
struct Refused {
    previous_response_id: Option<Value>,
    conversation: Option<Value>,
    background: Option<Value>,
    reasoning: Option<Value>,
    truncation: Option<Value>,
    prompt: Option<Value>,
    max_tool_calls: Option<Value>,
}

impl Refused {
    fn check(&self) -> Result<(), GatewayError> {
        let absent = |v: &Option<Value>| neutral(v, &[]);
        // `reasoning: {"effort": null}` asks for nothing.
        let empty = |v: &Option<Value>| match v {
            Some(Value::Object(fields)) => fields.values().all(Value::is_null),
            other => absent(other),
        };
        let checks: [(&'static str, bool, &str); 7] = [
            (
                "previous_response_id",
                absent(&self.previous_response_id),
                "sibyl keeps no responses: send the whole conversation in `input`",
            ),
            (
                "conversation",
                absent(&self.conversation),
                "sibyl keeps no conversations: send the whole conversation in `input`",
            ),
            (
                "background",
                neutral(&self.background, &[json!(false)]),
                "background responses are not supported (sibyl keeps no responses)",
            ),
            (
                "reasoning",
                empty(&self.reasoning),
                "`reasoning` settings are not supported",
            ),
            (
                "truncation",
                neutral(&self.truncation, &[json!("disabled")]),
                "only `truncation: \"disabled\"` is supported: a conversation over the \
                 context window is refused, not cut",
            ),
            (
                "prompt",
                absent(&self.prompt),
                "stored prompt templates are not supported",
            ),
            (
                "max_tool_calls",
                absent(&self.max_tool_calls),
                "`max_tool_calls` is not supported (`parallel_tool_calls: false` allows one)",
            ),
        ];
        refuse_first(checks)
    }
}

/// What `include` may ask for.
const LOGPROBS: &str = "message.output_text.logprobs";

fn bad(param: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid_param(param, message)
}

/// The text of a message's `content`: a string, or a list of text parts.
fn content_text(content: &Value, what: &str) -> Result<String, GatewayError> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(bad(
                            "input",
                            format!(
                                "{what}: content part `{kind}` is not supported (text parts \
                                 only: sibyl serves text models)"
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(bad(
            "input",
            format!("{what}: `content` is a string or a list of text parts"),
        )),
    }
}

/// The chat messages of `instructions` and `input`: messages as they are, function calls
/// as the calls of an assistant message (consecutive ones, and those right after an
/// assistant's message, in one), their outputs as tool messages.
fn chat_messages(instructions: Option<String>, input: Value) -> Result<Vec<Value>, GatewayError> {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(instructions) = instructions {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    let items = match input {
        Value::String(text) => vec![json!({"role": "user", "content": text})],
        Value::Array(items) if !items.is_empty() => items,
        _ => {
            return Err(bad(
                "input",
                "`input` is a string or a non-empty list of items",
            ))
        }
    };
    for (i, item) in items.into_iter().enumerate() {
        let what = format!("`input[{i}]`");
        let field = |name: &str| {
            item.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| bad("input", format!("{what} needs `{name}` as a string")))
        };
        let kind = match item.get("type").and_then(Value::as_str) {
            Some(kind) => kind,
            None if item.get("role").is_some() => "message",
            None => return Err(bad("input", format!("{what} has no `type`"))),
        };
        match kind {
            "message" => {
                let role = field("role")?;
                let content = content_text(item.get("content").unwrap_or(&Value::Null), &what)?;
                match messages.last_mut() {
                    // The answer after its thinking is one message with it.
                    Some(last)
                        if role == "assistant"
                            && last["role"] == "assistant"
                            && last["content"] == ""
                            && last.get("tool_calls").is_none() =>
                    {
                        last["content"] = json!(content);
                    }
                    _ => messages.push(json!({"role": role, "content": content})),
                }
            }
            "reasoning" => {
                // The model's earlier thinking, kept with the message or calls after it for
                // templates that write it back (Qwen3's).
                let parts = item
                    .get("content")
                    .filter(|c| c.as_array().is_some_and(|a| !a.is_empty()))
                    .or_else(|| item.get("summary"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let mut text = String::new();
                for part in &parts {
                    match part.get("text").and_then(Value::as_str) {
                        Some(piece) => text.push_str(piece),
                        None => {
                            return Err(bad(
                                "input",
                                format!("{what}: a reasoning item's parts are text"),
                            ))
                        }
                    }
                }
                messages
                    .push(json!({"role": "assistant", "content": "", "reasoning_content": text}));
            }
            "function_call" => {
                let call = json!({
                    "id": field("call_id")?,
                    "type": "function",
                    "function": {"name": field("name")?, "arguments": field("arguments")?},
                });
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" => match &mut last["tool_calls"] {
                        Value::Array(calls) => calls.push(call),
                        slot => *slot = json!([call]),
                    },
                    _ => messages.push(json!({"role": "assistant", "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let output = content_text(item.get("output").unwrap_or(&Value::Null), &what)?;
                messages.push(json!({
                    "role": "tool", "tool_call_id": field("call_id")?, "content": output,
                }));
            }
            other => {
                return Err(bad(
                    "input",
                    format!(
                        "{what}: items of type `{other}` are not supported (messages, \
                         `reasoning`, `function_call` and `function_call_output` are)"
                    ),
                ))
            }
        }
    }
    Ok(messages)
}

/// A function tool of this API as the chat endpoint's `tools` hold it.
fn chat_tool(i: usize, tool: &Value) -> Result<Value, GatewayError> {
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {
            let mut function = Map::new();
            for key in ["name", "description", "parameters", "strict"] {
                if let Some(value) = tool.get(key) {
                    function.insert(key.into(), value.clone());
                }
            }
            Ok(json!({"type": "function", "function": function}))
        }
        kind => Err(bad(
            "tools",
            format!(
                "`tools[{i}]` of type `{}`: only function tools are supported (sibyl runs no \
                 built-in tools)",
                kind.unwrap_or("none")
            ),
        )),
    }
}

/// `tool_choice` as the chat endpoint spells it.
fn chat_tool_choice(choice: Value) -> Result<Value, GatewayError> {
    match &choice {
        Value::Null | Value::String(_) => Ok(choice),
        Value::Object(fields) if fields.get("type") == Some(&json!("function")) => {
            match fields.get("name") {
                Some(name @ Value::String(_)) => {
                    Ok(json!({"type": "function", "function": {"name": name}}))
                }
                _ => Err(bad("tool_choice", "a function's `tool_choice` names it: `name`")),
            }
        }
        _ => Err(bad(
            "tool_choice",
            "`tool_choice` is `none`, `auto`, `required` or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

/// `text.format` as the chat endpoint's `response_format`.
fn response_format(format: &Value) -> Result<Value, GatewayError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") | Some("json_object") => Ok(json!({"type": format["type"]})),
        Some("json_schema") => match format.get("schema") {
            Some(schema @ (Value::Object(_) | Value::Bool(_))) => Ok(json!({
                "type": "json_schema",
                "json_schema": {"name": format.get("name"), "schema": schema},
            })),
            _ => Err(bad(
                "text",
                "`text.format.schema` must be a JSON Schema object",
            )),
        },
        _ => Err(bad(
            "text",
            "`text.format.type` must be `text`, `json_object` or `json_schema`",
        )),
    }
}

/// `value` as JSON with the digits the client wrote (0.7, not the f64 nearest the f32 0.7).
fn decimal(value: f32) -> Value {
    value
        .to_string()
        .parse::<f64>()
        .map_or_else(|_| json!(value), |v| json!(v))
}

impl ResponsesRequest {
    /// What every body of the answer repeats of the request, with the API's defaults.
    /// (`defaults`: the server's sampling for requests that set none.)
    fn settings(&self, defaults: &crate::SamplingDefaults) -> Map<String, Value> {
        let mut settings = Map::new();
        let mut set = |key: &str, value: Value| {
            settings.insert(key.into(), value);
        };
        set("instructions", json!(self.instructions));
        set("max_output_tokens", json!(self.max_output_tokens));
        set("metadata", json!(self.metadata.clone().unwrap_or_default()));
        set(
            "parallel_tool_calls",
            json!(self.parallel_tool_calls.unwrap_or(true)),
        );
        set("previous_response_id", Value::Null);
        set("reasoning", Value::Null);
        set("store", json!(false));
        let temperature = self.passed.temperature.or(defaults.temperature);
        set("temperature", decimal(temperature.unwrap_or(1.0)));
        set(
            "top_p",
            decimal(self.passed.top_p.or(defaults.top_p).unwrap_or(1.0)),
        );
        let format = self.text.as_ref().and_then(|t| t.format.clone());
        set(
            "text",
            json!({"format": format.unwrap_or_else(|| json!({"type": "text"}))}),
        );
        set(
            "tool_choice",
            self.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        );
        set("tools", json!(self.tools.clone().unwrap_or_default()));
        set("truncation", json!("disabled"));
        set("user", json!(self.user));
        settings
    }

    /// Whether the output's log probabilities are asked for: `include` holds
    /// `message.output_text.logprobs` (the one addition offered), or `top_logprobs` is
    /// above 0.
    fn logprobs(&self) -> Result<bool, GatewayError> {
        let included = match &self.include {
            None | Some(Value::Null) => false,
            Some(Value::Array(items)) => {
                if let Some(other) = items.iter().find(|i| *i != LOGPROBS) {
                    return Err(bad(
                        "include",
                        format!(
                            "`include` offers only `{LOGPROBS}` (there are no reasoning, search \
                             or image outputs), not {other}"
                        ),
                    ));
                }
                !items.is_empty()
            }
            Some(_) => return Err(bad("include", "`include` is a list of strings")),
        };
        let alternatives = self
            .top_logprobs
            .as_ref()
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 0);
        Ok(included || alternatives)
    }

    /// The chat completion request this one is.
    fn into_chat(self) -> Result<ChatRequest, GatewayError> {
        self.refused.check()?;
        if self.max_output_tokens.is_some_and(|n| n < 1) {
            return Err(bad(
                "max_output_tokens",
                "`max_output_tokens` must be at least 1",
            ));
        }
        let logprobs = self.logprobs()?;
        let mut chat = Map::new();
        chat.insert(
            "messages".into(),
            json!(chat_messages(self.instructions, self.input)?),
        );
        chat.insert("stream".into(), json!(self.stream));
        self.passed.set(&mut chat);
        let mut set = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                chat.insert(key.into(), value);
            }
        };
        set("max_tokens", self.max_output_tokens.map(Value::from));
        let tools = match self.tools {
            Some(tools) => Some(Value::Array(
                tools
                    .iter()
                    .enumerate()
                    .map(|(i, tool)| chat_tool(i, tool))
                    .collect::<Result<_, _>>()?,
            )),
            None => None,
        };
        set("tools", tools);
        set(
            "tool_choice",
            self.tool_choice.map(chat_tool_choice).transpose()?,
        );
        set(
            "parallel_tool_calls",
            self.parallel_tool_calls.map(Value::from),
        );
        if logprobs {
            set("logprobs", Some(json!(true)));
        }
        set("top_logprobs", self.top_logprobs);
        let format = self.text.and_then(|t| t.format).filter(|f| !f.is_null());
        set(
            "response_format",
            format.as_ref().map(response_format).transpose()?,
        );
        serde_json::from_value(Value::Object(chat))
            .map_err(|e| GatewayError::InvalidRequest(format!("invalid request: {e}")))
    }
}

/// Errors of the chat completion underneath, naming this API's fields.
fn renamed(error: GatewayError) -> GatewayError {
    match error {
        GatewayError::InvalidParam { param, message } => {
            let ours = match param {
                "messages" => "input",
                "max_tokens" => "max_output_tokens",
                "response_format" => "text",
                other => other,
            };
            GatewayError::InvalidParam {
                param: ours,
                message: message.replace(&format!("`{param}`"), &format!("`{ours}`")),
            }
        }
        other => other,
    }
}

/// `POST /v1/responses`.
pub(super) async fn responses(
    State(gateway): State<Arc<Gateway>>,
    key: Key,
    body: Body,
) -> Result<Response, GatewayError> {
    let request: ResponsesRequest = parse(body)?;
    let settings = request.settings(&gateway.sampling_defaults());
    let stream = request.stream;
    let started = async { start_chat(&gateway, "resp_", request.into_chat()?, key).await }
        .await
        .map_err(renamed)?;
    let answer = Answer {
        meta: started.meta,
        settings,
    };
    if stream {
        return Ok(sse(&gateway, stream_events(answer, started.outputs)));
    }
    whole(answer, started.outputs).await
}

/// What the bodies of one answer share: the chat completion's (its id, time, model, how
/// calls are read, whether log probabilities were asked for) and the request's settings.
struct Answer {
    meta: Meta,
    settings: Map<String, Value>,
}

/// A message's text, with its tokens' log probabilities (an empty list where they were
/// not asked for).
fn text_part(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

/// A message item: in progress while it has no text part; then `completed`, or
/// `incomplete` when the token limit cut it short (`cut`).
fn message_item(id: &str, part: Option<Value>, cut: bool) -> Value {
    let (status, content) = match part {
        Some(part) if cut => ("incomplete", vec![part]),
        Some(part) => ("completed", vec![part]),
        None => ("in_progress", Vec::new()),
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

/// A reasoning model's thinking (with `--reasoning-parser`), as the API's reasoning item.
fn reasoning_item(id: &str, text: &str) -> Value {
    json!({
        "type": "reasoning", "id": id, "summary": [], "status": "completed",
        "content": [{"type": "reasoning_text", "text": text}],
    })
}

fn call_item(id: &str, call: &Call, done: bool) -> Value {
    json!({
        "type": "function_call", "id": id, "call_id": call.id, "name": call.name,
        "arguments": if done { call.arguments.as_str() } else { "" },
        "status": if done { "completed" } else { "in_progress" },
    })
}

impl Answer {
    /// The response: `in_progress` without a summary, else as the generation ended (or
    /// `failed` with `error`), holding `output`.
    fn body(&self, summary: Option<&Summary>, output: &[Value], error: Option<&str>) -> Value {
        let length = summary.is_some_and(|s| s.finish_reason == FinishReason::Length);
        let status = match (error, summary) {
            (Some(_), _) => "failed",
            (None, None) => "in_progress",
            (None, Some(_)) if length => "incomplete",
            (None, Some(_)) => "completed",
        };
        let usage = summary.map(|s| {
            json!({
                "input_tokens": s.prompt_tokens,
                "input_tokens_details": {"cached_tokens": s.cached_tokens},
                "output_tokens": s.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": s.prompt_tokens.saturating_add(s.completion_tokens),
            })
        });
        let mut body = json!({
            "id": self.meta.id,
            "object": "response",
            "created_at": self.meta.created,
            "status": status,
            "error": error.map(|message| json!({"code": "server_error", "message": message})),
            "incomplete_details": length.then(|| json!({"reason": "max_output_tokens"})),
            "model": self.meta.model,
            "output": output,
            "usage": usage,
        });
        if let Value::Object(fields) = &mut body {
            fields.extend(self.settings.clone());
        }
        body
    }

    /// The log probabilities of `tokens` in this API's shape (the chat endpoint's): none
    /// where they were not asked for.
    fn logprobs(&self, tokens: &[Logprobs]) -> Vec<Value> {
        match self.meta.logprobs(tokens, 0).0 {
            // Through their text: a value made of them directly would widen each f32 to
            // an f64 written with more digits than the chat endpoint writes.
            Some(ChoiceLogprobs::Chat { content }) => serde_json::to_string(&content)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The output items of an answer: its message (when it has text, or makes no call),
    /// then its calls; with their item ids.
    fn items(
        &self,
        text: String,
        logprobs: &[Logprobs],
        message_id: &str,
        cut: bool,
    ) -> Vec<Value> {
        let mut items = Vec::new();
        // With a reasoning parser, the thinking is an item of its own, first.
        let text = match self.meta.reasoning {
            Some(parser) => {
                let split = parser.split(&text);
                if !split.reasoning.is_empty() {
                    items.push(reasoning_item(&new_id("rs_"), &split.reasoning));
                }
                split.content
            }
            None => text,
        };
        let (text, calls) = match &self.meta.calls {
            Some(reader) => {
                let answer = reader.read(&text);
                (answer.text, answer.calls)
            }
            None => (text, Vec::new()),
        };
        if !text.is_empty() || calls.is_empty() {
            let part = text_part(&text, &self.logprobs(logprobs));
            items.push(message_item(message_id, Some(part), cut));
        }
        items.extend(
            calls
                .iter()
                .map(|call| call_item(&new_id("fc_"), call, true)),
        );
        items
    }
}

/// The whole response, once the generation ends.
async fn whole(answer: Answer, mut outputs: Merged) -> Result<Response, GatewayError> {
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some((_, output)) = outputs.recv().await {
        match output? {
            Output::Text {
                text: more,
                logprobs: tokens,
                ..
            } => {
                text.push_str(&more);
                logprobs.extend(tokens);
            }
            Output::Done(summary) => {
                let cut = summary.finish_reason == FinishReason::Length;
                let items = answer.items(text, &logprobs, &new_id("msg_"), cut);
                return Ok(Json(answer.body(Some(&summary), &items, None)).into_response());
            }
        }
    }
    Err(GatewayError::Internal(
        "the generation ended without a summary".into(),
    ))
}

/// A stream's events, each numbered in order (`sequence_number`) and named by its type.
struct Events {
    sender: mpsc::Sender<Result<Event, Infallible>>,
    sequence: u64,
}

/// The client went away.
struct Gone;

impl Events {
    async fn send(&mut self, kind: &str, mut body: Value) -> Result<(), Gone> {
        if let Value::Object(fields) = &mut body {
            fields.insert("type".into(), json!(kind));
            fields.insert("sequence_number".into(), json!(self.sequence));
        }
        self.sequence += 1;
        let event = Event::default().event(kind).data(body.to_string());
        self.sender.send(Ok(event)).await.map_err(|_| Gone)
    }
}

/// Which kind of output item text streams into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Streamed {
    Message,
    /// A reasoning model's thinking (with `--reasoning-parser`).
    Reasoning,
}

/// Where a streamed answer's message (or thinking) stands: its id, its index among the
/// output items once opened, and its text so far.
struct StreamedItem {
    kind: Streamed,
    id: String,
    index: Option<usize>,
    text: String,
    /// The log probabilities of its tokens so far (a message's, where they were asked for).
    logprobs: Vec<Value>,
}

impl StreamedItem {
    fn new(kind: Streamed) -> Self {
        let prefix = match kind {
            Streamed::Message => "msg_",
            Streamed::Reasoning => "rs_",
        };
        Self {
            kind,
            id: new_id(prefix),
            index: None,
            text: String::new(),
            logprobs: Vec::new(),
        }
    }

    /// Its content part with `text`.
    fn part(&self, text: &str, logprobs: &[Value]) -> Value {
        match self.kind {
            Streamed::Message => text_part(text, logprobs),
            Streamed::Reasoning => json!({"type": "reasoning_text", "text": text}),
        }
    }

    /// The event of a piece of its text, and of the whole.
    fn text_event(&self, done: bool) -> &'static str {
        match (self.kind, done) {
            (Streamed::Message, false) => "response.output_text.delta",
            (Streamed::Message, true) => "response.output_text.done",
            (Streamed::Reasoning, false) => "response.reasoning_text.delta",
            (Streamed::Reasoning, true) => "response.reasoning_text.done",
        }
    }

    /// Sends `delta` of the item's text with its tokens' `logprobs`, opening the item
    /// first.
    async fn send(
        &mut self,
        events: &mut Events,
        output: &[Value],
        delta: &str,
        logprobs: Vec<Value>,
    ) -> Result<(), Gone> {
        let index = match self.index {
            Some(index) => index,
            None => {
                let index = output.len();
                self.index = Some(index);
                let item = match self.kind {
                    Streamed::Message => message_item(&self.id, None, false),
                    Streamed::Reasoning => json!({
                        "type": "reasoning", "id": self.id, "summary": [],
                        "status": "in_progress", "content": [],
                    }),
                };
                events
                    .send(
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                    )
                    .await?;
                let part = json!({
                    "item_id": self.id, "output_index": index, "content_index": 0,
                    "part": self.part("", &[]),
                });
                events.send("response.content_part.added", part).await?;
                index
            }
        };
        if delta.is_empty() {
            return Ok(());
        }
        self.text.push_str(delta);
        let mut event = json!({
            "item_id": self.id, "output_index": index, "content_index": 0, "delta": delta,
        });
        if self.kind == Streamed::Message {
            self.logprobs.extend(logprobs.iter().cloned());
            event["logprobs"] = json!(logprobs);
        }
        events.send(self.text_event(false), event).await
    }

    /// Closes the item, when it was opened, adding it to `output` (`cut`: a message the
    /// token limit cut short).
    async fn close(
        self,
        events: &mut Events,
        output: &mut Vec<Value>,
        cut: bool,
    ) -> Result<(), Gone> {
        let Some(index) = self.index else {
            return Ok(());
        };
        let place = json!({"item_id": self.id, "output_index": index, "content_index": 0});
        let mut done = place.clone();
        done["text"] = json!(self.text);
        if self.kind == Streamed::Message {
            done["logprobs"] = json!(self.logprobs);
        }
        events.send(self.text_event(true), done).await?;
        let mut part = place;
        part["part"] = self.part(&self.text, &self.logprobs);
        events
            .send("response.content_part.done", part.clone())
            .await?;
        let item = match self.kind {
            Streamed::Message => message_item(&self.id, Some(part["part"].take()), cut),
            Streamed::Reasoning => reasoning_item(&self.id, &self.text),
        };
        output.push(item.clone());
        events
            .send(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            )
            .await
    }
}

/// Sends one call as its output item, its arguments in one delta.
async fn send_call(events: &mut Events, output: &mut Vec<Value>, call: &Call) -> Result<(), Gone> {
    let id = new_id("fc_");
    let index = output.len();
    events
        .send(
            "response.output_item.added",
            json!({"output_index": index, "item": call_item(&id, call, false)}),
        )
        .await?;
    let place = json!({"item_id": id, "output_index": index});
    let mut delta = place.clone();
    delta["delta"] = json!(call.arguments);
    events
        .send("response.function_call_arguments.delta", delta)
        .await?;
    let mut done = place;
    done["name"] = json!(call.name);
    done["arguments"] = json!(call.arguments);
    events
        .send("response.function_call_arguments.done", done)
        .await?;
    let item = call_item(&id, call, true);
    output.push(item.clone());
    events
        .send(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        )
        .await
}

/// A streaming request's events, from a task that relays the generation's text as it
/// comes (held back while it may be a call, where tools are offered); a client that goes
/// away ends the generation.
fn stream_events(answer: Answer, mut outputs: Merged) -> mpsc::Receiver<Result<Event, Infallible>> {
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut events = Events {
            sender,
            sequence: 0,
        };
        let _ = relay(&answer, &mut outputs, &mut events).await;
    });
    receiver
}

async fn relay(answer: &Answer, outputs: &mut Merged, events: &mut Events) -> Result<(), Gone> {
    let opening = json!({"response": answer.body(None, &[], None)});
    events.send("response.created", opening.clone()).await?;
    events.send("response.in_progress", opening).await?;
    let mut output: Vec<Value> = Vec::new();
    let mut message = StreamedItem::new(Streamed::Message);
    // The answer's text as it can go out, and the log probabilities of tokens whose text
    // has not gone out.
    let mut text = AnswerText::new(&answer.meta);
    let mut tokens: Vec<Logprobs> = Vec::new();
    // With a reasoning parser: the thinking, streamed as an item of its own before the
    // message (`None` once it is over).
    let mut thinking = answer
        .meta
        .reasoning
        .map(|_| StreamedItem::new(Streamed::Reasoning));
    loop {
        // A client that goes away ends the generation now, not at the next output.
        let Some(output_or_error) = next_output(&events.sender, outputs).await else {
            return Err(Gone);
        };
        match output_or_error {
            Ok(Output::Text {
                text: piece,
                logprobs,
                ..
            }) => {
                let split = text.push(&piece);
                tokens.extend(logprobs);
                if let Some(reasoning) = thinking.as_mut().filter(|_| !split.reasoning.is_empty()) {
                    reasoning
                        .send(events, &output, &split.reasoning, Vec::new())
                        .await?;
                }
                if !split.content.is_empty() {
                    // Content comes once the thinking is over: its item closes first.
                    if let Some(reasoning) = thinking.take() {
                        reasoning.close(events, &mut output, false).await?;
                    }
                    let logprobs = answer.logprobs(&std::mem::take(&mut tokens));
                    message
                        .send(events, &output, &split.content, logprobs)
                        .await?;
                }
            }
            Ok(Output::Done(summary)) => {
                let (rest, calls) = text.finish();
                if let Some(mut reasoning) = thinking.take() {
                    if !rest.reasoning.is_empty() {
                        reasoning
                            .send(events, &output, &rest.reasoning, Vec::new())
                            .await?;
                    }
                    reasoning.close(events, &mut output, false).await?;
                }
                if !rest.content.is_empty() {
                    let logprobs = answer.logprobs(&std::mem::take(&mut tokens));
                    message
                        .send(events, &output, &rest.content, logprobs)
                        .await?;
                }
                // An answer that makes no call has a message, if an empty one.
                if calls.is_empty() {
                    message.send(events, &output, "", Vec::new()).await?;
                }
                // The message holds the log probabilities of every token, as a whole
                // response's does (those of the calls' tokens too).
                message.logprobs.extend(answer.logprobs(&tokens));
                let cut = summary.finish_reason == FinishReason::Length;
                message.close(events, &mut output, cut).await?;
                for call in &calls {
                    send_call(events, &mut output, call).await?;
                }
                let body = answer.body(Some(&summary), &output, None);
                let kind = match body["status"].as_str() {
                    Some("incomplete") => "response.incomplete",
                    _ => "response.completed",
                };
                return events.send(kind, json!({"response": body})).await;
            }
            Err(error) => {
                let body = answer.body(None, &output, Some(&error.to_string()));
                return events
                    .send("response.failed", json!({"response": body}))
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::sse::Sse;
    use tokio_stream::wrappers::ReceiverStream;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).unwrap()
    }

    fn chat(body: Value) -> Result<Value, GatewayError> {
        let request = request(body);
        request.refused.check()?;
        let messages = chat_messages(request.instructions, request.input)?;
        Ok(json!(messages))
    }

    fn param(result: Result<impl std::fmt::Debug, GatewayError>) -> &'static str {
        match result {
            Err(GatewayError::InvalidParam { param, .. }) => param,
            other => panic!("not refused by name: {other:?}"),
        }
    }

    #[test]
    fn input_becomes_the_chat_messages() {
        assert_eq!(
            chat(json!({"input": "Hi", "instructions": "Be brief."})).unwrap(),
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ])
        );
        let items = json!({"input": [
            {"role": "developer", "content": "Rules."},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Weather in "},
                         {"type": "input_text", "text": "Paris?"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Looking."}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather",
             "arguments": "{\"city\": \"Paris\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "noon"}]},
            {"type": "function_call", "call_id": "call_3", "name": "time", "arguments": "{}"},
            {"type": "reasoning", "id": "rs_1", "summary": [],
             "content": [{"type": "reasoning_text", "text": "Say it."}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Noon, snow."}]},
            {"type": "reasoning", "id": "rs_2",
             "summary": [{"type": "summary_text", "text": "Check again."}]},
            {"type": "function_call", "call_id": "call_4", "name": "time", "arguments": "{}"},
        ]});
        let weather = json!({"id": "call_1", "type": "function",
                             "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}});
        let time = |id: &str| json!({"id": id, "type": "function", "function": {"name": "time", "arguments": "{}"}});
        assert_eq!(
            chat(items).unwrap(),
            json!([
                {"role": "developer", "content": "Rules."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Looking.",
                 "tool_calls": [weather, time("call_2")]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
                {"role": "assistant", "tool_calls": [time("call_3")]},
                {"role": "assistant", "content": "Noon, snow.", "reasoning_content": "Say it."},
                {"role": "assistant", "content": "", "reasoning_content": "Check again.",
                 "tool_calls": [time("call_4")]},
            ])
        );
    }

    #[test]
    fn what_a_text_server_cannot_do_is_refused_by_name() {
        let image = json!({"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/a.png"}]}]});
        assert_eq!(param(chat(image)), "input");
        let search = json!({"input": [{"type": "web_search_call", "id": "ws_1"}]});
        assert_eq!(param(chat(search)), "input");
        let no_call_id = json!({"input": [{"type": "function_call_output", "output": "1"}]});
        assert_eq!(param(chat(no_call_id)), "input");
        assert_eq!(param(chat(json!({"input": []}))), "input");
        assert_eq!(param(chat(json!({"input": 5}))), "input");
        for (field, value) in [
            ("previous_response_id", json!("resp_1")),
            ("background", json!(true)),
            ("reasoning", json!({"effort": "high"})),
            ("truncation", json!("auto")),
        ] {
            let mut body = json!({"input": "Hi"});
            body[field] = value;
            assert_eq!(param(chat(body)), field);
        }
        // Neutral values pass.
        let neutral = json!({"input": "Hi", "previous_response_id": null, "include": [],
                             "reasoning": {"effort": null}, "truncation": "disabled",
                             "background": false, "store": true});
        assert!(chat(neutral).is_ok());
        let include = |value: Value| request(json!({"input": "Hi", "include": value})).logprobs();
        assert!(include(json!(["message.output_text.logprobs"])).unwrap());
        assert!(!include(json!([])).unwrap());
        assert_eq!(
            param(include(json!(["reasoning.encrypted_content"]))),
            "include"
        );
        assert_eq!(
            param(include(json!("message.output_text.logprobs"))),
            "include"
        );
        let top = request(json!({"input": "Hi", "top_logprobs": 2}));
        assert!(top.logprobs().unwrap());
        let search = json!({"input": "Hi", "tools": [{"type": "web_search"}]});
        assert_eq!(param(request(search).into_chat()), "tools");
        let zero = json!({"input": "Hi", "max_output_tokens": 0});
        assert_eq!(param(request(zero).into_chat()), "max_output_tokens");
        let format = json!({"input": "Hi", "text": {"format": {"type": "json_schema"}}});
        assert_eq!(param(request(format).into_chat()), "text");
        let underneath = GatewayError::invalid_param("max_tokens", "`max_tokens` is 9");
        let ours = renamed(underneath);
        assert_eq!(ours.to_string(), "`max_output_tokens` is 9");
        assert_eq!(param(Err::<(), _>(ours)), "max_output_tokens");
    }

    /// The answer to `pieces` of text: its items whole, the items of the stream's last
    /// event, and the stream's events.
    async fn answered(
        reasoning: Option<crate::ReasoningParser>,
        pieces: &[&str],
    ) -> (Value, Value, Vec<Value>) {
        let answer = || Answer {
            meta: Meta {
                id: "resp_1".into(),
                created: 1,
                model: "m".into(),
                kind: super::super::Kind::Chat,
                include_usage: false,
                logprobs: false,
                per_prompt: 1,
                echo: None,
                calls: None,
                reasoning,
            },
            settings: Map::new(),
        };
        let outputs = || {
            let (sender, outputs) = mpsc::channel(16);
            for piece in pieces {
                let text = Output::Text {
                    text: piece.to_string(),
                    tokens: 1,
                    logprobs: Vec::new(),
                };
                sender.try_send((0, Ok(text))).unwrap();
            }
            let done = Output::Done(Box::new(Summary {
                finish_reason: FinishReason::Stop,
                ..Summary::default()
            }));
            sender.try_send((0, Ok(done))).unwrap();
            outputs
        };
        let body = |response: Response| async move {
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        let whole: Value =
            serde_json::from_str(&body(whole(answer(), outputs()).await.unwrap()).await).unwrap();
        let events = ReceiverStream::new(stream_events(answer(), outputs()));
        let streamed = body(Sse::new(events).into_response()).await;
        let events: Vec<Value> = streamed
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        let last = events.last().unwrap()["response"]["output"].clone();
        (whole["output"].clone(), last, events)
    }

    /// An item's kind and text.
    fn texts(items: &Value) -> Vec<(String, String)> {
        items
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                let text = item["content"][0]["text"].as_str().unwrap_or_default();
                (item["type"].as_str().unwrap().to_string(), text.to_string())
            })
            .collect()
    }

    #[tokio::test]
    async fn thinking_is_a_reasoning_item_before_the_message_whole_and_streamed() {
        let parser = Some(crate::ReasoningParser::Qwen3);
        let pieces = ["<thi", "nk>\nRed is ", "warm.</th", "ink>\n\nRed", "."];
        let (whole, streamed, events) = answered(parser, &pieces).await;
        let expected = vec![
            ("reasoning".to_string(), "\nRed is warm.".to_string()),
            ("message".to_string(), "\n\nRed.".to_string()),
        ];
        assert_eq!(texts(&whole), expected);
        assert_eq!(texts(&streamed), expected);
        // The thinking streams as it comes, and its item closes before the message opens.
        let deltas = |kind: &str| -> Vec<String> {
            events
                .iter()
                .filter(|e| e["type"] == kind)
                .map(|e| e["delta"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            deltas("response.reasoning_text.delta"),
            ["\nRed is ", "warm."]
        );
        assert_eq!(deltas("response.output_text.delta").concat(), "\n\nRed.");
        let at = |kind: &str| events.iter().position(|e| e["type"] == kind).unwrap();
        assert!(at("response.reasoning_text.done") < at("response.output_text.delta"));
        // Thinking never closed is thinking; no thinking, no reasoning item; no parser, all
        // text.
        let (cut, cut_streamed, _) = answered(parser, &["<think>Hm"]).await;
        assert_eq!(
            texts(&cut),
            vec![
                ("reasoning".into(), "Hm".into()),
                ("message".into(), "".into())
            ]
        );
        assert_eq!(texts(&cut_streamed), texts(&cut));
        let (plain, _, _) = answered(parser, &["Red."]).await;
        assert_eq!(texts(&plain), vec![("message".into(), "Red.".into())]);
        let (raw, raw_streamed, _) = answered(None, &pieces).await;
        let all = pieces.concat();
        assert_eq!(texts(&raw), vec![("message".into(), all.clone())]);
        assert_eq!(texts(&raw_streamed), vec![("message".into(), all)]);
    }

    #[test]
    fn tools_and_formats_take_the_chat_endpoints_shapes() {
        assert_eq!(
            chat_tool(
                0,
                &json!({"type": "function", "name": "f", "parameters": {"type": "object"},
                                 "strict": true})
            )
            .unwrap(),
            json!({"type": "function",
                   "function": {"name": "f", "parameters": {"type": "object"}, "strict": true}})
        );
        assert_eq!(
            chat_tool_choice(json!({"type": "function", "name": "f"})).unwrap(),
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(
            chat_tool_choice(json!("required")).unwrap(),
            json!("required")
        );
        let request = request(json!({"input": "Hi", "temperature": 0.7}));
        let settings = request.settings(&crate::SamplingDefaults::default());
        assert_eq!(settings["temperature"].to_string(), "0.7");
        assert_eq!(settings["top_p"], json!(1.0));
        assert_eq!(
            response_format(&json!({"type": "json_schema", "name": "p", "strict": true,
                                    "schema": {"type": "object"}}))
            .unwrap(),
            json!({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}})
        );
        assert_eq!(
            response_format(&json!({"type": "json_object"})).unwrap(),
            json!({"type": "json_object"})
        );
    }
}
