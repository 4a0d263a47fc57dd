use super::*;
use crate::quant::typed;
use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use proptest::prelude::*;

/// A small deterministic generator (the proptest seed picks the stream).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
    }
}

/// Byte values at the ends of every field's range.
const EDGE_BYTES: [u8; 6] = [0x00, 0xFF, 0x80, 0x7F, 0x0F, 0xF0];

/// `rows` weight rows of `blocks` random blocks each. Scales are finite f16 (a model file
/// with NaN scales is garbage in, garbage out); with `edge`, every other byte is an extreme
/// value.
fn weight_rows(kind: Kind, rows: usize, blocks: usize, rng: &mut Rng, edge: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * blocks * kind.block_bytes());
    for _ in 0..rows * blocks {
        let mut block: Vec<u8> = (0..kind.block_bytes())
            .map(|_| {
                if edge {
                    EDGE_BYTES[rng.next() as usize % EDGE_BYTES.len()]
                } else {
                    rng.byte()
                }
            })
            .collect();
        let mut scale = |at: usize, rng: &mut Rng| {
            let value = if edge { 0.0625 } else { rng.unit() * 0.05 };
            block[at..at + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
        };
        match kind {
            Kind::Q4K | Kind::Q5K => {
                scale(0, rng);
                scale(2, rng);
            }
            Kind::Q6K => scale(208, rng),
            Kind::Q4_0 | Kind::Q8_0 => scale(0, rng),
        }
        out.extend(block);
    }
    out
}

/// `m` rows of `cols` activations: smooth random values, or (with `edge`) integer vectors
/// at the ends of their range, including -128 where the K-quant products allow it.
fn activations(kind: Kind, m: usize, cols: usize, rng: &mut Rng, edge: bool) -> Activations {
    if !edge {
        let x: Vec<f32> = (0..m * cols).map(|_| rng.unit() * 3.0).collect();
        return Activations::quantize(kind, &x, cols);
    }
    let mut pick = |low: i8| [low, 127, 0, -1, 1][rng.next() as usize % 5];
    match kind {
        Kind::Q4K | Kind::Q5K | Kind::Q6K => Activations::K(
            (0..m * cols / QK_K)
                .map(|_| {
                    let mut x = Q8K::ZERO;
                    x.d = 0.01;
                    x.qs.iter_mut().for_each(|q| *q = pick(-128));
                    x.set_sums();
                    x
                })
                .collect(),
        ),
        Kind::Q4_0 | Kind::Q8_0 => Activations::Q8(
            (0..m * cols / QK8_0)
                .map(|_| {
                    let mut x = Q8::ZERO;
                    x.d = 0.01;
                    x.qs.iter_mut().for_each(|q| *q = pick(-127));
                    x.sum = x.qs.iter().map(|&q| q as i32).sum();
                    x
                })
                .collect(),
        ),
    }
}

/// Every output of `packed` times `m` activation rows, column-major (`m` per weight row).
fn products(packed: &Packed, isa: Isa, acts: &Activations, m: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; packed.groups() * GROUP * m];
    packed.dot_groups(isa, 0, packed.groups(), acts, m, |group, first, tile| {
        for (r, values) in tile.iter().enumerate() {
            for (c, &value) in values.iter().enumerate() {
                out[(group * GROUP + c) * m + first + r] = value;
            }
        }
    });
    out
}

fn dequantized_weights(kind: Kind, row: &[u8]) -> Vec<f32> {
    fn with<T: GgmlType>(row: &[u8]) -> Vec<f32> {
        let blocks: Vec<T> = typed(row).expect("whole blocks");
        let mut out = vec![0f32; blocks.len() * T::BLCK_SIZE];
        T::to_float(&blocks, &mut out);
        out
    }
    match kind {
        Kind::Q4K => with::<BlockQ4K>(row),
        Kind::Q5K => with::<BlockQ5K>(row),
        Kind::Q6K => with::<BlockQ6K>(row),
        Kind::Q4_0 => with::<BlockQ4_0>(row),
        Kind::Q8_0 => with::<BlockQ8_0>(row),
    }
}

fn dequantized_row(acts: &Activations, r: usize, cols: usize) -> Vec<f32> {
    match acts {
        Activations::K(xs) => xs[r * cols / QK_K..(r + 1) * cols / QK_K]
            .iter()
            .flat_map(|x| x.qs.iter().map(move |&q| x.d * q as f32))
            .collect(),
        Activations::Q8(xs) => xs[r * cols / QK8_0..(r + 1) * cols / QK8_0]
            .iter()
            .flat_map(|x| x.qs.iter().map(move |&q| x.d * q as f32))
            .collect(),
    }
}

fn one_row(acts: &Activations, r: usize, blocks: usize) -> Activations {
    match acts {
        Activations::K(xs) => Activations::K(xs[r * blocks..(r + 1) * blocks].to_vec()),
        Activations::Q8(xs) => Activations::Q8(xs[r * blocks..(r + 1) * blocks].to_vec()),
    }
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Q4K),
        Just(Kind::Q5K),
        Just(Kind::Q6K),
        Just(Kind::Q4_0),
        Just(Kind::Q8_0)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Every instruction set gives the same bits; a row gives the same bits alone as among
    /// up to 70 rows; the value is the dot product of the GGUF weights dequantized by candle
    /// (independently of the repacking and these kernels) with the quantized activations;
    /// and a repacked row dequantizes to exactly what candle makes of the GGUF row.
    #[test]
    fn kernels_agree_across_isas_and_row_counts_and_with_a_dequantized_reference(
        kind in kind_strategy(),
        blocks in 1usize..6,
        n in 1usize..20,
        m in 1usize..70,
        seed in any::<u64>(),
        edge in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let cols = blocks * kind.block_values();
        let bytes = weight_rows(kind, n, blocks, &mut rng, edge);
        let packed = Packed::new(kind, n, cols, &bytes).expect("whole blocks");
        let acts = activations(kind, m, cols, &mut rng, edge);
        let row_bytes = bytes.len() / n;
        let weights: Vec<Vec<f32>> = bytes
            .chunks_exact(row_bytes)
            .map(|row| dequantized_weights(kind, row))
            .collect();
        for (c, expected) in weights.iter().enumerate() {
            let mut row = vec![f32::NAN; cols];
            packed.dequantize_row(c, &mut row);
            let same = row.iter().zip(expected).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same, "{:?} row {} dequantizes differently", kind, c);
        }
        let reference = products(&packed, Isa::Portable, &acts, m);
        for isa in Isa::available() {
            let out = products(&packed, isa, &acts, m);
            let same = reference.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same, "{:?} differs from the portable kernel for {:?}", isa, kind);
            for r in [0, m / 2, m - 1] {
                let alone = products(&packed, isa, &one_row(&acts, r, blocks), 1);
                for c in 0..n {
                    prop_assert_eq!(alone[c].to_bits(), out[c * m + r].to_bits(), "{:?} {:?} row {} column {}", isa, kind, r, c);
                }
            }
        }
        for r in 0..m {
            let x = dequantized_row(&acts, r, cols);
            for (c, w) in weights.iter().enumerate() {
                let exact: f64 = w.iter().zip(&x).map(|(&w, &v)| w as f64 * v as f64).sum();
                let scale: f64 = w.iter().zip(&x).map(|(&w, &v)| (w as f64 * v as f64).abs()).sum();
                let value = reference[c * m + r] as f64;
                prop_assert!(
                    (value - exact).abs() <= 1e-4 * scale + 1e-9,
                    "{:?} row {} column {}: {} against {}", kind, r, c, value, exact
                );
            }
        }
    }
}

#[test]
fn activation_quantizers_match_candle() {
    use candle_core::quantized::k_quants::BlockQ8K;
    let mut rng = Rng(7);
    let x: Vec<f32> = (0..2 * QK_K).map(|_| rng.unit() * 4.0).collect();
    let mut ours = Vec::new();
    for chunk in x.chunks_exact(QK_K) {
        let q = Q8K::quantize(chunk);
        ours.extend(q.qs.iter().map(|&v| q.d * v as f32));
    }
    let mut theirs = vec![BlockQ8K::zeros(); 2];
    BlockQ8K::from_float(&x, &mut theirs);
    let mut decoded = vec![0f32; 2 * QK_K];
    BlockQ8K::to_float(&theirs, &mut decoded);
    assert_eq!(ours, decoded);

    let mut ours = Vec::new();
    for chunk in x.chunks_exact(QK8_0) {
        let q = Q8::quantize(chunk);
        ours.extend(q.qs.iter().map(|&v| q.d * v as f32));
    }
    let mut theirs = vec![BlockQ8_0::zeros(); x.len() / QK8_0];
    BlockQ8_0::from_float(&x, &mut theirs);
    let mut decoded = vec![0f32; x.len()];
    BlockQ8_0::to_float(&theirs, &mut decoded);
    assert_eq!(ours, decoded);
}

/// The vector activation quantizer gives the scalar one's bytes, also where rounding is a
/// tie, on NaN and infinities, on a denormal largest value and on zeros.
#[test]
fn the_vector_activation_quantizer_gives_the_scalar_bytes() {
    let mut rng = Rng(11);
    let mut rows: Vec<Vec<f32>> = (0..20)
        .map(|_| (0..QK_K).map(|_| rng.unit() * 3.0).collect())
        .collect();
    // Largest value -127: the scale is 1, and halves are ties.
    let ties: Vec<f32> = (0..QK_K)
        .map(|i| {
            if i == 9 {
                -127.0
            } else {
                (i as f32 - 128.0) / 2.0
            }
        })
        .collect();
    rows.push(ties);
    let mut special = rows[0].clone();
    special[3] = f32::NAN;
    special[100] = f32::INFINITY;
    special[200] = f32::NEG_INFINITY;
    rows.push(special);
    let mut nan = rows[1].clone();
    nan[0] = f32::NAN;
    nan[255] = -f32::NAN;
    rows.push(nan);
    rows.push(
        (0..QK_K)
            .map(|i| f32::from_bits(1 + i as u32) * if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect(),
    );
    rows.push(vec![0.0; QK_K]);
    rows.push(vec![f32::NAN; QK_K]);
    for (r, row) in rows.iter().enumerate() {
        let (q, scalar) = (Q8K::quantize(row), Q8K::quantize_portable(row));
        assert_eq!(q.qs, scalar.qs, "row {r}");
        assert_eq!(q.d.to_bits(), scalar.d.to_bits(), "row {r}");
        assert_eq!(
            (q.bsums, q.sums32),
            (scalar.bsums, scalar.sums32),
            "row {r}"
        );
    }
}

#[test]
fn all_zero_activations_give_zero() {
    let mut rng = Rng(3);
    for kind in [Kind::Q4K, Kind::Q5K, Kind::Q6K, Kind::Q4_0, Kind::Q8_0] {
        let cols = 2 * kind.block_values();
        let packed = Packed::new(kind, 3, cols, &weight_rows(kind, 3, 2, &mut rng, false)).unwrap();
        let acts = Activations::quantize(kind, &vec![0f32; cols], cols);
        for isa in Isa::available() {
            assert_eq!(
                products(&packed, isa, &acts, 1)[..3],
                [0.0; 3],
                "{isa:?} {kind:?}"
            );
        }
    }
}

/// Weights and activations at the ends of their ranges, every value alike: the largest
/// integer sums the kernels meet, where a 16-bit partial sum that was summed too long
/// overflows. Every instruction set must still give the portable kernel's bits, and those
/// the exact product.
#[test]
fn the_largest_sums_give_the_portable_bits_on_every_isa() {
    let (n, blocks, m) = (16, 3, 9);
    for kind in [Kind::Q4K, Kind::Q5K, Kind::Q6K, Kind::Q4_0, Kind::Q8_0] {
        let cols = blocks * kind.block_values();
        // All bits set: the largest values and scales; Q6_K's scales are signed, so also
        // 0x7F, and Q8_0's weights -128 and 127.
        for fill in [0xFF, 0x7F, 0x80] {
            let mut bytes = vec![fill; n * blocks * kind.block_bytes()];
            let scales: &[usize] = match kind {
                Kind::Q4K | Kind::Q5K => &[0, 2],
                Kind::Q6K => &[208],
                Kind::Q4_0 | Kind::Q8_0 => &[0],
            };
            for block in bytes.chunks_exact_mut(kind.block_bytes()) {
                for &at in scales {
                    block[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                }
            }
            let packed = Packed::new(kind, n, cols, &bytes).unwrap();
            let weights = dequantized_weights(kind, &bytes[..bytes.len() / n]);
            for activation in [-128i8, 127, -127] {
                let acts = match kind {
                    Kind::Q4_0 | Kind::Q8_0 => {
                        let mut x = Q8::ZERO;
                        x.d = 0.01;
                        x.qs = [activation.max(-127); QK8_0];
                        x.sum = x.qs.iter().map(|&q| q as i32).sum();
                        Activations::Q8(vec![x; m * cols / QK8_0])
                    }
                    _ => {
                        let mut x = Q8K::ZERO;
                        x.d = 0.01;
                        x.qs = [activation; QK_K];
                        x.set_sums();
                        Activations::K(vec![x; m * cols / QK_K])
                    }
                };
                let reference = products(&packed, Isa::Portable, &acts, m);
                let x = dequantized_row(&acts, 0, cols);
                let exact: f64 = weights
                    .iter()
                    .zip(&x)
                    .map(|(&w, &v)| w as f64 * v as f64)
                    .sum();
                let scale: f64 = weights
                    .iter()
                    .zip(&x)
                    .map(|(&w, &v)| (w as f64 * v as f64).abs())
                    .sum();
                assert!(
                    (reference[0] as f64 - exact).abs() <= 1e-4 * scale + 1e-9,
                    "{kind:?} {fill:#x} {activation}: {} against {exact}",
                    reference[0]
                );
                for isa in Isa::available() {
                    let out = products(&packed, isa, &acts, m);
                    let same = reference
                        .iter()
                        .zip(&out)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} {kind:?} {fill:#x} {activation}");
                }
            }
        }
    }
}

#[test]
fn sizes_that_do_not_fit_are_refused() {
    assert!(Packed::new(Kind::Q8_0, 2, 64, &[0u8; 100]).is_none());
    assert!(Packed::new(Kind::Q4K, 1, 128, &[0u8; 72]).is_none());
}
