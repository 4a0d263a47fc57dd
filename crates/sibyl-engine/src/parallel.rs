//! Work split over candle's persistent thread pool, the one its quantized kernels use, so
//! that a forward pass never has two pools spinning against each other.

/// Calls `f(i, chunk)` for every `chunk_len`-sized chunk `i` of `out`, in parallel. Each
/// chunk is computed by exactly one call, so results never depend on the split.
pub(crate) fn for_each_chunk_mut<T, F>(out: &mut [T], chunk_len: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync,
{
    if out.is_empty() || chunk_len == 0 {
        return;
    }
    let len = out.len();
    let chunks = len.div_ceil(chunk_len);
    if chunks == 1 {
        // Not worth waking the pool.
        return f(0, out);
    }
    let base = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
        for i in range {
            let start = i * chunk_len;
            let end = len.min(start + chunk_len);
            // SAFETY: the pool hands out each index once; chunks are disjoint and inside
            // `out`, which outlives the call (the pool returns when all work is done).
            let chunk =
                unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(start), end - start) };
            f(i, chunk);
        }
    });
}

/// Calls `f` on ranges that together cover `0..count` once, in parallel on the same pool
/// (a few ranges per thread, so that per-call set-up is paid rarely).
pub(crate) fn for_each_range<F>(count: usize, f: F)
where
    F: Fn(std::ops::Range<usize>) + Sync,
{
    if count == 0 {
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(count, f);
}

/// A slice that parallel work items write at disjoint indices.
pub(crate) struct DisjointWrites {
    start: *mut f32,
    len: usize,
}

// SAFETY: writers promise disjoint indices (see `write`); the slice outlives the pool call.
unsafe impl Sync for DisjointWrites {}

impl DisjointWrites {
    pub(crate) fn new(slice: &mut [f32]) -> Self {
        Self {
            start: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }

    /// Writes `values` at `start..start + values.len()`.
    ///
    /// # Safety
    /// No other work item writes or reads those indices during the parallel call, and the
    /// slice given to `new` is still borrowed.
    pub(crate) unsafe fn write_all(&self, start: usize, values: &[f32]) {
        assert!(
            start + values.len() <= self.len,
            "indices {start}..{} out of {}",
            start + values.len(),
            self.len
        );
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.start.add(start), values.len());
    }
}
