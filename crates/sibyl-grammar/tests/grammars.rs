//! Constraints over a small byte-level vocabulary, driven by random logits: whatever the
//! logits, the output is JSON that matches the schema, text that matches the regular
//! expression, one of the choices.

use serde_json::Value;
use sibyl_grammar::{GrammarCompiler, GrammarConstraint, GrammarError};
use sibyl_spec::{argmax, TokenConstraint, TokenId};

/// Printable ASCII one byte a token, some longer pieces, and a stop token last.
fn vocabulary() -> (Vec<(Vec<u8>, bool)>, TokenId) {
    let mut tokens: Vec<(Vec<u8>, bool)> = (0x20u8..0x7f).map(|b| (vec![b], false)).collect();
    for piece in [
        "{\"", "\":", "\",", "\"}", "true", "false", "null", "\n", "  ", "12", "ab",
    ] {
        tokens.push((piece.as_bytes().to_vec(), false));
    }
    // An id the tokenizer lacks, and a control token that looks like text.
    tokens.push((Vec::new(), false));
    tokens.push((b"<|im_start|>".to_vec(), true));
    let stop = tokens.len() as TokenId;
    tokens.push((b"<|im_end|>".to_vec(), true));
    (tokens, stop)
}

/// A small deterministic generator of logits.
struct Noise(u64);

impl Noise {
    fn row(&mut self, vocab: usize) -> Vec<f32> {
        (0..vocab)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 8.0
            })
            .collect()
    }
}

/// Greedy generation under `schema` from random logits, up to a stop token.
fn generate(compiler: &GrammarCompiler, schema: &str, seed: u64) -> String {
    generate_under(compiler.json_schema(schema).unwrap(), seed)
}

/// Greedy generation under `constraint` from random logits, up to a stop token.
fn generate_under(mut constraint: GrammarConstraint, seed: u64) -> String {
    let (tokens, stop) = vocabulary();
    let mut noise = Noise(seed);
    let mut out = Vec::new();
    for _ in 0..5_000 {
        let mut row = noise.row(tokens.len());
        constraint.mask(&[], &mut row).unwrap();
        let token = argmax(&row);
        assert!(row[token as usize].is_finite(), "every token masked");
        if token == stop {
            return String::from_utf8(out).unwrap();
        }
        constraint.record(&[token]).unwrap();
        out.extend_from_slice(&tokens[token as usize].0);
    }
    panic!("no stop token in 5000: {}", String::from_utf8_lossy(&out));
}

/// The id of the token of `text` in [`vocabulary`].
fn id(text: &str) -> TokenId {
    let (tokens, _) = vocabulary();
    tokens
        .iter()
        .position(|(t, _)| t == text.as_bytes())
        .unwrap() as TokenId
}

fn compiler() -> GrammarCompiler {
    let (tokens, stop) = vocabulary();
    GrammarCompiler::new(tokens, &[stop]).unwrap()
}

#[test]
fn random_logits_under_a_schema_give_json_that_matches_it() {
    let compiler = compiler();
    let schema = r#"{
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    }"#;
    for seed in 0..20 {
        let text = generate(&compiler, schema, seed);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 3, "{text}");
        assert!(
            object["name"].as_str().unwrap().chars().count() <= 6,
            "{text}"
        );
        assert!(
            (0..=120).contains(&object["age"].as_i64().unwrap()),
            "{text}"
        );
        let tags = object["tags"].as_array().unwrap();
        assert!(
            tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"),
            "{text}"
        );
        assert!(!text.contains("<|"), "a control token's text in {text}");
    }
}

#[test]
fn json_object_mode_gives_an_object() {
    let compiler = compiler();
    for seed in 0..10 {
        let text = generate(&compiler, r#"{"type": "object"}"#, seed);
        match serde_json::from_str::<Value>(&text) {
            Ok(value) => assert!(value.is_object(), "{text}"),
            // JSON bounds no number (random logits write 1e400); serde_json's f64 does.
            Err(e) if e.to_string().starts_with("number out of range") => {
                assert!(text.trim_start().starts_with('{'), "{text}")
            }
            Err(e) => panic!("{e}: {text}"),
        }
    }
}

#[test]
fn a_regex_or_a_choice_holds_the_whole_output() {
    let compiler = compiler();
    let choices = [
        "yes".to_string(),
        "no".to_string(),
        "say \"maybe\"\n".to_string(),
    ];
    for seed in 0..10 {
        let text = generate_under(compiler.regex(r"[0-9]{3}-[a-z]{2,4}").unwrap(), seed);
        let (digits, letters) = text.split_once('-').unwrap_or_else(|| panic!("{text:?}"));
        assert!(
            digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()),
            "{text:?}"
        );
        assert!((2..=4).contains(&letters.len()), "{text:?}");
        assert!(letters.bytes().all(|b| b.is_ascii_lowercase()), "{text:?}");
        let chosen = generate_under(compiler.choice(&choices).unwrap(), seed);
        assert!(choices.contains(&chosen), "{chosen:?}");
    }
    let grammar = r#"start: "v" NUMBER
NUMBER: /[1-9][0-9]?/"#;
    let text = generate_under(compiler.lark(grammar).unwrap(), 3);
    assert!(
        text.starts_with('v') && text[1..].parse::<u32>().unwrap() < 100,
        "{text:?}"
    );
    assert!(matches!(
        compiler.regex("(unclosed"),
        Err(GrammarError::Grammar(_))
    ));
    assert!(matches!(
        compiler.lark("start: nothing_here"),
        Err(GrammarError::Grammar(_))
    ));
    assert!(matches!(compiler.choice(&[]), Err(GrammarError::NoChoice)));
}

#[test]
fn a_mask_for_a_path_then_a_record_of_another_leaves_the_state_of_the_record() {
    let compiler = compiler();
    let (tokens, _) = vocabulary();
    let schema = r#"{"type": "object", "properties": {"k": {"type": "integer"}}}"#;
    let (open, k, colon, one, two) = (id("{\""), id("k"), id("\":"), id("1"), id("2"));
    let mut walked = compiler.json_schema(schema).unwrap();
    let mut row = vec![0.0; tokens.len()];
    // A verify walk down one path, then the step emits a shorter, different one.
    for depth in 0..4 {
        let path = [open, k, colon, one];
        walked.mask(&path[..depth], &mut row).unwrap();
    }
    walked.record(&[open, k, colon, two]).unwrap();
    let mut direct = compiler.json_schema(schema).unwrap();
    direct.record(&[open, k]).unwrap();
    direct.record(&[colon, two]).unwrap();
    let (mut a, mut b) = (vec![0.0; tokens.len()], vec![0.0; tokens.len()]);
    walked.mask(&[], &mut a).unwrap();
    direct.mask(&[], &mut b).unwrap();
    assert_eq!(a, b);
    assert!(a[id("}") as usize].is_finite() && a[id("a") as usize] == f32::NEG_INFINITY);
}

#[test]
fn drafts_are_allowed_up_to_the_first_token_the_grammar_forbids_or_does_not_know() {
    let compiler = compiler();
    let (tokens, stop) = vocabulary();
    let mut json = compiler.json_schema(r#"{"type": "array"}"#).unwrap();
    let draft = [id("["), id("1"), id("]"), id("]")];
    assert_eq!(json.allowed_prefix(&draft), 3);
    assert_eq!(json.allowed_prefix(&[id("["), 1_000_000, id("]")]), 1);
    assert_eq!(
        json.allowed_prefix(&[id("["), id("]"), stop]),
        3,
        "the end where complete"
    );
    // Neither changed the state: the output still starts anew.
    let mut row = vec![0.0; tokens.len()];
    json.mask(&[], &mut row).unwrap();
    assert!(row[id("[") as usize].is_finite() && row[id("]") as usize] == f32::NEG_INFINITY);
}

#[test]
fn after_a_stop_token_only_stop_tokens_follow_whether_recorded_or_on_the_path() {
    // A session that goes on past the end (`ignore_eos`) must see the same rows in plain
    // steps (the stop token recorded) as in a verify tree (the stop token on the path).
    let compiler = compiler();
    let (tokens, stop) = vocabulary();
    let choice = ["ab".to_string()];
    let mut plain = compiler.choice(&choice).unwrap();
    plain.record(&[id("ab"), stop]).unwrap();
    let mut after_record = vec![0.0; tokens.len()];
    plain.mask(&[], &mut after_record).unwrap();
    let mut tree = compiler.choice(&choice).unwrap();
    tree.record(&[id("ab")]).unwrap();
    let mut on_path = vec![0.0; tokens.len()];
    tree.mask(&[stop], &mut on_path).unwrap();
    assert_eq!(after_record, on_path);
    let allowed: Vec<usize> = (0..tokens.len())
        .filter(|&t| on_path[t].is_finite())
        .collect();
    assert_eq!(allowed, vec![stop as usize]);
}

#[test]
fn bad_schemas_are_refused_with_a_message() {
    let compiler = compiler();
    let refuse = |schema: &str| compiler.json_schema(schema).err().unwrap();
    assert!(matches!(refuse("{not json"), GrammarError::NotJson(_)));
    assert_eq!(refuse("[1, 2]"), GrammarError::NotSchema);
    let error = refuse(r##"{"$ref": "#/definitions/missing"}"##);
    assert!(matches!(error, GrammarError::Schema(_)), "{error:?}");
    assert!(error.to_string().contains("missing"), "{error}");
    assert_eq!(
        GrammarCompiler::new(vocabulary().0, &[]).err(),
        Some(GrammarError::NoStopToken)
    );
}
