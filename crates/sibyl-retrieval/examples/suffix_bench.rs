//! Append and lookup latency of the suffix drafter's index, filled with the documents of a
//! datastore built by `sibyl index` (real token statistics):
//! `cargo run --release -p sibyl-retrieval --example suffix_bench -- FILE [MAX_TOKENS] [LOOKUPS]`.
//!
//! Documents are added in file order until the index is full, then as many again (so that
//! the oldest are evicted meanwhile); appends are reported apart while the index fills
//! (its tables grow) and once it is full. Lookups use 64-token contexts: half copied from the
//! indexed text (long matches whose continuations are counted, the expensive case), half
//! with their last token made up. Each lookup is a session's first call: its own context is
//! indexed too. Prints percentiles and the memory the index took (measured before the
//! lookups).

mod common;

use common::{report, timed_lookup, Lcg};
use sibyl_retrieval::{Datastore, SuffixConfig, SuffixDrafter, SuffixIndex};
use std::sync::Arc;
use std::time::Instant;

/// Resident memory of this process in bytes, where the system says (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: suffix_bench FILE [MAX_TOKENS] [LOOKUPS]")?;
    let max_tokens: usize = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(4 << 20);
    let lookups: usize = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20_000);
    let store = Datastore::open(path.as_ref(), None)?;
    let separator = store.separator();
    // Copied out of the mapped file first, so that the memory measured is the index's.
    let documents: Vec<Vec<u32>> = store
        .text()
        .split(|&t| t == separator)
        .filter(|d| !d.is_empty())
        .map(<[u32]>::to_vec)
        .collect();
    if documents.is_empty() {
        return Err("the datastore has no documents".into());
    }
    let before = resident_bytes();
    let index = Arc::new(SuffixIndex::new(SuffixConfig {
        max_tokens,
        ..SuffixConfig::default()
    }));
    // Fill the index, then add as much again: appends that evict.
    // Appends while the index fills (its tables still grow), and once it is full (each
    // evicts the oldest documents): whole appends, and per 1,000 tokens appended.
    let (mut filling, mut evicting, mut per_thousand) = (Vec::new(), Vec::new(), Vec::new());
    let mut added = 0usize;
    for document in documents.iter().cycle() {
        if added >= 2 * max_tokens || (added >= store.len() * 2 && added >= max_tokens) {
            break;
        }
        let full = index.tokens() + document.len() + 1 > max_tokens;
        let began = Instant::now();
        index.add(document);
        let us = began.elapsed().as_secs_f64() * 1e6;
        if full {
            evicting.push(us);
            per_thousand.push(us * 1000.0 / (document.len() + 1) as f64);
        } else {
            filling.push(us);
        }
        added += document.len() + 1;
    }
    let after = resident_bytes();
    let mut random = Lcg::new();
    let mut next = |bound: usize| random.below(bound);
    let (mut hits, mut misses) = (Vec::new(), Vec::new());
    let mut proposed = 0usize;
    let long: Vec<&Vec<u32>> = documents.iter().filter(|d| d.len() > 65).collect();
    // One session's drafter, given a new context each call: it indexes that context first,
    // as a session's first call does.
    let mut drafter = SuffixDrafter::new(index.clone());
    for i in 0..lookups {
        let Some(document) = long.get(next(long.len())) else {
            break;
        };
        let start = next(document.len() - 65);
        let mut context = document[start..start + 64].to_vec();
        let copied = i % 2 == 0;
        if !copied {
            context[63] = next(separator as usize) as u32;
        }
        let times = if copied { &mut hits } else { &mut misses };
        proposed += timed_lookup(&mut drafter, &context, times);
    }
    println!(
        "{path}: {} tokens in {} documents; index of at most {max_tokens} tokens holds {} in {} \
         documents",
        store.len(),
        documents.len(),
        index.tokens(),
        index.documents()
    );
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "memory taken by the index: {:.1} MiB ({:.1} bytes a token)",
            after.saturating_sub(before) as f64 / f64::from(1 << 20),
            after.saturating_sub(before) as f64 / index.tokens().max(1) as f64
        );
    }
    let mean = added as f64 / (filling.len() + evicting.len()) as f64;
    println!("documents appended: {mean:.0} tokens each on average");
    report("appends while the index fills", "us", &mut filling);
    report("appends that evict", "us", &mut evicting);
    report("  the same per 1,000 tokens", "us", &mut per_thousand);
    report("lookups, contexts from the text", "us", &mut hits);
    report("lookups, contexts with a made-up end", "us", &mut misses);
    println!("draft tokens proposed: {proposed}");
    Ok(())
}
