//! Time of one quantized matrix product against the number of activation rows, for the
//! shapes of Qwen2.5-Coder-1.5B (random weights; the kernels' speed does not depend on
//! the values).
//!
//! `CANDLE_NUM_THREADS=2 cargo run --release -p sibyl-engine --example kernel_bench
//!      [--from-memory]`

use sibyl_engine::{GgmlDType, QuantMatrix};
use std::time::Instant;

#[derive(clap::Parser)]
struct Args {
    /// Cycle through copies of each matrix that together exceed the caches (about 512 MiB),
    /// so that the weights come from memory, as in a forward pass of a real model.
    #[arg(long)]
    from_memory: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let shapes = [
        ("ffn_gate Q4_K", GgmlDType::Q4K, 8960, 1536),
        ("ffn_down Q6_K", GgmlDType::Q6K, 1536, 8960),
        ("attn_q Q4_K", GgmlDType::Q4K, 1536, 1536),
        ("ffn_gate shape, Q6_K", GgmlDType::Q6K, 8960, 1536),
        ("ffn_down shape, Q4_K", GgmlDType::Q4K, 1536, 8960),
        ("ffn_gate shape, Q5_K", GgmlDType::Q5K, 8960, 1536),
        ("ffn_gate shape, Q4_0", GgmlDType::Q4_0, 8960, 1536),
        ("0.5B ffn_up Q8_0", GgmlDType::Q8_0, 4864, 896),
    ];
    let mut state = 1u64;
    let mut value = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    println!("matrix | rows | ms per product | per row | relative to 1 row");
    for (name, dtype, n, k) in shapes {
        let values: Vec<f32> = (0..n * k).map(|_| value()).collect();
        let w = QuantMatrix::quantize(dtype, n, k, &values).expect("shape");
        let copies = if args.from_memory {
            ((512 << 20) / w.size_in_bytes()).max(2)
        } else {
            1
        };
        let ws: Vec<QuantMatrix> = (0..copies).map(|_| w.clone()).collect();
        let mut one = 0.0;
        for m in [1usize, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64] {
            let x: Vec<f32> = (0..m * k).map(|_| value()).collect();
            let mut out = vec![0f32; m * n];
            let repeats = 200 / m + 5;
            let mut times = Vec::new();
            for w in ws.iter().cycle().take(repeats) {
                let t = Instant::now();
                w.matmul(&x, m, &mut out).expect("matmul");
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            if m == 1 {
                one = ms;
            }
            println!(
                "{name} | {m} | {ms:.3} | {:.3} | {:.2}x",
                ms / m as f64,
                ms / one
            );
        }
    }
}
