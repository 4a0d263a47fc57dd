//! Bad model files get clear errors that name the file and the problem.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use sibyl_engine::{load, EngineError, LoadOptions};
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sibyl-engine-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write_gguf(path: &PathBuf, metadata: &[(&str, Value)], with_embedding: bool) {
    let embedding = QTensor::quantize(
        &Tensor::zeros((96, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = if with_embedding {
        vec![("token_embd.weight", &embedding)]
    } else {
        Vec::new()
    };
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

fn qwen2_metadata() -> Vec<(&'static str, Value)> {
    vec![
        ("general.architecture", Value::String("qwen2".into())),
        ("qwen2.embedding_length", Value::U32(64)),
        ("qwen2.attention.head_count", Value::U32(4)),
        ("qwen2.attention.head_count_kv", Value::U32(2)),
        ("qwen2.feed_forward_length", Value::U32(128)),
        ("qwen2.block_count", Value::U32(1)),
        ("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("qwen2.context_length", Value::U32(256)),
    ]
}

#[test]
fn an_unknown_architecture_is_named() {
    let path = scratch("mamba.gguf");
    write_gguf(
        &path,
        &[("general.architecture", Value::String("mamba".into()))],
        true,
    );
    let error = load(&path, &LoadOptions::default()).err().unwrap();
    assert!(
        matches!(error, EngineError::UnsupportedArchitecture { .. }),
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.contains("mamba") && text.contains("mamba.gguf"),
        "{text}"
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let path = scratch("missing.gguf");
    write_gguf(&path, &qwen2_metadata(), true);
    let error = load(&path, &LoadOptions::default()).err().unwrap();
    let text = error.to_string();
    assert!(matches!(error, EngineError::MissingTensor { .. }), "{text}");
    assert!(
        text.contains("blk.0.") && text.contains("missing.gguf"),
        "{text}"
    );
}

#[test]
fn missing_metadata_is_named() {
    let path = scratch("nometa.gguf");
    let mut metadata = qwen2_metadata();
    metadata.retain(|(k, _)| *k != "qwen2.block_count");
    write_gguf(&path, &metadata, true);
    let text = load(&path, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(text.contains("qwen2.block_count"), "{text}");
}

#[test]
fn a_file_that_is_not_gguf_is_refused() {
    let path = scratch("garbage.gguf");
    std::fs::write(&path, b"this is not a model file at all").unwrap();
    let error = load(&path, &LoadOptions::default()).err().unwrap();
    assert!(matches!(error, EngineError::Header { .. }), "{error}");
    assert!(error.to_string().contains("garbage.gguf"));
}

#[test]
fn a_tensor_type_the_engine_cannot_read_is_named() {
    let path = scratch("iq4_xs.gguf");
    write_gguf(&path, &qwen2_metadata(), true);
    let mut bytes = std::fs::read(&path).unwrap();
    // The tensor's entry: its name, two dimensions of 8 bytes, then its type (F32: 0).
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    let type_at = at + name.len() + 4 + 2 * 8;
    assert_eq!(bytes[type_at..type_at + 4], [0, 0, 0, 0]);
    bytes[type_at..type_at + 4].copy_from_slice(&23u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let error = load(&path, &LoadOptions::default()).err().unwrap();
    let text = error.to_string();
    assert!(
        matches!(error, EngineError::UnknownTensorType { id: 23, .. }),
        "{text}"
    );
    assert!(
        text.contains("IQ4_XS") && text.contains("iq4_xs.gguf") && text.contains("Q4_K_M"),
        "{text}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let path = scratch("does-not-exist.gguf");
    let error = load(&path, &LoadOptions::default()).err().unwrap();
    assert!(matches!(error, EngineError::Open { .. }), "{error}");
}

/// A small valid GGUF: a model's metadata, a tokenizer's, and one tensor.
fn valid_file_bytes() -> Vec<u8> {
    let path = scratch("valid-for-mutation.gguf");
    let tokens: Vec<Value> = ["a", "b", "ab", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|t| Value::String(t.to_string()))
        .collect();
    let mut metadata = qwen2_metadata();
    metadata.extend([
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("a b".into())]),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array([1, 1, 1, 3, 3].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(4)),
        (
            "tokenizer.chat_template",
            Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ),
    ]);
    write_gguf(&path, &metadata, true);
    std::fs::read(&path).unwrap()
}

#[test]
fn a_zero_alignment_is_a_load_error_not_a_panic() {
    let path = scratch("zero-alignment.gguf");
    let mut metadata = qwen2_metadata();
    metadata.push(("general.alignment", Value::U32(0)));
    write_gguf(&path, &metadata, true);
    let error = load(&path, &LoadOptions::default()).err().unwrap();
    assert!(matches!(error, EngineError::Malformed { .. }), "{error}");
    assert!(error.to_string().contains("zero-alignment.gguf"), "{error}");
    let error = sibyl_engine::load_text(&path).err().unwrap();
    assert!(matches!(error, EngineError::Malformed { .. }), "{error}");
}

mod mutated {
    use super::*;
    use proptest::prelude::*;

    /// What can go wrong in a file: cut short, bytes flipped, a count or length made huge.
    #[derive(Debug, Clone)]
    enum Mutation {
        Truncate(usize),
        Flip(usize, u8),
        Huge(usize, u64),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            any::<usize>().prop_map(Mutation::Truncate),
            (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
            (
                any::<usize>(),
                prop_oneof![Just(u64::MAX), Just(u64::MAX / 2), Just(1 << 40), Just(0)]
            )
                .prop_map(|(at, value)| Mutation::Huge(at, value)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Whatever is done to a valid file, loading it returns: a model or an error,
        /// never a panic that escapes, an abort or a hang.
        #[test]
        fn loading_a_mutated_file_returns(mutations in proptest::collection::vec(mutation(), 1..4)) {
            let mut bytes = valid_file_bytes();
            for mutation in &mutations {
                match *mutation {
                    Mutation::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
                    Mutation::Flip(at, mask) if !bytes.is_empty() => {
                        let at = at % bytes.len();
                        bytes[at] ^= mask;
                    }
                    Mutation::Huge(at, value) if bytes.len() >= 8 => {
                        let at = at % (bytes.len() - 7);
                        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
                    }
                    _ => {}
                }
            }
            let path = scratch(&format!("mutated-{}.gguf", unique()));
            std::fs::write(&path, &bytes).unwrap();
            let _ = sibyl_engine::load_text(&path);
            let _ = load(&path, &LoadOptions::default());
            std::fs::remove_file(&path).unwrap();
        }
    }

    /// A fresh file name (cases may run in parallel threads).
    fn unique() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}
