//! The datastore file: a corpus as target-model tokens plus their suffix array, written once
//! by [`write`] and memory-mapped read-only by [`Datastore::open`].
//!
//! Layout (little-endian): a 64-byte header, then `n` tokens (`u32`), then the suffix array
//! (`n` positions, `u32`). Documents are separated by the token id `vocab_size`, which no
//! context token can equal, so no match and no continuation crosses a document boundary.
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SIBYLRS1` |
//! | 8..12 | format version (1) |
//! | 12..16 | vocabulary size of the tokenizer (the separator's id) |
//! | 16..24 | tokenizer fingerprint |
//! | 24..32 | `n`, tokens including separators |
//! | 32..40 | documents |
//! | 40..44 | CRC-32 of bytes 0..40 and of everything after the header |
//! | 44..64 | zero |

use crate::TokenId;
use memmap2::Mmap;
use std::cmp::Ordering;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SIBYLRS1";
const VERSION: u32 = 1;
const HEADER: usize = 64;
/// Longest text the `u32` positions (and libsais' `i32` ones) can index.
const MAX_TOKENS: usize = i32::MAX as usize;

/// Why a datastore cannot be built, written or used.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a sibyl datastore (no SIBYLRS1 header); build one with `sibyl index`")]
    NotADatastore { path: PathBuf },
    #[error("{path} is a datastore of format version {found}; this sibyl reads version {VERSION}: rebuild it with `sibyl index`")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is corrupt: {what}; rebuild it with `sibyl index`")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "{path} was built with tokenizer {found:016x} (vocabulary {found_vocab}), but the model's \
         tokenizer is {expected:016x} (vocabulary {expected_vocab}): rebuild it with \
         `sibyl index --model` naming this model"
    )]
    TokenizerMismatch {
        path: PathBuf,
        found: u64,
        found_vocab: u32,
        expected: u64,
        expected_vocab: u32,
    },
    #[error("the corpus is empty: no document has a token")]
    Empty,
    #[error("the corpus has {0} tokens; a datastore holds at most {MAX_TOKENS}")]
    TooLarge(usize),
    #[error("document {document} has token {token}, outside the vocabulary of {vocab}")]
    Token {
        document: usize,
        token: TokenId,
        vocab: u32,
    },
    #[error("the suffix array could not be built: {0}")]
    SuffixArray(String),
}

/// Which tokenizer a datastore's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizerId {
    pub fingerprint: u64,
    pub vocab_size: u32,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub documents: usize,
    /// Tokens of the documents (separators not counted).
    pub tokens: usize,
    pub bytes: u64,
}

/// Concatenates `documents` (token ids under `tokenizer.vocab_size`), builds the suffix array
/// and writes the datastore to `path` (through a temporary file beside it, renamed at the
/// end, so a reader never sees half a file). Empty documents are left out.
pub fn write(
    path: &Path,
    tokenizer: TokenizerId,
    documents: &[Vec<TokenId>],
) -> Result<Written, DatastoreError> {
    let separator = tokenizer.vocab_size;
    let kept: Vec<&Vec<TokenId>> = documents.iter().filter(|d| !d.is_empty()).collect();
    let tokens: usize = kept.iter().map(|d| d.len()).sum();
    if tokens == 0 {
        return Err(DatastoreError::Empty);
    }
    let n = tokens + kept.len() - 1;
    if n > MAX_TOKENS {
        return Err(DatastoreError::TooLarge(n));
    }
    let mut text: Vec<i32> = Vec::with_capacity(n);
    for (document, tokens) in documents.iter().enumerate() {
        if tokens.is_empty() {
            continue;
        }
        if !text.is_empty() {
            text.push(separator as i32);
        }
        for &token in tokens {
            if token >= separator {
                return Err(DatastoreError::Token {
                    document,
                    token,
                    vocab: separator,
                });
            }
            text.push(token as i32);
        }
    }
    let suffixes = suffix_array(&mut text)?;
    let io = |source| DatastoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut header = [0u8; HEADER];
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&tokenizer.vocab_size.to_le_bytes());
    header[16..24].copy_from_slice(&tokenizer.fingerprint.to_le_bytes());
    header[24..32].copy_from_slice(&(n as u64).to_le_bytes());
    header[32..40].copy_from_slice(&(kept.len() as u64).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[..40]);
    let body = |values: &[i32]| -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| (v as u32).to_le_bytes())
            .collect()
    };
    let (text_bytes, sa_bytes) = (body(&text), body(&suffixes));
    crc.update(&text_bytes);
    crc.update(&sa_bytes);
    header[40..44].copy_from_slice(&crc.finalize().to_le_bytes());

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let temporary = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new("."))).map_err(io)?;
    {
        let mut out = BufWriter::new(temporary.as_file());
        out.write_all(&header).map_err(io)?;
        out.write_all(&text_bytes).map_err(io)?;
        out.write_all(&sa_bytes).map_err(io)?;
        out.flush().map_err(io)?;
    }
    temporary.as_file().sync_all().map_err(io)?;
    // Temporary files are private; a datastore is read by servers running as other users
    // (the container image's uid 65532).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let readable = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(temporary.path(), readable).map_err(io)?;
    }
    temporary.persist(path).map_err(|e| io(e.error))?;
    Ok(Written {
        documents: kept.len(),
        tokens,
        bytes: (HEADER + 8 * n) as u64,
    })
}

/// The suffix array of `text` (values in `0..=max`), by libsais.
fn suffix_array(text: &mut [i32]) -> Result<Vec<i32>, DatastoreError> {
    let construction = libsais::SuffixArrayConstruction::for_text_mut(text)
        .in_owned_buffer32()
        .single_threaded();
    let built = construction
        .run()
        .map_err(|e| DatastoreError::SuffixArray(format!("{e:?}")))?;
    Ok(built.into_vec())
}

/// A datastore, memory-mapped read-only.
pub struct Datastore {
    path: PathBuf,
    map: Mmap,
    n: usize,
    documents: usize,
    tokenizer: TokenizerId,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("path", &self.path)
            .field("tokens", &self.n)
            .field("documents", &self.documents)
            .finish()
    }
}

impl Datastore {
    /// Maps the datastore at `path` and checks it: header, size, checksum, every token
    /// within the vocabulary, every suffix position within the text. With `expected`, a
    /// datastore built for another tokenizer is refused.
    ///
    /// The file must not be changed while it is mapped (`sibyl index` replaces files by
    /// renaming a new one over them, which leaves the mapped one intact).
    pub fn open(path: &Path, expected: Option<TokenizerId>) -> Result<Self, DatastoreError> {
        let path_buf = path.to_path_buf();
        let corrupt = |what: String| DatastoreError::Corrupt {
            path: path_buf.clone(),
            what,
        };
        let io = |source| DatastoreError::Io {
            path: path_buf.clone(),
            source,
        };
        if cfg!(target_endian = "big") {
            return Err(corrupt(
                "datastores are little-endian; this machine is not".into(),
            ));
        }
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER as u64 {
            let head = std::fs::read(path).map_err(io)?;
            if head.starts_with(MAGIC) {
                return Err(corrupt(format!("{len} bytes, shorter than the header")));
            }
            return Err(DatastoreError::NotADatastore { path: path_buf });
        }
        // SAFETY: the map is read-only and the file is not modified while mapped (see above).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        if &map[0..8] != MAGIC {
            return Err(DatastoreError::NotADatastore { path: path_buf });
        }
        let u32_at = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != VERSION {
            return Err(DatastoreError::Version {
                path: path_buf,
                found: version,
            });
        }
        let tokenizer = TokenizerId {
            vocab_size: u32_at(12),
            fingerprint: u64_at(16),
        };
        let n = u64_at(24);
        let documents = u64_at(32);
        let expected_len = usize::try_from(n)
            .ok()
            .filter(|&n| n > 0 && n <= MAX_TOKENS)
            .map(|n| HEADER + 8 * n);
        if expected_len != Some(map.len()) {
            return Err(corrupt(format!(
                "the header says {n} tokens, which does not match the file's {} bytes",
                map.len()
            )));
        }
        let n = n as usize;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&map[..40]);
        crc.update(&map[HEADER..]);
        if crc.finalize() != u32_at(40) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let store = Self {
            path: path_buf.clone(),
            map,
            n,
            documents: usize::try_from(documents).unwrap_or(usize::MAX),
            tokenizer,
        };
        if let Some(expected) = expected {
            store.check_tokenizer(expected)?;
        }
        let (tokens, suffixes) = (store.tokens()?, store.suffixes()?);
        if let Some(t) = tokens.iter().find(|&&t| t > tokenizer.vocab_size) {
            return Err(corrupt(format!(
                "token {t} is outside the vocabulary of {}",
                tokenizer.vocab_size
            )));
        }
        if let Some(s) = suffixes.iter().find(|&&s| s as usize >= n) {
            return Err(corrupt(format!(
                "suffix position {s} is past the {n} tokens"
            )));
        }
        Ok(store)
    }

    fn slice(&self, range: Range<usize>) -> Result<&[u32], DatastoreError> {
        bytemuck::try_cast_slice(&self.map[range]).map_err(|e| DatastoreError::Corrupt {
            path: self.path.clone(),
            what: format!("misaligned data: {e}"),
        })
    }

    fn tokens(&self) -> Result<&[u32], DatastoreError> {
        self.slice(HEADER..HEADER + 4 * self.n)
    }

    fn suffixes(&self) -> Result<&[u32], DatastoreError> {
        self.slice(HEADER + 4 * self.n..HEADER + 8 * self.n)
    }

    /// The tokens, separators included (checked aligned at open).
    pub fn text(&self) -> &[u32] {
        self.tokens().unwrap_or(&[])
    }

    fn suffix_array(&self) -> &[u32] {
        self.suffixes().unwrap_or(&[])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tokenizer(&self) -> TokenizerId {
        self.tokenizer
    }

    /// Refuses a datastore built for another tokenizer than `expected`.
    pub fn check_tokenizer(&self, expected: TokenizerId) -> Result<(), DatastoreError> {
        if expected == self.tokenizer {
            return Ok(());
        }
        Err(DatastoreError::TokenizerMismatch {
            path: self.path.clone(),
            found: self.tokenizer.fingerprint,
            found_vocab: self.tokenizer.vocab_size,
            expected: expected.fingerprint,
            expected_vocab: expected.vocab_size,
        })
    }

    /// Tokens of the text, separators included.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: an empty corpus is refused when writing.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn documents(&self) -> usize {
        self.documents
    }

    /// Positions where `pattern` occurs, as a range of the suffix array (empty if none).
    pub fn find(&self, pattern: &[TokenId]) -> Range<usize> {
        let (text, sa) = (self.text(), self.suffix_array());
        let compare = |start: u32| -> Ordering {
            let start = start as usize;
            let end = (start + pattern.len()).min(text.len());
            text[start.min(end)..end].cmp(pattern)
        };
        let low = sa.partition_point(|&s| compare(s) == Ordering::Less);
        let high = sa.partition_point(|&s| compare(s) != Ordering::Greater);
        low..high.max(low)
    }

    /// The text position of the suffix at `rank` in the suffix array.
    pub fn position(&self, rank: usize) -> Option<usize> {
        self.suffix_array().get(rank).map(|&p| p as usize)
    }

    /// The separator: the token id between documents.
    pub fn separator(&self) -> TokenId {
        self.tokenizer.vocab_size
    }
}
