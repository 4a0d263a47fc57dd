//! What a request asks for and what a generation reports, in the gateway's own terms. Both
//! APIs convert their fields into these at their edge (the OpenAI module from JSON, `wire`
//! from `sibyl.v1` messages) and check them here, by one set of rules.

use crate::generation::GatewayError;
use sibyl_spec::{Penalties, PenaltyError};

/// Highest sampling temperature either API accepts (the OpenAI API's limit).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`None`: all).
    pub top_k: Option<u32>,
    /// Keep the most likely tokens whose mass reaches `top_p` (`None`: all).
    pub top_p: Option<f32>,
    /// Keep the tokens at least `min_p` times as likely as the most likely (`None`: all).
    pub min_p: Option<f32>,
    /// Seed of the request's random stream (`None`: the gateway picks one and reports it).
    pub seed: Option<u64>,
    /// Bias and penalties applied to the logits first.
    pub penalties: Penalties,
    /// llama.cpp's order: top-k, top-p, min-p on the model's own probabilities, then
    /// temperature; otherwise temperature first (vLLM's order).
    pub filters_first: bool,
}

impl Sampling {
    /// Checks the values: `temperature` in [0, [`MAX_TEMPERATURE`]], `top_p` in (0, 1],
    /// `top_k` at least 1. The error names the field as the OpenAI API spells it.
    pub fn new(
        temperature: f32,
        top_k: Option<u32>,
        top_p: Option<f32>,
        seed: Option<u64>,
    ) -> Result<Self, GatewayError> {
        if !(temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&temperature)) {
            return Err(GatewayError::invalid_param(
                "temperature",
                format!("`temperature` must be between 0 and {MAX_TEMPERATURE}"),
            ));
        }
        if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(GatewayError::invalid_param(
                "top_p",
                "`top_p` must be in (0, 1]",
            ));
        }
        if top_k == Some(0) {
            return Err(GatewayError::invalid_param(
                "top_k",
                "`top_k` must be at least 1",
            ));
        }
        Ok(Self {
            temperature,
            top_k,
            top_p,
            min_p: None,
            seed,
            penalties: Penalties::default(),
            filters_first: false,
        })
    }

    /// The same in llama.cpp's order (see [`Sampling::filters_first`]).
    pub fn filters_first(self) -> Self {
        Self {
            filters_first: true,
            ..self
        }
    }

    /// The same with `min_p` (in [0, 1]; 0 or `None` keeps all tokens), checked.
    pub fn with_min_p(self, min_p: Option<f32>) -> Result<Self, GatewayError> {
        match min_p {
            Some(p) if !(0.0..=1.0).contains(&p) => Err(GatewayError::invalid_param(
                "min_p",
                "`min_p` must be between 0 and 1",
            )),
            _ => Ok(Self {
                min_p: min_p.filter(|&p| p > 0.0),
                ..self
            }),
        }
    }

    /// The same with `penalties`, checked (biased tokens against the vocabulary by the
    /// verifier). The error names the field as the OpenAI API spells it.
    pub fn with_penalties(self, penalties: Penalties) -> Result<Self, GatewayError> {
        if let Err(e) = penalties.validate(usize::MAX) {
            let param = match e {
                PenaltyError::Presence(_) => "presence_penalty",
                PenaltyError::Frequency(_) => "frequency_penalty",
                PenaltyError::Repetition(_) => "repetition_penalty",
                PenaltyError::Bias(_)
                | PenaltyError::TooManyBiases(_)
                | PenaltyError::BiasToken { .. } => "logit_bias",
            };
            return Err(GatewayError::invalid_param(param, e.to_string()));
        }
        Ok(Self { penalties, ..self })
    }
}

/// Most alternatives a request may ask log-probabilities of at each token (OpenAI's
/// `top_logprobs` limit, and the verifier's).
pub const MAX_LOGPROBS: u32 = 20;

/// Checks how many alternatives a request asks log-probabilities of; `param` names the
/// field as the API spells it.
pub fn check_logprobs(count: Option<u32>, param: &'static str) -> Result<(), GatewayError> {
    match count {
        Some(n) if n > MAX_LOGPROBS => Err(GatewayError::invalid_param(
            param,
            format!("`{param}` must be between 0 and {MAX_LOGPROBS}"),
        )),
        _ => Ok(()),
    }
}

/// A token, the bytes it stands for (possibly part of a UTF-8 character) and its
/// log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// One generated token's log-probability under the target model (before temperature,
/// top-k and top-p), and the most likely tokens at its position, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// A grammar the output must follow (compiled by the verifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grammar {
    /// JSON that matches this JSON Schema.
    JsonSchema(String),
    /// Text that matches this regular expression as a whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this Lark grammar (llguidance's dialect).
    Lark(String),
}

/// Whether and how a request speculates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Speculation {
    /// As the verifier is configured.
    #[default]
    Default,
    /// Plain decoding.
    Off,
    /// With the drafters of these kinds (none named: every one the verifier has).
    On { drafters: Vec<String> },
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FinishReason {
    /// Not reported.
    #[default]
    Unspecified,
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
    /// The client or the server ended it.
    Cancelled,
}

/// How a drafter's stream ended up in a generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DrafterState {
    #[default]
    Unspecified,
    Connected,
    Refused,
    Failed,
    Connecting,
}

/// One drafter's part in a generation, as the verifier reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrafterStats {
    /// Drafter kind (`ngram`, `retrieval`, ...).
    pub kind: String,
    /// Where the verifier reached it; empty in process.
    pub endpoint: String,
    /// Its draft tokens placed in verified trees, and those accepted.
    pub proposed_tokens: u64,
    pub accepted_tokens: u64,
    /// Blocks received, and those dropped unused.
    pub blocks_received: u64,
    pub blocks_dropped: u64,
    pub state: DrafterState,
    /// The stream's last error; empty if none.
    pub error: String,
}

/// vLLM's switches for how a chat template renders the messages.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Rendering {
    /// End with the start of the assistant's answer; default: unless the final message is
    /// continued.
    pub add_generation_prompt: Option<bool>,
    /// The model continues the last message (a prefilled answer) rather than starting one.
    #[serde(default)]
    pub continue_final_message: bool,
    /// More variables for the template (such as Qwen3's `enable_thinking`).
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Rendering {
    /// The rendering asked for, of `messages` offering `tools`: `continue_final_message`
    /// needs a last message with content, and no generation prompt.
    pub fn options(
        self,
        messages: &[sibyl_engine::ChatMessage],
        tools: Vec<serde_json::Value>,
    ) -> Result<sibyl_engine::ChatOptions, GatewayError> {
        let param = "continue_final_message";
        if self.continue_final_message {
            if self.add_generation_prompt == Some(true) {
                return Err(GatewayError::invalid_param(
                    param,
                    "`continue_final_message` and `add_generation_prompt` cannot both be true",
                ));
            }
            if messages.last().is_none_or(|m| m.content.trim().is_empty()) {
                return Err(GatewayError::invalid_param(
                    param,
                    "`continue_final_message` needs a last message with content to continue",
                ));
            }
        }
        Ok(sibyl_engine::ChatOptions {
            tools,
            add_generation_prompt: self
                .add_generation_prompt
                .unwrap_or(!self.continue_final_message),
            continue_final_message: self.continue_final_message,
            variables: self.chat_template_kwargs.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_values_outside_their_ranges_are_refused_naming_the_field() {
        for (temperature, top_k, top_p, param) in [
            (-0.1, None, None, "temperature"),
            (2.5, None, None, "temperature"),
            (f32::NAN, None, None, "temperature"),
            (1.0, None, Some(0.0), "top_p"),
            (1.0, None, Some(1.5), "top_p"),
            (1.0, Some(0), None, "top_k"),
        ] {
            match Sampling::new(temperature, top_k, top_p, None) {
                Err(GatewayError::InvalidParam { param: named, .. }) => assert_eq!(named, param),
                other => panic!("{temperature} {top_k:?} {top_p:?}: {other:?}"),
            }
        }
        let sampling = Sampling::new(2.0, Some(40), Some(1.0), Some(7)).unwrap();
        assert_eq!(sampling.top_k, Some(40));
        assert_eq!(sampling.seed, Some(7));
        assert!(Sampling::new(0.0, None, None, None).is_ok());
    }

    #[test]
    fn penalties_outside_their_ranges_are_refused_naming_the_field() {
        let greedy = || Sampling::new(0.0, None, None, None).unwrap();
        let cases = [
            (
                Penalties {
                    presence: 2.5,
                    ..Penalties::default()
                },
                "presence_penalty",
            ),
            (
                Penalties {
                    frequency: f32::NAN,
                    ..Penalties::default()
                },
                "frequency_penalty",
            ),
            (
                Penalties {
                    repetition: 0.0,
                    ..Penalties::default()
                },
                "repetition_penalty",
            ),
            (
                Penalties {
                    logit_bias: vec![(3, -101.0)],
                    ..Penalties::default()
                },
                "logit_bias",
            ),
        ];
        for (penalties, param) in cases {
            match greedy().with_penalties(penalties.clone()) {
                Err(GatewayError::InvalidParam { param: named, .. }) => assert_eq!(named, param),
                other => panic!("{penalties:?}: {other:?}"),
            }
        }
        let kept = Penalties {
            presence: -2.0,
            frequency: 2.0,
            repetition: 1.2,
            logit_bias: vec![(3, 100.0)],
        };
        assert_eq!(
            greedy().with_penalties(kept.clone()).unwrap().penalties,
            kept
        );
    }
}
