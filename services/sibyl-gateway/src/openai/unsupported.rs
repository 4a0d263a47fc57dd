//! OpenAI request fields sibyl does not implement, refused by name rather than ignored.

use crate::generation::GatewayError;
use serde::Deserialize;
use serde_json::{json, Value};

/// OpenAI fields this server does not implement. Each is refused with a 400 naming it
/// when set to anything but its neutral value (which clients often send explicitly), so
/// that a client never gets free text where it asked for tool calls or JSON. Fields OpenAI does not define are ignored.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Unsupported {
    functions: Option<Value>,
    function_call: Option<Value>,
    best_of: Option<Value>,
    /// vLLM's per-request template.
    chat_template: Option<Value>,
}

/// Whether a field is absent, null or one of the `allowed` values that ask for nothing.
pub(super) fn neutral(value: &Option<Value>, allowed: &[Value]) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(v) => allowed.contains(v),
    }
}

/// The first of `checks` (field, whether its value can be honoured, why not) that fails,
/// as a 400 naming the field.
pub(crate) fn refuse_first<'a>(
    checks: impl IntoIterator<Item = (&'static str, bool, &'a str)>,
) -> Result<(), GatewayError> {
    match checks.into_iter().find(|(_, ok, _)| !ok) {
        Some((param, _, message)) => Err(GatewayError::invalid_param(param, message)),
        None => Ok(()),
    }
}

impl Unsupported {
    /// The first field set to something this server cannot do, with why.
    pub(super) fn check(&self) -> Result<(), GatewayError> {
        let empty = |value: &Option<Value>| match value {
            Some(Value::Array(items)) => items.is_empty(),
            Some(Value::Object(fields)) => fields.is_empty(),
            other => neutral(other, &[]),
        };
        let one = |value: &Option<Value>| neutral(value, &[json!(1)]);
        let checks: [(&'static str, bool, &str); 4] = [
            (
                "functions",
                empty(&self.functions),
                "the deprecated `functions` is not supported; use `tools`",
            ),
            (
                "function_call",
                neutral(&self.function_call, &[json!("none"), json!("auto")]),
                "the deprecated `function_call` is not supported; use `tool_choice`",
            ),
            (
                "best_of",
                one(&self.best_of),
                "only `best_of: 1` is supported (`n` gives several choices)",
            ),
            (
                "chat_template",
                neutral(&self.chat_template, &[]),
                "a template per request is not supported; the server takes one at start \
                 (--chat-template)",
            ),
        ];
        refuse_first(checks)
    }
}
