use crate::gguf::ModelFile;
use crate::{EngineError, TextTokenizer, TokenId};
use minijinja::value::{Kwargs, Value as TemplateValue};
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;
use serde_json::Value;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
    /// An assistant message's calls of tools.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool message's answer is to this call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant message's thinking, for templates that write it back (Qwen3's reads
    /// `reasoning_content`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            reasoning_content: None,
        }
    }
}

/// A call of a function an assistant made, in the shape chat templates read
/// (`tool_call.function.name`, `tool_call.function.arguments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON value (templates write them with `tojson`).
    pub arguments: Value,
}

/// How a conversation is rendered, beyond its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOptions {
    /// The definitions of the tools the model may call (OpenAI's `tools` entries; with none,
    /// the template's `tools` is `none`).
    pub tools: Vec<Value>,
    /// End with the start of the assistant's answer (the template's `add_generation_prompt`).
    pub add_generation_prompt: bool,
    /// End right after the last message's content, leaving that message open for the model
    /// to continue (a prefilled answer), as Hugging Face's `continue_final_message` does.
    pub continue_final_message: bool,
    /// More variables for the template (vLLM's `chat_template_kwargs`, such as Qwen3's
    /// `enable_thinking`). The ones the renderer sets itself (`messages`, `tools`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`) are not taken from here.
    pub variables: serde_json::Map<String, Value>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            tools: Vec::new(),
            add_generation_prompt: true,
            continue_final_message: false,
            variables: serde_json::Map::new(),
        }
    }
}

/// How a model's answers call tools, as its chat template teaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, once per call (Qwen2.5,
    /// Qwen3, Hermes; vLLM's `hermes` parser).
    Hermes,
}

/// `date` written by the `strftime` directives templates use (`strftime_now("%d %b %Y")` in
/// Llama 3.1's, `"%Y-%m-%d"`, `"%B %d, %Y"`), as Python writes them in the C locale; another
/// directive is an error naming it.
fn strftime(format: &str, date: time::OffsetDateTime) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month = date.month().to_string();
        let weekday = date.weekday().to_string();
        let hour12 = match date.hour() % 12 {
            0 => 12,
            h => h,
        };
        match chars.next() {
            Some('Y') => out.push_str(&date.year().to_string()),
            Some('y') => out.push_str(&format!("{:02}", date.year().rem_euclid(100))),
            Some('m') => out.push_str(&format!("{:02}", u8::from(date.month()))),
            Some('d') => out.push_str(&format!("{:02}", date.day())),
            Some('e') => out.push_str(&format!("{:2}", date.day())),
            Some('j') => out.push_str(&format!("{:03}", date.ordinal())),
            Some('B') => out.push_str(&month),
            Some('b' | 'h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(&weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", date.hour())),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('p') => out.push_str(if date.hour() < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{:02}", date.minute())),
            Some('S') => out.push_str(&format!("{:02}", date.second())),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: `%{}` is not supported",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// The model's chat template (Jinja, from `tokenizer.chat_template`), rendered with
/// minijinja, Python-compatible string methods, `tojson` as Python's `json.dumps` writes,
/// and `strftime_now` (today's date, UTC), as Hugging Face's templates are rendered.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    tool_calls: Option<ToolCallFormat>,
}

impl ChatTemplate {
    /// Compiles a template; errors name the template problem.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        // As transformers compiles chat templates (and vLLM and llama.cpp render them): a
        // block tag's line keeps neither its leading whitespace nor its newline.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function(
            "strftime_now",
            |format: String| -> Result<String, minijinja::Error> {
                strftime(&format, time::OffsetDateTime::now_utc())
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(EngineError::Template)?;
        let tool_calls = (source.contains("tools") && source.contains("<tool_call>"))
            .then_some(ToolCallFormat::Hermes);
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
            tool_calls,
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

    /// How the model calls tools, when its template takes tool definitions and teaches a
    /// format sibyl can read back.
    pub fn tool_calls(&self) -> Option<ToolCallFormat> {
        self.tool_calls
    }

    /// The prompt text for `messages`, ending where the assistant's answer starts.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.render_with(messages, &ChatOptions::default())
    }

    /// The prompt text for `messages` rendered as `options` say.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(EngineError::Template)?;
        let tools = (!options.tools.is_empty()).then_some(&options.tools);
        // The values set here win over the caller's variables of the same names.
        let rendered = template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => options.add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
                ..TemplateValue::from_serialize(&options.variables)
            })
            .map_err(EngineError::Template)?;
        if !options.continue_final_message {
            return Ok(rendered);
        }
        // The text ends after the last message's content: where the template wrote it
        // last, whole or (as templates often write it) trimmed.
        let last = messages.last().map_or("", |m| m.content.as_str());
        let content = [last, last.trim()]
            .into_iter()
            .find(|c| !c.is_empty() && rendered.contains(c))
            .ok_or_else(|| {
                EngineError::Encode(
                    "to continue the final message, it must have content that the chat \
                     template writes into the prompt"
                        .into(),
                )
            })?;
        let end = rendered.rfind(content).unwrap_or(0) + content.len();
        Ok(rendered[..end].to_string())
    }
}

/// Python's `json.dumps` separators without an indent: `, ` and `: `.
struct PythonCompact;

/// `, ` before every item but the first.
fn item_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// The `tojson` filter as Hugging Face's chat templates have it (Python's `json.dumps`:
/// keys in their order, `, ` and `: ` between items, no HTML escaping; `indent=N`,
/// `ensure_ascii`, `sort_keys` honoured), not minijinja's HTML-safe one.
fn tojson(value: &TemplateValue, kwargs: Kwargs) -> Result<TemplateValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Python's own defaults, accepted and meaning what they mean there.
    let _: Option<TemplateValue> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let bad =
        |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string());
    let mut json: Value = serde_json::to_value(value).map_err(bad)?;
    if sort_keys == Some(true) {
        json.sort_all_objects();
    }
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
            json.serialize(&mut serializer).map_err(bad)?;
        }
        None => {
            let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonCompact);
            json.serialize(&mut serializer).map_err(bad)?;
        }
    }
    let text = String::from_utf8(out).unwrap_or_default();
    let text = if ensure_ascii == Some(true) {
        let mut ascii = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_ascii() {
                ascii.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    ascii.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        ascii
    } else {
        text
    };
    Ok(TemplateValue::from_safe_string(text))
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
        self.encode_with_at_most(tokenizer, messages, &ChatOptions::default(), limit)
    }

    /// [`Self::encode_at_most`] rendered as `options` say (see [`Self::render_with`]).
    /// Control strings in the tools, in tool calls' names and arguments and in the
    /// template's variables are text, as in content.
    pub fn encode_with_at_most(
        &self,
        tokenizer: &TextTokenizer,
        messages: &[ChatMessage],
        options: &ChatOptions,
        limit: usize,
    ) -> Result<Option<Vec<TokenId>>, EngineError> {
        let controls = tokenizer.controls();
        let matcher = tokenizer.control_matcher();
        let mut texts: Vec<&str> = Vec::new();
        for message in messages {
            texts.push(&message.content);
            texts.extend(message.tool_call_id.as_deref());
            texts.extend(message.reasoning_content.as_deref());
            for call in &message.tool_calls {
                texts.push(&call.id);
                texts.push(&call.kind);
                texts.push(&call.function.name);
                json_strings(&call.function.arguments, &mut texts);
            }
        }
        for tool in &options.tools {
            json_strings(tool, &mut texts);
        }
        for (name, value) in &options.variables {
            texts.push(name);
            json_strings(value, &mut texts);
        }
        let base = stand_in_base(&texts, controls.len())?;
        let mask = |text: &str| {
            let mut masked = String::with_capacity(text.len());
            let mut last = 0;
            for found in matcher.find_iter(text) {
                masked.push_str(&text[last..found.start()]);
                masked.push(stand_in(base, found.pattern().as_usize()));
                last = found.end();
            }
            masked.push_str(&text[last..]);
            masked
        };
        let masked: Vec<ChatMessage> = messages
            .iter()
            .map(|message| ChatMessage {
                role: message.role.clone(),
                content: mask(&message.content),
                tool_calls: message
                    .tool_calls
                    .iter()
                    .map(|call| ToolCall {
                        id: mask(&call.id),
                        kind: mask(&call.kind),
                        function: FunctionCall {
                            name: mask(&call.function.name),
                            arguments: map_json_strings(&call.function.arguments, &mask),
                        },
                    })
                    .collect(),
                tool_call_id: message.tool_call_id.as_deref().map(mask),
                reasoning_content: message.reasoning_content.as_deref().map(mask),
            })
            .collect();
        let masked_options = ChatOptions {
            tools: options
                .tools
                .iter()
                .map(|t| map_json_strings(t, &mask))
                .collect(),
            variables: options
                .variables
                .iter()
                .map(|(name, value)| (name.clone(), map_json_strings(value, &mask)))
                .collect(),
            ..options.clone()
        };
        let rendered = self.render_with(&masked, &masked_options)?;
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

/// Every string in a JSON value: its object keys and string values.
fn json_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| json_strings(v, out)),
        Value::Object(fields) => {
            for (key, v) in fields {
                out.push(key);
                json_strings(v, out);
            }
        }
        _ => {}
    }
}

/// `value` with `map` applied to each of its strings (keys and values).
fn map_json_strings(value: &Value, map: &impl Fn(&str) -> String) -> Value {
    match value {
        Value::String(s) => Value::String(map(s)),
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| map_json_strings(v, map)).collect())
        }
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, v)| (map(key), map_json_strings(v, map)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The start of `count` code points in plane 16 that none of `texts` uses.
fn stand_in_base(texts: &[&str], count: usize) -> Result<u32, EngineError> {
    let mut used: Vec<u32> = texts
        .iter()
        .flat_map(|t| t.chars())
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

    /// transformers compiles templates with `trim_blocks` and `lstrip_blocks`: a line
    /// holding only a block tag leaves nothing behind. (jinja2 with those settings renders
    /// this template to exactly the text asserted.)
    #[test]
    fn block_tags_take_their_lines_whitespace_as_transformers_renders_them() {
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU: {{ m.content }}\n  \
                      {% else %}\nA: {{ m.content }}\n  {% endif %}\n{% endfor %}\n\
                      {% if add_generation_prompt %}A:{% endif %}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let text = template
            .render(&[
                ChatMessage::new("user", "hi"),
                ChatMessage::new("assistant", "hello"),
                ChatMessage::new("user", "bye"),
            ])
            .unwrap();
        assert_eq!(text, "U: hi\nA: hello\nU: bye\nA:");
    }

    #[test]
    fn a_final_message_is_continued_and_variables_reach_the_template() {
        let source = format!(
            "{CHATML}{{%- if enable_thinking is defined and not enable_thinking %}}\
             <think></think>{{%- endif %}}{{{{ add_generation_prompt }}}}"
        );
        let template = ChatTemplate::new(&source, "", "<|im_end|>").unwrap();
        let messages = [
            ChatMessage::new("user", "Count to 3."),
            ChatMessage::new("assistant", " 1, 2, "),
        ];
        let options = |continued: bool, variables: serde_json::Value| ChatOptions {
            add_generation_prompt: false,
            continue_final_message: continued,
            variables: variables.as_object().unwrap().clone(),
            ..ChatOptions::default()
        };
        let closed = template
            .render_with(&messages, &options(false, serde_json::json!({})))
            .unwrap();
        assert_eq!(
            closed,
            "<|im_start|>user\nCount to 3.<|im_end|>\n<|im_start|>assistant\n1, 2,<|im_end|>\nFalse"
        );
        // The template trims the content: the text ends after the trimmed content.
        let open = template
            .render_with(&messages, &options(true, serde_json::json!({})))
            .unwrap();
        assert_eq!(
            open,
            "<|im_start|>user\nCount to 3.<|im_end|>\n<|im_start|>assistant\n1, 2,"
        );
        // A variable reaches the template; one the renderer sets is not replaced.
        let variables = serde_json::json!({"enable_thinking": false, "add_generation_prompt": 7});
        let thinking = template
            .render_with(&messages, &options(false, variables))
            .unwrap();
        assert!(thinking.ends_with("<think></think>False"), "{thinking:?}");
        // Content the template does not write cannot be continued.
        let empty = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("assistant", "  "),
        ];
        assert!(template
            .render_with(&empty, &options(true, serde_json::json!({})))
            .is_err());
    }

    /// The constructs of Qwen3's chat template: a namespace set in a reversed loop,
    /// Python's string methods with arguments, `is string` / `is false` / `is not none`
    /// tests, neighbours by `loop.index0`, and reasoning split off at `</think>`.
    #[test]
    fn renders_the_jinja_qwen3_templates_use() {
        let source = r#"
{%- set ns = namespace(last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
  {%- if message.role == "user" and not message.content.startswith('<tool_response>') and ns.last_query == messages|length - 1 %}
    {%- set ns.last_query = (messages|length - 1) - loop.index0 %}
  {%- endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message.role == "assistant" %}
    {%- set content = message.content %}
    {%- set reasoning = '' %}
    {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
      {%- set reasoning = message.reasoning_content %}
    {%- elif '</think>' in content %}
      {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '[a' ~ loop.index0 ~ '>' ~ ns.last_query ~ ':' ~ reasoning.strip('\n') ~ '|' ~ content }}
    {%- for call in message.tool_calls %}
      {%- if call.function.arguments is string %}{{- call.function.arguments }}
      {%- else %}{{- call.function.name ~ call.function.arguments | tojson }}{%- endif %}
    {%- endfor %}
    {{- ']' }}
  {%- elif message.role == "tool" %}
    {%- if messages[loop.index0 - 1].role != "tool" %}{{- '[tools' }}{%- endif %}
    {{- ' ' ~ message.content }}
    {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- ']' }}{%- endif %}
  {%- else %}
    {{- '[' ~ message.role ~ ' ' ~ message.content ~ ']' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '[a' }}
  {%- if enable_thinking is defined and enable_thinking is false %}{{- ' <think></think>' }}{%- endif %}
{%- endif %}"#;
        let template = ChatTemplate::new(source, "", "<|im_end|>").unwrap();
        let call = ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "weather".into(),
                arguments: serde_json::json!({"city": "Oslo"}),
            },
        };
        let messages = [
            ChatMessage::new("user", "Weather in Oslo?"),
            ChatMessage {
                tool_calls: vec![call],
                ..ChatMessage::new("assistant", "<think>\nCall it.\n</think>\n\nChecking.")
            },
            ChatMessage::new("tool", "-3 C"),
            ChatMessage::new("tool", "snow"),
            ChatMessage::new("user", "<tool_response>late</tool_response>"),
            ChatMessage {
                reasoning_content: Some("\nBecause.\n".into()),
                ..ChatMessage::new("assistant", "Late.")
            },
        ];
        let options = ChatOptions {
            variables: serde_json::json!({"enable_thinking": false})
                .as_object()
                .unwrap()
                .clone(),
            ..ChatOptions::default()
        };
        assert_eq!(
            template.render_with(&messages, &options).unwrap(),
            "[user Weather in Oslo?][a1>0:Call it.|Checking.weather{\"city\": \"Oslo\"}]\
             [tools -3 C snow][user <tool_response>late</tool_response>][a5>0:Because.|Late.]\
             [a <think></think>"
        );
    }

    #[test]
    fn stand_ins_come_from_a_range_no_message_uses() {
        assert_eq!(stand_in_base(&["hi"], 3).unwrap(), PLANE_16);
        let text: String = [PLANE_16, PLANE_16 + 2, PLANE_16 + 9]
            .iter()
            .map(|&c| char::from_u32(c).unwrap())
            .collect();
        let busy = ["hi", text.as_str()];
        assert_eq!(stand_in_base(&busy, 3).unwrap(), PLANE_16 + 3);
        assert_eq!(stand_in_base(&busy, 7).unwrap(), PLANE_16 + 10);
        assert!(stand_in_base(&busy, 0x10000).is_err());
    }

    /// Qwen2.5's handling of tools, cut down (its newlines written as it writes them: the
    /// newline after a block tag is dropped, as transformers renders templates).
    const TOOLS: &str = "{%- if tools %}<tools>{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}{{ '\\n' }}</tools>\n{%- endif %}{%- for message in messages %}{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}{{ '\\n' }}<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}";

    #[test]
    fn tools_and_calls_are_written_as_python_json_dumps_writes_them() {
        let template = ChatTemplate::new(TOOLS, "", "").unwrap();
        assert_eq!(template.tool_calls(), Some(ToolCallFormat::Hermes));
        assert_eq!(
            ChatTemplate::new(CHATML, "", "").unwrap().tool_calls(),
            None
        );
        // Keys in the client's order, Python's separators, no HTML escaping.
        let tool: Value = serde_json::from_str(
            r#"{"type": "function", "function": {"name": "f", "description": "a<b & 'c' é",
                "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}"#,
        )
        .unwrap();
        let call = ChatMessage {
            tool_calls: vec![ToolCall {
                id: "call_1".into(),
                kind: "function".into(),
                function: FunctionCall {
                    name: "f".into(),
                    arguments: serde_json::json!({"x": 2, "list": [1.5, "y"]}),
                },
            }],
            ..ChatMessage::new("assistant", "")
        };
        let text = template
            .render_with(
                &[ChatMessage::new("user", "hi"), call],
                &ChatOptions {
                    tools: vec![tool],
                    ..ChatOptions::default()
                },
            )
            .unwrap();
        assert_eq!(
            text,
            "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"f\", \
             \"description\": \"a<b & 'c' é\", \"parameters\": {\"type\": \"object\", \
             \"properties\": {\"x\": {\"type\": \"integer\"}}}}}\n</tools>\
             <|im_start|>user\nhi<|im_end|><|im_start|>assistant\n<tool_call>\n\
             {\"name\": \"f\", \"arguments\": {\"x\": 2, \"list\": [1.5, \"y\"]}}\n\
             </tool_call><|im_end|>"
        );
        // No tools: the template's `tools` is `none`.
        let plain = template.render(&[ChatMessage::new("user", "hi")]).unwrap();
        assert_eq!(plain, "<|im_start|>user\nhi<|im_end|>");
    }

    #[test]
    fn tojson_takes_pythons_arguments() {
        let template = ChatTemplate::new(
            "{{ {'b': 1, 'a': ['é']} | tojson(indent=2, sort_keys=true, ensure_ascii=true) }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            template.render(&[]).unwrap(),
            "{\n  \"a\": [\n    \"\\u00e9\"\n  ],\n  \"b\": 1\n}"
        );
        let unknown = ChatTemplate::new("{{ 1 | tojson(colour=1) }}", "", "").unwrap();
        assert!(unknown.render(&[]).is_err());
    }

    #[test]
    fn strftime_now_writes_the_date_as_python_does() {
        let dated = time::Date::from_calendar_date(2024, time::Month::July, 26)
            .and_then(|day| day.with_hms(9, 5, 3))
            .unwrap()
            .assume_utc();
        let cases = [
            ("%d %b %Y", "26 Jul 2024"),
            ("%Y-%m-%d", "2024-07-26"),
            ("%B %d, %Y", "July 26, 2024"),
            ("%A %a %j %e %y", "Friday Fri 208 26 24"),
            ("%I:%M:%S %p %H %Z%% x", "09:05:03 AM 09 UTC% x"),
        ];
        for (format, expected) in cases {
            assert_eq!(strftime(format, dated).unwrap(), expected, "{format}");
        }
        assert!(strftime("%Q", dated)
            .unwrap_err()
            .to_string()
            .contains("`%Q`"));
        // Llama 3.1's guard finds it; it writes today's date.
        let source = "{% if strftime_now is defined %}{{ strftime_now('%Y') }}{% endif %}";
        let year = time::OffsetDateTime::now_utc().year().to_string();
        let rendered = ChatTemplate::new(source, "", "")
            .unwrap()
            .render(&[])
            .unwrap();
        assert_eq!(rendered, year);
    }

    #[test]
    fn template_errors_are_reported() {
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let err = raising.render(&[]).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
