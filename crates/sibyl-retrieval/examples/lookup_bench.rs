//! Lookup latency of the retrieval drafter on a datastore built by `sibyl index`:
//! `cargo run --release -p sibyl-retrieval --example lookup_bench -- FILE [LOOKUPS]`.
//!
//! Contexts are 16-token windows: half copied from the datastore (so the longest suffix is
//! found and its continuations are counted, the expensive case), half with their last two
//! tokens made up (so every suffix length from 16 down is searched). Prints percentiles.

mod common;

use common::{report, timed_lookup, Lcg};
use sibyl_retrieval::{Datastore, RetrievalConfig, RetrievalDrafter};
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: lookup_bench FILE [LOOKUPS]")?;
    let lookups: usize = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20_000);
    let opened = Instant::now();
    let store = Arc::new(Datastore::open(path.as_ref(), None)?);
    let open_ms = opened.elapsed().as_secs_f64() * 1e3;
    let text = store.text().to_vec();
    let vocab = store.separator();
    let mut drafter = RetrievalDrafter::new(vec![store.clone()], RetrievalConfig::default());
    let mut random = Lcg::new();
    let mut next = |bound: usize| random.below(bound);
    let (mut hits, mut misses) = (Vec::new(), Vec::new());
    let mut proposed = 0usize;
    for i in 0..lookups {
        let start = next(text.len().saturating_sub(17));
        let mut context: Vec<u32> = text[start..start + 16].to_vec();
        let copied = i % 2 == 0;
        if !copied {
            for token in context.iter_mut().skip(14) {
                *token = next(vocab as usize) as u32;
            }
        }
        let times = if copied { &mut hits } else { &mut misses };
        proposed += timed_lookup(&mut drafter, &context, times);
    }
    println!(
        "{path}: {} tokens, {} documents, opened and checked in {open_ms:.0} ms",
        store.len(),
        store.documents()
    );
    report("contexts from the corpus", "us", &mut hits);
    report("contexts with a made-up end", "us", &mut misses);
    println!("draft tokens proposed: {proposed}");
    Ok(())
}
