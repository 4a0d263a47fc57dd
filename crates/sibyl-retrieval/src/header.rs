//! The header that sibyl's token files start with (datastores, suffix index snapshots), and
//! how such a file is written. Little-endian, 64 bytes, then the file's own body:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic (the kind of file) |
//! | 8..12 | format version |
//! | 12..16 | vocabulary size of the tokenizer |
//! | 16..24 | tokenizer fingerprint |
//! | 24..32 | tokens, document separators included |
//! | 32..40 | documents |
//! | 40..44 | CRC-32 of bytes 0..40 and of the body |
//! | 44..64 | zero |

use crate::TokenizerId;
use std::io::Write;
use std::path::Path;

pub(crate) const HEADER: usize = 64;

/// A kind of token file: its magic and format version.
pub(crate) struct Format {
    pub magic: &'static [u8; 8],
    pub version: u32,
}

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub tokenizer: TokenizerId,
    pub tokens: u64,
    pub documents: u64,
}

/// Why a file's header is not one of its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Another kind of file (no magic).
    Foreign,
    /// The magic, then fewer bytes than a header.
    Short(usize),
    /// Another version of the format.
    Version(u32),
}

impl Format {
    /// The header saying `header`, its checksum over the body's `parts` in order.
    pub fn header(&self, header: &Header, parts: &[&[u8]]) -> [u8; HEADER] {
        let mut bytes = [0u8; HEADER];
        bytes[0..8].copy_from_slice(self.magic);
        bytes[8..12].copy_from_slice(&self.version.to_le_bytes());
        bytes[12..16].copy_from_slice(&header.tokenizer.vocab_size.to_le_bytes());
        bytes[16..24].copy_from_slice(&header.tokenizer.fingerprint.to_le_bytes());
        bytes[24..32].copy_from_slice(&header.tokens.to_le_bytes());
        bytes[32..40].copy_from_slice(&header.documents.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes[..40]);
        for part in parts {
            crc.update(part);
        }
        bytes[40..44].copy_from_slice(&crc.finalize().to_le_bytes());
        bytes
    }

    /// Reads the header at the start of `file` (the file's bytes, or at least its first
    /// ones): magic, length and version checked, not the checksum ([`checksum_holds`]).
    pub fn read(&self, file: &[u8]) -> Result<Header, Refused> {
        if !file.starts_with(self.magic) {
            return Err(Refused::Foreign);
        }
        if file.len() < HEADER {
            return Err(Refused::Short(file.len()));
        }
        let version = u32_at(file, 8);
        if version != self.version {
            return Err(Refused::Version(version));
        }
        Ok(Header {
            tokenizer: TokenizerId {
                vocab_size: u32_at(file, 12),
                fingerprint: u64_at(file, 16),
            },
            tokens: u64_at(file, 24),
            documents: u64_at(file, 32),
        })
    }
}

/// Whether the checksum in the header of `file` (all its bytes) matches the rest.
pub(crate) fn checksum_holds(file: &[u8]) -> bool {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&file[..40]);
    crc.update(&file[HEADER..]);
    crc.finalize() == u32_at(file, 40)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes `parts` to `path` through a temporary file beside it, synced and renamed over
/// `path` at the end, so a reader (or a crash) never meets half a file. The file is
/// readable by other users (servers run as their own, the container image's uid 65532).
pub(crate) fn write_atomically(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let temporary = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))?;
    {
        let mut out = std::io::BufWriter::new(temporary.as_file());
        for part in parts {
            out.write_all(part)?;
        }
        out.flush()?;
    }
    temporary.as_file().sync_all()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let readable = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(temporary.path(), readable)?;
    }
    temporary.persist(path).map_err(|e| e.error)?;
    Ok(())
}
