//! Retrieval drafting (REST: retrieval-based speculative decoding): a corpus tokenized with
//! the target's tokenizer is stored with its suffix array; the longest suffix of the context
//! found in it (16 tokens down to 2) proposes what followed its occurrences, counted into a
//! small trie of the most frequent continuations.
//!
//! [`write`] builds a datastore file from tokenized documents; [`Datastore::open`] maps one
//! read-only and checks it; [`RetrievalDrafter`] drafts from one or more.
//!
//! Suffix drafting ([`SuffixDrafter`]) retrieves from what was generated instead: an index
//! that grows as sessions finish ([`SuffixIndex`]), shared by all of them.

mod continuations;
mod datastore;
mod drafter;
mod header;
mod suffix;

pub use datastore::{write, Datastore, DatastoreError, TokenizerId, Written};
pub use drafter::{lookup, Continuation, RetrievalConfig, RetrievalDrafter};
pub use sibyl_spec::TokenId;
pub use suffix::{
    Saved, SnapshotError, SuffixConfig, SuffixDrafter, SuffixIndex, SuffixStats, ANCHOR,
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sibyl_spec::Drafter;
    use std::path::Path;
    use std::sync::Arc;

    const TOKENIZER: TokenizerId = TokenizerId {
        fingerprint: 0x5eed,
        vocab_size: 100,
    };

    fn store(dir: &Path, documents: &[Vec<TokenId>]) -> Datastore {
        let path = dir.join("store.sibyl");
        write(&path, TOKENIZER, documents).unwrap();
        Datastore::open(&path, Some(TOKENIZER)).unwrap()
    }

    #[test]
    fn the_longest_suffix_proposes_what_followed_it_most_often() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(
            dir.path(),
            &[
                vec![1, 2, 3, 4, 5, 6],
                vec![9, 2, 3, 4, 5, 7],
                vec![8, 3, 4, 5, 6, 10, 11],
                vec![],
                vec![3, 4, 5, 6, 10, 12],
            ],
        );
        assert_eq!(store.documents(), 4);
        let config = RetrievalConfig::default();
        // "2 3 4 5" occurs twice: followed by 6 and by 7, one each.
        let found = lookup(&store, &[0, 2, 3, 4, 5], 8, &config);
        assert_eq!(found.len(), 2);
        assert!(found.iter().all(|c| c.support == 1 && c.tokens.len() == 1));
        // "3 4 5" after an unseen token: "3 4 5" occurs four times; 6 follows three of them,
        // then 10 twice, then 11 and 12 once each (not followed).
        let found = lookup(&store, &[42, 3, 4, 5], 8, &config);
        assert_eq!(found[0].tokens, vec![6, 10]);
        assert_eq!(found[0].support, 3);
        assert_eq!(found[0].matched, 3, "the length of the suffix found");
        assert_eq!(found[1].tokens, vec![7]);
        // A continuation stops at the end of its document: "1 2 3 4 5 6" ends there, so a
        // shorter suffix speaks: "3 4 5 6" is followed by 10 twice.
        let found = lookup(&store, &[1, 2, 3, 4, 5, 6], 8, &config);
        assert_eq!(
            found,
            vec![Continuation {
                tokens: vec![10],
                support: 2,
                matched: 4,
            }]
        );
        // max_tokens bounds a branch.
        let found = lookup(&store, &[42, 3, 4, 5], 1, &config);
        assert_eq!(found[0].tokens, vec![6]);
        // Nothing shorter than min_suffix is looked up.
        assert!(lookup(&store, &[5], 8, &config).is_empty());
    }

    #[test]
    fn a_single_occurrence_is_followed_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), &[(0..40).collect(), vec![50, 51, 52]]);
        let found = lookup(&store, &[99, 10, 11], 5, &RetrievalConfig::default());
        assert_eq!(found[0].tokens, vec![12, 13, 14, 15, 16]);
        let mut drafter = RetrievalDrafter::new(vec![Arc::new(store)], RetrievalConfig::default());
        assert_eq!(drafter.kind(), "retrieval");
        let proposals = drafter.propose(&[50, 51], 4);
        assert_eq!(proposals.len(), 1);
        assert_eq!(proposals[0].tokens, vec![52]);
    }

    #[test]
    fn another_tokenizer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sibyl");
        write(&path, TOKENIZER, &[vec![1, 2, 3]]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o044, 0o044, "readable by others: {mode:o}");
        }
        let other = TokenizerId {
            fingerprint: 0xbad,
            ..TOKENIZER
        };
        let error = Datastore::open(&path, Some(other)).unwrap_err();
        assert!(matches!(error, DatastoreError::TokenizerMismatch { .. }));
        assert!(error.to_string().contains("sibyl index --model"), "{error}");
        assert!(Datastore::open(&path, None).is_ok());
    }

    #[test]
    fn corrupt_or_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sibyl");
        write(&path, TOKENIZER, &[vec![1, 2, 3, 4], vec![5, 6]]).unwrap();
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], expected: &str| {
            let bad = dir.path().join("bad.sibyl");
            std::fs::write(&bad, bytes).unwrap();
            let error = Datastore::open(&bad, Some(TOKENIZER))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{expected}: {error}");
            assert!(error.contains("bad.sibyl"), "names the file: {error}");
        };
        check(&good[..good.len() - 4], "does not match");
        check(&good[..20], "shorter than the header");
        let mut flipped = good.clone();
        flipped[70] ^= 1;
        check(&flipped, "checksum mismatch");
        let mut version = good.clone();
        version[8] = 9;
        check(&version, "version 9");
        check(b"def main(): pass\n", "not a sibyl datastore");
        check(b"", "not a sibyl datastore");
        let missing = Datastore::open(&dir.path().join("missing"), None).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
    }

    #[test]
    fn bad_corpora_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sibyl");
        assert!(matches!(
            write(&path, TOKENIZER, &[vec![], vec![]]),
            Err(DatastoreError::Empty)
        ));
        assert!(matches!(
            write(&path, TOKENIZER, &[vec![1], vec![2, 100]]),
            Err(DatastoreError::Token {
                document: 1,
                token: 100,
                ..
            })
        ));
        assert!(!path.exists());
    }

    /// What can be done to a datastore's bytes after the checksum is made right again (a
    /// buggy writer, or someone who knows the format): counts, vocabulary, tokens, suffix
    /// positions and their order changed.
    #[derive(Debug, Clone)]
    enum Mutation {
        /// A byte of the header's counts (tokens, documents) or vocabulary size, xored.
        Header(usize, u8),
        /// A word of the tokens or suffix array set to a value.
        Word(usize, u32),
        /// Two words of the suffix array swapped (positions still in range, order wrong).
        Swap(usize, usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (0..28usize, 1..=255u8).prop_map(|(at, mask)| Mutation::Header(at, mask)),
            (
                any::<usize>(),
                prop_oneof![Just(u32::MAX), Just(u32::MAX / 2), 0..200u32]
            )
                .prop_map(|(at, value)| Mutation::Word(at, value)),
            (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// A datastore changed behind its checksum is refused with an error or, where what
        /// it holds is still in range, opened and searched and drafted from without a panic.
        #[test]
        fn a_datastore_changed_behind_its_checksum_never_panics(
            mutations in prop::collection::vec(mutation(), 1..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store.sibyl");
            let documents = [vec![1, 2, 3, 4, 5, 6], vec![2, 3, 4, 7], vec![3, 4, 5, 6, 9]];
            write(&path, TOKENIZER, &documents).unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            let header = 64;
            let words = (bytes.len() - header) / 4;
            for mutation in &mutations {
                match *mutation {
                    // Vocabulary size (12..16), token count (24..32), documents (32..40).
                    Mutation::Header(at, mask) => {
                        let at = [12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33]
                            [at % 14];
                        bytes[at] ^= mask;
                    }
                    Mutation::Word(at, value) => {
                        let at = header + 4 * (at % words);
                        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
                    }
                    Mutation::Swap(a, b) => {
                        // The suffix array is the second half of the words.
                        let half = words / 2;
                        let (a, b) = (header + 4 * (half + a % half), header + 4 * (half + b % half));
                        for i in 0..4 {
                            bytes.swap(a + i, b + i);
                        }
                    }
                }
            }
            let mut crc = crc32fast::Hasher::new();
            crc.update(&bytes[..40]);
            crc.update(&bytes[header..]);
            bytes[40..44].copy_from_slice(&crc.finalize().to_le_bytes());
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(store) = Datastore::open(&path, None) {
                let config = RetrievalConfig::default();
                for context in [&[2, 3, 4][..], &[3, 4, 5, 6], &[9], &[0, 1, 2, 3, 4, 5, 6, 7]] {
                    let _ = lookup(&store, context, 8, &config);
                    for rank in store.find(context) {
                        let _ = store.position(rank);
                    }
                }
                let mut drafter =
                    RetrievalDrafter::new(vec![Arc::new(store)], RetrievalConfig::default());
                let _ = drafter.propose(&[1, 2, 3], 6);
            }
        }

        /// `find` returns exactly the positions where the pattern occurs inside a document.
        #[test]
        fn find_agrees_with_a_linear_scan(
            documents in prop::collection::vec(prop::collection::vec(0u32..6, 0..40), 1..5),
            pattern in prop::collection::vec(0u32..6, 1..5),
        ) {
            prop_assume!(documents.iter().any(|d| !d.is_empty()));
            let dir = tempfile::tempdir().unwrap();
            let tokenizer = TokenizerId { fingerprint: 1, vocab_size: 6 };
            let path = dir.path().join("s");
            write(&path, tokenizer, &documents).unwrap();
            let store = Datastore::open(&path, Some(tokenizer)).unwrap();
            let text = store.text();
            let mut expected: Vec<usize> = (0..text.len())
                .filter(|&i| text[i..].starts_with(&pattern))
                .collect();
            let mut found: Vec<usize> = store
                .find(&pattern)
                .map(|rank| store.position(rank).unwrap())
                .collect();
            expected.sort_unstable();
            found.sort_unstable();
            prop_assert_eq!(found, expected);
        }
    }
}
