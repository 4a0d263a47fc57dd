//! Bearer keys: the API keys a gateway accepts from clients.
//!
//! A key file holds one key per line (blank lines and lines starting with `#` are skipped).
//! Only each key's SHA-256 is kept in memory, and a presented key is hashed and compared
//! with every digest in constant time, so that neither the time taken nor the logs tell
//! anything about a key. A key is named in logs by its id, `key-` and the first 8 hex
//! digits of its SHA-256 (`sha256sum` of the key without a newline shows it).

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Request, Status};

/// Longest key accepted in a key file, in bytes.
const MAX_KEY_BYTES: usize = 4096;

/// The keys a server accepts.
pub struct ApiKeys {
    /// Each key's SHA-256 and id.
    keys: Vec<([u8; 32], KeyId)>,
}

/// The public name of a key, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId(pub String);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
    #[error("the key file {0} holds no key")]
    Empty(PathBuf),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no API key: send it as `Authorization: Bearer KEY`")]
    Missing,
    #[error("the API key is not valid")]
    Invalid,
}

/// The text of a key file.
fn read(path: &Path) -> Result<String, KeyFileError> {
    std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl ApiKeys {
    /// Reads a key file.
    pub fn from_file(path: &Path) -> Result<Self, KeyFileError> {
        Ok(Self::parse(&read(path)?, path)?.0)
    }

    /// The keys of a key file's text, and its first key; `source` names the text in errors
    /// (the first bad line, 1-based, and why).
    fn parse<'t>(text: &'t str, source: &Path) -> Result<(Self, &'t str), KeyFileError> {
        let mut keys = Vec::new();
        let mut first = None;
        for (index, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            let reason = if key.len() > MAX_KEY_BYTES {
                Some("a key is longer than 4096 bytes")
            } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
                Some("a key must be printable ASCII without spaces (it travels in a header)")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(KeyFileError::Line {
                    path: source.to_path_buf(),
                    line: index + 1,
                    reason,
                });
            }
            first.get_or_insert(key);
            keys.push(Self::entry(key));
        }
        match first {
            Some(first) => Ok((Self { keys }, first)),
            None => Err(KeyFileError::Empty(source.to_path_buf())),
        }
    }

    fn entry(key: &str) -> ([u8; 32], KeyId) {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let id = digest[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        (digest, KeyId(format!("key-{id}")))
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The id of the key an `Authorization` header value (`Bearer KEY`) carries.
    pub fn check(&self, authorization: Option<&str>) -> Result<&KeyId, Denied> {
        let header = authorization.ok_or(Denied::Missing)?;
        let (scheme, key) = header.trim().split_once(' ').ok_or(Denied::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Denied::Invalid);
        }
        self.check_key(key.trim())
    }

    /// The id of `key`, if it is one of these keys. Every key is compared, whichever
    /// matches.
    pub fn check_key(&self, key: &str) -> Result<&KeyId, Denied> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (known, id) in &self.keys {
            if constant_time_eq::constant_time_eq_32(known, &digest) {
                found = Some(id);
            }
        }
        found.ok_or(Denied::Invalid)
    }
}

/// A gRPC interceptor that lets a call through when there are no keys or its
/// `authorization` metadata (`Bearer KEY`) carries one of them (the key's [`KeyId`] then
/// goes into the request's extensions, for its logs); UNAUTHENTICATED otherwise.
#[derive(Clone, Debug, Default)]
pub struct RequireKey(pub Option<Arc<ApiKeys>>);

impl tonic::service::Interceptor for RequireKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(keys) = &self.0 else {
            return Ok(request);
        };
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.to_str().unwrap_or(""));
        let id = keys
            .check(header)
            .map_err(|denied| Status::unauthenticated(denied.to_string()))?
            .clone();
        request.extensions_mut().insert(id);
        Ok(request)
    }
}

/// The token the roles of one deployment show each other (`--internal-token-file`): a
/// verifier and drafters accept only calls that carry one of the file's tokens, and a role
/// sends the first. Rotation: add the new token as a second line everywhere, then make it
/// the first, then remove the old one.
#[derive(Clone)]
pub struct InternalToken {
    accepted: Arc<ApiKeys>,
    sent: AsciiMetadataValue,
}

impl InternalToken {
    /// Reads a token file (the format of an API key file).
    pub fn from_file(path: &Path) -> Result<Self, KeyFileError> {
        Self::from_keys(ApiKeys::parse(&read(path)?, path)?)
    }

    /// The tokens of a token file's text.
    pub fn from_text(text: &str) -> Result<Self, KeyFileError> {
        Self::from_keys(ApiKeys::parse(text, Path::new("<text>"))?)
    }

    fn from_keys((accepted, first): (ApiKeys, &str)) -> Result<Self, KeyFileError> {
        // A key is printable ASCII (checked by `parse`), so it makes a header value.
        let sent = format!("Bearer {first}")
            .parse()
            .map_err(|_| KeyFileError::Empty(PathBuf::new()))?;
        Ok(Self {
            accepted: Arc::new(accepted),
            sent,
        })
    }

    /// Puts the token into a call's metadata.
    pub fn attach(&self, metadata: &mut MetadataMap) {
        metadata.insert("authorization", self.sent.clone());
    }

    /// The interceptor that accepts calls carrying one of the tokens.
    pub fn require(&self) -> RequireKey {
        RequireKey(Some(self.accepted.clone()))
    }
}

impl std::fmt::Debug for InternalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalToken")
            .field("accepted", &self.accepted)
            .finish_non_exhaustive()
    }
}

/// Puts `token`, if any, into a call's metadata.
pub fn attach(token: Option<&InternalToken>, metadata: &mut MetadataMap) {
    if let Some(token) = token {
        token.attach(metadata);
    }
}

/// The interceptor for `token`: open without one.
pub fn require(token: Option<&InternalToken>) -> RequireKey {
    token.map_or_else(RequireKey::default, InternalToken::require)
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(_, id)| id.0.as_str()).collect();
        f.debug_struct("ApiKeys").field("ids", &ids).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_their_bearer_header_and_named_by_id() {
        let (keys, first) =
            ApiKeys::parse("# clients\nsk-alpha\n\n  sk-beta  \n", Path::new("k")).unwrap();
        assert_eq!(first, "sk-alpha");
        assert_eq!(keys.len(), 2);
        let alpha = keys.check(Some("Bearer sk-alpha")).unwrap().clone();
        let beta = keys.check(Some("bearer  sk-beta")).unwrap().clone();
        assert_ne!(alpha, beta);
        assert!(
            alpha.0.starts_with("key-") && alpha.0.len() == 12,
            "{alpha}"
        );
        // The id is the start of the key's SHA-256, as `sha256sum` prints it.
        let digest = Sha256::digest(b"sk-alpha");
        assert_eq!(
            alpha.0[4..],
            format!(
                "{:02x}{:02x}{:02x}{:02x}",
                digest[0], digest[1], digest[2], digest[3]
            )
        );
        assert!(!format!("{keys:?}").contains("sk-alpha"));
    }

    #[test]
    fn wrong_missing_or_malformed_keys_are_denied() {
        let (keys, _) = ApiKeys::parse("sk-alpha\n", Path::new("k")).unwrap();
        assert_eq!(keys.check(None), Err(Denied::Missing));
        for header in [
            "Bearer sk-alph",
            "Bearer sk-alpha2",
            "Basic sk-alpha",
            "sk-alpha",
            "Bearer ",
            "",
        ] {
            assert_eq!(keys.check(Some(header)), Err(Denied::Invalid), "{header:?}");
        }
    }

    #[test]
    fn an_internal_token_is_sent_first_and_every_one_is_accepted() {
        let token = InternalToken::from_text("# rotating\nnew-token\nold-token\n").unwrap();
        let mut metadata = MetadataMap::new();
        token.attach(&mut metadata);
        assert_eq!(metadata.get("authorization").unwrap(), "Bearer new-token");
        for sent in ["Bearer new-token", "Bearer old-token"] {
            assert!(token.accepted.check(Some(sent)).is_ok());
        }
        assert!(token.accepted.check(Some("Bearer other")).is_err());
        assert!(!format!("{token:?}").contains("new-token"));
    }

    #[test]
    fn unusable_key_files_are_refused_with_the_line() {
        let parse = |text: &str| ApiKeys::parse(text, Path::new("keys.txt")).map(|_| ());
        assert!(matches!(
            parse("# nothing\n\n"),
            Err(KeyFileError::Empty(_))
        ));
        assert!(matches!(
            parse("sk-ok\nsk with space\n"),
            Err(KeyFileError::Line { line: 2, .. })
        ));
        let long = parse(&"k".repeat(MAX_KEY_BYTES + 1)).unwrap_err();
        assert!(matches!(long, KeyFileError::Line { line: 1, .. }));
        assert!(long.to_string().contains("keys.txt"), "{long}");
    }
}
