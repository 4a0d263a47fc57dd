use crate::tensor::TensorKv;
use crate::EngineError;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Keys and values of one sequence, per layer, laid out `[position][kv_head][head_dim]`.
///
/// The CPU engine keeps them in half precision, as llama.cpp does by default: half the
/// memory of `f32`, and half the bytes attention reads per position. Every forward pass
/// rounds a new row the same way before any attention reads it, so a position's keys and
/// values are the same whether it was computed alone, in a tree, in a batch or copied from
/// another cache.
///
/// The cache holds the processed prefix. A forward over a tree appends one row per tree node
/// (in node order); [`KvCache::keep_path`] then keeps only the accepted path, compacted to
/// consecutive positions, and [`KvCache::truncate`] drops a suffix. Neither re-runs anything.
///
/// A model on a CUDA device keeps its caches there ([`crate::Device`]); the methods are the
/// same, and a cache only ever goes to the model that made it.
#[derive(Debug)]
pub struct KvCache {
    row: usize,
    len: usize,
    storage: Storage,
}

#[derive(Debug)]
enum Storage {
    Host {
        keys: Vec<Vec<f16>>,
        values: Vec<Vec<f16>>,
    },
    Tensor(TensorKv),
}

impl KvCache {
    pub(crate) fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            row: kv_heads * head_dim,
            len: 0,
            storage: Storage::Host {
                keys: vec![Vec::new(); layers],
                values: vec![Vec::new(); layers],
            },
        }
    }

    pub(crate) fn on_device(kv: TensorKv, row: usize) -> Self {
        Self {
            row,
            len: 0,
            storage: Storage::Tensor(kv),
        }
    }

    pub(crate) fn is_on_device(&self) -> bool {
        matches!(self.storage, Storage::Tensor(_))
    }

    pub(crate) fn tensor_storage(&mut self) -> Option<&mut TensorKv> {
        match &mut self.storage {
            Storage::Tensor(kv) => Some(kv),
            Storage::Host { .. } => None,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Makes room for `len` positions in host memory at once, so that filling a cache
    /// piece by piece (a long prefix copied over several steps) moves none of it again.
    pub fn reserve(&mut self, len: usize) {
        if let Storage::Host { keys, values } = &mut self.storage {
            for layer in keys.iter_mut().chain(values.iter_mut()) {
                layer.reserve((len * self.row).saturating_sub(layer.len()));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the first `len` positions (all of them if there are fewer): what processing
    /// those tokens again would put in a new cache. (A device cache that the device has no
    /// memory to copy gives an empty cache: [`KvCache::len`] says what was copied.)
    pub fn prefix(&self, len: usize) -> KvCache {
        let len = len.min(self.len);
        match &self.storage {
            Storage::Host { keys, .. } => {
                let mut copy = KvCache::new(keys.len(), self.row, 1);
                copy.copy_from(self, len);
                copy
            }
            Storage::Tensor(kv) => {
                let (copy, len) = match kv.copy(len) {
                    Ok(copy) => (copy, len),
                    Err(error) => {
                        tracing::warn!(%error, "no device memory to copy a KV cache");
                        (kv.copy(0).expect("an empty copy allocates nothing"), 0)
                    }
                };
                KvCache {
                    row: self.row,
                    len,
                    storage: Storage::Tensor(copy),
                }
            }
        }
    }

    /// Extends this cache to `len` positions (at most `other`'s) with `other`'s positions
    /// from this one's length on, and says whether it grew. Meant for a cache of the same
    /// model whose positions so far hold the same tokens as `other`'s: the result is then
    /// what processing the tokens would give. A cache of another shape is left as it is.
    pub fn copy_from(&mut self, other: &KvCache, len: usize) -> bool {
        let len = len.min(other.len);
        if len <= self.len || other.row != self.row {
            return false;
        }
        match (&mut self.storage, &other.storage) {
            (
                Storage::Host { keys, values },
                Storage::Host {
                    keys: other_keys,
                    values: other_values,
                },
            ) if keys.len() == other_keys.len() => {
                let span = self.len * self.row..len * self.row;
                for (mine, theirs) in keys
                    .iter_mut()
                    .zip(other_keys)
                    .chain(values.iter_mut().zip(other_values))
                {
                    mine.extend_from_slice(&theirs[span.clone()]);
                }
            }
            (Storage::Tensor(mine), Storage::Tensor(theirs)) if mine.same_shape(theirs) => {
                if let Err(error) = mine.copy_from(theirs, self.len, len) {
                    // The positions are computed afresh instead.
                    tracing::warn!(%error, "no device memory to copy a KV cache");
                    return false;
                }
            }
            _ => return false,
        }
        self.len = len;
        true
    }

    /// Gives back memory beyond the cached positions (rows of trees no longer kept).
    pub fn shrink_to_fit(&mut self) {
        match &mut self.storage {
            Storage::Host { keys, values } => {
                for layer in keys.iter_mut().chain(values.iter_mut()) {
                    layer.shrink_to_fit();
                }
            }
            Storage::Tensor(kv) => {
                // Without memory for the smaller copy, the larger one stays.
                if let Err(error) = kv.shrink(self.len) {
                    tracing::warn!(%error, "could not shrink a device KV cache");
                }
            }
        }
    }

    /// Drops every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if let Storage::Host { keys, values } = &mut self.storage {
            for layer in keys.iter_mut().chain(values.iter_mut()) {
                layer.truncate(len * self.row);
            }
        }
        self.len = len;
    }

    /// After a forward of `tree_len` nodes on a prefix of `prefix_len`, keeps the nodes of
    /// `path` (ascending node indices, usually the root and the accepted drafts) at
    /// positions `prefix_len..` and drops the rest of the tree.
    pub fn keep_path(
        &mut self,
        prefix_len: usize,
        tree_len: usize,
        path: &[usize],
    ) -> Result<(), EngineError> {
        let ascending = path.windows(2).all(|w| w[0] < w[1]);
        if prefix_len + tree_len != self.len
            || !ascending
            || path.last().is_some_and(|&last| last >= tree_len)
        {
            return Err(EngineError::InvalidPath {
                path: path.to_vec(),
                len: tree_len,
            });
        }
        let row = self.row;
        match &mut self.storage {
            Storage::Host { keys, values } => {
                for layer in keys.iter_mut().chain(values.iter_mut()) {
                    for (slot, &node) in path.iter().enumerate() {
                        if slot != node {
                            let from = (prefix_len + node) * row;
                            layer.copy_within(from..from + row, (prefix_len + slot) * row);
                        }
                    }
                    layer.truncate((prefix_len + path.len()) * row);
                }
            }
            Storage::Tensor(kv) => kv
                .keep_path(prefix_len, path)
                .map_err(EngineError::Device)?,
        }
        self.len = prefix_len + path.len();
        Ok(())
    }

    /// Appends rows to a host cache's layer (the CPU engine's forward pass), rounded to
    /// half precision (to nearest, ties to even; beyond its largest finite value, that
    /// value, so that a large key never becomes an infinity).
    pub(crate) fn append(&mut self, layer: usize, new_keys: &[f32], new_values: &[f32]) {
        if let Storage::Host { keys, values } = &mut self.storage {
            for (cache, new) in [
                (&mut keys[layer], new_keys),
                (&mut values[layer], new_values),
            ] {
                let start = cache.len();
                cache.resize(start + new.len(), f16::ZERO);
                cache[start..].convert_from_f32_slice(new);
                for (x, &from) in cache[start..].iter_mut().zip(new) {
                    if x.is_infinite() && from.is_finite() {
                        *x = if from > 0.0 { f16::MAX } else { f16::MIN };
                    }
                }
            }
        }
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    /// A host cache's layer (the CPU engine's forward pass); empty for a device cache.
    pub(crate) fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        match &self.storage {
            Storage::Host { keys, values } => (&keys[layer], &values[layer]),
            Storage::Tensor(_) => (&[], &[]),
        }
    }

    fn layers(&self) -> usize {
        match &self.storage {
            Storage::Host { keys, .. } => keys.len(),
            Storage::Tensor(kv) => kv.layers(),
        }
    }

    /// Bytes one cached position takes (keys and values of every layer): half-precision
    /// values on the host, `f32` on a device.
    pub fn bytes_per_token(&self) -> usize {
        let value = match self.storage {
            Storage::Host { .. } => std::mem::size_of::<f16>(),
            Storage::Tensor(_) => std::mem::size_of::<f32>(),
        };
        2 * self.layers() * self.row * value
    }

    /// Bytes of the keys and values of the cached positions (on the device, for a device
    /// cache). Room reserved beyond them is given back by [`KvCache::shrink_to_fit`].
    pub fn size_in_bytes(&self) -> usize {
        match &self.storage {
            Storage::Host { keys, values } => keys
                .iter()
                .chain(values)
                .map(|l| l.len() * std::mem::size_of::<f16>())
                .sum(),
            Storage::Tensor(_) => self.len * self.bytes_per_token(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host cache rounds what it is given to half precision to nearest, keeps infinities
    /// and NaN, and takes the largest finite value for finite values beyond it.
    #[test]
    fn appended_rows_are_rounded_to_half_precision() {
        let mut cache = KvCache::new(1, 1, 4);
        let keys = [1.0, 1e-3, 1e6, -70_000.0];
        let values = [0.1, f32::INFINITY, f32::NAN, -0.0];
        cache.append(0, &keys, &values);
        cache.set_len(1);
        let (k, v) = cache.layer(0);
        let nearest = f16::from_f32(1e-3);
        assert_eq!(k, [f16::ONE, nearest, f16::MAX, f16::MIN]);
        assert!((nearest.to_f32() - 1e-3).abs() <= 1e-3 / 2048.0);
        assert_eq!(v[0], f16::from_f32(0.1));
        assert_eq!(v[1], f16::INFINITY);
        assert!(v[2].is_nan());
        assert_eq!(v[3].to_bits(), f16::NEG_ZERO.to_bits());
        assert_eq!(cache.size_in_bytes(), 16);
        assert_eq!(cache.bytes_per_token(), 16);
    }
}
