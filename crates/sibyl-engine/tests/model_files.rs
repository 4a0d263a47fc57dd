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
fn a_missing_file_is_named() {
    let path = scratch("does-not-exist.gguf");
    let error = load(&path, &LoadOptions::default()).err().unwrap();
    assert!(matches!(error, EngineError::Open { .. }), "{error}");
}
