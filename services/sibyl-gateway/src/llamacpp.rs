//! llama.cpp server's native API: `/completion` (also `/completions`) and `/infill`, with
//! llama.cpp's request fields, defaults and response shapes, for scripts written against
//! `llama-server` and its editor plugins (llama.vim, llama.vscode).
//!
//! `/infill` writes the other files of the repository (`input_extra`), the code before the
//! cursor (`input_prefix`, then `prompt`, the start of the middle) and the code after it
//! (`input_suffix`) between the model's fill-in-the-middle tokens, cut to fit as llama.cpp
//! cuts them ([`Gateway::repo_infill_tokens`]). The n-gram drafter drafts from all of it.
//!
//! Sampling follows llama.cpp: top-k 40, top-p 0.95, min-p 0.05 and temperature 0.8 unless
//! set, in llama.cpp's order (the filters, then temperature), and `samplers` picks which
//! of them apply. Fields that ask for what sibyl does not do (llama.cpp's penalties over
//! the last 64 tokens, mirostat, DRY, XTC, GBNF grammars, LoRA) are refused by name.

use crate::generation::{
    Ending, Gateway, GatewayError, Generation, Output, OutputStream, PromptInput, Summary,
};
use crate::openai::{key_id, parse, Body, Key};
use crate::params::{FinishReason, Grammar, Sampling, Speculation};
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sibyl_engine::InfillFile;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The native routes (behind the same keys as the OpenAI API).
pub(crate) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/completion", post(completion))
        .route("/completions", post(completion))
        .route("/infill", post(infill))
}

/// Most completions one request may ask for (`n_cmpl`), as the OpenAI API's `n`.
const MAX_COMPLETIONS: u32 = 8;

/// Most names `samplers` may list (llama.cpp has 11 samplers).
const MAX_SAMPLERS: usize = 16;

/// Most files `input_extra` may hold.
const MAX_EXTRA_FILES: usize = 256;

/// A request to `/completion` or `/infill`. Fields llama.cpp does not define are ignored,
/// as llama.cpp ignores them.
#[derive(Debug, Default, Deserialize)]
struct NativeRequest {
    model: Option<String>,
    prompt: Option<Value>,
    input_prefix: Option<String>,
    input_suffix: Option<String>,
    input_extra: Option<Value>,
    n_predict: Option<i64>,
    max_tokens: Option<i64>,
    temperature: Option<f32>,
    top_k: Option<i64>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    cache_prompt: Option<bool>,
    samplers: Option<Value>,
    n_indent: Option<i64>,
    t_max_predict_ms: Option<i64>,
    response_fields: Option<Vec<String>>,
    n_cmpl: Option<u32>,
    n: Option<u32>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    return_tokens: bool,
    json_schema: Option<Value>,
    /// sibyl's extension, as on the OpenAI API: `{"enabled": false}` decodes plainly.
    speculation: Option<Value>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

/// llama.cpp fields sibyl does not do, refused when set to anything but their neutral value.
#[derive(Debug, Default, Deserialize)]
struct Unsupported {
    repeat_penalty: Option<Value>,
    presence_penalty: Option<Value>,
    frequency_penalty: Option<Value>,
    typical_p: Option<Value>,
    mirostat: Option<Value>,
    dry_multiplier: Option<Value>,
    xtc_probability: Option<Value>,
    top_n_sigma: Option<Value>,
    dynatemp_range: Option<Value>,
    grammar: Option<Value>,
    lora: Option<Value>,
    logit_bias: Option<Value>,
    n_probs: Option<Value>,
}

impl Unsupported {
    fn check(&self) -> Result<(), GatewayError> {
        // Absent, null, or the number that asks for nothing.
        let number = |value: &Option<Value>, neutral: f64| match value {
            None | Some(Value::Null) => true,
            Some(v) => v.as_f64() == Some(neutral),
        };
        let at_most = |value: &Option<Value>, neutral: f64| match value {
            None | Some(Value::Null) => true,
            Some(v) => v.as_f64().is_some_and(|x| x <= neutral),
        };
        let empty = |value: &Option<Value>| match value {
            None | Some(Value::Null) => true,
            Some(Value::Array(items)) => items.is_empty(),
            Some(Value::Object(fields)) => fields.is_empty(),
            Some(Value::String(text)) => text.is_empty(),
            Some(_) => false,
        };
        let penalty = "llama.cpp's penalties (over the last 64 tokens) are not supported; \
                       /v1/completions takes OpenAI's and vLLM's";
        let checks: [(&'static str, bool, &str); 13] = [
            ("repeat_penalty", number(&self.repeat_penalty, 1.0), penalty),
            (
                "presence_penalty",
                number(&self.presence_penalty, 0.0),
                penalty,
            ),
            (
                "frequency_penalty",
                number(&self.frequency_penalty, 0.0),
                penalty,
            ),
            (
                "typical_p",
                number(&self.typical_p, 1.0),
                "typical sampling is not supported",
            ),
            (
                "mirostat",
                number(&self.mirostat, 0.0),
                "mirostat is not supported",
            ),
            (
                "dry_multiplier",
                number(&self.dry_multiplier, 0.0),
                "DRY is not supported",
            ),
            (
                "xtc_probability",
                number(&self.xtc_probability, 0.0),
                "XTC is not supported",
            ),
            (
                "top_n_sigma",
                at_most(&self.top_n_sigma, 0.0),
                "top-n-sigma is not supported",
            ),
            (
                "dynatemp_range",
                number(&self.dynatemp_range, 0.0),
                "dynamic temperature is not supported",
            ),
            (
                "grammar",
                empty(&self.grammar),
                "GBNF grammars are not supported; use `json_schema`, or /v1/completions' \
                 `guided_grammar` (Lark)",
            ),
            ("lora", empty(&self.lora), "LoRA adapters are not supported"),
            (
                "logit_bias",
                empty(&self.logit_bias),
                "`logit_bias` is not supported here; /v1/completions takes OpenAI's",
            ),
            (
                "n_probs",
                number(&self.n_probs, 0.0),
                "`n_probs` is not supported here; /v1/completions takes `logprobs`",
            ),
        ];
        crate::openai::refuse_first(checks)
    }
}

/// The samplers llama.cpp applies by default, in its order: the filters see the model's
/// own probabilities, and temperature applies to what they keep.
const DEFAULT_SAMPLERS: [Sampler; 4] = [
    Sampler::TopK,
    Sampler::TopP,
    Sampler::MinP,
    Sampler::Temperature,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sampler {
    TopK,
    TopP,
    MinP,
    Temperature,
}

impl Sampler {
    fn name(self) -> &'static str {
        match self {
            Sampler::TopK => "top_k",
            Sampler::TopP => "top_p",
            Sampler::MinP => "min_p",
            Sampler::Temperature => "temperature",
        }
    }
}

/// The samplers a request's `samplers` applies, in llama.cpp's order: names (or llama.cpp's
/// one-letter codes in a string). Samplers whose parameters are refused unless neutral
/// (penalties, DRY, typical, XTC, top-n-sigma) and llama.cpp's `infill` sampler are
/// accepted and apply nothing. The four sibyl applies must come in llama.cpp's default
/// order; temperature may come first instead, where it changes none of the filters' choices
/// but min-p's and top-p's (vLLM's order), which this API does not offer.
fn samplers(value: &Option<Value>) -> Result<Vec<Sampler>, GatewayError> {
    let too_many =
        || GatewayError::invalid_param("samplers", format!("at most {MAX_SAMPLERS} samplers"));
    let names: Vec<String> = match value {
        None | Some(Value::Null) => return Ok(DEFAULT_SAMPLERS.to_vec()),
        Some(Value::String(codes)) if codes.chars().count() > MAX_SAMPLERS => {
            return Err(too_many())
        }
        Some(Value::Array(items)) if items.len() > MAX_SAMPLERS => return Err(too_many()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                GatewayError::invalid_param("samplers", "`samplers` takes a list of names")
            })?,
        // llama.cpp's codes: k top_k, p top_p, m min_p, t temperature; e penalties, d DRY,
        // s top-n-sigma, y typical, x XTC, i infill.
        Some(Value::String(codes)) => codes
            .chars()
            .map(|c| match c {
                'k' => "top_k".into(),
                'p' => "top_p".into(),
                'm' => "min_p".into(),
                't' => "temperature".into(),
                'e' => "penalties".into(),
                'd' => "dry".into(),
                's' => "top_n_sigma".into(),
                'y' => "typ_p".into(),
                'x' => "xtc".into(),
                'i' => "infill".into(),
                other => other.to_string(),
            })
            .collect(),
        Some(_) => {
            return Err(GatewayError::invalid_param(
                "samplers",
                "`samplers` takes a list of names",
            ))
        }
    };
    if names.len() > MAX_SAMPLERS {
        return Err(GatewayError::invalid_param(
            "samplers",
            format!("at most {MAX_SAMPLERS} samplers"),
        ));
    }
    let mut chosen = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(GatewayError::invalid_param(
                "samplers",
                format!("`{name}` is listed twice"),
            ));
        }
        let sampler = match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "top_k" => Sampler::TopK,
            "top_p" | "nucleus" => Sampler::TopP,
            "min_p" => Sampler::MinP,
            "temperature" | "temp" => Sampler::Temperature,
            "penalties" | "dry" | "top_n_sigma" | "typ_p" | "typical_p" | "typical" | "xtc"
            | "infill" => continue,
            _ => {
                return Err(GatewayError::invalid_param(
                    "samplers",
                    format!("unknown sampler `{name}`"),
                ))
            }
        };
        if chosen.contains(&sampler) {
            return Err(GatewayError::invalid_param(
                "samplers",
                format!("`{name}` names a sampler listed before"),
            ));
        }
        chosen.push(sampler);
    }
    let rank = |s: &Sampler| DEFAULT_SAMPLERS.iter().position(|d| d == s);
    if !chosen
        .windows(2)
        .all(|pair| rank(&pair[0]) < rank(&pair[1]))
    {
        return Err(GatewayError::invalid_param(
            "samplers",
            "sibyl applies `top_k`, `top_p`, `min_p`, `temperature` in this order (llama.cpp's \
             default); list them in it",
        ));
    }
    Ok(chosen)
}

/// How a request's completions are asked for, and what its responses say about it.
struct Settings {
    generation: Generation,
    choices: u32,
    /// `n_predict: 0`: the prompt is computed (into the prefix cache) and no text comes back.
    prompt_only: bool,
    n_indent: usize,
    t_max_predict: Option<Duration>,
    response_fields: Option<Vec<String>>,
    stream: bool,
    /// What responses report as `generation_settings`.
    reported: Value,
}

impl NativeRequest {
    /// The generation this request asks for (its prompt yet to be set), with llama.cpp's
    /// defaults.
    fn settings(self, gateway: &Gateway) -> Result<Settings, GatewayError> {
        self.unsupported.check()?;
        gateway.check_model(self.model.as_deref())?;
        let n_predict = match self.n_predict.or(self.max_tokens) {
            None => None,
            Some(n) if n < 0 => None,
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let chain = samplers(&self.samplers)?;
        let has = |s: Sampler| chain.contains(&s);
        // llama.cpp's defaults, where neither the request nor the server says otherwise.
        let server = gateway.sampling_defaults();
        let top_k = match self.top_k.or(server.top_k).unwrap_or(40) {
            k if k <= 0 || !has(Sampler::TopK) => None,
            k => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        };
        let top_p =
            Some(self.top_p.or(server.top_p).unwrap_or(0.95)).filter(|_| has(Sampler::TopP));
        let min_p =
            Some(self.min_p.or(server.min_p).unwrap_or(0.05)).filter(|_| has(Sampler::MinP));
        // Without the temperature sampler llama.cpp draws from the filtered probabilities as
        // they are; at or below 0 it takes the most likely token.
        let temperature = match self.temperature.or(server.temperature).unwrap_or(0.8) {
            _ if !has(Sampler::Temperature) => 1.0,
            t if t <= 0.0 => 0.0,
            t => t,
        };
        let seed = match self.seed {
            None | Some(-1) | Some(0xFFFF_FFFF) => None,
            Some(seed) => Some(u64::try_from(seed).map_err(|_| {
                GatewayError::invalid_param("seed", "`seed` must be -1 (random) or at least 0")
            })?),
        };
        let sampling = Sampling::new(temperature, top_k, top_p, seed)?
            .with_min_p(min_p)?
            .filters_first();
        let choices = self.n_cmpl.or(self.n).unwrap_or(1);
        if !(1..=MAX_COMPLETIONS).contains(&choices) {
            return Err(GatewayError::invalid_param(
                "n_cmpl",
                format!("`n_cmpl` must be from 1 to {MAX_COMPLETIONS}"),
            ));
        }
        let count = |value: Option<i64>| usize::try_from(value.unwrap_or(0)).unwrap_or(0);
        let t_max_predict = self
            .t_max_predict_ms
            .filter(|&ms| ms > 0)
            .map(|ms| Duration::from_millis(ms as u64));
        let speculation = match self.speculation.as_ref().and_then(|s| s.get("enabled")) {
            Some(Value::Bool(false)) => Speculation::Off,
            _ => Speculation::Default,
        };
        let grammar = match self.json_schema {
            None | Some(Value::Null) => None,
            Some(Value::String(schema)) => Some(Grammar::JsonSchema(schema)),
            Some(schema) => Some(Grammar::JsonSchema(schema.to_string())),
        };
        let stop: Vec<String> = self
            .stop
            .unwrap_or_default()
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        let reported = json!({
            "n_ctx": gateway.context_length(),
            "n_predict": n_predict.map_or(-1, |n| n as i64),
            "seed": seed.map_or(0xFFFF_FFFFu64, |s| s),
            "temperature": temperature,
            "top_k": top_k.unwrap_or(0),
            "top_p": top_p.unwrap_or(1.0),
            "min_p": min_p.unwrap_or(0.0),
            "stop": stop,
            "ignore_eos": self.ignore_eos,
            "stream": self.stream,
            "samplers": chain.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "speculative": speculation != Speculation::Off,
        });
        let generation = Generation {
            model: self.model.filter(|m| !m.is_empty()),
            prompt: PromptInput::Tokens(Vec::new()),
            // The prompt alone: one token is made (it completes the step that stores the
            // prompt's work) and left out.
            max_tokens: n_predict.map(|n| n.max(1)),
            sampling,
            speculation,
            stop,
            details: self.return_tokens,
            prefix_cache: self.cache_prompt.filter(|&c| !c),
            logprobs: None,
            prompt_logprobs: None,
            grammar,
            prediction: None,
            ending: Ending {
                ignore_eos: self.ignore_eos,
                ..Ending::default()
            },
            api: crate::generation::Api::Http,
            request_id: String::new(),
            key_id: None,
        };
        Ok(Settings {
            generation,
            choices,
            prompt_only: n_predict == Some(0),
            n_indent: count(self.n_indent),
            t_max_predict,
            response_fields: self.response_fields,
            stream: self.stream,
            reported,
        })
    }
}

async fn completion(
    State(gateway): State<Arc<Gateway>>,
    key: Key,
    body: Body,
) -> Result<Response, GatewayError> {
    let mut request: NativeRequest = parse(body)?;
    let prompts = match request.prompt.take() {
        Some(Value::String(text)) => vec![PromptInput::Text(text)],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            let ids = items.iter().map(|v| v.as_u64().unwrap_or(u64::MAX));
            let ids = ids
                .map(|id| u32::try_from(id).unwrap_or(u32::MAX))
                .collect();
            vec![PromptInput::Tokens(ids)]
        }
        // Several prompts, each text or token ids.
        Some(Value::Array(items)) if !items.is_empty() => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Ok(PromptInput::Text(text)),
                Value::Array(ids) => ids
                    .iter()
                    .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .map(PromptInput::Tokens)
                    .ok_or_else(mixed),
                _ => Err(mixed()),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(GatewayError::invalid_param(
                "prompt",
                "`prompt` takes text, token ids, or a list of them",
            ))
        }
    };
    let settings = request.settings(&gateway)?;
    respond(gateway, settings, prompts, false, key_id(key)).await
}

fn mixed() -> GatewayError {
    GatewayError::invalid_param(
        "prompt",
        "each prompt is text or a list of token ids (text and ids mixed in one prompt are \
         not supported)",
    )
}

/// The files of `input_extra`: `{"filename": name, "text": text}` each (the name "tmp"
/// when there is none; other fields ignored, as llama.cpp ignores them).
fn extra_files(value: Option<Value>) -> Result<Vec<InfillFile>, GatewayError> {
    let bad = |message: &str| GatewayError::invalid_param("input_extra", message.to_string());
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(bad(
                "`input_extra` must be a list of {\"filename\": string, \"text\": string}",
            ))
        }
    };
    if items.len() > MAX_EXTRA_FILES {
        return Err(bad(&format!("at most {MAX_EXTRA_FILES} files")));
    }
    items
        .into_iter()
        .map(|item| {
            let text = item.get("text").and_then(Value::as_str);
            let filename = match item.get("filename") {
                None | Some(Value::Null) => Some("tmp"),
                Some(name) => name.as_str(),
            };
            match (filename, text) {
                (Some(filename), Some(text)) => Ok(InfillFile {
                    filename: filename.to_string(),
                    text: text.to_string(),
                }),
                (_, None) => Err(bad("each file of `input_extra` needs a string `text`")),
                (None, _) => Err(bad("a file's `filename` must be a string")),
            }
        })
        .collect()
}

async fn infill(
    State(gateway): State<Arc<Gateway>>,
    key: Key,
    body: Body,
) -> Result<Response, GatewayError> {
    let mut request: NativeRequest = parse(body)?;
    let files = extra_files(request.input_extra.take())?;
    let required = |field: Option<String>, name: &'static str| {
        field.ok_or_else(|| GatewayError::invalid_param(name, format!("`{name}` is required")))
    };
    let prefix = required(request.input_prefix.take(), "input_prefix")?;
    let suffix = required(request.input_suffix.take(), "input_suffix")?;
    let middle = match request.prompt.take() {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text,
        Some(_) => {
            return Err(GatewayError::invalid_param(
                "prompt",
                "`prompt` of /infill is text: the start of the middle",
            ))
        }
    };
    // Room kept for the output: `n_predict`, or a quarter of llama.cpp's batch.
    let reserved = match request.n_predict.or(request.max_tokens) {
        Some(n) if n >= 0 => usize::try_from(n).unwrap_or(usize::MAX),
        _ => crate::generation::INFILL_BATCH / 4,
    };
    let settings = request.settings(&gateway)?;
    let (tokens, cut) = gateway
        .repo_infill_tokens(files, prefix, middle, suffix, reserved)
        .await?;
    let prompts = vec![PromptInput::Tokens(tokens)];
    respond(gateway, settings, prompts, cut, key_id(key)).await
}

/// Starts `choices` completions of each of `prompts` (completion `p * choices + i` is
/// prompt `p`'s `i`th, with the seed plus `i`) and answers with them.
async fn respond(
    gateway: Arc<Gateway>,
    settings: Settings,
    prompts: Vec<PromptInput>,
    truncated: bool,
    key: Option<sibyl_proto::auth::KeyId>,
) -> Result<Response, GatewayError> {
    let total = prompts.len() * settings.choices as usize;
    if total > MAX_COMPLETIONS as usize {
        return Err(GatewayError::invalid_param(
            "prompt",
            format!(
                "{} prompts times `n_cmpl` {} is over {MAX_COMPLETIONS} completions",
                prompts.len(),
                settings.choices
            ),
        ));
    }
    let id = format!("cmpl-{:032x}", rand::random::<u128>());
    let started = Instant::now();
    let (events, receiver) = mpsc::channel(64);
    let mut runs = Vec::new();
    for (p, prompt) in prompts.into_iter().enumerate() {
        // The prompt's text, as the responses report it: once for all its completions.
        let text = match &prompt {
            PromptInput::Text(text) => text.clone(),
            PromptInput::Tokens(ids) => gateway.detokenize(ids).unwrap_or_default(),
            _ => String::new(),
        };
        for i in 0..settings.choices {
            let index = p * settings.choices as usize + i as usize;
            let mut generation = settings.generation.clone();
            generation.prompt = prompt.clone();
            generation.key_id = key.clone();
            generation.request_id = match index {
                0 => id.clone(),
                _ => format!("{id}-{index}"),
            };
            generation.sampling.seed = generation
                .sampling
                .seed
                .map(|s| s.wrapping_add(u64::from(i)));
            let (prompt_tokens, outputs) = gateway.generate(generation).await?;
            runs.push((index, text.clone(), prompt_tokens, outputs));
        }
    }
    for (index, prompt, prompt_tokens, outputs) in runs {
        let choice = Choice {
            index,
            prompt,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            limits: LineLimits::new(settings.n_indent, settings.t_max_predict),
            prompt_only: settings.prompt_only,
            truncated,
            started,
        };
        tokio::spawn(choice.run(outputs, events.clone()));
    }
    drop(events);
    let meta = Meta {
        model: gateway.model_name().to_string(),
        settings: settings.reported,
        fields: settings.response_fields,
    };
    if settings.stream {
        let keep_alive = KeepAlive::new().interval(gateway.sse_keep_alive());
        let events = stream_events(meta, receiver, total);
        return Ok(Sse::new(ReceiverStream::new(events))
            .keep_alive(keep_alive)
            .into_response());
    }
    whole(meta, receiver, total).await
}

/// What every completion's response repeats.
struct Meta {
    model: String,
    settings: Value,
    fields: Option<Vec<String>>,
}

impl Meta {
    /// A finished completion as llama.cpp reports it, cut to `response_fields` when the
    /// request lists them (each path `a/b` copied to the top under its own name).
    fn final_object(&self, done: &Finished, content: &str) -> Value {
        let prompt_ms = done.prompt_time.as_secs_f64() * 1e3;
        let predicted_ms = done.predict_time.as_secs_f64() * 1e3;
        let per = |n: u32, ms: f64| {
            let per_token = if n > 0 {
                json!(ms / f64::from(n))
            } else {
                Value::Null
            };
            let per_second = if ms > 0.0 {
                json!(1e3 * f64::from(n) / ms)
            } else {
                Value::Null
            };
            (per_token, per_second)
        };
        let prompt_n = done.prompt_tokens - done.cached_tokens.min(done.prompt_tokens);
        let (prompt_per_token, prompt_per_second) = per(prompt_n, prompt_ms);
        let (predicted_per_token, predicted_per_second) = per(done.predicted, predicted_ms);
        let object = json!({
            "index": done.index,
            "content": content,
            "tokens": done.tokens,
            "id_slot": 0,
            "stop": true,
            "model": self.model,
            "tokens_predicted": done.predicted,
            "tokens_evaluated": done.prompt_tokens,
            "generation_settings": self.settings,
            "prompt": done.prompt,
            "has_new_line": done.has_new_line,
            "truncated": done.truncated,
            "stop_type": done.stop_type,
            "stopping_word": done.stopping_word,
            "tokens_cached": done.prompt_tokens + done.predicted,
            "timings": {
                "cache_n": done.cached_tokens,
                "prompt_n": prompt_n,
                "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_per_token,
                "prompt_per_second": prompt_per_second,
                "predicted_n": done.predicted,
                "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_per_token,
                "predicted_per_second": predicted_per_second,
                "draft_n": done.drafted,
                "draft_n_accepted": done.accepted,
            },
        });
        match &self.fields {
            None => object,
            Some(fields) if fields.is_empty() => object,
            Some(fields) => {
                let mut picked = Map::new();
                for path in fields {
                    let found = path
                        .split('/')
                        .try_fold(&object, |value, key| value.get(key));
                    if let Some(value) = found {
                        picked.insert(path.clone(), value.clone());
                    }
                }
                Value::Object(picked)
            }
        }
    }
}

/// What a completion sends to the response.
enum ChoiceEvent {
    Text {
        index: usize,
        text: String,
        predicted: u32,
        evaluated: u32,
    },
    Done(Box<Finished>),
    Failed(GatewayError),
}

/// A completion once it ended.
#[derive(Debug, Clone, PartialEq)]
struct Finished {
    index: usize,
    prompt: String,
    prompt_tokens: u32,
    cached_tokens: u32,
    predicted: u32,
    tokens: Vec<u32>,
    stop_type: &'static str,
    stopping_word: String,
    has_new_line: bool,
    truncated: bool,
    prompt_time: Duration,
    predict_time: Duration,
    drafted: u32,
    accepted: u32,
}

/// One completion, relayed from its output stream to the response.
struct Choice {
    index: usize,
    prompt: String,
    prompt_tokens: u32,
    limits: LineLimits,
    prompt_only: bool,
    truncated: bool,
    started: Instant,
}

impl Choice {
    /// Relays `outputs` until the completion ends, `n_indent` or `t_max_predict_ms` ends
    /// it (dropping `outputs` then cancels it on the verifier), or the response goes away.
    async fn run(mut self, mut outputs: OutputStream, events: mpsc::Sender<ChoiceEvent>) {
        let mut predicted = 0u32;
        let mut first: Option<Instant> = None;
        let last = loop {
            let output = tokio::select! {
                () = events.closed() => return,
                output = outputs.recv() => output,
            };
            break match output {
                None => ChoiceEvent::Failed(GatewayError::Internal(
                    "the generation ended without a summary".into(),
                )),
                Some(Err(error)) => ChoiceEvent::Failed(error),
                Some(Ok(Output::Text { text, tokens, .. })) => {
                    let began = *first.get_or_insert_with(Instant::now);
                    predicted += tokens;
                    if self.prompt_only {
                        continue;
                    }
                    let (keep, ended) = self.limits.push(&text, began.elapsed());
                    let text = text[..keep].to_string();
                    if !text.is_empty() {
                        let event = ChoiceEvent::Text {
                            index: self.index,
                            text,
                            predicted,
                            evaluated: self.prompt_tokens,
                        };
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                    if !ended {
                        continue;
                    }
                    let now = Instant::now();
                    let summary = Summary {
                        finish_reason: FinishReason::Length,
                        prompt_tokens: self.prompt_tokens,
                        completion_tokens: predicted,
                        ..Summary::default()
                    };
                    let done = self.finished(summary, first.map(|f| (f, now)));
                    ChoiceEvent::Done(Box::new(done))
                }
                Some(Ok(Output::Done(mut summary))) => {
                    let now = Instant::now();
                    if self.prompt_only {
                        summary.completion_tokens = 0;
                        summary.finish_reason = FinishReason::Length;
                        summary.token_ids.clear();
                    }
                    let done = self.finished(*summary, first.map(|f| (f, now)));
                    ChoiceEvent::Done(Box::new(done))
                }
            };
        };
        // The generation is cancelled now, not once a slow client has read the end.
        drop(outputs);
        let _ = events.send(last).await;
    }

    /// The completion's report: the verifier's timings where it sent them, else the
    /// gateway's clock (from the request to the first text, then to the end).
    fn finished(&mut self, summary: Summary, times: Option<(Instant, Instant)>) -> Finished {
        let (prompt_time, predict_time) = match (summary.prompt_time, times) {
            (t, _) if !t.is_zero() => (t, summary.decode_time),
            (_, Some((first, end))) => (first - self.started, end - first),
            (_, None) => (self.started.elapsed(), Duration::ZERO),
        };
        let stop_type = match (&summary.finish_reason, &summary.stop_string) {
            (_, Some(_)) => "word",
            (FinishReason::Stop, None) => "eos",
            (FinishReason::Length, None) => "limit",
            _ => "none",
        };
        let drafted = summary.accepted_prediction_tokens + summary.rejected_prediction_tokens;
        Finished {
            index: self.index,
            prompt: std::mem::take(&mut self.prompt),
            prompt_tokens: summary.prompt_tokens.max(self.prompt_tokens),
            cached_tokens: summary.cached_tokens,
            predicted: summary.completion_tokens,
            tokens: summary.token_ids,
            stop_type,
            stopping_word: summary.stop_string.unwrap_or_default(),
            has_new_line: self.limits.has_new_line,
            truncated: self.truncated,
            prompt_time,
            predict_time,
            drafted,
            accepted: summary.accepted_prediction_tokens,
        }
    }
}

/// llama.cpp's line limits for code completion: after the first newline, a line indented
/// less than `n_indent` ends the text before its first other character (an empty line
/// too); and once `t_max_predict` has passed since the first token, the next newline ends
/// it (after the newline).
#[derive(Debug, Clone)]
struct LineLimits {
    n_indent: usize,
    t_max_predict: Option<Duration>,
    has_new_line: bool,
    /// The blanks counted at the start of the current line, while only blanks came after
    /// a newline (with `n_indent`).
    indent: Option<usize>,
}

impl LineLimits {
    fn new(n_indent: usize, t_max_predict: Option<Duration>) -> Self {
        Self {
            n_indent,
            t_max_predict,
            has_new_line: false,
            indent: None,
        }
    }

    /// How many bytes of the next `piece` of text to keep (`elapsed` since the first
    /// token), and whether the text ends there.
    fn push(&mut self, piece: &str, elapsed: Duration) -> (usize, bool) {
        for (at, c) in piece.char_indices() {
            if let Some(indent) = self.indent {
                if c == ' ' || c == '\t' {
                    self.indent = Some(indent + 1);
                    continue;
                }
                self.indent = None;
                if indent < self.n_indent {
                    return (at, true);
                }
            }
            if c == '\n' {
                self.has_new_line = true;
                if self.n_indent > 0 {
                    self.indent = Some(0);
                }
                if self.t_max_predict.is_some_and(|limit| elapsed > limit) {
                    return (at + 1, true);
                }
            }
        }
        (piece.len(), false)
    }
}

/// A non-streamed response: one object, or a list of them (several prompts or `n_cmpl`).
async fn whole(
    meta: Meta,
    mut events: mpsc::Receiver<ChoiceEvent>,
    total: usize,
) -> Result<Response, GatewayError> {
    let mut texts = vec![String::new(); total];
    let mut done: Vec<Option<Box<Finished>>> = vec![None; total];
    while let Some(event) = events.recv().await {
        match event {
            ChoiceEvent::Text { index, text, .. } => texts[index].push_str(&text),
            ChoiceEvent::Done(finished) => {
                let index = finished.index;
                done[index] = Some(finished);
            }
            ChoiceEvent::Failed(error) => return Err(error),
        }
    }
    let objects: Vec<Value> = done
        .iter()
        .zip(&texts)
        .map(|(finished, text)| {
            finished
                .as_ref()
                .map(|f| meta.final_object(f, text))
                .ok_or_else(|| GatewayError::Internal("a completion did not finish".into()))
        })
        .collect::<Result<_, _>>()?;
    Ok(match <[Value; 1]>::try_from(objects) {
        Ok([object]) => Json(object).into_response(),
        Err(objects) => Json(objects).into_response(),
    })
}

/// A streamed response: `data: {...}` events of text as it comes, then each completion's
/// final object (no `[DONE]`, as llama.cpp's native API).
fn stream_events(
    meta: Meta,
    mut events: mpsc::Receiver<ChoiceEvent>,
    total: usize,
) -> mpsc::Receiver<Result<Event, Infallible>> {
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut finished = 0;
        loop {
            let event = tokio::select! {
                () = sender.closed() => return,
                event = events.recv() => event,
            };
            let body = match event {
                None => break,
                Some(ChoiceEvent::Text {
                    index,
                    text,
                    predicted,
                    evaluated,
                }) => json!({
                    "index": index,
                    "content": text,
                    "tokens": [],
                    "stop": false,
                    "id_slot": 0,
                    "tokens_predicted": predicted,
                    "tokens_evaluated": evaluated,
                }),
                Some(ChoiceEvent::Done(done)) => {
                    finished += 1;
                    meta.final_object(&done, "")
                }
                Some(ChoiceEvent::Failed(error)) => {
                    let body = json!({"error": {
                        "code": 500,
                        "message": error.to_string(),
                        "type": "server_error",
                    }});
                    let _ = sender
                        .send(Ok(Event::default().data(body.to_string())))
                        .await;
                    return;
                }
            };
            if sender
                .send(Ok(Event::default().data(body.to_string())))
                .await
                .is_err()
                || finished == total
            {
                return;
            }
        }
    });
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(n_indent: usize, pieces: &[&str]) -> (String, bool) {
        let mut limits = LineLimits::new(n_indent, None);
        let mut text = String::new();
        for piece in pieces {
            let (keep, ended) = limits.push(piece, Duration::ZERO);
            text.push_str(&piece[..keep]);
            if ended {
                return (text, true);
            }
        }
        (text, false)
    }

    #[test]
    fn a_line_indented_less_than_n_indent_ends_the_text_before_it() {
        // The first line is the rest of the cursor's line: never checked.
        let body = "x = 1\n    y = 2\n";
        assert_eq!(
            limits(4, &[body, "    return y\n", "def g():"]),
            ("x = 1\n    y = 2\n    return y\n".into(), true)
        );
        // Split across pieces, blanks before the character are kept.
        assert_eq!(
            limits(4, &["a\n  ", "  b\n ", " c"]),
            ("a\n    b\n  ".into(), true)
        );
        // An empty line ends it too (llama.cpp's rule); tabs count as one each.
        assert_eq!(limits(2, &["a\n\t\tb\n\nc"]), ("a\n\t\tb\n".into(), true));
        // Without `n_indent`, nothing.
        assert_eq!(limits(0, &["a\nb\n\nc"]), ("a\nb\n\nc".into(), false));
    }

    #[test]
    fn past_t_max_predict_the_next_newline_ends_the_text() {
        let mut limits = LineLimits::new(0, Some(Duration::from_millis(100)));
        assert_eq!(limits.push("a\nb", Duration::from_millis(50)), (3, false));
        assert_eq!(limits.push("cd", Duration::from_millis(150)), (2, false));
        assert_eq!(limits.push("e\nf\n", Duration::from_millis(200)), (2, true));
        assert!(limits.has_new_line);
    }

    #[test]
    fn samplers_pick_and_order_as_llama_cpp() {
        let chain = |v: Value| samplers(&Some(v));
        assert_eq!(samplers(&None).unwrap(), DEFAULT_SAMPLERS);
        // llama.vim's: top-k and top-p, no temperature; `infill` applies nothing.
        assert_eq!(
            chain(json!(["top_k", "top_p", "infill"])).unwrap(),
            [Sampler::TopK, Sampler::TopP]
        );
        assert_eq!(
            chain(json!("kpt")).unwrap(),
            [Sampler::TopK, Sampler::TopP, Sampler::Temperature]
        );
        assert_eq!(chain(json!([])).unwrap(), []);
        for bad in [
            json!(["temperature", "top_p"]),
            json!(["top_k", "top_k"]),
            json!(["greedy"]),
            json!(3),
            // No-op samplers count too: a long list is refused, not allocated.
            json!(["infill", "infill"]),
            json!("i".repeat(17)),
        ] {
            let error = chain(bad.clone()).unwrap_err();
            assert!(
                matches!(
                    error,
                    GatewayError::InvalidParam {
                        param: "samplers",
                        ..
                    }
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn response_fields_pick_paths_under_their_own_names() {
        let meta = |fields: Option<Vec<&str>>| Meta {
            model: "m".into(),
            settings: json!({"n_ctx": 4096}),
            fields: fields.map(|f| f.into_iter().map(String::from).collect()),
        };
        let done = Finished {
            index: 0,
            prompt: "p".into(),
            prompt_tokens: 10,
            cached_tokens: 4,
            predicted: 5,
            tokens: Vec::new(),
            stop_type: "eos",
            stopping_word: String::new(),
            has_new_line: true,
            truncated: false,
            prompt_time: Duration::from_millis(30),
            predict_time: Duration::from_millis(100),
            drafted: 6,
            accepted: 3,
        };
        let whole = meta(None).final_object(&done, "text");
        assert_eq!(whole["content"], "text");
        assert_eq!(whole["tokens_cached"], 15);
        assert_eq!(whole["timings"]["prompt_n"], 6);
        assert_eq!(whole["timings"]["predicted_per_second"], 50.0);
        assert_eq!(whole["generation_settings"]["n_ctx"], 4096);
        let picked = meta(Some(vec!["content", "timings/prompt_ms", "nothing/here"]))
            .final_object(&done, "text");
        assert_eq!(
            picked,
            json!({"content": "text", "timings/prompt_ms": 30.0})
        );
        assert_eq!(meta(Some(vec![""])).final_object(&done, "text"), json!({}));
    }
}
