//! The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions` (with
//! `stream: true` as server-sent events ending in `data: [DONE]`), `/v1/responses` (a chat
//! completion underneath, see [`responses`]), Anthropic's `/v1/messages` (likewise, see
//! [`messages`]), `/v1/models`, vLLM's `/tokenize` and `/detokenize`, `/health`.
//!
//! Extension: `"speculation": {"enabled": false}` turns speculation off for one request;
//! `"speculation": {"drafters": ["ngram"]}` picks drafter kinds; `"prefix_cache": false`
//! computes the whole prompt (the verifier reuses none of the work it holds, and keeps
//! none of this request's). `top_k` is accepted too.

mod messages;
mod request;
mod response;
mod responses;
mod tools;
mod unsupported;

pub(crate) use unsupported::refuse_first;

use crate::generation::{Gateway, GatewayError, Output, PromptInput};
use crate::params::Rendering;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use request::{ChatRequest, ChatRequestMessage, Common, CompletionRequest, MAX_GENERATIONS};
use response::{ErrorBody, Finished, Kind, Meta, ModelCard, ModelList};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sibyl_proto::auth::KeyId;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tools::{CallStream, Tools};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Longest a refused request's body is read (and dropped) before the 401 goes out (see
/// [`authorize`]); at most [`MAX_BODY_BYTES`] of it.
const REFUSED_BODY_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// The HTTP routes of the gateway: with API keys, every one but `/health` needs a key.
pub fn router(gateway: Arc<Gateway>, metrics: bool) -> Router {
    let mut api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .merge(crate::llamacpp::routes());
    if metrics {
        api = api.merge(sibyl_telemetry::metrics_router());
    }
    let api = api
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            authorize,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway)
}

/// Lets a request through when the gateway has no keys or it carries one of them (its id
/// then goes into the request's extensions); 401 with OpenAI's error object otherwise
/// (Anthropic's on its Messages API).
async fn authorize(
    State(gateway): State<Arc<Gateway>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(keys) = gateway.api_keys() else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or(""));
    // Anthropic's clients send the key as `x-api-key`: either header may carry it.
    let checked = match (header, headers.get("x-api-key")) {
        (None, Some(key)) => keys.check_key(key.to_str().unwrap_or("")),
        (Some(header), Some(key)) => keys
            .check(Some(header))
            .or_else(|_| keys.check_key(key.to_str().unwrap_or(""))),
        (header, None) => keys.check(header),
    };
    match checked {
        Ok(id) => {
            let id = id.clone();
            request.extensions_mut().insert(id);
            next.run(request).await
        }
        Err(denied) => {
            // Read what the client is still sending (a bounded amount, briefly) before
            // answering: over HTTP/2 an answer to a request whose body is unread resets the
            // stream, and a client still uploading (curl) then reports a stream error
            // instead of the 401.
            let anthropic = request.uri().path().starts_with("/v1/messages");
            let mut unread = request.into_body().into_data_stream();
            let drain = async {
                let mut bytes = 0;
                while let Some(Ok(chunk)) = unread.next().await {
                    bytes += chunk.len();
                    if bytes > MAX_BODY_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(REFUSED_BODY_TIME, drain).await;
            let message = denied.to_string();
            let mut response = if anthropic {
                let body = messages::error_body("authentication_error", &message);
                (StatusCode::UNAUTHORIZED, Json(body)).into_response()
            } else {
                let body = ErrorBody::new(
                    &message,
                    "invalid_request_error",
                    None,
                    Some("invalid_api_key"),
                );
                (StatusCode::UNAUTHORIZED, Json(body)).into_response()
            };
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

/// The id of the key a request came with, when the gateway has keys.
pub(crate) type Key = Option<axum::Extension<KeyId>>;

pub(crate) fn key_id(key: Key) -> Option<KeyId> {
    key.map(|axum::Extension(id)| id)
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, kind, code) = match &self {
            GatewayError::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", None)
            }
            GatewayError::InvalidRequest(_) | GatewayError::InvalidParam { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            GatewayError::ModelNotFound { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            GatewayError::Unavailable(_) | GatewayError::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", None)
            }
            GatewayError::Verifier(status) => match status.code() {
                tonic::Code::InvalidArgument => {
                    (StatusCode::BAD_REQUEST, "invalid_request_error", None)
                }
                tonic::Code::ResourceExhausted => {
                    (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", None)
                }
                _ => (StatusCode::BAD_GATEWAY, "server_error", None),
            },
            GatewayError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let param = match &self {
            GatewayError::InvalidParam { param, .. } => Some(*param),
            _ => None,
        };
        let message = self.to_string();
        let mut response =
            (status, Json(ErrorBody::new(&message, kind, param, code))).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            // The verifier's hint, in seconds; one second where it gave none.
            let retry_after = match &self {
                GatewayError::Verifier(status) => status
                    .metadata()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok()),
                _ => None,
            };
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(retry_after.unwrap_or(1)),
            );
        }
        response
    }
}

fn invalid(message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest(message.into())
}

/// A request body as the extractor delivered it (an error when it is over the size limit or
/// could not be read).
pub(crate) type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// Parses a JSON body, with serde's message (which names the field) on failure.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, GatewayError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => GatewayError::PayloadTooLarge(format!(
            "the request body is over the limit of {MAX_BODY_BYTES} bytes"
        )),
        _ => invalid(format!("cannot read the request body: {rejection}")),
    })?;
    serde_json::from_slice(&body).map_err(|e| invalid(format!("invalid request body: {e}")))
}

async fn completions(
    State(gateway): State<Arc<Gateway>>,
    key: Key,
    body: Body,
) -> Result<Response, GatewayError> {
    let request: CompletionRequest = parse(body)?;
    let suffix = request.suffix.filter(|s| !s.is_empty());
    if suffix.is_some() && request.common.echo()? {
        return Err(GatewayError::invalid_param(
            "echo",
            "`echo` does not go with `suffix`: the prompt is not text the completion follows",
        ));
    }
    let prompts = request.prompt.into_inputs(suffix)?;
    if request.common.tools()?.is_some() {
        return Err(GatewayError::invalid_param(
            "tools",
            "`tools` is a parameter of /v1/chat/completions",
        ));
    }
    respond(
        gateway,
        Kind::Completion,
        request.common,
        prompts,
        None,
        key_id(key),
    )
    .await
}

async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    key: Key,
    body: Body,
) -> Result<Response, GatewayError> {
    let (common, prompt, tools) = chat_prompt(parse(body)?)?;
    respond(
        gateway,
        Kind::Chat,
        common,
        vec![prompt],
        tools,
        key_id(key),
    )
    .await
}

/// A chat request's generation settings, its prompt (the messages, rendered with the tools
/// it offers the model) and its tools.
fn chat_prompt(request: ChatRequest) -> Result<(Common, PromptInput, Option<Tools>), GatewayError> {
    let messages = request
        .messages
        .into_iter()
        .map(ChatRequestMessage::into_message)
        .collect::<Result<Vec<_>, _>>()?;
    // With `tool_choice: "none"` the model is not shown the tools.
    let tools = request.common.tools()?.filter(Tools::offered);
    let definitions = tools
        .as_ref()
        .map(|t| t.definitions.clone())
        .unwrap_or_default();
    let options = request.rendering.options(&messages, definitions)?;
    let prompt = PromptInput::Chat { messages, options };
    Ok((request.common, prompt, tools))
}

/// vLLM's `/tokenize` body: a text prompt or chat messages (rendered as for a generation).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatRequestMessage>>,
    /// With `messages`: the tools' definitions, written into the prompt as a chat
    /// completion offering them writes them.
    tools: Option<Vec<serde_json::Value>>,
    /// With `messages`: how the template renders them, as for a chat completion.
    add_generation_prompt: Option<bool>,
    #[serde(default)]
    continue_final_message: bool,
    chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// vLLM's switch; sibyl always adds what the tokenizer and template write.
    add_special_tokens: Option<bool>,
}

/// The tokens a generation of the prompt would start from, as vLLM's `/tokenize` answers.
async fn tokenize(
    State(gateway): State<Arc<Gateway>>,
    body: Body,
) -> Result<Response, GatewayError> {
    let request: TokenizeRequest = parse(body)?;
    gateway.check_model(request.model.as_deref())?;
    if request.add_special_tokens == Some(false) {
        return Err(invalid(
            "sibyl tokenizes as a generation would: `add_special_tokens` can only be true"
                .to_string(),
        ));
    }
    let rendering = Rendering {
        add_generation_prompt: request.add_generation_prompt,
        continue_final_message: request.continue_final_message,
        chat_template_kwargs: request.chat_template_kwargs,
    };
    let prompt = match (request.prompt, request.messages, request.tools) {
        (Some(text), None, None) => PromptInput::Text(text),
        (None, Some(messages), tools) => {
            let messages = messages
                .into_iter()
                .map(ChatRequestMessage::into_message)
                .collect::<Result<Vec<_>, _>>()?;
            let options = rendering.options(&messages, tools.unwrap_or_default())?;
            PromptInput::Chat { messages, options }
        }
        (Some(_), None, Some(_)) => {
            return Err(invalid("`tools` goes with `messages`".to_string()))
        }
        _ => return Err(invalid("set one of `prompt` and `messages`".to_string())),
    };
    let tokens = gateway.prompt_tokens(prompt).await?;
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": gateway.context_length(),
        "tokens": tokens,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

/// The text of token ids (control tokens left out), as vLLM's `/detokenize` answers.
async fn detokenize(
    State(gateway): State<Arc<Gateway>>,
    body: Body,
) -> Result<Response, GatewayError> {
    let request: DetokenizeRequest = parse(body)?;
    gateway.check_model(request.model.as_deref())?;
    let prompt = gateway.detokenize(&request.tokens)?;
    Ok(Json(json!({ "prompt": prompt })).into_response())
}

/// Generates `n` choices of each of `prompts` (at least one), as one response whose
/// choice `p * n + i` is prompt `p`'s choice `i`.
async fn respond(
    gateway: Arc<Gateway>,
    kind: Kind,
    common: Common,
    prompts: Vec<PromptInput>,
    tools: Option<Tools>,
    key_id: Option<KeyId>,
) -> Result<Response, GatewayError> {
    let stream = common.stream;
    let id_prefix = match kind {
        Kind::Chat => "chatcmpl-",
        Kind::Completion => "cmpl-",
    };
    let started = start(&gateway, kind, id_prefix, common, prompts, tools, key_id).await?;
    let (meta, outputs, choices) = (started.meta, started.outputs, started.choices);
    if stream {
        return Ok(sse(&gateway, stream_events(meta, outputs, choices)));
    }
    whole_response(&meta, outputs, choices).await
}

/// A request's generations, running: what its responses share, and their outputs.
struct Started {
    meta: Meta,
    outputs: Merged,
    choices: usize,
    /// The first prompt's length in tokens.
    prompt_tokens: usize,
}

/// Starts `n` choices of each of `prompts` (at least one); choice `p * n + i` is prompt
/// `p`'s choice `i`. The response's id is `id_prefix` and a random number.
async fn start(
    gateway: &Gateway,
    kind: Kind,
    id_prefix: &str,
    mut common: Common,
    prompts: Vec<PromptInput>,
    tools: Option<Tools>,
    key_id: Option<KeyId>,
) -> Result<Started, GatewayError> {
    let stream = common.stream;
    let include_usage = common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let per_prompt = common.choices()?;
    let choices = per_prompt * prompts.len();
    if choices > MAX_GENERATIONS {
        return Err(GatewayError::invalid_param(
            "n",
            format!(
                "{} prompts times `n` {per_prompt} is over {MAX_GENERATIONS} generations \
                 a request may ask for",
                prompts.len()
            ),
        ));
    }
    let echo_text = |prompt: &PromptInput| -> Result<String, GatewayError> {
        Ok(match prompt {
            PromptInput::Tokens(ids) => gateway
                .detokenize(ids)
                .map_err(|e| GatewayError::invalid_param("prompt", e.to_string()))?,
            PromptInput::Text(text) => text.clone(),
            PromptInput::Infill { prefix, .. } => prefix.clone(),
            // vLLM's: a continued answer is repeated, a user's message is not.
            PromptInput::Chat { messages, .. } => messages
                .last()
                .filter(|m| m.role == "assistant")
                .map(|m| m.content.clone())
                .unwrap_or_default(),
        })
    };
    let echo = match common.echo()? {
        false => None,
        true if stream && common.logprobs_asked() && kind == Kind::Completion => {
            return Err(GatewayError::invalid_param(
                "echo",
                "`echo` with `logprobs` is answered whole: set `stream` to false",
            ))
        }
        true => Some(
            prompts
                .iter()
                .map(echo_text)
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    // Every prompt's generation is the first's with its own prompt.
    let mut prompts = prompts.into_iter();
    let first = prompts
        .next()
        .ok_or_else(|| invalid("no prompt".to_string()))?;
    let rest: Vec<PromptInput> = prompts.collect();
    common.default_sampling(&gateway.sampling_defaults());
    let mut generation = common.generation(first, tools.as_ref())?;
    let logprobs = generation.logprobs.is_some();
    let id = new_id(id_prefix);
    // The response's id is the request id in logs and traces (with `-1`, `-2`... for the
    // choices after the first).
    generation.request_id = id.clone();
    generation.key_id = key_id;
    // A prompt's choice `i` is what the prompt alone gives with the seed plus `i` (each
    // choice without a seed gets one of its own). If one cannot start, the ones started
    // are cancelled as their outputs are dropped.
    let mut outputs = Vec::with_capacity(choices);
    let mut prompt_tokens = 0;
    let prompts = std::iter::once(None).chain(rest.into_iter().map(Some));
    for (p, prompt) in prompts.enumerate() {
        for i in 0..per_prompt {
            let mut choice = generation.clone();
            if let Some(prompt) = &prompt {
                choice.prompt = prompt.clone();
            }
            let index = p * per_prompt + i;
            if index > 0 {
                choice.request_id = format!("{id}-{index}");
                choice.sampling.seed = generation.sampling.seed.map(|s| s.wrapping_add(i as u64));
            }
            let (tokens, output) = gateway.generate(choice).await?;
            if index == 0 {
                prompt_tokens = tokens;
            }
            outputs.push(output);
        }
    }
    let outputs = merge(outputs);
    let meta = Meta {
        id,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: gateway.model_name().to_string(),
        kind,
        include_usage,
        logprobs,
        per_prompt,
        echo,
        calls: tools.as_ref().map(Tools::reader),
        reasoning: gateway.reasoning_parser().filter(|_| kind == Kind::Chat),
    };
    Ok(Started {
        meta,
        outputs,
        choices,
        prompt_tokens,
    })
}

/// A new id of an answer or of a part of one: `prefix` and a random number.
fn new_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

/// Starts the one generation of a chat request that a request of another API (Responses,
/// Messages) was translated into. The answer's id is `id_prefix` and a random number.
async fn start_chat(
    gateway: &Gateway,
    id_prefix: &str,
    chat: ChatRequest,
    key: Key,
) -> Result<Started, GatewayError> {
    let (common, prompt, tools) = chat_prompt(chat)?;
    let prompts = vec![prompt];
    start(
        gateway,
        Kind::Chat,
        id_prefix,
        common,
        prompts,
        tools,
        key_id(key),
    )
    .await
}

/// A streamed answer's events as server-sent events, with comments while no token is
/// ready (a long prompt's prefill, a queue), so that a proxy's idle timeout does not cut
/// the stream.
fn sse(gateway: &Gateway, events: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    let keep_alive = KeepAlive::new().interval(gateway.sse_keep_alive());
    Sse::new(ReceiverStream::new(events))
        .keep_alive(keep_alive)
        .into_response()
}

/// The next output of a streamed answer, or `None` once its client (`client`: the events'
/// sender) has gone, which ends the generation; an error where the outputs end without a
/// summary.
async fn next_output(
    client: &mpsc::Sender<Result<Event, Infallible>>,
    outputs: &mut Merged,
) -> Option<Result<Output, GatewayError>> {
    tokio::select! {
        () = client.closed() => None,
        next = outputs.recv() => Some(match next {
            Some((_, output)) => output,
            None => Err(GatewayError::Internal(
                "the generation ended without a summary".into(),
            )),
        }),
    }
}

/// The outputs of a request's choices, each tagged with its index.
type Merged = mpsc::Receiver<(usize, Result<Output, GatewayError>)>;

/// One stream of the outputs of every choice, read as they come (a choice whose outputs
/// waited for another's would stall its session). Dropping it cancels them all.
fn merge(outputs: Vec<mpsc::Receiver<Result<Output, GatewayError>>>) -> Merged {
    let (sender, merged) = mpsc::channel(64);
    for (index, outputs) in outputs.into_iter().enumerate() {
        crate::generation::forward(outputs, sender.clone(), move |output| (index, output));
    }
    merged
}

/// A non-streaming request's response: all of each choice's text, once every one ends.
async fn whole_response(
    meta: &Meta,
    mut outputs: Merged,
    choices: usize,
) -> Result<Response, GatewayError> {
    let mut texts = vec![String::new(); choices];
    let mut logprobs = vec![Vec::new(); choices];
    let mut summaries = vec![None; choices];
    while let Some((index, output)) = outputs.recv().await {
        match output? {
            Output::Text {
                text,
                logprobs: more,
                ..
            } => {
                texts[index].push_str(&text);
                logprobs[index].extend(more);
            }
            Output::Done(summary) => {
                summaries[index] = Some(*summary);
                if summaries.iter().all(Option::is_some) {
                    let finished: Vec<Finished> = texts
                        .into_iter()
                        .zip(logprobs)
                        .zip(summaries.into_iter().flatten())
                        .enumerate()
                        .map(|(index, ((text, logprobs), summary))| {
                            let echo = meta.echo_of(index).unwrap_or_default();
                            // Thinking first split off, then calls read from the rest.
                            let (reasoning, text) = match meta.reasoning {
                                Some(parser) => {
                                    let split = parser.split(&text);
                                    let reasoning = Some(split.reasoning).filter(|r| !r.is_empty());
                                    (reasoning, split.content)
                                }
                                None => (None, text),
                            };
                            let (text, calls) = match &meta.calls {
                                Some(reader) => {
                                    let answer = reader.read(&text);
                                    (format!("{echo}{}", answer.text), answer.calls)
                                }
                                None => (format!("{echo}{text}"), Vec::new()),
                            };
                            Finished {
                                text,
                                reasoning,
                                calls,
                                logprobs,
                                summary,
                            }
                        })
                        .collect();
                    return Ok(Json(meta.whole(&finished)).into_response());
                }
            }
        }
    }
    Err(GatewayError::Internal(
        "the generation ended without a summary".into(),
    ))
}

/// One server-sent event holding `body` as JSON.
fn sse_event(body: &impl Serialize) -> Result<Event, Infallible> {
    // Serializing these bodies cannot fail: they hold only strings, numbers and nulls.
    Ok(Event::default().data(serde_json::to_string(body).unwrap_or_default()))
}

/// A streaming request's server-sent events, from a task that relays the outputs of its
/// choices as chunks and ends with `[DONE]`; a client that goes away ends the generations.
fn stream_events(
    meta: Meta,
    mut outputs: Merged,
    choices: usize,
) -> mpsc::Receiver<Result<Event, Infallible>> {
    let (events, receiver) = mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        // Each choice opens with its role (a chat) and what it echoes.
        for index in 0..choices as u32 {
            let role = (meta.kind == Kind::Chat).then(|| meta.role_chunk(index));
            let echo = meta.echo_of(index as usize).filter(|echo| !echo.is_empty());
            let echo = echo.map(|echo| meta.text_chunk(index, echo, None));
            for chunk in role.iter().chain(&echo) {
                if events.send(sse_event(chunk)).await.is_err() {
                    return;
                }
            }
        }
        // Per choice: characters of the tokens reported so far (`text_offset`), how it
        // ended, and where tools are offered, the text held back while calls may be coming
        // and its tokens' log probabilities.
        let mut offsets = vec![0; choices];
        let mut summaries = vec![None; choices];
        let mut calls: Vec<CallStream> = (0..choices).map(|_| CallStream::default()).collect();
        let mut held: Vec<Vec<crate::params::Logprobs>> = vec![Vec::new(); choices];
        // With a reasoning parser, each choice's thinking goes out apart from its content.
        let mut thinking: Vec<Option<crate::reasoning::Thinking>> = (0..choices)
            .map(|_| meta.reasoning.map(crate::ReasoningParser::thinking))
            .collect();
        loop {
            // A client that goes away ends the generation now, not at the next output.
            let output = tokio::select! {
                () = events.closed() => return,
                output = outputs.recv() => output,
            };
            let Some((index, output)) = output else { break };
            let chunk_index = index as u32;
            let sent = match output {
                Ok(Output::Text { text, logprobs, .. }) => {
                    held[index].extend(logprobs);
                    let text = match &mut thinking[index] {
                        Some(thinking) => {
                            let split = thinking.push(&text);
                            let thought = &split.reasoning;
                            if !send_thinking(
                                &events,
                                &meta,
                                chunk_index,
                                thought,
                                &mut held[index],
                            )
                            .await
                            {
                                return;
                            }
                            split.content
                        }
                        None => text,
                    };
                    let text = match meta.calls {
                        Some(_) => calls[index].push(&text),
                        None => text,
                    };
                    if text.is_empty() && (meta.calls.is_some() || meta.reasoning.is_some()) {
                        continue;
                    }
                    let (logprobs, chars) = meta.logprobs(&held[index], offsets[index]);
                    held[index].clear();
                    offsets[index] += chars;
                    let chunk = meta.text_chunk(chunk_index, &text, logprobs);
                    events.send(sse_event(&chunk)).await
                }
                Ok(Output::Done(summary)) => {
                    // Thinking and content held back at a possible tag go out first.
                    if let Some(rest) = thinking[index].take().map(|t| t.finish()) {
                        let thought = &rest.reasoning;
                        if !send_thinking(&events, &meta, chunk_index, thought, &mut held[index])
                            .await
                        {
                            return;
                        }
                        let text = match meta.calls {
                            Some(_) => calls[index].push(&rest.content),
                            None => rest.content,
                        };
                        if !text.is_empty() {
                            let (logprobs, _) = meta.logprobs(&held[index], 0);
                            held[index].clear();
                            let chunk = meta.text_chunk(chunk_index, &text, logprobs);
                            if events.send(sse_event(&chunk)).await.is_err() {
                                return;
                            }
                        }
                    }
                    let mut called = false;
                    if let Some(reader) = &meta.calls {
                        let (mut logprobs, _) = meta.logprobs(&held[index], offsets[index]);
                        held[index].clear();
                        let answer = std::mem::take(&mut calls[index]).finish(reader);
                        if !answer.text.is_empty() {
                            let chunk = meta.text_chunk(chunk_index, &answer.text, logprobs.take());
                            if events.send(sse_event(&chunk)).await.is_err() {
                                return;
                            }
                        }
                        if !answer.calls.is_empty() {
                            called = true;
                            let chunk = meta.calls_chunk(chunk_index, &answer.calls, logprobs);
                            if events.send(sse_event(&chunk)).await.is_err() {
                                return;
                            }
                        }
                    }
                    let chunk = meta.finish_chunk(chunk_index, &summary, called);
                    let mut sent = events.send(sse_event(&chunk)).await;
                    summaries[index] = Some(*summary);
                    if summaries.iter().all(Option::is_some) {
                        if sent.is_ok() && meta.include_usage {
                            let all: Vec<_> = summaries.iter().flatten().collect();
                            sent = events.send(sse_event(&meta.usage_chunk(&all))).await;
                        }
                        if sent.is_err() {
                            return;
                        }
                        break;
                    }
                    sent
                }
                Err(error) => {
                    let message = error.to_string();
                    let body = ErrorBody::new(&message, "server_error", None, None);
                    let _ = events.send(sse_event(&body)).await;
                    break;
                }
            };
            if sent.is_err() {
                return;
            }
        }
        let _ = events.send(Ok(Event::default().data("[DONE]"))).await;
    });
    receiver
}

/// Sends a chat chunk of choice `index`'s thinking, when there is any, with the log
/// probabilities `held` for it; false when the client has gone.
async fn send_thinking(
    events: &mpsc::Sender<Result<Event, Infallible>>,
    meta: &Meta,
    index: u32,
    text: &str,
    held: &mut Vec<crate::params::Logprobs>,
) -> bool {
    if text.is_empty() {
        return true;
    }
    let (logprobs, _) = meta.logprobs(held, 0);
    held.clear();
    let chunk = meta.reasoning_chunk(index, text, logprobs);
    events.send(sse_event(&chunk)).await.is_ok()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let message = format!("no route {uri}; this server has /v1/completions, /v1/chat/completions, /v1/responses, /v1/models, /tokenize, /detokenize, /health, and llama.cpp's /completion and /infill");
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody::new(
            &message,
            "invalid_request_error",
            None,
            None,
        )),
    )
        .into_response()
}

/// The served model, in a list both OpenAI's and Anthropic's clients read.
async fn models(State(gateway): State<Arc<Gateway>>) -> Response {
    let name = gateway.model_name();
    let list = ModelList {
        object: "list",
        data: vec![ModelCard {
            id: name,
            object: "model",
            created: 0,
            owned_by: "sibyl",
            max_model_len: gateway.context_length(),
            kind: "model",
            display_name: name,
            created_at: "1970-01-01T00:00:00Z",
        }],
        has_more: false,
        first_id: name,
        last_id: name,
    };
    Json(list).into_response()
}

/// 200 when a verifier answers, 503 otherwise.
async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.verifier_status().await {
        Ok(status) => Json(json!({"status": "ok", "model": status.model, "active_sessions": status.active_sessions})).into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "error": error.to_string()})),
        )
            .into_response(),
    }
}
