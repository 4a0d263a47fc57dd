use crate::gguf::ModelFile;
use crate::{EngineError, TextTokenizer, TokenId};
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// The model's chat template (Jinja, from `tokenizer.chat_template`), rendered with
/// minijinja and Python-compatible string methods.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles a template; errors name the template problem.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(EngineError::Template)?;
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    pub(crate) fn from_gguf(
        file: &ModelFile,
        tokenizer: &TextTokenizer,
    ) -> Result<Option<Self>, EngineError> {
        match file.string("tokenizer.chat_template") {
            Ok(source) => Self::new(source, tokenizer.bos_text(), tokenizer.eos_text()).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The prompt text for `messages`, ending where the assistant's answer starts.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(EngineError::Template)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(EngineError::Template)
    }
}

impl ChatTemplate {
    /// The prompt's token ids for `messages`, ending where the assistant's answer starts.
    ///
    /// Control tokens (`<|im_start|>`) are recognised only where the template writes them:
    /// in message content their strings are text, so content cannot open a turn of
    /// another role. Content without such strings gives exactly the ids of tokenizing
    /// [`Self::render`]'s text. (While the template runs, each control string in content
    /// stands in as one private-use character from a range no message uses; the template's
    /// output is split at the control strings it wrote, and each piece between them is
    /// tokenized as text with the stand-ins put back.)
    pub fn encode(
        &self,
        tokenizer: &TextTokenizer,
        messages: &[ChatMessage],
    ) -> Result<Vec<TokenId>, EngineError> {
        let ids = self.encode_at_most(tokenizer, messages, usize::MAX)?;
        Ok(ids.unwrap_or_default())
    }

    /// [`Self::encode`]'s ids, or `None` as soon as they are known to number more than
    /// `limit` (see [`TextTokenizer::encode_at_most`]).
    pub fn encode_at_most(
        &self,
        tokenizer: &TextTokenizer,
        messages: &[ChatMessage],
        limit: usize,
    ) -> Result<Option<Vec<TokenId>>, EngineError> {
        let controls = tokenizer.controls();
        let matcher = tokenizer.control_matcher();
        let base = stand_in_base(messages, controls.len())?;
        let masked: Vec<ChatMessage> = messages
            .iter()
            .map(|message| {
                let content = &message.content;
                let mut masked = String::with_capacity(content.len());
                let mut last = 0;
                for found in matcher.find_iter(content) {
                    masked.push_str(&content[last..found.start()]);
                    masked.push(stand_in(base, found.pattern().as_usize()));
                    last = found.end();
                }
                masked.push_str(&content[last..]);
                ChatMessage {
                    role: message.role.clone(),
                    content: masked,
                }
            })
            .collect();
        let rendered = self.render(&masked)?;
        let mut ids: Vec<TokenId> = tokenizer.leading_bos().into_iter().collect();
        // Appends a piece of the template's output as text; `false` once over the limit.
        let text = |piece: &str, ids: &mut Vec<TokenId>| -> Result<bool, EngineError> {
            if piece.is_empty() {
                return Ok(true);
            }
            let mut unmasked = String::with_capacity(piece.len());
            for c in piece.chars() {
                match (c as u32).checked_sub(base) {
                    Some(i) if (i as usize) < controls.len() => {
                        unmasked.push_str(&controls[i as usize].0)
                    }
                    _ => unmasked.push(c),
                }
            }
            let room = limit.saturating_sub(ids.len());
            match tokenizer.encode_text_at_most(&unmasked, room)? {
                Some(piece) => {
                    ids.extend(piece);
                    Ok(true)
                }
                None => Ok(false),
            }
        };
        let mut last = 0;
        for found in matcher.find_iter(&rendered) {
            if !text(&rendered[last..found.start()], &mut ids)? {
                return Ok(None);
            }
            ids.push(controls[found.pattern().as_usize()].1);
            last = found.end();
        }
        if !text(&rendered[last..], &mut ids)? || ids.len() > limit {
            return Ok(None);
        }
        Ok(Some(ids))
    }
}

/// First code point of supplementary private use area B (plane 16).
const PLANE_16: u32 = 0x10_0000;
/// Last code point of plane 16 that is a character.
const PLANE_16_LAST: u32 = 0x10_FFFD;

/// The start of `count` code points in plane 16 that no message content uses.
fn stand_in_base(messages: &[ChatMessage], count: usize) -> Result<u32, EngineError> {
    let mut used: Vec<u32> = messages
        .iter()
        .flat_map(|m| m.content.chars())
        .map(|c| c as u32)
        .filter(|&c| c >= PLANE_16)
        .collect();
    used.sort_unstable();
    used.dedup();
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    let mut base = PLANE_16;
    for c in used {
        if c >= base.saturating_add(count) {
            break;
        }
        base = c + 1;
    }
    if base.saturating_add(count) > PLANE_16_LAST + 1 {
        return Err(EngineError::Encode(
            "the messages use so many private-use characters of plane 16 that control \
             tokens in them cannot be told from the template's"
                .into(),
        ));
    }
    Ok(base)
}

fn stand_in(base: u32, index: usize) -> char {
    // In plane 16 by `stand_in_base`, so a valid character.
    char::from_u32(base + index as u32).unwrap_or(char::REPLACEMENT_CHARACTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

    #[test]
    fn renders_chatml_with_python_string_methods() {
        let template = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let text = template
            .render(&[ChatMessage::new("user", "  hi  ")])
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn stand_ins_come_from_a_range_no_message_uses() {
        let plain = [ChatMessage::new("user", "hi")];
        assert_eq!(stand_in_base(&plain, 3).unwrap(), PLANE_16);
        let text: String = [PLANE_16, PLANE_16 + 2, PLANE_16 + 9]
            .iter()
            .map(|&c| char::from_u32(c).unwrap())
            .collect();
        let busy = [ChatMessage::new("user", &text)];
        assert_eq!(stand_in_base(&busy, 3).unwrap(), PLANE_16 + 3);
        assert_eq!(stand_in_base(&busy, 7).unwrap(), PLANE_16 + 10);
        assert!(stand_in_base(&busy, 0x10000).is_err());
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let err = raising.render(&[]).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
