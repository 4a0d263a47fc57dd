//! The suffix index's snapshot file: what the index holds, written at an interval and at
//! shutdown, read back at start, so a restarted drafter keeps what it had learned.
//!
//! Layout (little-endian): the header of [`crate::header`] (magic `SIBYLSX1`, version 1),
//! then `n` tokens (`u32`): the documents, oldest first, each ended by the id `u32::MAX`.

use super::{SuffixIndex, SEPARATOR};
use crate::header::{self, Format, Header, Refused, HEADER};
use crate::{TokenId, TokenizerId};
use std::path::{Path, PathBuf};

const VERSION: u32 = 1;
const FORMAT: Format = Format {
    magic: b"SIBYLSX1",
    version: VERSION,
};

/// Why a snapshot cannot be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a suffix index snapshot (no SIBYLSX1 header)")]
    NotASnapshot { path: PathBuf },
    #[error("{path} is a snapshot of format version {found}; this sibyl reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "{path} was written for tokenizer {found:016x} (vocabulary {found_vocab}), but the \
         model's tokenizer is {expected:016x} (vocabulary {expected_vocab})"
    )]
    TokenizerMismatch {
        path: PathBuf,
        found: u64,
        found_vocab: u32,
        expected: u64,
        expected_vocab: u32,
    },
}

/// What [`SuffixIndex::save`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    pub documents: usize,
    /// Tokens, document ends included.
    pub tokens: usize,
    /// The index's count of added documents when it was read: a later save is only needed
    /// once [`SuffixIndex::stats`] says more were added.
    pub added: u64,
}

impl SuffixIndex {
    /// Writes what the index holds to `path`, through a temporary file beside it renamed
    /// at the end ([`header::write_atomically`]). The index is locked only while its tokens
    /// are copied.
    pub fn save(&self, path: &Path, tokenizer: TokenizerId) -> Result<Saved, SnapshotError> {
        let (tokens, documents, added) = {
            let corpus = self.corpus.read().unwrap_or_else(|e| e.into_inner());
            let live = (corpus.start - corpus.offset) as usize;
            (
                corpus.tokens[live..].to_vec(),
                corpus.ends.len(),
                self.added.load(std::sync::atomic::Ordering::Relaxed),
            )
        };
        let body: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let head = FORMAT.header(
            &Header {
                tokenizer,
                tokens: tokens.len() as u64,
                documents: documents as u64,
            },
            &[&body],
        );
        header::write_atomically(path, &[&head, &body]).map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Saved {
            documents,
            tokens: tokens.len(),
            added,
        })
    }

    /// Adds the documents of the snapshot at `path`, oldest first (an index smaller than
    /// the snapshot keeps the newest), after checking all of it: header, size, checksum,
    /// tokenizer, every token. Says how many documents it held. Nothing is added from a
    /// snapshot that fails a check. The listener is not told.
    pub fn restore(&self, path: &Path, tokenizer: TokenizerId) -> Result<usize, SnapshotError> {
        let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let tokens = check(path, &bytes, tokenizer)?;
        let mut documents = 0;
        for document in tokens.split(|&t| t == SEPARATOR) {
            // The split's last piece is what follows the final end: nothing.
            if !document.is_empty() {
                self.store(document);
                documents += 1;
            }
        }
        Ok(documents)
    }
}

/// The tokens of a snapshot read into `bytes`, once every check has passed.
fn check(path: &Path, bytes: &[u8], tokenizer: TokenizerId) -> Result<Vec<TokenId>, SnapshotError> {
    let path_buf = path.to_path_buf();
    let corrupt = |what: String| SnapshotError::Corrupt {
        path: path_buf.clone(),
        what,
    };
    let Header {
        tokenizer: found,
        tokens: n,
        documents,
    } = match FORMAT.read(bytes) {
        Ok(header) => header,
        Err(Refused::Foreign) => return Err(SnapshotError::NotASnapshot { path: path_buf }),
        Err(Refused::Short(len)) => {
            return Err(corrupt(format!("{len} bytes, shorter than the header")))
        }
        Err(Refused::Version(found)) => {
            return Err(SnapshotError::Version {
                path: path_buf,
                found,
            })
        }
    };
    if found != tokenizer {
        return Err(SnapshotError::TokenizerMismatch {
            path: path_buf,
            found: found.fingerprint,
            found_vocab: found.vocab_size,
            expected: tokenizer.fingerprint,
            expected_vocab: tokenizer.vocab_size,
        });
    }
    let vocab = found.vocab_size;
    let body = &bytes[HEADER..];
    if Some(body.len() as u64) != n.checked_mul(4) {
        return Err(corrupt(format!(
            "the header says {n} tokens, the file holds {} bytes of them",
            body.len()
        )));
    }
    if !header::checksum_holds(bytes) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let tokens: Vec<TokenId> = body
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    if let Some(&token) = tokens.iter().find(|&&t| t >= vocab && t != SEPARATOR) {
        return Err(corrupt(format!(
            "token {token} is outside the vocabulary of {vocab}"
        )));
    }
    let ends = tokens.iter().filter(|&&t| t == SEPARATOR).count() as u64;
    if ends != documents || tokens.last().is_some_and(|&t| t != SEPARATOR) {
        return Err(corrupt(format!(
            "the header says {documents} documents, the tokens end {ends}"
        )));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suffix::SuffixConfig;
    use crate::SuffixDrafter;
    use sibyl_spec::Drafter;
    use std::sync::Arc;

    const TOKENIZER: TokenizerId = TokenizerId {
        fingerprint: 0x5eed,
        vocab_size: 1000,
    };

    fn index(max_tokens: usize) -> SuffixIndex {
        SuffixIndex::new(SuffixConfig {
            max_tokens,
            ..SuffixConfig::default()
        })
    }

    fn filled(max_tokens: usize, count: u32) -> SuffixIndex {
        let index = index(max_tokens);
        for i in 0..count {
            index.add(&[i, 500 + i, 501 + i, 502 + i, 503 + i, i]);
        }
        index
    }

    #[test]
    fn a_restored_index_drafts_what_the_saved_one_drafted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suffix.snapshot");
        // Full, so some documents were evicted before the save.
        let saved = filled(64, 20);
        let written = saved.save(&path, TOKENIZER).unwrap();
        assert_eq!(
            (written.documents, written.tokens, written.added),
            (saved.documents(), saved.tokens(), 20)
        );
        let restored = Arc::new(index(64));
        assert_eq!(
            restored.restore(&path, TOKENIZER).unwrap(),
            saved.documents()
        );
        assert_eq!(restored.tokens(), saved.tokens());
        let saved = Arc::new(saved);
        for context in [[519, 520, 521], [514, 515, 516], [3, 4, 5]] {
            let want = SuffixDrafter::new(saved.clone()).propose(&context, 4);
            let got = SuffixDrafter::new(restored.clone()).propose(&context, 4);
            assert_eq!(got, want, "{context:?}");
        }
        // A smaller index keeps the newest documents of the snapshot.
        let small = index(21);
        small.restore(&path, TOKENIZER).unwrap();
        assert_eq!(small.documents(), 3);
        assert!(SuffixDrafter::new(Arc::new(small))
            .propose(&[519, 520, 521], 2)
            .iter()
            .any(|p| p.tokens[0] == 522));
    }

    #[test]
    fn a_damaged_or_foreign_snapshot_is_refused_and_adds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("suffix.snapshot");
        filled(1 << 10, 5).save(&path, TOKENIZER).unwrap();
        let good = std::fs::read(&path).unwrap();
        let refused = |bytes: &[u8], tokenizer: TokenizerId| {
            std::fs::write(&path, bytes).unwrap();
            let index = index(1 << 10);
            let error = index.restore(&path, tokenizer).unwrap_err();
            assert_eq!(index.documents(), 0, "{error}");
            error
        };
        let other = TokenizerId {
            fingerprint: 0xbad,
            ..TOKENIZER
        };
        assert!(matches!(
            refused(&good, other),
            SnapshotError::TokenizerMismatch { .. }
        ));
        assert!(matches!(
            refused(b"not a snapshot at all", TOKENIZER),
            SnapshotError::NotASnapshot { .. }
        ));
        assert!(matches!(
            refused(&good[..good.len() - 3], TOKENIZER),
            SnapshotError::Corrupt { .. }
        ));
        let mut flipped = good.clone();
        flipped[HEADER + 5] ^= 1;
        let error = refused(&flipped, TOKENIZER);
        assert!(error.to_string().contains("checksum"), "{error}");
        let mut newer = good.clone();
        newer[8] = 2;
        assert!(matches!(
            refused(&newer, TOKENIZER),
            SnapshotError::Version { .. }
        ));
        // A missing file is an I/O error naming the path.
        let missing = dir.path().join("none");
        let error = index(16).restore(&missing, TOKENIZER).unwrap_err();
        assert!(error.to_string().contains("none"), "{error}");
    }

    #[test]
    fn a_save_that_fails_says_so_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        // A directory is where the snapshot should go: it cannot take its place.
        let path = dir.path().join("suffix.snapshot");
        std::fs::create_dir_all(path.join("inside")).unwrap();
        let error = filled(1 << 10, 9).save(&path, TOKENIZER).unwrap_err();
        assert!(error.to_string().contains("suffix.snapshot"), "{error}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
        // Saved again over an earlier snapshot, the new one replaces it whole.
        let path = dir.path().join("kept");
        filled(1 << 10, 5).save(&path, TOKENIZER).unwrap();
        filled(1 << 10, 9).save(&path, TOKENIZER).unwrap();
        assert_eq!(index(1 << 10).restore(&path, TOKENIZER).unwrap(), 9);
    }
}
