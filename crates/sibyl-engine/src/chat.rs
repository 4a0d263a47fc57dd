use crate::gguf::ModelFile;
use crate::{EngineError, TextTokenizer};
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
    fn template_errors_are_reported() {
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let err = raising.render(&[]).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
