//! Quantized matrix kernels for k activation rows at once (Q4_K, Q5_K, Q6_K, Q4_0 and Q8_0
//! weights).
//!
//! A forward over k draft tokens multiplies every weight matrix by k activation rows. On a
//! CPU that must cost little more than one row, so:
//! - weights are repacked at load so that eight output columns lie side by side: a vector
//!   of eight 32-bit lanes holds one partial sum per column, and four activation values
//!   are broadcast to all lanes. No horizontal sums, and each weight block is unpacked once
//!   and applied to every activation row while it sits in registers or L1;
//! - the products inside a block are integers (8-bit weights times 8-bit activations),
//!   summed exactly in `i32`, so their order does not matter;
//! - the float part (block scales times those integer sums, accumulated over the blocks of a
//!   row) is one fixed sequence of `f32` operations per output element, written once per type
//!   (`*_accumulate` below) and followed by the portable and the AVX2 code alike.
//!
//! So a token's logits are bit-identical alone or inside a block of 64 tokens, and the AVX2
//! path gives exactly what the portable path gives (both are tested).

mod packed_layout;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

use half::f16;

/// Values per K-quant super-block.
pub(crate) const QK_K: usize = 256;
/// Values per Q8_0 (and Q4_0) block.
pub(crate) const QK8_0: usize = 32;

/// A weight storage type these kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4K,
    Q5K,
    Q6K,
    Q4_0,
    Q8_0,
}

impl Kind {
    /// Values per block.
    pub(crate) fn block_values(self) -> usize {
        match self {
            Kind::Q4K | Kind::Q5K | Kind::Q6K => QK_K,
            Kind::Q4_0 | Kind::Q8_0 => QK8_0,
        }
    }

    /// Whether products with `other` take the same quantized activations
    /// ([`Activations::quantize`]): ggml's Q8_K for the K-quants, its Q8_0 for Q4_0 and Q8_0.
    pub(crate) fn shares_activations(self, other: Kind) -> bool {
        self.block_values() == other.block_values()
    }

    /// Bytes per block, as GGUF stores it.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Kind::Q4K => 144,
            Kind::Q5K => 176,
            Kind::Q6K => 210,
            Kind::Q4_0 => 18,
            Kind::Q8_0 => 34,
        }
    }

    /// Bytes per interleaved group block ([`GROUP`] blocks; `packed_layout`). Q4_K's and
    /// Q5_K's scales and mins take 16 bytes unpacked instead of 12.
    pub(crate) fn group_block_bytes(self) -> usize {
        match self {
            Kind::Q4K => packed_layout::Q4K_GROUP_BYTES,
            Kind::Q5K => packed_layout::Q5K_GROUP_BYTES,
            Kind::Q6K | Kind::Q4_0 | Kind::Q8_0 => GROUP * self.block_bytes(),
        }
    }
}

/// Instruction sets the kernels have code for, slowest first: each runs only where the
/// ones before it do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Portable,
    /// AVX2 with FMA and F16C (every AVX2 CPU has both).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 plus AVX-512 (F, BW, VL, VNNI): `dpbusd`, and two groups per 512-bit vector.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Isa {
    /// The fastest one this CPU runs, detected once, or a slower one where
    /// `SIBYL_KERNELS` (`portable`, `avx2`) asks for it: to see what a CPU without the
    /// newer instructions would do.
    pub(crate) fn detect() -> Isa {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = Isa::fastest();
            let Ok(asked) = std::env::var("SIBYL_KERNELS") else {
                return best;
            };
            let cap = match asked.as_str() {
                "portable" => Isa::Portable,
                #[cfg(target_arch = "x86_64")]
                "avx2" => Isa::Avx2,
                _ => {
                    tracing::warn!(
                        SIBYL_KERNELS = %asked,
                        "unknown kernel set (portable, avx2); using the fastest this CPU runs"
                    );
                    return best;
                }
            };
            if cap > best {
                tracing::warn!(SIBYL_KERNELS = %asked, "this CPU cannot run that kernel set");
                return best;
            }
            cap
        })
    }

    fn fastest() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                    return Isa::Vnni;
                }
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Whether this instruction set has kernels for the two groups of a stored pair.
    fn pairs_groups(self) -> bool {
        self != Isa::Portable
    }

    /// Every instruction set this CPU runs (the tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        match Isa::detect() {
            Isa::Vnni => all.extend([Isa::Avx2, Isa::Vnni]),
            Isa::Avx2 => all.push(Isa::Avx2),
            Isa::Portable => {}
        }
        all
    }
}

/// 256 activations quantized to 8 bits, as the K-quant products take them (ggml's Q8_K):
/// `x ≈ d * qs`, with the sums of each 16 and of each 32 values.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Q8K {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
    pub(crate) sums32: [i16; QK_K / 32],
}

/// 32 activations quantized to 8 bits for Q8_0 products: `x ≈ d * qs`, `d` rounded to f16
/// as ggml stores it, `|qs| <= 127`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Q8 {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK8_0],
    /// The sum of `qs`.
    pub(crate) sum: i32,
}

impl Q8K {
    const ZERO: Q8K = Q8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
        sums32: [0; QK_K / 32],
    };

    /// ggml's `quantize_row_q8_K`: the value of largest magnitude maps to -127.
    pub(crate) fn quantize(x: &[f32]) -> Q8K {
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() != Isa::Portable {
            // SAFETY: `Isa::detect` finds AVX2 before it answers anything but `Portable`.
            return unsafe { x86::quantize_q8k(x) };
        }
        Self::quantize_portable(x)
    }

    /// [`Q8K::quantize`] one value at a time.
    pub(crate) fn quantize_portable(x: &[f32]) -> Q8K {
        debug_assert_eq!(x.len(), QK_K);
        // The first value of largest magnitude, found in two passes that vectorize.
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let mut out = Q8K::ZERO;
        if amax == 0.0 || amax.is_nan() {
            return out;
        }
        let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127f32 / max;
        for (q, &v) in out.qs.iter_mut().zip(x) {
            *q = round_away(iscale * v).clamp(-128.0, 127.0) as i8;
        }
        out.set_sums();
        out.d = 1.0 / iscale;
        out
    }

    /// Fills `bsums` and `sums32` from `qs`.
    pub(crate) fn set_sums(&mut self) {
        for (sum, group) in self.bsums.iter_mut().zip(self.qs.chunks_exact(16)) {
            *sum = group.iter().map(|&q| q as i16).sum();
        }
        for (j, sum) in self.sums32.iter_mut().enumerate() {
            *sum = self.bsums[2 * j] + self.bsums[2 * j + 1];
        }
    }
}

impl Q8 {
    const ZERO: Q8 = Q8 {
        d: 0.0,
        qs: [0; QK8_0],
        sum: 0,
    };

    /// ggml's `quantize_row_q8_0`.
    pub(crate) fn quantize(x: &[f32]) -> Q8 {
        debug_assert_eq!(x.len(), QK8_0);
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut out = Q8::ZERO;
        for (q, &v) in out.qs.iter_mut().zip(x) {
            *q = round_away(v * id).clamp(-127.0, 127.0) as i8;
        }
        out.sum = out.qs.iter().map(|&q| q as i32).sum();
        out.d = f16::from_f32(d).to_f32();
        out
    }
}

/// `v.round()` (halves away from zero) for `|v| < 2^31`, without a call into libm, so that
/// quantizing a row vectorizes. `v - trunc(v)` is exact, so the decision is the same.
#[inline(always)]
fn round_away(v: f32) -> f32 {
    let t = v as i32 as f32;
    let fraction = v - t;
    if fraction >= 0.5 {
        t + 1.0
    } else if fraction <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// `m` activation rows quantized for one weight kind, row after row.
pub(crate) enum Activations {
    K(Vec<Q8K>),
    Q8(Vec<Q8>),
}

impl Activations {
    /// Quantizes `m` rows of `cols` values for products with `kind` weights.
    pub(crate) fn quantize(kind: Kind, x: &[f32], cols: usize) -> Activations {
        debug_assert!(cols.is_multiple_of(kind.block_values()));
        match kind {
            Kind::Q4K | Kind::Q5K | Kind::Q6K => {
                Activations::K(quantize_all(x, QK_K, Q8K::ZERO, Q8K::quantize))
            }
            Kind::Q4_0 | Kind::Q8_0 => {
                Activations::Q8(quantize_all(x, QK8_0, Q8::ZERO, Q8::quantize))
            }
        }
    }
}

/// `quantize` applied to every `block`-sized piece of `x`, in parallel (each block alone, so
/// the split changes nothing).
fn quantize_all<Q: Copy + Send>(
    x: &[f32],
    block: usize,
    zero: Q,
    quantize: fn(&[f32]) -> Q,
) -> Vec<Q> {
    /// Blocks per parallel work item.
    const BLOCKS_PER_TASK: usize = 16;
    let mut out = vec![zero; x.len() / block];
    crate::parallel::for_each_chunk_mut(&mut out, BLOCKS_PER_TASK, |i, chunk| {
        let x = &x[i * BLOCKS_PER_TASK * block..];
        chunk
            .iter_mut()
            .zip(x.chunks_exact(block))
            .for_each(|(q, x)| *q = quantize(x));
    });
    out
}

/// Output columns (weight rows) interleaved in one group.
pub(crate) const GROUP: usize = 8;

/// A weight matrix repacked for these kernels: groups of [`GROUP`] weight rows, and in each
/// group, block after block, the eight rows' blocks interleaved (layouts in `packed_layout`).
/// Takes the memory of the GGUF blocks (Q4_K 2.8% more, Q5_K 2.3%), plus padding rows up to
/// a multiple of eight.
#[derive(Clone, Debug)]
pub(crate) struct Packed {
    kind: Kind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl Packed {
    /// Repacks `rows` weight rows of `cols` values, `bytes` as GGUF stores them. `None` if the
    /// sizes do not fit together.
    pub(crate) fn new(kind: Kind, rows: usize, cols: usize, bytes: &[u8]) -> Option<Packed> {
        let blocks = cols / kind.block_values();
        let row_bytes = blocks * kind.block_bytes();
        if !cols.is_multiple_of(kind.block_values()) || bytes.len() != rows * row_bytes {
            return None;
        }
        let groups = rows.div_ceil(GROUP);
        let group_block = kind.group_block_bytes();
        let mut data = vec![0u8; groups * blocks * group_block];
        let zero = vec![0u8; kind.block_bytes()];
        let mut sources: [&[u8]; GROUP] = [&zero; GROUP];
        let mut packed = Packed {
            kind,
            rows,
            cols,
            data: Vec::new(),
        };
        for group in 0..groups {
            let (first, stride) = packed.placement(group);
            for b in 0..blocks {
                for (i, source) in sources.iter_mut().enumerate() {
                    let row = group * GROUP + i;
                    *source = if row < rows {
                        &bytes[row * row_bytes + b * kind.block_bytes()..][..kind.block_bytes()]
                    } else {
                        &zero
                    };
                }
                let at = first + b * stride;
                let out = &mut data[at..at + group_block];
                match kind {
                    Kind::Q4K => packed_layout::pack_q4k(&sources, out),
                    Kind::Q5K => packed_layout::pack_q5k(&sources, out),
                    Kind::Q6K => packed_layout::pack_q6k(&sources, out),
                    Kind::Q4_0 => packed_layout::pack_q4_0(&sources, out),
                    Kind::Q8_0 => packed_layout::pack_q8_0(&sources, out),
                }
            }
        }
        packed.data = data;
        Some(packed)
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    pub(crate) fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn blocks(&self) -> usize {
        self.cols / self.kind.block_values()
    }

    fn group_bytes(&self) -> usize {
        self.blocks() * self.kind.group_block_bytes()
    }

    /// Where group `g`'s blocks lie: the offset of block 0 and the bytes from one block to
    /// the next. Groups are stored in pairs, block by block (block `b` of group `2p`, then
    /// block `b` of group `2p + 1`), so that the kernels that run a pair read one sequential
    /// stream; a last group without a partner is stored alone.
    fn placement(&self, g: usize) -> (usize, usize) {
        let size = self.kind.group_block_bytes();
        let pair_start = g / 2 * 2 * self.group_bytes();
        let alone = g / 2 * 2 + 1 >= self.groups();
        let first = pair_start + if g % 2 == 1 { size } else { 0 };
        (first, if alone { size } else { 2 * size })
    }

    /// The blocks of group `g`.
    fn group(&self, g: usize) -> GroupBlocks<'_> {
        let (first, stride) = self.placement(g);
        GroupBlocks {
            data: &self.data,
            first,
            stride,
            size: self.kind.group_block_bytes(),
        }
    }

    /// Row `row` as floats, bit-identical to candle's dequantization of the GGUF blocks.
    pub(crate) fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let group = self.group(row / GROUP);
        let values = self.kind.block_values();
        for (b, out) in out.chunks_exact_mut(values).enumerate() {
            packed_layout::dequantize(self.kind, group.block(b), row % GROUP, out);
        }
    }

    /// Computes groups `first_group..first_group + count` against the `m` activation rows
    /// of `acts` (quantized for this kind), handing each result to `emit(group, first_row,
    /// tile)`: `tile[r][c]` is weight row `group * GROUP + c` times activation row
    /// `first_row + r`.
    pub(crate) fn dot_groups<F>(
        &self,
        isa: Isa,
        first_group: usize,
        count: usize,
        acts: &Activations,
        m: usize,
        mut emit: F,
    ) where
        F: FnMut(usize, usize, &[[f32; GROUP]]),
    {
        let blocks = self.blocks();
        let group = |i: usize| self.group(i);
        let mut tiles = [[[0f32; GROUP]; ROWS_PER_PASS]; 2];
        let end = first_group + count;
        let mut i = first_group;
        while i < end {
            // The two groups of a stored pair are read together, as one stream.
            let pair = isa.pairs_groups() && i.is_multiple_of(2) && i + 1 < end;
            for first in (0..m).step_by(ROWS_PER_PASS) {
                let rows = (m - first).min(ROWS_PER_PASS);
                let [one, two] = &mut tiles;
                let (one, two) = (&mut one[..rows], &mut two[..rows]);
                if pair {
                    group_pair_kernel(
                        isa,
                        self.kind,
                        [group(i), group(i + 1)],
                        blocks,
                        acts,
                        first,
                        [&mut *one, &mut *two],
                    );
                    emit(i, first, one);
                    emit(i + 1, first, two);
                } else {
                    group_kernel(isa, self.kind, group(i), blocks, acts, first, one);
                    emit(i, first, one);
                }
            }
            i += 1 + pair as usize;
        }
    }

    /// Groups of [`GROUP`] weight rows (the last one padded).
    pub(crate) fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }
}

/// Where the blocks of one group lie in a [`Packed`] matrix.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupBlocks<'a> {
    data: &'a [u8],
    /// Offset of block 0.
    first: usize,
    /// Bytes from one block to the next.
    stride: usize,
    /// Bytes of one block.
    size: usize,
}

impl<'a> GroupBlocks<'a> {
    /// Block `b`.
    pub(crate) fn block(&self, b: usize) -> &'a [u8] {
        &self.data[self.first + b * self.stride..][..self.size]
    }

    /// The start of block `b`, which must exist.
    pub(crate) fn ptr(&self, b: usize) -> *const u8 {
        self.block(b).as_ptr()
    }

    pub(crate) fn stride(&self) -> usize {
        self.stride
    }
}

/// Activation rows one kernel call handles (its accumulators live on the stack).
pub(crate) const ROWS_PER_PASS: usize = 64;

/// [`group_kernel`] for the two groups of a stored pair, read block by block as one stream:
/// with AVX2 256-bit code for each group, with AVX-512 one 512-bit kernel for both.
fn group_pair_kernel(
    isa: Isa,
    kind: Kind,
    groups: [GroupBlocks<'_>; 2],
    blocks: usize,
    acts: &Activations,
    first: usize,
    [one, two]: [&mut [[f32; GROUP]]; 2],
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(isa.pairs_groups() && Isa::detect() != Isa::Portable);
        let rows = first..first + one.len();
        // The 512-bit kernel also for one row: on Zen 5 the 256-bit VNNI code read a
        // one-row product's weights 1.3x slower (a decoding step 41 ms against 32 ms); on
        // Zen 4 the two were level.
        let wide = isa == Isa::Vnni;
        // SAFETY (all): `Isa::Avx2` and `Isa::Vnni` are only made where the CPU has AVX2 and
        // F16C, `Isa::Vnni` where it also has AVX-512 F, BW, VL and VNNI (asserted above).
        unsafe {
            match (kind, acts) {
                (Kind::Q4K, Activations::K(xs)) => {
                    let xs = &xs[rows.start * blocks..rows.end * blocks];
                    if wide {
                        x86::q4k_pair(groups, blocks, xs, one, two)
                    } else {
                        x86::q4k_dual(groups, blocks, xs, one, two)
                    }
                }
                (Kind::Q5K, Activations::K(xs)) => {
                    let xs = &xs[rows.start * blocks..rows.end * blocks];
                    if wide {
                        x86::q5k_pair(groups, blocks, xs, one, two)
                    } else {
                        x86::q5k_dual(groups, blocks, xs, one, two)
                    }
                }
                (Kind::Q6K, Activations::K(xs)) => {
                    let xs = &xs[rows.start * blocks..rows.end * blocks];
                    if wide {
                        x86::q6k_pair(groups, blocks, xs, one, two)
                    } else {
                        x86::q6k_dual(groups, blocks, xs, one, two)
                    }
                }
                (Kind::Q4_0, Activations::Q8(xs)) => {
                    let xs = &xs[rows.start * blocks..rows.end * blocks];
                    if wide {
                        x86::q4_0_pair(groups, blocks, xs, one, two)
                    } else {
                        x86::q4_0_dual(groups, blocks, xs, one, two)
                    }
                }
                (Kind::Q8_0, Activations::Q8(xs)) => {
                    let xs = &xs[rows.start * blocks..rows.end * blocks];
                    if wide {
                        x86::q8_0_pair(groups, blocks, xs, one, two)
                    } else {
                        x86::q8_0_dual(groups, blocks, xs, one, two)
                    }
                }
                _ => panic!("activations quantized for another weight kind"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, kind, groups, blocks, acts, first, one, two);
        unreachable!("pairs of groups are for x86-64")
    }
}

/// `out[r][c] = dot(weight row c of the group, activation row first + r)`.
fn group_kernel(
    isa: Isa,
    kind: Kind,
    group: GroupBlocks<'_>,
    blocks: usize,
    acts: &Activations,
    first: usize,
    out: &mut [[f32; GROUP]],
) {
    let rows = out.len();
    match (kind, acts) {
        (Kind::Q4K | Kind::Q5K | Kind::Q6K, Activations::K(xs)) => {
            let xs = &xs[first * blocks..(first + rows) * blocks];
            match (isa, kind) {
                (Isa::Portable, Kind::Q4K) => portable::q4k(group, blocks, xs, out),
                (Isa::Portable, Kind::Q5K) => portable::q5k(group, blocks, xs, out),
                (Isa::Portable, _) => portable::q6k(group, blocks, xs, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Avx2` is only made where the CPU has AVX2 and F16C.
                (Isa::Avx2, Kind::Q4K) => unsafe { x86::q4k(group, blocks, xs, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (Isa::Avx2, Kind::Q5K) => unsafe { x86::q5k(group, blocks, xs, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (Isa::Avx2, _) => unsafe { x86::q6k(group, blocks, xs, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Vnni` is only made where the CPU also has AVX-512 VL and VNNI.
                (Isa::Vnni, Kind::Q4K) => unsafe { x86::q4k_vnni(group, blocks, xs, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (Isa::Vnni, Kind::Q5K) => unsafe { x86::q5k_vnni(group, blocks, xs, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (Isa::Vnni, _) => unsafe { x86::q6k_vnni(group, blocks, xs, out) },
            }
        }
        (Kind::Q4_0 | Kind::Q8_0, Activations::Q8(xs)) => {
            let xs = &xs[first * blocks..(first + rows) * blocks];
            match (isa, kind) {
                (Isa::Portable, Kind::Q4_0) => portable::q4_0(group, blocks, xs, out),
                (Isa::Portable, _) => portable::q8_0(group, blocks, xs, out),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above (VNNI machines have AVX2).
                (Isa::Avx2 | Isa::Vnni, Kind::Q4_0) => unsafe { x86::q4_0(group, blocks, xs, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                (Isa::Avx2 | Isa::Vnni, _) => unsafe { x86::q8_0(group, blocks, xs, out) },
            }
        }
        _ => panic!("activations quantized for another weight kind"),
    }
}

/// The 6-bit scales and mins of a Q4_K super-block (ggml's `get_scale_min_k4`).
fn q4k_scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            scales[j] = packed[j] & 63;
            mins[j] = packed[j + 4] & 63;
        } else {
            scales[j] = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
            mins[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        }
    }
    (scales, mins)
}

/// The 256 stored values (0..64, the weight plus 32) of a Q6_K super-block, in order.
fn q6k_values(block: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&block[..128], &block[128..192]);
    let mut v = [0u8; QK_K];
    for half in 0..2 {
        let (ql, qh, v) = (&ql[64 * half..], &qh[32 * half..], &mut v[128 * half..]);
        for l in 0..32 {
            v[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            v[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            v[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            v[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    v
}

/// The float step of a Q4_K (and Q5_K) super-block, shared by every instruction set: `isum`
/// is the scaled integer dot product, `msum` the mins times the activation sums.
#[inline(always)]
fn q4k_accumulate(acc: f32, xd: f32, d: f32, dmin: f32, isum: i32, msum: i32) -> f32 {
    acc + ((xd * d) * isum as f32 - (xd * dmin) * msum as f32)
}

/// The float step of a Q6_K super-block: `isum` is the scaled dot product of the weights'
/// stored (offset by 32) values, `bsum` the scales times the activation sums.
#[inline(always)]
fn q6k_accumulate(acc: f32, xd: f32, d: f32, isum: i32, bsum: i32) -> f32 {
    acc + (xd * d) * (isum - 32 * bsum) as f32
}

/// The float step of a Q8_0 or Q4_0 block (for Q4_0, `isum` is the product of the
/// weights' values: their stored values less 8).
#[inline(always)]
fn q8_0_accumulate(acc: f32, xd: f32, d: f32, isum: i32) -> f32 {
    acc + (d * xd) * isum as f32
}

#[cfg(test)]
mod tests;
