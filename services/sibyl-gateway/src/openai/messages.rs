//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as
//! llama.cpp's and vLLM's servers answer it, so that clients written for it (the
//! `anthropic` SDKs, coding agents pointed at a local server) run against sibyl.
//! Underneath, a message is a chat completion of the same conversation: `system` is the
//! system message, `tool_use` and `tool_result` blocks are calls and tool messages, a
//! `thinking` block is the earlier thinking templates write back, and a conversation
//! ending with the assistant's words is continued from them (Anthropic's prefill). Errors
//! have this API's shape (`{"type": "error", "error": {"type", "message"}}`); a stream is
//! its events, from `message_start` to `message_stop`.

use super::request::{ChatRequest, PassedOn};
use super::response::{AnswerText, Meta};
use super::tools::Call;
use super::unsupported::{neutral, refuse_first};
use super::{chat_prompt, new_id, next_output, parse, sse, start_chat, Body, Key, Merged};
use crate::generation::{Gateway, GatewayError, Output, Summary};
use crate::params::FinishReason;
use crate::reasoning::Split;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A Messages API request: what sibyl reads of it (the fields of `count_tokens` too).
#[derive(Debug, Deserialize)]
pub(super) struct MessagesRequest {
    /// Required by `/v1/messages`, as the API requires it.
    max_tokens: Option<i64>,
    messages: Vec<Value>,
    /// A string or a list of text blocks.
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    /// The model; `temperature`, `top_p` and `top_k`, which the API had and its current
    /// SDKs no longer list (their `extra_body` sends them: without them a message is
    /// sampled at temperature 1); extensions, as on the chat endpoint (`seed`,
    /// `speculation`, `prefix_cache`).
    #[serde(flatten)]
    passed: PassedOn,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    /// `{"type": "enabled" | "adaptive" | "between_tools" | "disabled", "display": ...}`.
    thinking: Option<Value>,
    /// `{"format": {"type": "json_schema", "schema": ...}, "effort": ...}`.
    output_config: Option<Value>,
    /// `{"edits": [{"type": "clear_thinking_20251015", "keep": ...}]}`.
    context_management: Option<Value>,
    // Accepted, as they ask nothing sibyl does otherwise: `metadata` and the account's
    // `user_profile_id` and `workspace_id`; `cache_control` (the prefix cache is always
    // on); `diagnostics` (no cache-miss reasons are reported).
    #[serde(flatten)]
    refused: Refused,
}

/// Fields of this API that sibyl cannot honour: each is refused with a 400 naming it unless
/// it is absent or neutral.
#[derive(Debug, Default, Deserialize)]
struct Refused {
    service_tier: Option<Value>,
    container: Option<Value>,
    mcp_servers: Option<Value>,
    speed: Option<Value>,
    inference_geo: Option<Value>,
    /// The beta API's server-side compaction and model fallbacks.
    compaction: Option<Value>,
    fallbacks: Option<Value>,
}

impl Refused {
    fn check(&self) -> Result<(), GatewayError> {
        let checks: [(&'static str, bool, &str); 7] = [
            (
                "service_tier",
                neutral(&self.service_tier, &[json!("auto"), json!("standard_only")]),
                "sibyl has one service tier: `auto` or `standard_only`",
            ),
            (
                "container",
                neutral(&self.container, &[]),
                "code execution containers are not supported (sibyl runs no tools)",
            ),
            (
                "mcp_servers",
                neutral(&self.mcp_servers, &[json!([])]),
                "MCP servers are not supported (sibyl runs no tools)",
            ),
            (
                "speed",
                neutral(&self.speed, &[json!("standard")]),
                "sibyl has one speed, `standard` (speculation is always as fast as it can be)",
            ),
            (
                "inference_geo",
                neutral(&self.inference_geo, &[]),
                "sibyl runs where it is deployed: `inference_geo` cannot be chosen",
            ),
            (
                "compaction",
                neutral(&self.compaction, &[]),
                "server-side compaction is not supported: send the conversation as it is to \
                 be read",
            ),
            (
                "fallbacks",
                neutral(&self.fallbacks, &[json!([])]),
                "sibyl serves one model: there is nothing to fall back to",
            ),
        ];
        refuse_first(checks)
    }
}

fn bad(param: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid_param(param, message)
}

/// The text of `system` or of a `tool_result`'s `content`: a string, or text blocks (one
/// per line). In a tool's result (`placeholders`), a block a text model cannot read (an
/// image the tool opened) stands as a line saying so, for the model to read: refusing it
/// would refuse every later turn of the conversation that holds it.
fn text_blocks(
    value: &Value,
    param: &'static str,
    what: &str,
    placeholders: bool,
) -> Result<String, GatewayError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for block in blocks {
                match (block.get("type").and_then(Value::as_str), block.get("text")) {
                    (Some("text"), Some(Value::String(text))) => texts.push(text.clone()),
                    (Some(kind @ ("image" | "document")), _) if placeholders => {
                        texts.push(format!("[{kind} omitted: this model reads text only]"))
                    }
                    (kind, _) => {
                        return Err(bad(
                            param,
                            format!(
                                "{what}: blocks of type `{}` are not supported (text blocks \
                                 only: sibyl serves text models)",
                                kind.unwrap_or("none")
                            ),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(bad(
            param,
            format!("{what} is a string or a list of text blocks"),
        )),
    }
}

/// The chat messages of `system` and `messages`: a user's `tool_result` blocks become tool
/// messages (before the user's text), an assistant's `tool_use` blocks its calls and its
/// `thinking` blocks its earlier thinking.
fn chat_messages(system: Option<&Value>, messages: &[Value]) -> Result<Vec<Value>, GatewayError> {
    let mut chat = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system.filter(|s| !s.is_null()) {
        let text = text_blocks(system, "system", "`system`", false)?;
        chat.push(json!({"role": "system", "content": text}));
    }
    if messages.is_empty() {
        return Err(bad("messages", "`messages` must not be empty"));
    }
    for (i, message) in messages.iter().enumerate() {
        let what = format!("`messages[{i}]`");
        let role = match message.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant")) => role,
            role => {
                return Err(bad(
                    "messages",
                    format!(
                        "{what}: `role` is `user` or `assistant`, not {} (the system prompt \
                         goes in `system`)",
                        role.map_or_else(|| "missing".to_string(), |r| format!("`{r}`"))
                    ),
                ))
            }
        };
        let blocks = match message.get("content") {
            Some(Value::String(text)) => vec![json!({"type": "text", "text": text})],
            Some(Value::Array(blocks)) => blocks.clone(),
            _ => {
                return Err(bad(
                    "messages",
                    format!("{what}: `content` is a string or a list of content blocks"),
                ))
            }
        };
        let mut texts = Vec::new();
        let mut calls = Vec::new();
        let mut results = Vec::new();
        let mut thinking = String::new();
        for (j, block) in blocks.iter().enumerate() {
            let at = format!("{what}.content[{j}]");
            let kind = block.get("type").and_then(Value::as_str).unwrap_or("none");
            let string = |name: &str| {
                block
                    .get(name)
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("messages", format!("{at} needs `{name}` as a string")))
            };
            match (role, kind) {
                (_, "text") => texts.push(string("text")?.to_string()),
                ("user", "tool_result") => {
                    let content = block.get("content").unwrap_or(&Value::Null);
                    let mut text = text_blocks(content, "messages", &at, true)?;
                    // The API tells the model a call failed by this flag; a chat's tool
                    // message by its text.
                    if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                        text.insert_str(0, "Error: ");
                    }
                    results.push(json!({
                        "role": "tool",
                        "tool_call_id": string("tool_use_id")?,
                        "content": text,
                    }));
                }
                ("assistant", "tool_use") => {
                    // An object, as the API has it; any JSON value a model's call held.
                    let input = match block.get("input") {
                        Some(input) => input.to_string(),
                        None => {
                            return Err(bad(
                                "messages",
                                format!("{at}: a `tool_use` block needs its `input`"),
                            ))
                        }
                    };
                    calls.push(json!({
                        "id": string("id")?,
                        "type": "function",
                        "function": {"name": string("name")?, "arguments": input},
                    }));
                }
                ("assistant", "thinking") => thinking.push_str(string("thinking")?),
                // Encrypted thinking from another server: nothing a template could write.
                ("assistant", "redacted_thinking") => {}
                (role, kind) => {
                    return Err(bad(
                        "messages",
                        format!(
                            "{at}: blocks of type `{kind}` are not supported in {role} messages \
                             (sibyl serves text models and runs no tools)"
                        ),
                    ))
                }
            }
        }
        let text = texts.join("\n");
        match role {
            "user" => {
                chat.extend(results);
                if !text.is_empty() || chat.last().is_none_or(|m| m["role"] != "tool") {
                    chat.push(json!({"role": "user", "content": text}));
                }
            }
            _ => {
                let mut message = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    message["tool_calls"] = json!(calls);
                }
                if !thinking.is_empty() {
                    message["reasoning_content"] = json!(thinking);
                }
                chat.push(message);
            }
        }
    }
    Ok(chat)
}

/// A tool of this API as the chat endpoint's `tools` hold it.
fn chat_tool(i: usize, tool: &Value) -> Result<Value, GatewayError> {
    match tool.get("type").and_then(Value::as_str) {
        None | Some("custom") => {
            let name = tool
                .get("name")
                .filter(|n| n.is_string())
                .ok_or_else(|| bad("tools", format!("`tools[{i}]` needs a `name`")))?;
            let mut function = Map::new();
            function.insert("name".into(), name.clone());
            for key in ["description", "strict"] {
                if let Some(value) = tool.get(key) {
                    function.insert(key.into(), value.clone());
                }
            }
            let schema = tool
                .get("input_schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            function.insert("parameters".into(), schema);
            Ok(json!({"type": "function", "function": function}))
        }
        Some(kind) => Err(bad(
            "tools",
            format!(
                "`tools[{i}]` of type `{kind}`: Anthropic's server tools are not supported \
                 (sibyl runs no tools; define it as a custom tool)"
            ),
        )),
    }
}

/// `tool_choice` as the chat endpoint spells it, and whether it allows one call only.
fn chat_tool_choice(choice: &Value) -> Result<(Value, bool), GatewayError> {
    let one = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chat = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match choice.get("name") {
            Some(name @ Value::String(_)) => {
                json!({"type": "function", "function": {"name": name}})
            }
            _ => {
                return Err(bad(
                    "tool_choice",
                    "`tool_choice` of type `tool` names it: `name`",
                ))
            }
        },
        _ => {
            return Err(bad(
                "tool_choice",
                "`tool_choice.type` is `auto`, `any`, `tool` or `none`",
            ))
        }
    };
    Ok((chat, one))
}

/// `output_config` as the chat endpoint's `response_format` (none where it sets no format).
/// Its `effort` is accepted and does nothing: how long a local model thinks is its own.
fn output_format(config: &Value) -> Result<Option<Value>, GatewayError> {
    let Value::Object(fields) = config else {
        return Err(bad("output_config", "`output_config` is an object"));
    };
    if let Some((key, _)) = fields
        .iter()
        .find(|(key, value)| !matches!(key.as_str(), "format" | "effort") && !value.is_null())
    {
        return Err(bad(
            "output_config",
            format!("`output_config.{key}` is not supported (`format` and `effort` are)"),
        ));
    }
    match fields.get("format").filter(|f| !f.is_null()) {
        None => Ok(None),
        Some(format) => match (
            format.get("type").and_then(Value::as_str),
            format.get("schema"),
        ) {
            (Some("json_schema"), Some(schema @ (Value::Object(_) | Value::Bool(_)))) => {
                Ok(Some(json!({
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": schema},
                })))
            }
            _ => Err(bad(
                "output_config",
                "`output_config.format` is {\"type\": \"json_schema\", \"schema\": {...}}",
            )),
        },
    }
}

/// How many of the last assistant turns keep their thinking under `context_management`
/// (`None`: all): its `clear_thinking_20251015` edit is honoured; the others (clearing tool
/// results past a token count) are refused.
fn thinking_turns_kept(management: &Value) -> Result<Option<usize>, GatewayError> {
    let refuse = |message: String| Err(bad("context_management", message));
    let edits = match management.get("edits") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(edits)) => edits,
        Some(_) => return refuse("`context_management.edits` is a list".into()),
    };
    let mut kept = None;
    for edit in edits {
        match edit.get("type").and_then(Value::as_str) {
            Some("clear_thinking_20251015") => match edit.get("keep") {
                Some(keep) if keep == "all" => {}
                None => kept = Some(1),
                Some(keep) => match (keep.get("type"), keep.get("value").and_then(Value::as_u64)) {
                    (Some(kind), Some(turns)) if kind == "thinking_turns" => {
                        kept = Some(usize::try_from(turns).unwrap_or(usize::MAX));
                    }
                    _ => {
                        return refuse(
                            "`clear_thinking_20251015` keeps `all` or {\"type\": \
                             \"thinking_turns\", \"value\": N}"
                                .into(),
                        )
                    }
                },
            },
            kind => {
                return refuse(format!(
                    "the `{}` edit is not supported (`clear_thinking_20251015` is): send the \
                     conversation as it is to be read",
                    kind.unwrap_or("none")
                ))
            }
        }
    }
    Ok(kept)
}

/// Drops the thinking of every assistant turn but the last `kept` that have some.
fn clear_thinking(messages: &mut [Value], kept: usize) {
    let turns = messages
        .iter_mut()
        .rev()
        .filter(|m| m["role"] == "assistant" && m.get("reasoning_content").is_some())
        .skip(kept);
    for turn in turns {
        if let Value::Object(fields) = turn {
            fields.remove("reasoning_content");
        }
    }
}

impl MessagesRequest {
    /// Whether thinking is shown (`display` other than `omitted`). Thinking comes back in
    /// `thinking` blocks where the gateway has a reasoning parser; a model that does not
    /// think answers in text, as one that thinks nothing would.
    fn thinking_shown(&self) -> Result<bool, GatewayError> {
        let Some(thinking) = self.thinking.as_ref().filter(|t| !t.is_null()) else {
            return Ok(true);
        };
        match thinking.get("type").and_then(Value::as_str) {
            Some("disabled") => Ok(true),
            Some("enabled" | "adaptive" | "between_tools") => {
                match thinking.get("display").and_then(Value::as_str) {
                    None | Some("summarized") => Ok(true),
                    Some("omitted") => Ok(false),
                    Some(other) => Err(bad(
                        "thinking",
                        format!("`thinking.display` is `summarized` or `omitted`, not `{other}`"),
                    )),
                }
            }
            _ => Err(bad(
                "thinking",
                "`thinking.type` is `enabled`, `adaptive`, `between_tools` or `disabled`",
            )),
        }
    }

    /// The chat completion request this one is.
    fn into_chat(self) -> Result<ChatRequest, GatewayError> {
        self.refused.check()?;
        self.thinking_shown()?;
        let format = match self.output_config.as_ref().filter(|c| !c.is_null()) {
            Some(config) => output_format(config)?,
            None => None,
        };
        let kept = match self.context_management.as_ref().filter(|c| !c.is_null()) {
            Some(management) => thinking_turns_kept(management)?,
            None => None,
        };
        let mut messages = chat_messages(self.system.as_ref(), &self.messages)?;
        if let Some(kept) = kept {
            clear_thinking(&mut messages, kept);
        }
        // A conversation that ends with the assistant's words goes on from them.
        let prefilled = messages
            .last()
            .is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_none());
        let mut chat = Map::new();
        chat.insert("messages".into(), json!(messages));
        chat.insert("stream".into(), json!(self.stream));
        if prefilled {
            chat.insert("continue_final_message".into(), json!(true));
            chat.insert("add_generation_prompt".into(), json!(false));
        }
        // Thinking switched on or off as templates that can switch it read it (Qwen3's);
        // other templates ignore the variable.
        let switch = match self.thinking.as_ref().and_then(|t| t.get("type")) {
            Some(kind) if kind == "enabled" => Some(true),
            Some(kind) if kind == "disabled" => Some(false),
            _ => None,
        };
        if let Some(on) = switch {
            chat.insert(
                "chat_template_kwargs".into(),
                json!({"enable_thinking": on}),
            );
        }
        self.passed.set(&mut chat);
        if let Some(max_tokens) = self.max_tokens {
            chat.insert("max_tokens".into(), json!(max_tokens));
        }
        if let Some(stop) = self.stop_sequences {
            chat.insert("stop".into(), json!(stop));
        }
        if let Some(format) = format {
            chat.insert("response_format".into(), format);
        }
        if let Some(tools) = &self.tools {
            let tools: Vec<Value> = (tools.iter().enumerate())
                .map(|(i, tool)| chat_tool(i, tool))
                .collect::<Result<_, _>>()?;
            chat.insert("tools".into(), json!(tools));
        }
        if let Some(choice) = self.tool_choice.filter(|c| !c.is_null()) {
            let (choice, one) = chat_tool_choice(&choice)?;
            chat.insert("tool_choice".into(), choice);
            if one {
                chat.insert("parallel_tool_calls".into(), json!(false));
            }
        }
        serde_json::from_value(Value::Object(chat))
            .map_err(|e| GatewayError::InvalidRequest(format!("invalid request: {e}")))
    }
}

/// Errors of the chat completion underneath, naming this API's fields.
fn renamed(error: GatewayError) -> GatewayError {
    match error {
        GatewayError::InvalidParam {
            param: "stop",
            message,
        } => GatewayError::InvalidParam {
            param: "stop_sequences",
            message: message.replace("`stop`", "`stop_sequences`"),
        },
        GatewayError::InvalidRequest(message) => {
            GatewayError::InvalidRequest(message.replace("`stop`", "`stop_sequences`"))
        }
        other => other,
    }
}

/// This API's error type for an HTTP status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// This API's error body.
pub(super) fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// `error` as this API answers one: the gateway's status and headers (`Retry-After`), this
/// API's body.
fn error_response(error: GatewayError) -> Response {
    let message = error.to_string();
    let (parts, _) = error.into_response().into_parts();
    let body = error_body(error_type(parts.status), &message);
    let mut response = (parts.status, Json(body)).into_response();
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// `POST /v1/messages`.
pub(super) async fn messages(
    State(gateway): State<Arc<Gateway>>,
    key: Key,
    body: Body,
) -> Response {
    answer(gateway, key, body)
        .await
        .unwrap_or_else(error_response)
}

async fn answer(gateway: Arc<Gateway>, key: Key, body: Body) -> Result<Response, GatewayError> {
    let request: MessagesRequest = parse(body)?;
    if request.max_tokens.is_none() {
        return Err(bad("max_tokens", "`max_tokens` is required"));
    }
    let stream = request.stream;
    let max_tokens = request.max_tokens.unwrap_or_default();
    let thinking_shown = request.thinking_shown()?;
    let started = async {
        let mut chat = request.into_chat()?;
        // As the API does, a generation that reaches the end of the context window stops
        // there (`model_context_window_exceeded`), whatever `max_tokens` asked.
        chat.common.at_window = true;
        start_chat(&gateway, "msg_", chat, key).await
    }
    .await
    .map_err(renamed)?;
    let answer = Answer {
        meta: started.meta,
        prompt_tokens: started.prompt_tokens,
        thinking_shown,
        max_tokens,
    };
    if stream {
        return Ok(sse(&gateway, stream_events(answer, started.outputs)));
    }
    whole(answer, started.outputs).await
}

/// `POST /v1/messages/count_tokens`: the tokens of the prompt the same request to
/// `/v1/messages` starts from (its system prompt and tools included).
pub(super) async fn count_tokens(State(gateway): State<Arc<Gateway>>, body: Body) -> Response {
    let count = async {
        let request: MessagesRequest = parse(body)?;
        gateway.check_model(request.passed.model.as_deref())?;
        let (_, prompt, _) = chat_prompt(request.into_chat()?)?;
        let tokens = gateway.prompt_tokens(prompt).await?;
        Ok(Json(json!({"input_tokens": tokens.len()})).into_response())
    };
    count.await.map_err(renamed).unwrap_or_else(error_response)
}

/// What the bodies of one answer share: the chat completion's (its id, model, how calls
/// and thinking are read) and the prompt's length.
struct Answer {
    meta: Meta,
    prompt_tokens: usize,
    /// Whether thinking blocks carry the thinking (else they are empty: `display:
    /// "omitted"`).
    thinking_shown: bool,
    /// What the request asked (the window may have ended it sooner).
    max_tokens: i64,
}

/// A tool use block for a call the model made.
fn tool_use(call: &Call) -> Value {
    let input = serde_json::from_str::<Value>(&call.arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": new_id("toolu_"), "name": call.name, "input": input})
}

fn thinking_block(text: &str) -> Value {
    json!({"type": "thinking", "thinking": text, "signature": ""})
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

impl Answer {
    /// This API's `stop_reason` and `stop_sequence` for how the generation ended.
    /// `max_tokens`: what the request asked; the context window may end a generation
    /// sooner.
    fn stop(summary: &Summary, called: bool, max_tokens: i64) -> (&'static str, Option<String>) {
        match (&summary.finish_reason, &summary.stop_string) {
            _ if called => ("tool_use", None),
            (FinishReason::Length, _) if i64::from(summary.completion_tokens) < max_tokens => {
                ("model_context_window_exceeded", None)
            }
            (FinishReason::Length, _) => ("max_tokens", None),
            (_, Some(stop)) => ("stop_sequence", Some(stop.clone())),
            _ => ("end_turn", None),
        }
    }

    /// Usage as this API counts it: `input_tokens` are the prompt tokens computed, those
    /// taken from the prefix cache are `cache_read_input_tokens`.
    fn usage(summary: &Summary) -> Value {
        json!({
            "input_tokens": summary.prompt_tokens.saturating_sub(summary.cached_tokens),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": summary.cached_tokens,
            "output_tokens": summary.completion_tokens,
        })
    }

    /// The message: with `content` and a summary once the generation ended, empty before.
    fn body(&self, content: Vec<Value>, summary: Option<&Summary>, called: bool) -> Value {
        let (stop_reason, stop_sequence, usage) = match summary {
            Some(summary) => {
                let (reason, sequence) = Self::stop(summary, called, self.max_tokens);
                (json!(reason), json!(sequence), Self::usage(summary))
            }
            None => (
                Value::Null,
                Value::Null,
                json!({
                    "input_tokens": self.prompt_tokens,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                    "output_tokens": 0,
                }),
            ),
        };
        json!({
            "id": self.meta.id,
            "type": "message",
            "role": "assistant",
            "model": self.meta.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        })
    }

    /// The content blocks of an answer's text: its thinking (with a reasoning parser), its
    /// text (when it has some, or makes no call), then its calls; and whether it made any.
    fn blocks(&self, text: String) -> (Vec<Value>, bool) {
        let mut blocks = Vec::new();
        let text = match self.meta.reasoning {
            Some(parser) => {
                let split = parser.split(&text);
                if !split.reasoning.is_empty() {
                    let shown = if self.thinking_shown {
                        &split.reasoning
                    } else {
                        ""
                    };
                    blocks.push(thinking_block(shown));
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
            blocks.push(text_block(&text));
        }
        blocks.extend(calls.iter().map(tool_use));
        (blocks, !calls.is_empty())
    }
}

/// The whole message, once the generation ends.
async fn whole(answer: Answer, mut outputs: Merged) -> Result<Response, GatewayError> {
    let mut text = String::new();
    while let Some((_, output)) = outputs.recv().await {
        match output? {
            Output::Text { text: more, .. } => text.push_str(&more),
            Output::Done(summary) => {
                let (content, called) = answer.blocks(text);
                return Ok(Json(answer.body(content, Some(&summary), called)).into_response());
            }
        }
    }
    Err(GatewayError::Internal(
        "the generation ended without a summary".into(),
    ))
}

/// The client went away.
struct Gone;

/// A stream's events, each named by its type, and the content block open in it.
struct Events {
    sender: mpsc::Sender<Result<Event, Infallible>>,
    /// How many blocks were opened.
    blocks: usize,
    /// The kind of the block open now (`text` or `thinking`), if one is.
    open: Option<&'static str>,
}

impl Events {
    async fn send(&mut self, kind: &str, mut body: Value) -> Result<(), Gone> {
        if let Value::Object(fields) = &mut body {
            fields.insert("type".into(), json!(kind));
        }
        let event = Event::default().event(kind).data(body.to_string());
        self.sender.send(Ok(event)).await.map_err(|_| Gone)
    }

    /// Closes the open block, if any.
    async fn close(&mut self) -> Result<(), Gone> {
        if self.open.take().is_some() {
            let index = self.blocks - 1;
            self.send("content_block_stop", json!({"index": index}))
                .await?;
        }
        Ok(())
    }

    /// Opens a block, closing the one open.
    async fn open(&mut self, block: Value, kind: Option<&'static str>) -> Result<usize, Gone> {
        self.close().await?;
        let index = self.blocks;
        self.blocks += 1;
        self.open = kind;
        self.send(
            "content_block_start",
            json!({"index": index, "content_block": block}),
        )
        .await?;
        Ok(index)
    }

    /// Sends `delta` of text (`text`) or thinking (`thinking`), opening a block of its
    /// kind first where another (or none) is open.
    async fn text(&mut self, kind: &'static str, delta: &str) -> Result<(), Gone> {
        if self.open != Some(kind) {
            let block = match kind {
                "thinking" => thinking_block(""),
                _ => text_block(""),
            };
            self.open(block, Some(kind)).await?;
        }
        if delta.is_empty() {
            return Ok(());
        }
        let delta = match kind {
            "thinking" => json!({"type": "thinking_delta", "thinking": delta}),
            _ => json!({"type": "text_delta", "text": delta}),
        };
        let index = self.blocks - 1;
        self.send(
            "content_block_delta",
            json!({"index": index, "delta": delta}),
        )
        .await
    }

    /// Sends a piece of the answer: its thinking (only opening the block where thinking
    /// is not shown), then its content.
    async fn split(&mut self, answer: &Answer, split: Split) -> Result<(), Gone> {
        if !split.reasoning.is_empty() {
            let shown = if answer.thinking_shown {
                split.reasoning.as_str()
            } else {
                ""
            };
            self.text("thinking", shown).await?;
        }
        if !split.content.is_empty() {
            self.text("text", &split.content).await?;
        }
        Ok(())
    }

    /// Sends one call as a tool use block, its input in one delta.
    async fn call(&mut self, call: &Call) -> Result<(), Gone> {
        let mut block = tool_use(call);
        let input = block["input"].take().to_string();
        block["input"] = json!({});
        let index = self.open(block, None).await?;
        let delta = json!({"type": "input_json_delta", "partial_json": input});
        self.send(
            "content_block_delta",
            json!({"index": index, "delta": delta}),
        )
        .await?;
        self.send("content_block_stop", json!({"index": index}))
            .await
    }
}

/// A streaming request's events, from a task that relays the generation's text as it
/// comes (held back while it may be a call, where tools are offered); a client that goes
/// away ends the generation.
fn stream_events(answer: Answer, mut outputs: Merged) -> mpsc::Receiver<Result<Event, Infallible>> {
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut events = Events {
            sender,
            blocks: 0,
            open: None,
        };
        let _ = relay(&answer, &mut outputs, &mut events).await;
    });
    receiver
}

async fn relay(answer: &Answer, outputs: &mut Merged, events: &mut Events) -> Result<(), Gone> {
    let opening = json!({"message": answer.body(Vec::new(), None, false)});
    events.send("message_start", opening).await?;
    let mut text = AnswerText::new(&answer.meta);
    loop {
        // A client that goes away ends the generation now, not at the next output.
        let Some(output) = next_output(&events.sender, outputs).await else {
            return Err(Gone);
        };
        match output {
            Ok(Output::Text { text: piece, .. }) => {
                let split = text.push(&piece);
                events.split(answer, split).await?;
            }
            Ok(Output::Done(summary)) => {
                let (rest, calls) = text.finish();
                events.split(answer, rest).await?;
                // An answer that makes no call has a text block, if an empty one.
                if calls.is_empty() && events.open != Some("text") {
                    events.text("text", "").await?;
                }
                for call in &calls {
                    events.call(call).await?;
                }
                events.close().await?;
                let (reason, sequence) =
                    Answer::stop(&summary, !calls.is_empty(), answer.max_tokens);
                let delta = json!({
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": Answer::usage(&summary),
                });
                events.send("message_delta", delta).await?;
                return events.send("message_stop", json!({})).await;
            }
            Err(error) => {
                let message = error.to_string();
                let status = error.into_response().status();
                let body = json!({"error": {"type": error_type(status), "message": message}});
                return events.send("error", body).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::sse::Sse;
    use tokio_stream::wrappers::ReceiverStream;

    fn request(body: Value) -> MessagesRequest {
        serde_json::from_value(body).unwrap()
    }

    fn chat(body: Value) -> Result<Value, GatewayError> {
        let request = request(body);
        Ok(json!(chat_messages(
            request.system.as_ref(),
            &request.messages
        )?))
    }

    fn param(result: Result<impl std::fmt::Debug, GatewayError>) -> &'static str {
        match result {
            Err(GatewayError::InvalidParam { param, .. }) => param,
            other => panic!("not refused by name: {other:?}"),
        }
    }

    #[test]
    fn a_conversation_with_tools_becomes_the_chat_messages() {
        let body = json!({
            "system": [{"type": "text", "text": "Rules."},
                       {"type": "text", "text": "More rules.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Ask the tool.", "signature": "x"},
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"},
                    {"type": "tool_result", "tool_use_id": "toolu_2",
                     "content": [{"type": "text", "text": "noon"}]},
                ]},
                {"role": "assistant", "content": "Noon, 21 C."},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_3", "content": "ok", "is_error": false},
                    {"type": "text", "text": "Thanks."},
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_4", "name": "open", "input": {"path": "a.png"}},
                    {"type": "tool_use", "id": "toolu_5", "name": "run", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_4", "content": [
                        {"type": "text", "text": "a.png:"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}},
                    ]},
                    {"type": "tool_result", "tool_use_id": "toolu_5", "content": "exit 1", "is_error": true},
                ]},
            ],
        });
        let call = |id: &str, name: &str, arguments: &str| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}});
        assert_eq!(
            chat(body).unwrap(),
            json!([
                {"role": "system", "content": "Rules.\nMore rules."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Looking.", "reasoning_content": "Ask the tool.",
                 "tool_calls": [call("toolu_1", "weather", "{\"city\":\"Paris\"}"),
                                call("toolu_2", "time", "{}")]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "21 C"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "noon"},
                {"role": "assistant", "content": "Noon, 21 C."},
                {"role": "tool", "tool_call_id": "toolu_3", "content": "ok"},
                {"role": "user", "content": "Thanks."},
                {"role": "assistant", "content": "",
                 "tool_calls": [call("toolu_4", "open", "{\"path\":\"a.png\"}"), call("toolu_5", "run", "{}")]},
                // An image a tool opened is a line the model reads; a failed call says so.
                {"role": "tool", "tool_call_id": "toolu_4",
                 "content": "a.png:\n[image omitted: this model reads text only]"},
                {"role": "tool", "tool_call_id": "toolu_5", "content": "Error: exit 1"},
            ])
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let message = |content: Value| json!({"messages": [{"role": "user", "content": content}]});
        let image = json!([{"type": "image", "source": {"type": "base64", "data": ""}}]);
        assert_eq!(param(chat(message(image))), "messages");
        assert_eq!(param(chat(json!({"messages": []}))), "messages");
        let system_role = json!({"messages": [{"role": "system", "content": "x"}]});
        assert_eq!(param(chat(system_role)), "messages");
        let used_by_user = json!([{"type": "tool_use", "id": "t", "name": "f", "input": {}}]);
        assert_eq!(param(chat(message(used_by_user))), "messages");
        let into = |body: Value| request(body).into_chat();
        let base = |extra: Value| {
            let mut body = message(json!("Hi"));
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            body
        };
        assert_eq!(
            param(into(base(
                json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})
            ))),
            "tools"
        );
        assert_eq!(
            param(into(base(json!({"thinking": {"type": "on"}})))),
            "thinking"
        );
        let clear_tools = json!({"edits": [{"type": "clear_tool_uses_20250919"}]});
        assert_eq!(
            param(into(base(json!({"context_management": clear_tools})))),
            "context_management"
        );
        assert_eq!(param(into(base(json!({"container": "c"})))), "container");
        assert_eq!(
            param(into(base(json!({"tool_choice": {"type": "tool"}})))),
            "tool_choice"
        );
        // Neutral values ask nothing.
        let neutral = base(json!({"service_tier": "auto", "mcp_servers": [],
                                  "thinking": {"type": "disabled"}, "metadata": {"user_id": "u"}}));
        assert!(into(neutral).is_ok());
        let thinking = base(json!({"thinking": {"type": "enabled", "budget_tokens": 1024}}));
        assert!(into(thinking).is_ok());
        assert_eq!(param(into(base(json!({"speed": "fast"})))), "speed");
        assert_eq!(
            param(into(base(json!({"inference_geo": "us"})))),
            "inference_geo"
        );
        assert_eq!(
            param(into(base(json!({"compaction": {"trigger": 1000}})))),
            "compaction"
        );
        let unknown = base(json!({"output_config": {"task_budget": 10}}));
        assert_eq!(param(into(unknown)), "output_config");
        let no_schema = base(json!({"output_config": {"format": {"type": "json_schema"}}}));
        assert_eq!(param(into(no_schema)), "output_config");
    }

    #[test]
    fn output_config_and_thinking_display_are_read() {
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}}});
        let config = json!({"effort": "high", "format": {"type": "json_schema", "schema": schema}});
        assert_eq!(
            output_format(&config).unwrap(),
            Some(
                json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}})
            )
        );
        assert_eq!(output_format(&json!({"effort": "low"})).unwrap(), None);
        let shown = |thinking: Value| {
            request(json!({"messages": [], "thinking": thinking})).thinking_shown()
        };
        assert!(shown(json!({"type": "adaptive"})).unwrap());
        assert!(
            !shown(json!({"type": "enabled", "budget_tokens": 2048, "display": "omitted"}))
                .unwrap()
        );
        assert_eq!(
            param(shown(json!({"type": "adaptive", "display": "full"}))),
            "thinking"
        );
    }

    #[test]
    fn clear_thinking_keeps_the_last_turns_thinking() {
        let turn = |i: usize| json!({"role": "assistant", "content": "a", "reasoning_content": i.to_string()});
        let user = json!({"role": "user", "content": "q"});
        // A turn without thinking does not count as one that keeps it.
        let plain = json!({"role": "assistant", "content": "b"});
        let conversation = vec![
            turn(1),
            user.clone(),
            turn(2),
            user.clone(),
            plain,
            user.clone(),
            turn(3),
            user,
        ];
        let thinking = |kept: Option<usize>| {
            let mut messages = conversation.clone();
            if let Some(kept) = kept {
                clear_thinking(&mut messages, kept);
            }
            messages
                .iter()
                .filter_map(|m| m.get("reasoning_content").cloned())
                .collect::<Vec<_>>()
        };
        let edit = |keep: Value| {
            let mut edit = json!({"type": "clear_thinking_20251015"});
            if !keep.is_null() {
                edit["keep"] = keep;
            }
            thinking_turns_kept(&json!({"edits": [edit]})).unwrap()
        };
        assert_eq!(
            thinking(edit(json!("all"))),
            [json!("1"), json!("2"), json!("3")]
        );
        assert_eq!(thinking(edit(Value::Null)), [json!("3")]);
        let two = json!({"type": "thinking_turns", "value": 2});
        assert_eq!(thinking(edit(two)), [json!("2"), json!("3")]);
        // The switch reaches templates that read it.
        let body = json!({"messages": [{"role": "user", "content": "q"}],
                          "thinking": {"type": "disabled"}});
        let chat = request(body).into_chat().unwrap();
        assert_eq!(
            chat.rendering.chat_template_kwargs,
            Some(
                json!({"enable_thinking": false})
                    .as_object()
                    .unwrap()
                    .clone()
            )
        );
    }

    #[test]
    fn tools_and_choices_become_the_chat_endpoint_s() {
        let tool = json!({"name": "weather", "description": "Weather of a city.",
                          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                          "cache_control": {"type": "ephemeral"}});
        assert_eq!(
            chat_tool(0, &tool).unwrap(),
            json!({"type": "function", "function": {"name": "weather", "description": "Weather of a city.",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
        );
        assert_eq!(param(chat_tool(1, &json!({"input_schema": {}}))), "tools");
        let choice = |c: Value| chat_tool_choice(&c).unwrap();
        assert_eq!(choice(json!({"type": "auto"})), (json!("auto"), false));
        assert_eq!(
            choice(json!({"type": "any", "disable_parallel_tool_use": true})),
            (json!("required"), true)
        );
        assert_eq!(
            choice(json!({"type": "tool", "name": "weather"})),
            (
                json!({"type": "function", "function": {"name": "weather"}}),
                false
            )
        );
        assert_eq!(choice(json!({"type": "none"})), (json!("none"), false));
    }

    #[test]
    fn an_answer_ends_as_this_api_says() {
        let summary = |finish_reason, stop_string: Option<&str>| Summary {
            finish_reason,
            stop_string: stop_string.map(str::to_string),
            prompt_tokens: 30,
            cached_tokens: 12,
            completion_tokens: 5,
            ..Summary::default()
        };
        assert_eq!(
            Answer::stop(&summary(FinishReason::Stop, None), false, 5),
            ("end_turn", None)
        );
        assert_eq!(
            Answer::stop(&summary(FinishReason::Stop, Some("\n\n")), false, 5),
            ("stop_sequence", Some("\n\n".to_string()))
        );
        assert_eq!(
            Answer::stop(&summary(FinishReason::Length, None), false, 5),
            ("max_tokens", None)
        );
        // Asked for more than the window had room for: the window ended it.
        assert_eq!(
            Answer::stop(&summary(FinishReason::Length, None), false, 32_000),
            ("model_context_window_exceeded", None)
        );
        assert_eq!(
            Answer::stop(&summary(FinishReason::Stop, None), true, 5),
            ("tool_use", None)
        );
        assert_eq!(
            Answer::usage(&summary(FinishReason::Stop, None)),
            json!({"input_tokens": 18, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 12, "output_tokens": 5})
        );
    }

    fn answer(thinking_shown: bool) -> Answer {
        Answer {
            meta: Meta {
                id: "msg_1".into(),
                created: 0,
                model: "m".into(),
                kind: super::super::Kind::Chat,
                include_usage: false,
                logprobs: false,
                per_prompt: 1,
                echo: None,
                calls: None,
                reasoning: Some(crate::ReasoningParser::Qwen3),
            },
            prompt_tokens: 9,
            thinking_shown,
            max_tokens: 64,
        }
    }

    /// The events a stream of `pieces` of text gives, as (event name, data).
    async fn streamed(answer: Answer, pieces: &[&str]) -> Vec<(String, Value)> {
        let (sender, outputs) = mpsc::channel(16);
        for piece in pieces {
            let text = Output::Text {
                text: piece.to_string(),
                tokens: 1,
                logprobs: Vec::new(),
            };
            sender.send((0, Ok(text))).await.unwrap();
        }
        let summary = Summary {
            finish_reason: FinishReason::Stop,
            prompt_tokens: 9,
            cached_tokens: 4,
            completion_tokens: pieces.len() as u32,
            ..Summary::default()
        };
        sender
            .send((0, Ok(Output::Done(Box::new(summary)))))
            .await
            .unwrap();
        let events = stream_events(answer, outputs);
        let body = Sse::new(ReceiverStream::new(events))
            .into_response()
            .into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        text.split("\n\n")
            .filter(|event| !event.is_empty())
            .map(|event| {
                let line = |prefix: &str| {
                    event
                        .lines()
                        .find_map(|l| l.strip_prefix(prefix))
                        .unwrap()
                        .to_string()
                };
                let data: Value = serde_json::from_str(&line("data: ")).unwrap();
                let name = line("event: ");
                assert_eq!(data["type"], json!(name), "{event}");
                (name, data)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_stream_opens_and_closes_each_block_in_order() {
        let events = streamed(
            answer(true),
            &["<think>Blue", " it is.</think>", "Blue", "."],
        )
        .await;
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let data = |i: usize| &events[i].1;
        assert_eq!(data(0)["message"]["usage"]["input_tokens"], 9);
        assert_eq!(data(1)["content_block"]["type"], "thinking");
        assert_eq!(data(1)["index"], 0);
        let thinking: String = (2..4)
            .map(|i| data(i)["delta"]["thinking"].as_str().unwrap())
            .collect();
        assert_eq!(thinking, "Blue it is.");
        assert_eq!(
            (
                data(5)["content_block"]["type"].clone(),
                data(5)["index"].clone()
            ),
            (json!("text"), json!(1))
        );
        let text: String = (6..8)
            .map(|i| data(i)["delta"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Blue.");
        assert_eq!(data(8)["index"], 1);
        assert_eq!(data(9)["delta"]["stop_reason"], "end_turn");
        assert_eq!(
            data(9)["usage"],
            json!({"input_tokens": 5, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 4, "output_tokens": 4})
        );
        // The whole answer has the same blocks.
        let (blocks, called) = answer(true).blocks("<think>Blue it is.</think>Blue.".into());
        assert!(!called);
        assert_eq!(
            json!(blocks),
            json!([{"type": "thinking", "thinking": "Blue it is.", "signature": ""},
                   {"type": "text", "text": "Blue."}])
        );
    }

    #[tokio::test]
    async fn a_streamed_call_is_a_tool_use_block_after_the_text() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let reader = super::super::tools::Tools::from_request(Some(&tools), None, None)
            .unwrap()
            .unwrap()
            .reader();
        let mut with_tools = answer(true);
        with_tools.meta.calls = Some(reader);
        with_tools.meta.reasoning = None;
        let pieces = [
            "Checking.\n<tool",
            "_call>\n{\"name\": \"get_weather\", \"arguments\": ",
            "{\"city\": \"Paris\"}}\n</tool_call>",
        ];
        let events = streamed(with_tools, &pieces).await;
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let data = |i: usize| &events[i].1;
        // The text before the call, and none of the call's markup.
        assert_eq!(data(2)["delta"]["text"], "Checking.\n");
        let block = &data(4)["content_block"];
        assert_eq!(
            (block["type"].clone(), block["name"].clone()),
            (json!("tool_use"), json!("get_weather"))
        );
        assert_eq!(data(4)["index"], 1);
        assert!(block["id"].as_str().unwrap().starts_with("toolu_"));
        let input: Value =
            serde_json::from_str(data(5)["delta"]["partial_json"].as_str().unwrap()).unwrap();
        assert_eq!(input, json!({"city": "Paris"}));
        assert_eq!(data(6)["index"], 1);
        assert_eq!(data(7)["delta"]["stop_reason"], "tool_use");
    }

    #[tokio::test]
    async fn omitted_thinking_keeps_its_block_without_the_text() {
        let events = streamed(answer(false), &["<think>Blue", "</think>Blue"]).await;
        assert!(events
            .iter()
            .all(|(_, data)| data["delta"].get("thinking").is_none()));
        assert_eq!(events[1].1["content_block"]["type"], "thinking");
        let (blocks, _) = answer(false).blocks("<think>Blue</think>Blue".into());
        assert_eq!(blocks[0]["thinking"], "");
        assert_eq!(blocks[1]["text"], "Blue");
        // An empty answer still has its text block.
        let events = streamed(answer(true), &[]).await;
        assert_eq!(
            events[1].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        assert_eq!(events[2].0, "content_block_stop");
    }

    #[test]
    fn errors_have_this_api_s_shape_and_keep_the_status() {
        let response = error_response(bad("max_tokens", "`max_tokens` is required"));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            error_type(StatusCode::TOO_MANY_REQUESTS),
            "rate_limit_error"
        );
        assert_eq!(
            error_type(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error"
        );
        let renamed = renamed(GatewayError::InvalidRequest(
            "`stop` takes at most 16".into(),
        ));
        assert!(
            renamed.to_string().contains("`stop_sequences`"),
            "{renamed}"
        );
    }
}
