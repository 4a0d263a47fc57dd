//! Lookup latency of the retrieval drafter on a datastore built by `sibyl index`:
//! `cargo run --release -p sibyl-retrieval --example lookup_bench -- FILE [LOOKUPS]`.
//!
//! Contexts are 16-token windows: half copied from the datastore (so the longest suffix is
//! found and its continuations are counted, the expensive case), half with their last two
//! tokens made up (so every suffix length from 16 down is searched). Prints percentiles.

use sibyl_retrieval::{Datastore, RetrievalConfig, RetrievalDrafter};
use sibyl_spec::Drafter;
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
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |bound: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize % bound.max(1)
    };
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
        let began = Instant::now();
        let proposals = drafter.propose(&context, 10);
        let micros = began.elapsed().as_secs_f64() * 1e6;
        proposed += proposals.iter().map(|p| p.tokens.len()).sum::<usize>();
        if copied {
            hits.push(micros);
        } else {
            misses.push(micros);
        }
    }
    let report = |name: &str, times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "{name:<28} {:>6} lookups  p50 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us",
            times.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    };
    println!(
        "{path}: {} tokens, {} documents, opened and checked in {open_ms:.0} ms",
        store.len(),
        store.documents()
    );
    report("contexts from the corpus", &mut hits);
    report("contexts with a made-up end", &mut misses);
    println!("draft tokens proposed: {proposed}");
    Ok(())
}
