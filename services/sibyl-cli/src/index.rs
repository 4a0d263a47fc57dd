//! `sibyl index`: tokenizes a corpus with the target's tokenizer into a retrieval datastore.

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use sibyl_setup::args::ModelArgs;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    /// A file or folder of text or code (repeatable). Folders are walked recursively, in
    /// name order; files that are not UTF-8 text are skipped and counted.
    #[arg(long = "input", required = true)]
    pub inputs: Vec<PathBuf>,

    /// Folder names to skip while walking (repeatable, comma-separated), e.g.
    /// `--exclude test,tests,site-packages,__pycache__`.
    #[arg(long, value_delimiter = ',')]
    pub exclude: Vec<String>,

    /// Where to write the datastore (replaced if it exists).
    #[arg(long)]
    pub output: PathBuf,

    /// The model whose tokenizer the datastore is built with: drafting for any other
    /// tokenizer is refused.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The files under `inputs`, each once, folders walked in name order.
fn files(inputs: &[PathBuf], exclude: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta =
            std::fs::metadata(input).with_context(|| format!("--input {}", input.display()))?;
        if meta.is_file() {
            files.push(input.clone());
            continue;
        }
        let walk = walkdir::WalkDir::new(input)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|entry| {
                entry.depth() == 0
                    || !entry.file_type().is_dir()
                    || !exclude
                        .iter()
                        .any(|name| entry.file_name() == name.as_str())
            });
        for entry in walk {
            let entry = entry.with_context(|| format!("walking {}", input.display()))?;
            if entry.file_type().is_file() {
                files.push(entry.into_path());
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// A file's text, or `None` when it is not UTF-8 text (a NUL byte counts as binary).
fn read_text(path: &Path) -> anyhow::Result<Option<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.contains(&0) {
        return Ok(None);
    }
    Ok(String::from_utf8(bytes).ok())
}

pub fn run(args: IndexArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if let Some(threads) = args.model.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .ok();
    }
    let path = args.model.locate()?;
    let text_model = sibyl_engine::load_text(&path)?;
    let tokenizer = &text_model.tokenizer;
    let files = files(&args.inputs, &args.exclude)?;
    if files.is_empty() {
        bail!("no file found under the --input paths");
    }
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .collect();
    let total: u64 = sizes.iter().sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "tokenizing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let documents: Vec<Option<Vec<u32>>> = files
        .par_iter()
        .zip(&sizes)
        .map(|(file, &size)| -> anyhow::Result<Option<Vec<u32>>> {
            let text = read_text(file)?;
            bar.inc(size);
            let Some(text) = text else {
                return Ok(None);
            };
            let tokens = tokenizer
                .encode(&text)
                .with_context(|| format!("tokenizing {}", file.display()))?;
            Ok(Some(tokens))
        })
        .collect::<anyhow::Result<_>>()?;
    bar.finish_and_clear();
    let skipped = documents.iter().filter(|d| d.is_none()).count();
    let documents: Vec<Vec<u32>> = documents.into_iter().flatten().collect();
    let tokenized = started.elapsed();
    let id = sibyl_setup::tokenizer_id(tokenizer, text_model.config.vocab_size);
    let written = sibyl_retrieval::write(&args.output, id, &documents)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "indexed {} files ({:.1} MB; {skipped} skipped, not UTF-8 text) into {}: {} tokens, \
         {:.1} MB; tokenized in {:.1} s, total {:.1} s",
        written.documents,
        total as f64 / 1e6,
        args.output.display(),
        written.tokens,
        written.bytes as f64 / 1e6,
        tokenized.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}
