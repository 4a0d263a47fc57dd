//! The OpenAI API's response bodies, typed: a whole response and each streamed chunk of
//! both endpoints are made from these, and the error object of every failure.

use super::tools::Call;
use crate::generation::{PromptLogprobs, Summary};
use crate::params::{FinishReason, Logprobs, TokenLogprob};
use crate::reasoning::Split;
use serde::Serialize;

/// Which endpoint a response is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Completion,
    Chat,
}

/// A completion or chat completion: the whole response, or one chunk of a stream.
#[derive(Debug, Serialize)]
pub(super) struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice<'a>>,
    /// Absent from chunks unless usage was asked for; then `null` but in the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice of a response (of `n`).
#[derive(Debug, Serialize)]
pub(super) struct Choice<'a> {
    pub index: u32,
    /// The completion endpoint's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    /// A whole chat response's message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Message<'a>>,
    /// A chat chunk's part of the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta<'a>>,
    /// `null` unless the request asked for log probabilities.
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// A choice's log probabilities, in the shape of its endpoint.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(super) enum ChoiceLogprobs {
    Chat {
        content: Vec<ChatLogprob>,
    },
    Completion {
        tokens: Vec<String>,
        /// `null` for an echoed prompt's first token (nothing comes before it).
        token_logprobs: Vec<Option<f32>>,
        /// The most likely tokens at each position, and the chosen one.
        top_logprobs: Vec<Option<std::collections::BTreeMap<String, f32>>>,
        /// Where each token's text starts in the generated text, in characters.
        text_offset: Vec<usize>,
    },
}

#[derive(Debug, Serialize)]
pub(super) struct ChatLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize)]
pub(super) struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// A token's text: its bytes, with U+FFFD for any that are not a whole UTF-8 character.
fn token_text(token: &TokenLogprob) -> String {
    String::from_utf8_lossy(&token.bytes).into_owned()
}

#[derive(Debug, Serialize)]
pub(super) struct Message<'a> {
    pub role: &'static str,
    /// `null` when the answer is calls only.
    pub content: Option<&'a str>,
    /// With a reasoning parser, the model's thinking (absent when it had none), under
    /// vLLM's current name and under the older one many clients read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallBody<'a>>,
}

#[derive(Debug, Default, Serialize)]
pub(super) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    /// As in [`Message`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallBody<'a>>,
}

/// A call the model made, as a message (and, with its `index`, a chunk) holds it.
#[derive(Debug, Serialize)]
pub(super) struct ToolCallBody<'a> {
    /// A stream's chunks number the calls of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionBody<'a>,
}

#[derive(Debug, Serialize)]
pub(super) struct FunctionBody<'a> {
    pub name: &'a str,
    /// JSON text.
    pub arguments: &'a str,
}

/// `calls` as a message or a chunk holds them (`streamed`: numbered).
fn call_bodies(calls: &[Call], streamed: bool) -> Vec<ToolCallBody<'_>> {
    calls
        .iter()
        .zip(0u32..)
        .map(|(call, index)| ToolCallBody {
            index: streamed.then_some(index),
            id: &call.id,
            kind: "function",
            function: FunctionBody {
                name: &call.name,
                arguments: &call.arguments,
            },
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub(super) struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

#[derive(Debug, Serialize)]
pub(super) struct PromptTokensDetails {
    pub cached_tokens: u32,
}

#[derive(Debug, Serialize)]
pub(super) struct CompletionTokensDetails {
    pub accepted_prediction_tokens: u32,
    pub rejected_prediction_tokens: u32,
}

impl Usage {
    /// The usage of a request's choices, `per_prompt` of them for each of its prompts in
    /// turn: each prompt counted once (as its first choice saw it), the generated and draft
    /// tokens of all of them.
    pub fn of(summaries: &[&Summary], per_prompt: usize) -> Self {
        let sum = |field: fn(&Summary) -> u32, step: usize| {
            summaries
                .iter()
                .step_by(step)
                .fold(0u32, |total, s| total.saturating_add(field(s)))
        };
        let prompt_tokens = sum(|s| s.prompt_tokens, per_prompt.max(1));
        let completion_tokens = sum(|s| s.completion_tokens, 1);
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: sum(|s| s.cached_tokens, per_prompt.max(1)),
            },
            completion_tokens_details: CompletionTokensDetails {
                accepted_prediction_tokens: sum(|s| s.accepted_prediction_tokens, 1),
                rejected_prediction_tokens: sum(|s| s.rejected_prediction_tokens, 1),
            },
        }
    }
}

/// What one choice of a whole response holds: its text, the calls it made, its tokens'
/// log probabilities and how its generation ended.
pub(super) struct Finished {
    pub text: String,
    /// With a reasoning parser, the thinking split from `text` (`None`: there was none).
    pub reasoning: Option<String>,
    pub calls: Vec<Call>,
    pub logprobs: Vec<Logprobs>,
    pub summary: Summary,
}

/// OpenAI's `finish_reason` for how a generation ended (`called`: with calls).
pub(super) fn finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        _ if called => "tool_calls",
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// An echoed prompt's tokens' log probabilities (none for its first token), then the
/// completion's, in the completions endpoint's shape.
fn echoed_logprobs(prompt: &PromptLogprobs, completion: &[Logprobs]) -> ChoiceLogprobs {
    let first = (token_text(&prompt.first), None);
    let rest = prompt.rest.iter().chain(completion);
    completion_logprobs(
        [first]
            .into_iter()
            .chain(rest.map(|p| (token_text(&p.chosen), Some(p)))),
        0,
    )
}

/// Tokens' log probabilities in the completions endpoint's shape: each token's text and
/// its figures (`None`: a `null` entry, an echoed prompt's first token), the first token's
/// text starting `offset` characters into the text.
fn completion_logprobs<'p>(
    entries: impl IntoIterator<Item = (String, Option<&'p Logprobs>)>,
    offset: usize,
) -> ChoiceLogprobs {
    let (mut tokens, mut token_logprobs, mut top_logprobs, mut text_offset) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut at = offset;
    for (text, logprobs) in entries {
        text_offset.push(at);
        at += text.chars().count();
        tokens.push(text);
        token_logprobs.push(logprobs.map(|p| p.chosen.logprob));
        top_logprobs.push(logprobs.map(|p| {
            p.top
                .iter()
                .chain([&p.chosen])
                .map(|t| (token_text(t), t.logprob))
                .collect()
        }));
    }
    ChoiceLogprobs::Completion {
        tokens,
        token_logprobs,
        top_logprobs,
        text_offset,
    }
}

/// What every response of one request shares, and how its bodies are made.
pub(super) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
    /// Whether a stream's chunks carry `usage` (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Whether the request asked for log probabilities.
    pub logprobs: bool,
    /// How many choices each prompt has (`n`); choice `i` is of prompt `i / per_prompt`.
    pub per_prompt: usize,
    /// With `echo`: each prompt, which the whole response puts before each of its
    /// completions (with its tokens' log probabilities, where they were asked for) and a
    /// stream sends first.
    pub echo: Option<Vec<String>>,
    /// Where tools are offered, how the calls are read from an answer's text.
    pub calls: Option<super::tools::CallReader>,
    /// A chat's reasoning parser (`--reasoning-parser`), if the gateway has one.
    pub reasoning: Option<crate::ReasoningParser>,
}

/// An answer's text as it streams, read as a whole answer is: its thinking apart (with a
/// reasoning parser) and, where tools are offered, the text that may be a call held back
/// until it is known.
pub(super) struct AnswerText {
    thinking: Option<crate::reasoning::Thinking>,
    calls: Option<(super::tools::CallReader, super::tools::CallStream)>,
}

impl AnswerText {
    pub(super) fn new(meta: &Meta) -> Self {
        Self {
            thinking: meta.reasoning.map(crate::ReasoningParser::thinking),
            calls: meta
                .calls
                .clone()
                .map(|reader| (reader, Default::default())),
        }
    }

    /// The next piece of the text: its thinking, and the content that can go out now.
    pub(super) fn push(&mut self, text: &str) -> Split {
        let split = match &mut self.thinking {
            Some(thinking) => thinking.push(text),
            None => Split {
                reasoning: String::new(),
                content: text.to_string(),
            },
        };
        self.hold(split)
    }

    fn hold(&mut self, mut split: Split) -> Split {
        if let Some((_, held)) = &mut self.calls {
            split.content = held.push(&split.content);
        }
        split
    }

    /// What is left once the answer has ended: its last thinking and content, and its
    /// calls.
    pub(super) fn finish(mut self) -> (Split, Vec<Call>) {
        let rest = self.thinking.take().map(|t| t.finish()).unwrap_or_default();
        let mut rest = self.hold(rest);
        let calls = match self.calls {
            Some((reader, held)) => {
                let answer = held.finish(&reader);
                rest.content.push_str(&answer.text);
                answer.calls
            }
            None => Vec::new(),
        };
        (rest, calls)
    }
}

impl Meta {
    fn body<'a>(
        &'a self,
        chunk: bool,
        choices: Vec<Choice<'a>>,
        usage: Option<Option<Usage>>,
    ) -> Completion<'a> {
        let object = match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        };
        Completion {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices,
            usage,
        }
    }

    /// `logprobs` in this endpoint's shape (`None` where the request did not ask), the
    /// first token's text starting `offset` characters into the generated text; and the
    /// characters of their tokens' text.
    pub fn logprobs(
        &self,
        logprobs: &[Logprobs],
        offset: usize,
    ) -> (Option<ChoiceLogprobs>, usize) {
        if !self.logprobs {
            return (None, 0);
        }
        let texts: Vec<String> = logprobs.iter().map(|p| token_text(&p.chosen)).collect();
        let chars = texts.iter().map(|t| t.chars().count()).sum();
        let rendered = match self.kind {
            Kind::Chat => ChoiceLogprobs::Chat {
                content: logprobs
                    .iter()
                    .zip(texts)
                    .map(|(p, token)| ChatLogprob {
                        token,
                        logprob: p.chosen.logprob,
                        bytes: p.chosen.bytes.clone(),
                        top_logprobs: p
                            .top
                            .iter()
                            .map(|t| TopLogprob {
                                token: token_text(t),
                                logprob: t.logprob,
                                bytes: t.bytes.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
            },
            Kind::Completion => {
                completion_logprobs(texts.into_iter().zip(logprobs.iter().map(Some)), offset)
            }
        };
        (Some(rendered), chars)
    }

    /// With `echo`, what choice `index` repeats before its text.
    pub fn echo_of(&self, index: usize) -> Option<&str> {
        let echo = self.echo.as_ref()?;
        echo.get(index / self.per_prompt.max(1)).map(String::as_str)
    }

    /// The whole response: each choice's text, its tokens' log probabilities and how it
    /// ended.
    pub fn whole<'a>(&'a self, finished: &'a [Finished]) -> Completion<'a> {
        let choices = finished
            .iter()
            .zip(0u32..)
            .map(|(f, index)| {
                let logprobs = match (&self.echo, &f.summary.prompt_logprobs) {
                    (Some(_), Some(prompt)) if self.logprobs => {
                        Some(echoed_logprobs(prompt, &f.logprobs))
                    }
                    _ => self.logprobs(&f.logprobs, 0).0,
                };
                let mut choice = Choice {
                    index,
                    text: None,
                    message: None,
                    delta: None,
                    logprobs,
                    finish_reason: Some(finish_reason(
                        f.summary.finish_reason,
                        !f.calls.is_empty(),
                    )),
                };
                match self.kind {
                    Kind::Completion => choice.text = Some(&f.text),
                    Kind::Chat => {
                        let calls_only = !f.calls.is_empty() && f.text.is_empty();
                        choice.message = Some(Message {
                            role: "assistant",
                            content: (!calls_only).then_some(f.text.as_str()),
                            reasoning: f.reasoning.as_deref(),
                            reasoning_content: f.reasoning.as_deref(),
                            tool_calls: call_bodies(&f.calls, false),
                        })
                    }
                }
                choice
            })
            .collect();
        let summaries: Vec<&Summary> = finished.iter().map(|f| &f.summary).collect();
        let usage = Usage::of(&summaries, self.per_prompt);
        self.body(false, choices, Some(Some(usage)))
    }

    /// A chunk of a stream: its text (for a chat, its delta) and, in the last one, how the
    /// generation ended.
    fn chunk<'a>(
        &'a self,
        index: u32,
        delta: Delta<'a>,
        logprobs: Option<ChoiceLogprobs>,
        finish: Option<&'static str>,
    ) -> Completion<'a> {
        let mut choice = Choice {
            index,
            text: None,
            message: None,
            delta: None,
            logprobs,
            finish_reason: finish,
        };
        match self.kind {
            Kind::Completion => choice.text = Some(delta.content.unwrap_or("")),
            Kind::Chat => choice.delta = Some(delta),
        }
        self.body(true, vec![choice], self.include_usage.then_some(None))
    }

    /// A chat stream's first chunk of choice `index`: the assistant's role.
    pub fn role_chunk(&self, index: u32) -> Completion<'_> {
        self.chunk(
            index,
            Delta {
                role: Some("assistant"),
                content: Some(""),
                ..Delta::default()
            },
            None,
            None,
        )
    }

    /// A chunk of new text of choice `index`, with its tokens' log probabilities where
    /// they were asked for.
    pub fn text_chunk<'a>(
        &'a self,
        index: u32,
        text: &'a str,
        logprobs: Option<ChoiceLogprobs>,
    ) -> Completion<'a> {
        let delta = Delta {
            content: Some(text),
            ..Delta::default()
        };
        self.chunk(index, delta, logprobs, None)
    }

    /// As [`Meta::text_chunk`], for a chat's thinking (with a reasoning parser).
    pub fn reasoning_chunk<'a>(
        &'a self,
        index: u32,
        text: &'a str,
        logprobs: Option<ChoiceLogprobs>,
    ) -> Completion<'a> {
        let delta = Delta {
            reasoning: Some(text),
            reasoning_content: Some(text),
            ..Delta::default()
        };
        self.chunk(index, delta, logprobs, None)
    }

    /// A chat chunk of choice `index` with all the calls it made, and the log
    /// probabilities of their tokens where they were asked for.
    pub fn calls_chunk<'a>(
        &'a self,
        index: u32,
        calls: &'a [Call],
        logprobs: Option<ChoiceLogprobs>,
    ) -> Completion<'a> {
        self.chunk(
            index,
            Delta {
                tool_calls: call_bodies(calls, true),
                ..Delta::default()
            },
            logprobs,
            None,
        )
    }

    /// The chunk that says how choice `index`'s generation ended (no text; `called`: it
    /// made calls).
    pub fn finish_chunk(&self, index: u32, summary: &Summary, called: bool) -> Completion<'_> {
        self.chunk(
            index,
            Delta::default(),
            None,
            Some(finish_reason(summary.finish_reason, called)),
        )
    }

    /// With `include_usage`, the stream's last chunk: no choices, the usage of all.
    pub fn usage_chunk(&self, summaries: &[&Summary]) -> Completion<'_> {
        let usage = Usage::of(summaries, self.per_prompt);
        self.body(true, Vec::new(), Some(Some(usage)))
    }
}

/// OpenAI's error object.
#[derive(Debug, Serialize)]
pub(super) struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub(super) struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    /// The request field at fault, where one is.
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl<'a> ErrorBody<'a> {
    pub fn new(
        message: &'a str,
        kind: &'a str,
        param: Option<&'a str>,
        code: Option<&'a str>,
    ) -> Self {
        Self {
            error: ErrorDetail {
                message,
                kind,
                param,
                code,
            },
        }
    }
}

/// `/v1/models`.
#[derive(Debug, Serialize)]
pub(super) struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelCard<'a>>,
    /// Anthropic's list fields, so that its clients read the same list.
    pub has_more: bool,
    pub first_id: &'a str,
    pub last_id: &'a str,
}

#[derive(Debug, Serialize)]
pub(super) struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// An extension (vLLM's): the longest prompt and output of one request.
    pub max_model_len: usize,
    /// Anthropic's model fields.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub display_name: &'a str,
    pub created_at: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(kind: Kind, include_usage: bool) -> Meta {
        Meta {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            kind,
            include_usage,
            logprobs: false,
            per_prompt: 1,
            echo: None,
            calls: None,
            reasoning: None,
        }
    }

    fn summary() -> Summary {
        Summary {
            finish_reason: FinishReason::Length,
            prompt_tokens: 5,
            cached_tokens: 2,
            completion_tokens: 3,
            accepted_prediction_tokens: 1,
            rejected_prediction_tokens: 4,
            ..Summary::default()
        }
    }

    fn finished(text: &str) -> Finished {
        Finished {
            text: text.into(),
            reasoning: None,
            calls: Vec::new(),
            logprobs: Vec::new(),
            summary: summary(),
        }
    }

    fn value<T: Serialize>(body: &T) -> serde_json::Value {
        serde_json::to_value(body).unwrap()
    }

    #[test]
    fn bodies_have_openais_shapes() {
        let usage = json!({
            "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
            "prompt_tokens_details": {"cached_tokens": 2},
            "completion_tokens_details": {
                "accepted_prediction_tokens": 1, "rejected_prediction_tokens": 4}});
        let chat = meta(Kind::Chat, false);
        assert_eq!(
            value(&chat.whole(&[finished("hi")])),
            json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                    "logprobs": null, "finish_reason": "length"}],
                "usage": usage})
        );
        assert_eq!(
            value(&chat.role_chunk(0)),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                "model": "m", "choices": [{"index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]})
        );
        assert_eq!(
            value(&chat.finish_chunk(0, &summary(), false))["choices"][0],
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"})
        );
        let completion = meta(Kind::Completion, true);
        assert_eq!(
            value(&completion.text_chunk(0, "a", None)),
            json!({"id": "chatcmpl-1", "object": "text_completion", "created": 7, "model": "m",
                "choices": [{"index": 0, "text": "a", "logprobs": null, "finish_reason": null}],
                "usage": null})
        );
        assert_eq!(
            value(&completion.finish_chunk(0, &summary(), false))["choices"][0]["text"],
            json!("")
        );
        let last = value(&completion.usage_chunk(&[&summary()]));
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"], usage);
        assert_eq!(
            value(&ErrorBody::new(
                "no",
                "invalid_request_error",
                Some("top_p"),
                None
            )),
            json!({"error": {"message": "no", "type": "invalid_request_error",
                "param": "top_p", "code": null}})
        );
    }

    fn token(token: u32, text: &[u8], logprob: f32) -> TokenLogprob {
        TokenLogprob {
            token,
            bytes: text.to_vec(),
            logprob,
        }
    }

    #[test]
    fn log_probabilities_have_openais_shapes() {
        // "é" split over two tokens, then " x".
        let logprobs = [
            Logprobs {
                chosen: token(1, &[0xC3], -0.5),
                top: vec![token(1, &[0xC3], -0.5), token(2, b"a", -1.5)],
            },
            Logprobs {
                chosen: token(3, &[0xA9], -0.25),
                top: vec![token(3, &[0xA9], -0.25), token(4, b"b", -2.0)],
            },
            Logprobs {
                chosen: token(5, b" x", -1.0),
                top: vec![token(6, b" y", -0.75), token(5, b" x", -1.0)],
            },
        ];
        let chat = Meta {
            logprobs: true,
            ..meta(Kind::Chat, false)
        };
        let whole = [Finished {
            logprobs: logprobs.to_vec(),
            ..finished("\u{e9} x")
        }];
        let body = value(&chat.whole(&whole));
        let content = &body["choices"][0]["logprobs"]["content"];
        assert_eq!(
            content[0],
            json!({"token": "\u{fffd}", "logprob": -0.5, "bytes": [0xC3], "top_logprobs": [
                {"token": "\u{fffd}", "logprob": -0.5, "bytes": [0xC3]},
                {"token": "a", "logprob": -1.5, "bytes": [97]}]})
        );
        assert_eq!(content[2]["token"], json!(" x"));
        assert_eq!(content[2]["top_logprobs"][0]["token"], json!(" y"));
        let completion = Meta {
            logprobs: true,
            ..meta(Kind::Completion, false)
        };
        let (rendered, chars) = completion.logprobs(&logprobs[1..], 4);
        assert_eq!(chars, 3);
        assert_eq!(
            value(&rendered),
            json!({"tokens": ["\u{fffd}", " x"], "token_logprobs": [-0.25, -1.0],
                "top_logprobs": [{"\u{fffd}": -0.25, "b": -2.0}, {" y": -0.75, " x": -1.0}],
                "text_offset": [4, 5]})
        );
        // Not asked: `null`, whatever the generation reported.
        assert!(meta(Kind::Chat, false).logprobs(&logprobs, 0).0.is_none());
    }

    #[test]
    fn several_choices_are_indexed_and_their_usage_adds_up() {
        // Two choices of one prompt.
        let chat = Meta {
            per_prompt: 2,
            ..meta(Kind::Completion, false)
        };
        let second = Finished {
            summary: Summary {
                finish_reason: FinishReason::Stop,
                cached_tokens: 5,
                completion_tokens: 2,
                ..summary()
            },
            ..finished("b")
        };
        let both = [finished("a"), second];
        let body = value(&chat.whole(&both));
        assert_eq!(body["choices"][1]["index"], 1);
        assert_eq!(body["choices"][1]["text"], "b");
        assert_eq!(body["choices"][1]["finish_reason"], "stop");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 2},
                "completion_tokens_details": {
                    "accepted_prediction_tokens": 2, "rejected_prediction_tokens": 8}})
        );
        assert_eq!(
            value(&chat.text_chunk(3, "x", None))["choices"][0]["index"],
            3
        );
        // One choice each of two prompts: both prompts count.
        let prompts = meta(Kind::Completion, false);
        let body = value(&prompts.whole(&both));
        assert_eq!(body["usage"]["prompt_tokens"], 10);
        assert_eq!(body["usage"]["total_tokens"], 15);
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
    }
}
