//! The OpenAI API's request bodies, typed, and the generation the gateway makes of them:
//! the fields both endpoints share are read and checked in one place ([`Common`]).

use super::unsupported::Unsupported;
use crate::generation::{Api, GatewayError, Generation, PromptInput};
use crate::params::{Sampling, Speculation};
use serde::Deserialize;
use sibyl_engine::ChatMessage;

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
    #[serde(flatten)]
    unsupported: Unsupported,
}

impl Common {
    pub(super) fn generation(self, prompt: PromptInput) -> Result<Generation, GatewayError> {
        self.unsupported.check()?;
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
        )?;
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
            api: Api::Http,
            request_id: String::new(),
            key_id: None,
        })
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct CompletionRequest {
    pub(super) prompt: OneOrMany,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    pub(super) messages: Vec<ChatRequestMessage>,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatRequestMessage {
    role: String,
    content: Option<ChatContent>,
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
        Ok(ChatMessage::new(role, &content))
    }
}
