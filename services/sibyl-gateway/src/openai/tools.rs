//! Tool calling (OpenAI's `tools` and `tool_choice`), for models whose chat template
//! teaches the Hermes format (Qwen2.5, Qwen3, Hermes; what vLLM's `hermes` parser reads):
//! the tools' definitions go into the prompt through the template, the answer's
//! `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks come back as
//! `tool_calls`. `tool_choice: "required"` or a named function constrains the output to
//! such blocks with a grammar, so the calls always parse.

use crate::generation::GatewayError;
use crate::params::Grammar;
use serde_json::{json, Value};
use sibyl_spec::JSON_WHITESPACE;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Most tools one request may define.
pub(super) const MAX_TOOLS: usize = 128;

/// Whether and which tools the model may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ToolChoice {
    /// Answer in text; the tools are not shown to the model.
    None,
    /// Text or calls, as the model decides.
    Auto,
    /// One call or more, of any of the tools.
    Required,
    /// One call or more of this function.
    Function(String),
}

/// The tools of a chat request and how they may be called.
#[derive(Debug, Clone)]
pub(super) struct Tools {
    /// The `tools` entries as the client sent them (the template writes them out).
    pub definitions: Vec<Value>,
    /// Each function's name and its parameters' JSON Schema, less its definitions.
    functions: Vec<(String, Value)>,
    /// The definitions the parameters' schemas refer to (`$defs`, `definitions`: pydantic
    /// writes nested models there), of every function, for the root of the calls' schema.
    defs: serde_json::Map<String, Value>,
    pub choice: ToolChoice,
    /// Whether an answer may make more than one call.
    pub parallel: bool,
}

fn bad(param: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid_param(param, message)
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    /// The tools of a request's `tools`, `tool_choice` and `parallel_tool_calls`; `None`
    /// when it defines none (then `tool_choice` may only be `none` or `auto`).
    pub(super) fn from_request(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<&Value>,
    ) -> Result<Option<Self>, GatewayError> {
        let definitions = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(_) => return Err(bad("tools", "`tools` must be a list of tools")),
        };
        if definitions.len() > MAX_TOOLS {
            return Err(bad(
                "tools",
                format!("at most {MAX_TOOLS} tools may be defined"),
            ));
        }
        let mut functions = Vec::with_capacity(definitions.len());
        let mut defs = serde_json::Map::new();
        for (i, tool) in definitions.iter().enumerate() {
            let shape = || {
                bad(
                    "tools",
                    format!(
                        "`tools[{i}]` must be {{\"type\": \"function\", \"function\": \
                         {{\"name\": ..., \"parameters\": {{...}}}}}}"
                    ),
                )
            };
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(shape());
            }
            let function = tool.get("function").ok_or_else(shape)?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(shape)?;
            if !valid_name(name) {
                return Err(bad(
                    "tools",
                    format!(
                        "`tools[{i}].function.name` must be 1 to 64 letters, digits, `_` or `-`"
                    ),
                ));
            }
            if functions.iter().any(|(n, _)| n == name) {
                return Err(bad("tools", format!("two tools are named `{name}`")));
            }
            let mut parameters = match function.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object"}),
                Some(schema @ Value::Object(_)) => schema.clone(),
                Some(_) => {
                    return Err(bad(
                        "tools",
                        format!("`tools[{i}].function.parameters` must be a JSON Schema object"),
                    ))
                }
            };
            // `#/$defs/X` in a function's parameters means its own root; the calls' schema
            // holds every function's, so their definitions move to its root.
            for key in ["$defs", "definitions"] {
                let Some(Value::Object(own)) =
                    parameters.as_object_mut().and_then(|p| p.shift_remove(key))
                else {
                    continue;
                };
                let merged = defs
                    .entry(key)
                    .or_insert_with(|| Value::Object(serde_json::Map::new()));
                for (def, schema) in own {
                    match merged.get(&def) {
                        Some(other) if *other != schema => {
                            return Err(bad(
                                "tools",
                                format!("two tools define `{key}/{def}` differently"),
                            ))
                        }
                        _ => {
                            if let Value::Object(merged) = merged {
                                merged.insert(def, schema);
                            }
                        }
                    }
                }
            }
            functions.push((name.to_string(), parameters));
        }
        let parallel = match parallel {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(bad(
                    "parallel_tool_calls",
                    "`parallel_tool_calls` is true or false",
                ))
            }
        };
        let named = |value: &Value| {
            value
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map(String::from)
        };
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
            Some(Value::String(s)) if s == "required" => ToolChoice::Required,
            Some(value @ Value::Object(_))
                if value.get("type").and_then(Value::as_str) == Some("function") =>
            {
                let name = named(value).ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
                if !functions.iter().any(|(n, _)| *n == name) {
                    return Err(bad(
                        "tool_choice",
                        format!("`tool_choice` names `{name}`, which `tools` does not define"),
                    ));
                }
                ToolChoice::Function(name)
            }
            Some(_) => {
                return Err(bad(
                    "tool_choice",
                    "`tool_choice` is `none`, `auto`, `required` or {\"type\": \"function\", \
                     \"function\": {\"name\": ...}}",
                ))
            }
        };
        if definitions.is_empty() {
            return match choice {
                ToolChoice::None | ToolChoice::Auto => Ok(None),
                _ => Err(bad(
                    "tool_choice",
                    "`tool_choice` asks for a tool call, but `tools` defines none",
                )),
            };
        }
        Ok(Some(Self {
            definitions,
            functions,
            defs,
            choice,
            parallel,
        }))
    }

    /// Whether the model is shown the tools and its answer read for calls.
    pub(super) fn offered(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar that makes the answer calls only (`required`, a named function): one
    /// `<tool_call>` block, or several one per line when parallel calls are allowed, each
    /// holding a function's name and arguments that match its parameters' schema.
    pub(super) fn grammar(&self) -> Option<Grammar> {
        let functions: Vec<&(String, Value)> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.functions.iter().collect(),
            ToolChoice::Function(name) => {
                self.functions.iter().filter(|(n, _)| n == name).collect()
            }
        };
        let calls: Vec<Value> = functions
            .iter()
            .map(|(name, parameters)| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = json!({
            "anyOf": calls,
            // As `response_format` schemas: lenient, whitespace bounded.
            "x-guidance": {"lenient": true, "whitespace_pattern": JSON_WHITESPACE},
        });
        if let Value::Object(root) = &mut schema {
            root.extend(self.defs.clone());
        }
        let repeat = if self.parallel {
            r#" ("\n" call)*"#
        } else {
            ""
        };
        Some(Grammar::Lark(format!(
            "start: call{repeat}\ncall: \"{OPEN}\\n\" body \"\\n{CLOSE}\"\nbody: %json {schema}\n"
        )))
    }
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Call {
    /// A new id, as OpenAI's look (`call_...`).
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// Reads the calls in an answer, for a request's tools.
#[derive(Debug, Clone)]
pub(super) struct CallReader {
    names: Vec<String>,
    parallel: bool,
}

/// An answer split into its text and the calls it made.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Answer {
    pub text: String,
    pub calls: Vec<Call>,
}

impl Tools {
    /// How answers to this request are read for calls.
    pub(super) fn reader(&self) -> CallReader {
        CallReader {
            names: self.functions.iter().map(|(n, _)| n.clone()).collect(),
            parallel: self.parallel,
        }
    }
}

/// A call as a JSON value `{"name": ..., "arguments": ...}`.
fn call_of(value: &Value) -> Option<Call> {
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(text)) => text.clone(),
        Some(value) => value.to_string(),
    };
    Some(Call {
        id: format!("call_{:024x}", rand::random::<u128>() >> 32),
        name,
        arguments,
    })
}

impl CallReader {
    /// The text and calls of a whole answer. Calls are `<tool_call>` blocks after the
    /// text (Hermes), or, as llama.cpp also reads them, an answer that is nothing but a
    /// call object of a defined function (or a list of them), bare or in a ```` ```json ````
    /// fence, as some models (Qwen2.5-Coder) answer. An answer whose blocks do not parse is
    /// all text, as vLLM's parser has it.
    pub(super) fn read(&self, text: &str) -> Answer {
        let mut calls = self
            .blocks(text)
            .or_else(|| self.whole(text))
            .unwrap_or_default();
        if calls.is_empty() {
            return Answer {
                text: text.to_string(),
                calls,
            };
        }
        if !self.parallel {
            calls.truncate(1);
        }
        let before = text.find(OPEN).map_or("", |start| &text[..start]);
        Answer {
            text: before.to_string(),
            calls,
        }
    }

    /// `<tool_call>` blocks, from the first to the end of the answer.
    fn blocks(&self, text: &str) -> Option<Vec<Call>> {
        let start = text.find(OPEN)?;
        let mut calls = Vec::new();
        let mut rest = &text[start..];
        while let Some(open) = rest.find(OPEN) {
            if !rest[..open].trim().is_empty() {
                return None;
            }
            let body = &rest[open + OPEN.len()..];
            let (inner, after) = match body.find(CLOSE) {
                Some(close) => (&body[..close], &body[close + CLOSE.len()..]),
                None => (body, ""),
            };
            calls.push(call_of(&serde_json::from_str(inner.trim()).ok()?)?);
            rest = after;
        }
        rest.trim().is_empty().then_some(calls)
    }

    /// An answer that is only a call object of a defined function, or a list of them,
    /// bare or fenced.
    fn whole(&self, text: &str) -> Option<Vec<Call>> {
        let mut inner = text.trim();
        if let Some(fenced) = inner.strip_prefix("```") {
            let fenced = fenced.strip_suffix("```")?;
            let (info, body) = fenced.split_once('\n')?;
            if !matches!(info.trim(), "" | "json") {
                return None;
            }
            inner = body.trim();
        }
        let value: Value = serde_json::from_str(inner).ok()?;
        let objects = match &value {
            Value::Array(items) if !items.is_empty() => items.iter().collect(),
            Value::Object(_) => vec![&value],
            _ => return None,
        };
        objects
            .into_iter()
            .map(|object| {
                let fields = object.as_object()?;
                let arguments_ok = fields.get("arguments").is_none_or(Value::is_object);
                let only_call = fields.keys().all(|k| k == "name" || k == "arguments");
                let call = call_of(object)?;
                (arguments_ok && only_call && self.names.contains(&call.name)).then_some(call)
            })
            .collect()
    }
}

/// Where a streamed answer stands while calls may still come.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Streaming {
    /// Nothing but whitespace, or what may begin a call object or a fence, so far.
    #[default]
    Undecided,
    /// Text, sent as it comes (but for a tail that may begin `<tool_call>`).
    Text,
    /// Held to the end: from a `<tool_call>` on, or the whole answer when it may be a
    /// call object.
    Held,
}

/// A streamed answer's text as it may go out while calls may follow: text is sent until
/// `<tool_call>` begins (a tail that may be its start is held back), and an answer that
/// begins as a call object (bare or fenced) is held; what is held is read at the end.
#[derive(Debug, Default)]
pub(super) struct CallStream {
    held: String,
    state: Streaming,
}

impl CallStream {
    /// The part of the answer, with `text` added, that can go out as text now.
    pub(super) fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        if self.state == Streaming::Undecided {
            let start = self.held.trim_start();
            self.state = if start.is_empty() || "```".starts_with(start) {
                Streaming::Undecided
            } else if start.starts_with('{') || start.starts_with('[') {
                Streaming::Held
            } else if let Some(fenced) = start.strip_prefix("```") {
                match fenced.split_once('\n') {
                    None => Streaming::Undecided,
                    Some((info, _)) if matches!(info.trim(), "" | "json") => Streaming::Held,
                    Some(_) => Streaming::Text,
                }
            } else {
                Streaming::Text
            };
        }
        match self.state {
            Streaming::Undecided | Streaming::Held => String::new(),
            Streaming::Text => {
                if let Some(open) = self.held.find(OPEN) {
                    self.state = Streaming::Held;
                    return self.held.drain(..open).collect();
                }
                // Hold back the longest tail that is a start of `<tool_call>`.
                let len = self.held.len();
                let keep = (1..OPEN.len().min(len + 1))
                    .rev()
                    .find(|&n| {
                        self.held.is_char_boundary(len - n)
                            && OPEN.starts_with(&self.held[len - n..])
                    })
                    .unwrap_or(0);
                self.held.drain(..len - keep).collect()
            }
        }
    }

    /// At the end: what was held, read for calls.
    pub(super) fn finish(self, reader: &CallReader) -> Answer {
        reader.read(&self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}}])
    }

    #[test]
    fn requests_are_read_and_bad_ones_refused_by_field() {
        let tools = weather();
        let read = |choice: Value| Tools::from_request(Some(&tools), Some(&choice), None);
        assert_eq!(
            read(json!("auto")).unwrap().unwrap().choice,
            ToolChoice::Auto
        );
        assert_eq!(read(json!(null)).unwrap().unwrap().choice, ToolChoice::Auto);
        assert!(!read(json!("none")).unwrap().unwrap().offered());
        assert_eq!(
            read(json!({"type": "function", "function": {"name": "now"}}))
                .unwrap()
                .unwrap()
                .choice,
            ToolChoice::Function("now".into())
        );
        let param = |e: GatewayError| match e {
            GatewayError::InvalidParam { param, .. } => param,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            param(read(json!({"type": "function", "function": {"name": "later"}})).unwrap_err()),
            "tool_choice"
        );
        assert_eq!(param(read(json!("always")).unwrap_err()), "tool_choice");
        // No tools: nothing to call, and asking for a call is an error.
        assert!(Tools::from_request(None, Some(&json!("auto")), None)
            .unwrap()
            .is_none());
        assert!(Tools::from_request(Some(&json!([])), Some(&json!("required")), None).is_err());
        for bad_tools in [
            json!({"type": "function"}),
            json!([{"type": "retrieval"}]),
            json!([{"type": "function", "function": {"name": "a b"}}]),
            json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
            json!([{"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "f"}}]),
        ] {
            let error = Tools::from_request(Some(&bad_tools), None, None).unwrap_err();
            assert_eq!(param(error), "tools", "{bad_tools}");
        }
        let error = Tools::from_request(Some(&tools), None, Some(&json!("yes"))).unwrap_err();
        assert_eq!(param(error), "parallel_tool_calls");
        // Definitions shared by name must agree.
        let with_defs = |name: &str, kind: &str| {
            json!({"type": "function", "function": {"name": name, "parameters": {
                "$defs": {"City": {"type": kind}},
                "properties": {"city": {"$ref": "#/$defs/City"}}}}})
        };
        let clash = json!([with_defs("a", "string"), with_defs("b", "integer")]);
        let error = Tools::from_request(Some(&clash), None, None).unwrap_err();
        assert_eq!(param(error), "tools");
        let agree = json!([with_defs("a", "string"), with_defs("b", "string")]);
        assert!(Tools::from_request(Some(&agree), None, None).is_ok());
    }

    fn reader(parallel: bool) -> CallReader {
        let tools = weather();
        Tools::from_request(Some(&tools), None, Some(&json!(parallel)))
            .unwrap()
            .unwrap()
            .reader()
    }

    fn named(answer: &Answer) -> Vec<(&str, &str)> {
        answer
            .calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect()
    }

    #[test]
    fn calls_are_read_from_hermes_blocks_and_from_answers_that_are_a_call() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                    {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \
                    \"arguments\": {}}\n</tool_call>";
        let answer = reader(true).read(text);
        assert_eq!(answer.text, "Let me check.\n");
        assert_eq!(
            named(&answer),
            [("get_weather", r#"{"city":"Paris"}"#), ("now", "{}")]
        );
        assert!(
            answer.calls[0].id.starts_with("call_") && answer.calls[0].id != answer.calls[1].id
        );
        assert_eq!(reader(false).read(text).calls.len(), 1);
        // An answer that is only a call object of a defined function: bare, fenced, a list.
        let object = r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
        for text in [
            object.to_string(),
            format!("```json\n{object}\n```"),
            format!(" ```\n[{object}, {{\"name\": \"now\"}}]\n```\n"),
        ] {
            let answer = reader(true).read(&text);
            assert_eq!(answer.text, "", "{text}");
            assert_eq!(answer.calls[0].name, "get_weather", "{text}");
        }
        // Text: no call, a block that is not JSON, text after the calls, JSON that is not
        // a call of a defined function, a fence of another language.
        for text in [
            "It is sunny.".to_string(),
            "<tool_call>\n{\"name\": \n</tool_call>".to_string(),
            "<tool_call>{\"arguments\": {}}</tool_call>".to_string(),
            format!("{text}\nDone."),
            r#"{"name": "rm_rf", "arguments": {}}"#.to_string(),
            r#"{"name": "now", "arguments": {}, "why": "asked"}"#.to_string(),
            r#"{"name": "Ada", "age": 36}"#.to_string(),
            format!("```python\n{object}\n```"),
            format!("Here: {object}"),
        ] {
            let answer = reader(true).read(&text);
            assert_eq!(
                answer,
                Answer {
                    text: text.clone(),
                    calls: Vec::new()
                }
            );
        }
        // Cut off before its end tag, a whole object still counts.
        let cut = reader(true).read("<tool_call>\n{\"name\": \"now\", \"arguments\": {}}");
        assert_eq!(cut.calls[0].name, "now");
    }

    /// What a stream of `pieces` sends as text as it goes, and what it reads at the end.
    fn stream(pieces: &[&str]) -> (String, Answer) {
        let mut stream = CallStream::default();
        let sent: String = pieces.iter().map(|p| stream.push(p)).collect();
        (sent, stream.finish(&reader(true)))
    }

    #[test]
    fn a_stream_sends_text_until_a_call_may_begin_and_reads_the_rest_at_the_end() {
        let block = [
            "Sure",
            ". <tool",
            "_ca",
            "ll>\n{\"name\": \"now\", ",
            "\"arguments\": {}}\n</tool_call>",
        ];
        let (sent, answer) = stream(&block);
        assert_eq!(sent, "Sure. ");
        assert_eq!(
            (answer.text.as_str(), answer.calls[0].name.as_str()),
            ("", "now")
        );
        // A start that turns out to be text goes out once it cannot be a call.
        let (sent, answer) = stream(&["a <to", "y>"]);
        assert_eq!((sent.as_str(), answer.text.as_str()), ("a <toy>", ""));
        let (sent, answer) = stream(&["x <tool_call>{oops"]);
        assert_eq!(
            (sent.as_str(), answer.text.as_str()),
            ("x ", "<tool_call>{oops")
        );
        // An answer that begins as a call object is held whole.
        let (sent, answer) = stream(&[
            "\n``",
            "`json\n{\"name\": \"now\",",
            " \"arguments\": {}}\n```",
        ]);
        assert_eq!((sent.as_str(), answer.calls.len()), ("", 1));
        let (sent, answer) = stream(&["{\"a\": ", "1}"]);
        assert_eq!((sent.as_str(), answer.text.as_str()), ("", "{\"a\": 1}"));
        // Code in another language is text from its fence's first line.
        let (sent, answer) = stream(&["``", "`py", "thon\nx = 1", "\n```"]);
        assert_eq!(
            (sent.as_str(), answer.text.as_str()),
            ("```python\nx = 1\n```", "")
        );
    }

    #[test]
    fn the_grammar_names_the_functions_it_allows() {
        let tools = weather();
        let grammar = |choice: Value, parallel: bool| {
            Tools::from_request(Some(&tools), Some(&choice), Some(&json!(parallel)))
                .unwrap()
                .unwrap()
                .grammar()
        };
        assert!(grammar(json!("auto"), true).is_none());
        let Some(Grammar::Lark(required)) = grammar(json!("required"), true) else {
            panic!()
        };
        assert!(required.contains("get_weather") && required.contains("\"now\""));
        assert!(required.contains("(\"\\n\" call)*"), "{required}");
        let named = json!({"type": "function", "function": {"name": "now"}});
        let Some(Grammar::Lark(one)) = grammar(named, false) else {
            panic!()
        };
        assert!(!one.contains("get_weather") && !one.contains(")*"), "{one}");
    }
}
