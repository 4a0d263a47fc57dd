//! The OpenAI API's request bodies, typed, and the generation the gateway makes of them:
//! the fields both endpoints share are read and checked in one place ([`Common`]).

use super::tools::Tools;
use super::unsupported::Unsupported;
use crate::generation::{Api, Ending, GatewayError, Generation, PromptInput};
use crate::params::{check_logprobs, Grammar, Rendering, Sampling, Speculation, MAX_LOGPROBS};
use serde::Deserialize;
use serde_json::Value;
use sibyl_engine::{ChatMessage, FunctionCall, ToolCall};
use sibyl_spec::Penalties;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpeculationExtension {
    enabled: Option<bool>,
    drafters: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    #[serde(default)]
    pub(super) stream: bool,
    pub(super) stream_options: Option<StreamOptions>,
    stop: Option<OneOrMany>,
    speculation: Option<SpeculationExtension>,
    prefix_cache: Option<bool>,
    /// Chat: whether to return log probabilities; completions: how many alternatives.
    logprobs: Option<Value>,
    /// Chat: how many alternatives (with `logprobs: true`).
    top_logprobs: Option<Value>,
    /// How many choices to generate.
    n: Option<Value>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// vLLM's extension (as llama.cpp's `repeat_penalty`).
    repetition_penalty: Option<f32>,
    /// Token ids (as strings) to the bias added to their logits.
    logit_bias: Option<Value>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema",
    /// "json_schema": {"schema": ...}}`.
    response_format: Option<Value>,
    /// vLLM's extensions.
    guided_json: Option<Value>,
    guided_regex: Option<Value>,
    guided_choice: Option<Value>,
    guided_grammar: Option<Value>,
    /// vLLM's newer spelling of the `guided_*` fields: `{"json" | "regex" | "choice" |
    /// "grammar": ...}`.
    structured_outputs: Option<Value>,
    min_p: Option<f32>,
    min_tokens: Option<u32>,
    #[serde(default)]
    ignore_eos: bool,
    stop_token_ids: Option<Vec<u32>>,
    /// Set by the Messages API: see [`crate::generation::Ending::at_window`].
    #[serde(skip)]
    pub(super) at_window: bool,
    /// vLLM's: the text ends after the stop string that ended it, not before.
    #[serde(default)]
    include_stop_str_in_output: bool,
    /// Chat only: the functions the model may call, whether it must, and whether it may
    /// call several at once.
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<Value>,
    /// Completions only: the prompt comes back before the completion (with `logprobs`,
    /// its tokens' log-probabilities too).
    echo: Option<Value>,
    /// OpenAI's predicted output: `{"type": "content", "content": text or text parts}`.
    prediction: Option<Value>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

/// The grammar of vLLM's field `param` of kind `kind` (`json`, `regex`, `choice`,
/// `grammar`) set to `value`.
fn guided_grammar(param: &'static str, kind: &str, value: &Value) -> Result<Grammar, GatewayError> {
    let bad = |what: &str| GatewayError::invalid_param(param, format!("`{param}` takes {what}"));
    match (kind, value) {
        // A schema as JSON or as its text.
        ("json", Value::String(schema)) => Ok(Grammar::JsonSchema(schema.clone())),
        ("json", schema @ (Value::Object(_) | Value::Bool(_))) => {
            Ok(Grammar::JsonSchema(schema.to_string()))
        }
        ("json", _) => Err(bad("a JSON Schema")),
        ("regex", Value::String(regex)) => Ok(Grammar::Regex(regex.clone())),
        ("regex", _) => Err(bad("a regular expression as a string")),
        ("choice", Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(String::from))
            .collect::<Option<Vec<String>>>()
            .filter(|choices| !choices.is_empty())
            .map(Grammar::Choice)
            .ok_or_else(|| bad("a non-empty list of strings")),
        ("choice", _) => Err(bad("a non-empty list of strings")),
        ("grammar", Value::String(lark)) => Ok(Grammar::Lark(lark.clone())),
        ("grammar", _) => Err(bad("a Lark grammar as a string")),
        _ => Err(bad("one of `json`, `regex`, `choice`, `grammar`")),
    }
}

/// A count of 0 or more in a JSON value: `Some(None)` for null, `None` for anything but a
/// non-negative integer.
fn count(value: &Option<Value>) -> Option<Option<u32>> {
    match value {
        None | Some(Value::Null) => Some(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(u32::try_from(n).unwrap_or(u32::MAX))),
    }
}

/// Most choices one request may ask for (`n`); each is a session of its own on the
/// verifier, batched with the others.
pub(super) const MAX_CHOICES: usize = 8;

/// Most generations one request may ask for: its prompts (a completion takes a list of
/// them, as lm-evaluation-harness sends a batch) times `n`.
pub(super) const MAX_GENERATIONS: usize = 64;

impl Common {
    /// The bias and penalties the request asks for; the values are checked with the rest
    /// of the sampling ([`Sampling::with_penalties`]).
    fn penalties(&self) -> Result<Penalties, GatewayError> {
        let bad_bias = || {
            GatewayError::invalid_param(
                "logit_bias",
                "`logit_bias` maps token ids (as strings) to numbers from -100 to 100",
            )
        };
        let logit_bias = match &self.logit_bias {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(entries)) => {
                let mut bias = entries
                    .iter()
                    .map(|(token, value)| {
                        let token = token.trim().parse::<u32>().map_err(|_| bad_bias())?;
                        let value = value.as_f64().ok_or_else(bad_bias)?;
                        Ok((token, value as f32))
                    })
                    .collect::<Result<Vec<_>, GatewayError>>()?;
                bias.sort_by_key(|&(token, _)| token);
                bias
            }
            Some(_) => return Err(bad_bias()),
        };
        Ok(Penalties {
            presence: self.presence_penalty.unwrap_or(0.0),
            frequency: self.frequency_penalty.unwrap_or(0.0),
            repetition: self.repetition_penalty.unwrap_or(1.0),
            logit_bias,
        })
    }

    /// The grammar the output must follow, if the request sets one: `response_format`,
    /// vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` or
    /// `structured_outputs` (at most one of them).
    fn grammar(&self) -> Result<Option<Grammar>, GatewayError> {
        let mut found: Vec<(&'static str, Grammar)> = Vec::new();
        if let Some(schema) = self.json_schema()? {
            found.push(("response_format", Grammar::JsonSchema(schema)));
        }
        let guided = [
            ("guided_json", "json", &self.guided_json),
            ("guided_regex", "regex", &self.guided_regex),
            ("guided_choice", "choice", &self.guided_choice),
            ("guided_grammar", "grammar", &self.guided_grammar),
        ];
        for (param, kind, value) in guided {
            if let Some(value) = value.as_ref().filter(|v| !v.is_null()) {
                found.push((param, guided_grammar(param, kind, value)?));
            }
        }
        if let Some(outputs) = self.structured_outputs.as_ref().filter(|v| !v.is_null()) {
            let param = "structured_outputs";
            let set: Vec<(&String, &Value)> = outputs
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| !v.is_null())
                .collect();
            match set.as_slice() {
                [(kind, value)] => found.push((param, guided_grammar(param, kind, value)?)),
                _ => {
                    return Err(GatewayError::invalid_param(
                        param,
                        "`structured_outputs` sets one of `json`, `regex`, `choice`, `grammar`",
                    ))
                }
            }
        }
        match found.len() {
            0 | 1 => Ok(found.pop().map(|(_, grammar)| grammar)),
            _ => Err(GatewayError::invalid_param(
                found[1].0,
                format!(
                    "`{}` and `{}` both constrain the output; set one",
                    found[0].0, found[1].0
                ),
            )),
        }
    }

    /// The JSON Schema `response_format` asks the output to match, if any.
    fn json_schema(&self) -> Result<Option<String>, GatewayError> {
        let bad = |message: &str| GatewayError::invalid_param("response_format", message);
        let Some(format) = self.response_format.as_ref().filter(|f| !f.is_null()) else {
            return Ok(None);
        };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(r#"{"type": "object"}"#.to_string())),
            Some("json_schema") => match format.get("json_schema").and_then(|s| s.get("schema")) {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => Ok(Some(schema.to_string())),
                _ => Err(bad(
                    "`response_format.json_schema.schema` must be a JSON Schema object",
                )),
            },
            _ => Err(bad(
                "`response_format.type` must be `text`, `json_object` or `json_schema`",
            )),
        }
    }

    /// The tools a chat request defines and how they may be called (`None`: no tools).
    pub(super) fn tools(&self) -> Result<Option<Tools>, GatewayError> {
        Tools::from_request(
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls.as_ref(),
        )
    }

    /// Whether the response repeats the prompt before each completion (`echo`; in a chat,
    /// as vLLM does, the last message's content when it is the assistant's).
    pub(super) fn echo(&self) -> Result<bool, GatewayError> {
        match &self.echo {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(false),
            Some(Value::Bool(true)) => Ok(true),
            Some(_) => Err(GatewayError::invalid_param(
                "echo",
                "`echo` is true or false",
            )),
        }
    }

    /// The text of a predicted output (`None` when absent or empty).
    fn prediction(&self) -> Result<Option<String>, GatewayError> {
        let bad = || {
            GatewayError::invalid_param(
                "prediction",
                "`prediction` is `{\"type\": \"content\", \"content\": ...}` with a string \
                 or a list of text parts",
            )
        };
        let content = match &self.prediction {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(fields))
                if fields.get("type").and_then(Value::as_str) == Some("content") =>
            {
                fields.get("content").ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        let text = match content {
            Value::String(text) => text.clone(),
            Value::Array(parts) => parts
                .iter()
                .map(|part| match (part.get("type"), part.get("text")) {
                    (Some(kind), Some(Value::String(text))) if kind == "text" => {
                        Some(text.as_str())
                    }
                    _ => None,
                })
                .collect::<Option<String>>()
                .ok_or_else(bad)?,
            _ => return Err(bad()),
        };
        Ok(Some(text).filter(|t| !t.is_empty()))
    }

    /// Whether the request asks for log probabilities at all (however it spells it).
    pub(super) fn logprobs_asked(&self) -> bool {
        !matches!(
            self.logprobs,
            None | Some(Value::Null) | Some(Value::Bool(false))
        )
    }

    /// How many choices the request asks for (`n`, 1 when absent).
    pub(super) fn choices(&self) -> Result<usize, GatewayError> {
        match count(&self.n) {
            Some(None) => Ok(1),
            Some(Some(n)) if (1..=MAX_CHOICES as u32).contains(&n) => Ok(n as usize),
            _ => Err(GatewayError::invalid_param(
                "n",
                format!("`n` must be from 1 to {MAX_CHOICES}"),
            )),
        }
    }

    /// How many alternatives' log probabilities a request asks for at each token, as the
    /// endpoint of `prompt` spells it: the chat endpoint's `logprobs: true` with
    /// `top_logprobs: N` (0 when absent), the completions endpoint's `logprobs: N`.
    fn logprobs(&self, prompt: &PromptInput) -> Result<Option<u32>, GatewayError> {
        let asked = match prompt {
            PromptInput::Chat { .. } => {
                let top = count(&self.top_logprobs).ok_or_else(|| {
                    GatewayError::invalid_param(
                        "top_logprobs",
                        format!("`top_logprobs` must be an integer from 0 to {MAX_LOGPROBS}"),
                    )
                })?;
                match &self.logprobs {
                    Some(Value::Bool(true)) => Some(top.unwrap_or(0)),
                    None | Some(Value::Null) | Some(Value::Bool(false)) => {
                        if top.is_some_and(|n| n > 0) {
                            return Err(GatewayError::invalid_param(
                                "top_logprobs",
                                "`top_logprobs` needs `logprobs: true`",
                            ));
                        }
                        None
                    }
                    Some(_) => {
                        return Err(GatewayError::invalid_param(
                            "logprobs",
                            "`logprobs` is true or false here (`top_logprobs` says how many alternatives)",
                        ))
                    }
                }
            }
            PromptInput::Text(_) | PromptInput::Tokens(_) | PromptInput::Infill { .. } => {
                if count(&self.top_logprobs).is_none_or(|n| n.is_some_and(|n| n > 0)) {
                    return Err(GatewayError::invalid_param(
                        "top_logprobs",
                        "`top_logprobs` is a chat parameter; /v1/completions takes `logprobs: N`",
                    ));
                }
                match &self.logprobs {
                    Some(Value::Bool(false)) => None,
                    other => count(other).ok_or_else(|| {
                        GatewayError::invalid_param(
                            "logprobs",
                            format!("`logprobs` must be an integer from 0 to {MAX_LOGPROBS}"),
                        )
                    })?,
                }
            }
        };
        let param = match prompt {
            PromptInput::Chat { .. } => "top_logprobs",
            PromptInput::Text(_) | PromptInput::Tokens(_) | PromptInput::Infill { .. } => {
                "logprobs"
            }
        };
        check_logprobs(asked, param)?;
        Ok(asked)
    }

    /// Takes `defaults` (the server's) for the sampling fields the request does not set.
    pub(super) fn default_sampling(&mut self, defaults: &crate::SamplingDefaults) {
        self.temperature = self.temperature.or(defaults.temperature);
        self.top_k = self.top_k.or(defaults.top_k);
        self.top_p = self.top_p.or(defaults.top_p);
        self.min_p = self.min_p.or(defaults.min_p);
    }

    /// The generation the request asks for, from `prompt` (with `tools`' definitions in it
    /// where they are offered); a `tool_choice` that asks for calls constrains the output
    /// to them.
    pub(super) fn generation(
        self,
        prompt: PromptInput,
        tools: Option<&Tools>,
    ) -> Result<Generation, GatewayError> {
        self.unsupported.check()?;
        // An echoed completion prompt is scored with its tokens' log-probabilities.
        let scored = self.echo()? && !matches!(prompt, PromptInput::Chat { .. });
        let grammar = match (self.grammar()?, tools.and_then(Tools::grammar)) {
            (Some(_), Some(_)) => {
                return Err(GatewayError::invalid_param(
                    "tool_choice",
                    "a `tool_choice` that asks for calls and a format for the output both \
                     constrain the output; set one",
                ))
            }
            (grammar, calls) => grammar.or(calls),
        };
        let logprobs = self.logprobs(&prompt)?;
        let prediction = self.prediction()?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (None, None) => None,
            (Some(n), _) | (None, Some(n)) if n < 1 => {
                let param = if self.max_completion_tokens.is_some() {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                return Err(GatewayError::invalid_param(
                    param,
                    format!("`{param}` must be at least 1"),
                ));
            }
            (Some(n), _) | (None, Some(n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        // OpenAI's defaults: temperature 1, top_p 1; top_k -1 or 0 for all tokens.
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
            Some(_) => {
                return Err(GatewayError::invalid_param(
                    "top_k",
                    "`top_k` must be -1 (all) or at least 1",
                ))
            }
        };
        let sampling = Sampling::new(
            self.temperature.unwrap_or(1.0),
            top_k,
            Some(self.top_p.unwrap_or(1.0)),
            self.seed,
        )?
        .with_penalties(self.penalties()?)?
        .with_min_p(self.min_p)?;
        let speculation = match self.speculation {
            None => Speculation::Default,
            Some(ext) => match (ext.enabled, ext.drafters) {
                (Some(false), _) => Speculation::Off,
                (_, drafters) => Speculation::On {
                    drafters: drafters.unwrap_or_default(),
                },
            },
        };
        Ok(Generation {
            model: self.model,
            prompt,
            max_tokens,
            sampling,
            speculation,
            stop: self.stop.map(OneOrMany::into_vec).unwrap_or_default(),
            details: false,
            prefix_cache: self.prefix_cache,
            logprobs,
            // With `echo`, the prompt's tokens come with theirs.
            prompt_logprobs: logprobs.filter(|_| scored),
            grammar,
            prediction,
            ending: Ending {
                min_tokens: self.min_tokens.unwrap_or(0),
                ignore_eos: self.ignore_eos,
                stop_token_ids: self.stop_token_ids.unwrap_or_default(),
                include_stop_string: self.include_stop_str_in_output,
                at_window: self.at_window,
            }
            .checked()?,
            api: Api::Http,
            request_id: String::new(),
            key_id: None,
        })
    }
}

/// A completion's `prompt`: text or token ids; one of them, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl CompletionPrompt {
    /// The prompts it holds, in order: at least one, at most [`MAX_GENERATIONS`]. With a
    /// `suffix` each text prompt is the code before a gap the model fills in.
    pub(super) fn into_inputs(
        self,
        suffix: Option<String>,
    ) -> Result<Vec<PromptInput>, GatewayError> {
        let text = |prefix: String| match &suffix {
            Some(suffix) => PromptInput::Infill {
                prefix,
                suffix: suffix.clone(),
            },
            None => PromptInput::Text(prefix),
        };
        let inputs: Vec<PromptInput> = match self {
            Self::Text(prefix) => vec![text(prefix)],
            Self::Texts(texts) => texts.into_iter().map(text).collect(),
            Self::Tokens(_) | Self::TokenLists(_) if suffix.is_some() => {
                return Err(GatewayError::invalid_param(
                    "suffix",
                    "`suffix` takes a text `prompt`, not token ids",
                ))
            }
            Self::Tokens(ids) => vec![PromptInput::Tokens(ids)],
            Self::TokenLists(lists) => lists.into_iter().map(PromptInput::Tokens).collect(),
        };
        if inputs.is_empty() || inputs.len() > MAX_GENERATIONS {
            return Err(GatewayError::invalid_param(
                "prompt",
                format!(
                    "`prompt` is a string, a list of token ids, or a list of 1 to \
                     {MAX_GENERATIONS} of either"
                ),
            ));
        }
        Ok(inputs)
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionRequest {
    pub(super) prompt: CompletionPrompt,
    /// The text after the completion: the model fills in the middle (an empty one asks
    /// for nothing, as OpenAI's default).
    pub(super) suffix: Option<String>,
    #[serde(flatten)]
    pub(super) common: Common,
}

/// The chat completion's fields that the Responses and Messages APIs take as they are:
/// the model, sampling (where the API has it) and sibyl's extensions.
#[derive(Debug, Default, Deserialize)]
pub(super) struct PassedOn {
    pub(super) model: Option<String>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) top_k: Option<i64>,
    pub(super) seed: Option<u64>,
    pub(super) speculation: Option<Value>,
    pub(super) prefix_cache: Option<bool>,
}

impl PassedOn {
    /// Sets those given among a chat completion request's fields.
    pub(super) fn set(self, chat: &mut serde_json::Map<String, Value>) {
        let fields = [
            ("model", self.model.map(Value::from)),
            ("temperature", self.temperature.map(Value::from)),
            ("top_p", self.top_p.map(Value::from)),
            ("top_k", self.top_k.map(Value::from)),
            ("seed", self.seed.map(Value::from)),
            ("speculation", self.speculation),
            ("prefix_cache", self.prefix_cache.map(Value::from)),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                chat.insert(key.into(), value);
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    pub(super) messages: Vec<ChatRequestMessage>,
    #[serde(flatten)]
    pub(super) rendering: Rendering,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequestMessage {
    role: String,
    content: Option<ChatContent>,
    /// An assistant message's calls.
    #[serde(default)]
    tool_calls: Vec<RequestToolCall>,
    /// A tool message's answer is to this call.
    tool_call_id: Option<String>,
    /// An assistant message's thinking, as a reasoning parser returned it (vLLM's newer
    /// `reasoning`, or `reasoning_content`): templates that read it write it back.
    reasoning: Option<String>,
    reasoning_content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RequestToolCall {
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    function: RequestFunctionCall,
}

#[derive(Debug, Deserialize)]
struct RequestFunctionCall {
    name: String,
    /// JSON text.
    arguments: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChatContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl ChatRequestMessage {
    pub(super) fn into_message(self) -> Result<ChatMessage, GatewayError> {
        // OpenAI's newer name for the system role; other roles are checked by the gateway.
        let role = if self.role == "developer" {
            "system"
        } else {
            self.role.as_str()
        };
        let content = match self.content {
            None => String::new(),
            Some(ChatContent::Text(text)) => text,
            Some(ChatContent::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(GatewayError::InvalidRequest(format!(
                                "content part `{kind}` is not supported"
                            )))
                        }
                    }
                }
                text
            }
        };
        let tool_calls = self
            .tool_calls
            .into_iter()
            .map(|call| {
                // Templates write the arguments with `tojson`: as a value, not as text.
                let arguments = serde_json::from_str(&call.function.arguments).map_err(|e| {
                    GatewayError::invalid_param(
                        "messages",
                        format!(
                            "the arguments of the call of `{}` are not JSON: {e}",
                            call.function.name
                        ),
                    )
                })?;
                Ok(ToolCall {
                    id: call.id.unwrap_or_default(),
                    kind: call.kind.unwrap_or_else(|| "function".into()),
                    function: FunctionCall {
                        name: call.function.name,
                        arguments,
                    },
                })
            })
            .collect::<Result<Vec<_>, GatewayError>>()?;
        Ok(ChatMessage {
            tool_calls,
            tool_call_id: self.tool_call_id,
            reasoning_content: self.reasoning_content.or(self.reasoning),
            ..ChatMessage::new(role, &content)
        })
    }
}
