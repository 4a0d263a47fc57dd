//! The datastore file: a corpus as target-model tokens plus their suffix array, written once
//! by [`write`] and memory-mapped read-only by [`Datastore::open`].
//!
//! Layout (little-endian): the header of [`crate::header`] (magic `SIBYLRS1`, version 1),
//! then `n` tokens (`u32`), then the suffix array (`n` positions, `u32`). Documents are
//! separated by the token id `vocab_size`, which no context token can equal, so no match
//! and no continuation crosses a document boundary.

use crate::header::{self, Format, Header, Refused, HEADER};
use crate::TokenId;
use memmap2::Mmap;
use std::cmp::Ordering;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SIBYLRS1";
const VERSION: u32 = 1;
const FORMAT: Format = Format {
    magic: MAGIC,
    version: VERSION,
};
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
    let body = |values: &[i32]| -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| (v as u32).to_le_bytes())
            .collect()
    };
    let (text_bytes, sa_bytes) = (body(&text), body(&suffixes));
    let head = FORMAT.header(
        &Header {
            tokenizer,
            tokens: n as u64,
            documents: kept.len() as u64,
        },
        &[&text_bytes, &sa_bytes],
    );
    header::write_atomically(path, &[&head, &text_bytes, &sa_bytes]).map_err(|source| {
        DatastoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?;
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
        let map = if len < HEADER as u64 {
            None
        } else {
            // SAFETY: the map is read-only and the file is not modified while mapped (see
            // above).
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        let head = match &map {
            Some(map) => FORMAT.read(map),
            None => FORMAT.read(&std::fs::read(path).map_err(io)?),
        };
        let Header {
            tokenizer,
            tokens: n,
            documents,
        } = match head {
            Ok(header) => header,
            Err(Refused::Foreign) => return Err(DatastoreError::NotADatastore { path: path_buf }),
            Err(Refused::Short(len)) => {
                return Err(corrupt(format!("{len} bytes, shorter than the header")))
            }
            Err(Refused::Version(found)) => {
                return Err(DatastoreError::Version {
                    path: path_buf,
                    found,
                })
            }
        };
        let map = map.expect("a file as long as a header is mapped");
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
        if !header::checksum_holds(&map) {
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
