//! Benchmark prompts: JSONL, one item per line (`id`, `category`, `prompt` or `turns`,
//! `format`, and `suffix` for fill-in-the-middle items), as in Spec-Bench's question files.

use anyhow::{bail, Context};
use serde::Deserialize;
use sibyl_engine::ChatMessage;
use sibyl_gateway::PromptInput;
use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;

/// Longest accepted line of a dataset file (a prompt with its context); longer is an error,
/// not an allocation.
const MAX_LINE_BYTES: usize = 4 << 20;

/// How an item's prompt reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// User turns in the model's chat template.
    Chat,
    /// The prompt text as it is.
    Completion,
    /// Fill in the middle: the prompt is the code before a gap, `suffix` the code after it.
    Infill,
}

/// One benchmark prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    pub category: String,
    pub format: Format,
    /// The user turns, in order (one for single-turn items).
    pub turns: Vec<String>,
    /// A system prompt before the turns (`sibyl bench --system-prompt`): a chat's first
    /// message, or the start of each completion prompt.
    pub system: Option<String>,
    /// An infill item's code after the gap.
    pub suffix: Option<String>,
}

impl Item {
    /// The prompt of turn `turn` (from 0), or `None` past the last. For a chat, `messages`
    /// holds the turns before with the model's answers (empty for the first) and gets this
    /// turn's message.
    pub fn prompt(&self, turn: usize, messages: &mut Vec<ChatMessage>) -> Option<PromptInput> {
        let text = self.turns.get(turn)?;
        Some(match self.format {
            Format::Completion => {
                PromptInput::Text(format!("{}{text}", self.system.as_deref().unwrap_or("")))
            }
            Format::Infill => PromptInput::Infill {
                prefix: format!("{}{text}", self.system.as_deref().unwrap_or("")),
                suffix: self.suffix.clone().unwrap_or_default(),
            },
            Format::Chat => {
                if let (true, Some(system)) = (messages.is_empty(), &self.system) {
                    messages.push(ChatMessage::new("system", system));
                }
                messages.push(ChatMessage::new("user", text));
                PromptInput::Chat {
                    messages: messages.clone(),
                    options: Default::default(),
                }
            }
        })
    }
}

#[derive(Deserialize)]
struct Line {
    id: serde_json::Value,
    category: String,
    prompt: String,
    format: Format,
    #[serde(default)]
    turns: Option<Vec<String>>,
    #[serde(default)]
    suffix: Option<String>,
}

/// Reads the items of `path`, in file order. Every line must be a complete item; ids must
/// be unique within the file.
pub fn read(path: &Path) -> anyhow::Result<Vec<Item>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the dataset {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut items = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut buffer = Vec::new();
    let mut number = 0;
    loop {
        buffer.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buffer)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            break;
        }
        number += 1;
        let at = || format!("{}:{number}", path.display());
        if buffer.len() > MAX_LINE_BYTES {
            bail!("{}: line longer than {MAX_LINE_BYTES} bytes", at());
        }
        let text = std::str::from_utf8(&buffer).with_context(|| format!("{}: not UTF-8", at()))?;
        if text.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(text).with_context(|| {
            format!(
                "{}: not a benchmark item (fields `id`, `category`, `prompt`, `format` \
                 chat|completion|infill, optional `turns`, `suffix`)",
                at()
            )
        })?;
        let id = match line.id {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ => bail!("{}: `id` must be a string or a number", at()),
        };
        if !seen.insert(id.clone()) {
            bail!("{}: the id `{id}` appears twice", at());
        }
        let turns = match line.turns {
            Some(turns) if !turns.is_empty() => turns,
            _ => vec![line.prompt],
        };
        if line.format != Format::Chat && turns.len() > 1 {
            bail!(
                "{}: `{id}` is a completion with {} turns; only chats have turns",
                at(),
                turns.len()
            );
        }
        if (line.format == Format::Infill) != line.suffix.is_some() {
            bail!(
                "{}: `{id}`: an infill item has a `suffix`, and only it",
                at()
            );
        }
        if turns.iter().any(|t| t.is_empty()) {
            bail!("{}: `{id}` has an empty prompt", at());
        }
        items.push(Item {
            id,
            category: line.category,
            format: line.format,
            turns,
            system: None,
            suffix: line.suffix,
        });
    }
    if items.is_empty() {
        bail!("{} holds no items", path.display());
    }
    Ok(items)
}

/// The items to run: those of `categories` (all when empty), at most `limit` per category,
/// in file order. Ids must be unique over all files.
pub fn select(
    files: Vec<Vec<Item>>,
    categories: &[String],
    limit: Option<usize>,
) -> anyhow::Result<Vec<Item>> {
    let mut taken: BTreeMap<String, usize> = BTreeMap::new();
    let mut ids = std::collections::HashSet::new();
    let mut selected = Vec::new();
    let mut known = std::collections::BTreeSet::new();
    for item in files.into_iter().flatten() {
        known.insert(item.category.clone());
        if !categories.is_empty() && !categories.contains(&item.category) {
            continue;
        }
        let count = taken.entry(item.category.clone()).or_default();
        if limit.is_some_and(|limit| *count >= limit) {
            continue;
        }
        if !ids.insert(item.id.clone()) {
            bail!("the id `{}` appears in two datasets", item.id);
        }
        *count += 1;
        selected.push(item);
    }
    if let Some(missing) = categories.iter().find(|c| !known.contains(*c)) {
        let known: Vec<_> = known.into_iter().collect();
        bail!(
            "no item has the category `{missing}`; the datasets have: {}",
            known.join(", ")
        );
    }
    if selected.is_empty() {
        bail!("no items selected");
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sibyl-dataset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_single_and_multi_turn_items() {
        let path = write(
            "ok.jsonl",
            concat!(
                r#"{"id": "a", "category": "x", "prompt": "one", "format": "chat", "turns": ["one", "two"], "extra": 1}"#,
                "\n\n",
                r#"{"id": 7, "category": "y", "prompt": "def f():", "format": "completion"}"#,
                "\n",
                r#"{"id": 8, "category": "y", "prompt": "def f():\n    ", "suffix": "\n    return x\n", "format": "infill"}"#,
                "\n",
            ),
        );
        let items = read(&path).unwrap();
        assert_eq!(items.len(), 3);
        match items[2].prompt(0, &mut Vec::new()) {
            Some(PromptInput::Infill { prefix, suffix }) => {
                assert_eq!(
                    (prefix.as_str(), suffix.as_str()),
                    ("def f():\n    ", "\n    return x\n")
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(items[0].turns, ["one", "two"]);
        assert_eq!(items[0].format, Format::Chat);
        assert_eq!(items[1].id, "7");
        assert_eq!(items[1].turns, ["def f():"]);
        assert_eq!(items[1].format, Format::Completion);
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line() {
        let cases = [
            ("missing.jsonl", r#"{"id": "a", "category": "x", "format": "chat"}"#, ":1: not a benchmark item"),
            ("format.jsonl", r#"{"id": "a", "category": "x", "prompt": "p", "format": "poem"}"#, ":1: not a benchmark item"),
            (
                "twice.jsonl",
                "{\"id\": \"a\", \"category\": \"x\", \"prompt\": \"p\", \"format\": \"chat\"}\n{\"id\": \"a\", \"category\": \"x\", \"prompt\": \"q\", \"format\": \"chat\"}",
                ":2: the id `a` appears twice",
            ),
            (
                "turns.jsonl",
                r#"{"id": "a", "category": "x", "prompt": "p", "format": "completion", "turns": ["p", "q"]}"#,
                "only chats have turns",
            ),
            (
                "no-suffix.jsonl",
                r#"{"id": "a", "category": "x", "prompt": "p", "format": "infill"}"#,
                "an infill item has a `suffix`",
            ),
            (
                "stray-suffix.jsonl",
                r#"{"id": "a", "category": "x", "prompt": "p", "suffix": "s", "format": "chat"}"#,
                "an infill item has a `suffix`",
            ),
            ("empty-prompt.jsonl", r#"{"id": "a", "category": "x", "prompt": "", "format": "chat"}"#, "empty prompt"),
            ("nothing.jsonl", "\n", "holds no items"),
        ];
        for (name, text, expected) in cases {
            let error = format!("{:#}", read(&write(name, text)).unwrap_err());
            assert!(error.contains(expected), "{name}: {error}");
        }
        let error = format!("{:#}", read(Path::new("/nonexistent/x.jsonl")).unwrap_err());
        assert!(
            error.contains("cannot open the dataset /nonexistent/x.jsonl"),
            "{error}"
        );
    }

    #[test]
    fn selects_categories_and_limits_per_category() {
        let item = |id: &str, category: &str| Item {
            id: id.into(),
            category: category.into(),
            format: Format::Chat,
            turns: vec!["p".into()],
            system: None,
            suffix: None,
        };
        let files = vec![
            vec![
                item("a1", "a"),
                item("b1", "b"),
                item("a2", "a"),
                item("a3", "a"),
            ],
            vec![item("c1", "c")],
        ];
        let ids = |items: Vec<Item>| items.into_iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(
            ids(select(files.clone(), &[], Some(2)).unwrap()),
            ["a1", "b1", "a2", "c1"]
        );
        assert_eq!(
            ids(select(files.clone(), &["c".into(), "b".into()], None).unwrap()),
            ["b1", "c1"]
        );
        let error = select(files.clone(), &["d".into()], None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("no item has the category `d`; the datasets have: a, b, c"),
            "{error}"
        );
        let twice = vec![vec![item("a1", "a")], vec![item("a1", "b")]];
        assert!(select(twice, &[], None)
            .unwrap_err()
            .to_string()
            .contains("two datasets"));
    }
}
