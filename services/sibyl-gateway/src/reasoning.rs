//! A reasoning model's thinking, split from its answer (vLLM's `--reasoning-parser`): the
//! text between `<think>` and `</think>` goes to the chat endpoint's `reasoning_content`,
//! the rest to `content`. Streamed text is split as it comes, a tail that may begin a tag
//! held back until the next text or the end.

use std::str::FromStr;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// How a model marks its thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    /// Qwen3 (and QwQ): thinking, when there is any, is the answer's `<think>` block; an
    /// answer that does not open with one is all content (as with `enable_thinking: false`).
    Qwen3,
    /// DeepSeek-R1 and its distillations: the template opens the thinking, so the answer is
    /// thinking until `</think>` (a leading `<think>` is dropped).
    DeepseekR1,
}

impl FromStr for ReasoningParser {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "qwen3" => Ok(Self::Qwen3),
            "deepseek_r1" => Ok(Self::DeepseekR1),
            other => Err(format!(
                "unknown reasoning parser `{other}` (qwen3, deepseek_r1)"
            )),
        }
    }
}

/// Where an answer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Nothing yet but what may begin `<think>` (after whitespace).
    Start,
    Reasoning,
    Answer,
}

/// Text split into thinking and answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

/// Splits one answer as its text comes.
#[derive(Debug)]
pub struct Thinking {
    parser: ReasoningParser,
    part: Part,
    held: String,
}

impl ReasoningParser {
    /// A splitter for one answer.
    pub fn thinking(self) -> Thinking {
        Thinking {
            parser: self,
            part: Part::Start,
            held: String::new(),
        }
    }

    /// Splits a whole answer.
    pub fn split(self, text: &str) -> Split {
        let mut thinking = self.thinking();
        let mut split = thinking.push(text);
        let rest = thinking.finish();
        split.reasoning.push_str(&rest.reasoning);
        split.content.push_str(&rest.content);
        split
    }
}

/// The length of the longest tail of `text` that is a proper start of `tag`.
fn partial_tag(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

impl Thinking {
    /// The split of the text that can go out with `text` added.
    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut split = Split::default();
        loop {
            match self.part {
                Part::Start => {
                    let start = self.held.trim_start();
                    if let Some(rest) = start.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.part = Part::Reasoning;
                    } else if OPEN.starts_with(start) {
                        // Empty, or a start of `<think>`: wait for more.
                        return split;
                    } else {
                        self.part = match self.parser {
                            ReasoningParser::Qwen3 => Part::Answer,
                            ReasoningParser::DeepseekR1 => Part::Reasoning,
                        };
                    }
                }
                Part::Reasoning => {
                    if let Some(end) = self.held.find(CLOSE) {
                        split.reasoning.push_str(&self.held[..end]);
                        self.held.drain(..end + CLOSE.len());
                        self.part = Part::Answer;
                    } else {
                        let keep = partial_tag(&self.held, CLOSE);
                        let out = self.held.len() - keep;
                        split.reasoning.extend(self.held.drain(..out));
                        return split;
                    }
                }
                Part::Answer => {
                    split.content.push_str(&self.held);
                    self.held.clear();
                    return split;
                }
            }
        }
    }

    /// What was held back, at the end: thinking that never closed is thinking.
    pub fn finish(self) -> Split {
        let held = self.held;
        match (self.part, self.parser) {
            (Part::Reasoning, _) | (Part::Start, ReasoningParser::DeepseekR1) => Split {
                reasoning: held,
                content: String::new(),
            },
            (Part::Answer, _) | (Part::Start, ReasoningParser::Qwen3) => Split {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(reasoning: &str, content: &str) -> Split {
        Split {
            reasoning: reasoning.into(),
            content: content.into(),
        }
    }

    /// The split of `text` pushed in pieces of `size` bytes (whole characters).
    fn streamed(parser: ReasoningParser, text: &str, size: usize) -> Split {
        let mut thinking = parser.thinking();
        let mut all = Split::default();
        let mut piece = String::new();
        for c in text.chars() {
            piece.push(c);
            if piece.len() >= size {
                let out = thinking.push(&piece);
                all.reasoning.push_str(&out.reasoning);
                all.content.push_str(&out.content);
                piece.clear();
            }
        }
        let out = thinking.push(&piece);
        all.reasoning.push_str(&out.reasoning);
        all.content.push_str(&out.content);
        let rest = thinking.finish();
        all.reasoning.push_str(&rest.reasoning);
        all.content.push_str(&rest.content);
        all
    }

    #[test]
    fn thinking_is_split_from_the_answer_whole_and_in_any_pieces() {
        use ReasoningParser::*;
        let cases = [
            (
                Qwen3,
                "<think>\nA, then B.\n</think>\n\nB.",
                split("\nA, then B.\n", "\n\nB."),
            ),
            (Qwen3, "  <think>x</think>y", split("x", "y")),
            (
                Qwen3,
                "No thinking <think> here",
                split("", "No thinking <think> here"),
            ),
            (Qwen3, "<think>cut short", split("cut short", "")),
            (Qwen3, "<thin", split("", "<thin")),
            (Qwen3, "", split("", "")),
            (Qwen3, "<think>a</think>b</think>", split("a", "b</think>")),
            (
                DeepseekR1,
                "It is 4.</think>Four.",
                split("It is 4.", "Four."),
            ),
            (
                DeepseekR1,
                "<think>It is 4.</think>Four.",
                split("It is 4.", "Four."),
            ),
            (DeepseekR1, "still thinking", split("still thinking", "")),
            (Qwen3, "<think>é</thinké</think>ü", split("é</thinké", "ü")),
        ];
        for (parser, text, expected) in cases {
            assert_eq!(parser.split(text), expected, "{parser:?} {text:?}");
            for size in 1..6 {
                assert_eq!(
                    streamed(parser, text, size),
                    expected,
                    "{parser:?} {text:?} in pieces of {size}"
                );
            }
        }
    }

    #[test]
    fn streamed_thinking_goes_out_before_the_tag_is_whole() {
        let mut thinking = ReasoningParser::Qwen3.thinking();
        assert_eq!(thinking.push("<thi"), split("", ""));
        assert_eq!(thinking.push("nk>Let me see</th"), split("Let me see", ""));
        assert_eq!(thinking.push("ink>Yes"), split("", "Yes"));
        assert_eq!(thinking.finish(), split("", ""));
    }

    #[test]
    fn parsers_are_named_as_vllm_names_them() {
        assert_eq!("qwen3".parse(), Ok(ReasoningParser::Qwen3));
        assert_eq!("deepseek_r1".parse(), Ok(ReasoningParser::DeepseekR1));
        assert!("granite".parse::<ReasoningParser>().is_err());
    }
}
