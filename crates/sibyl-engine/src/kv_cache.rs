use crate::EngineError;

/// Keys and values of one sequence, per layer, laid out `[position][kv_head][head_dim]`.
///
/// The cache holds the processed prefix. A forward over a tree appends one row per tree node
/// (in node order); [`KvCache::keep_path`] then keeps only the accepted path, compacted to
/// consecutive positions, and [`KvCache::truncate`] drops a suffix. Neither re-runs anything.
#[derive(Debug, Clone)]
pub struct KvCache {
    row: usize,
    len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    pub(crate) fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self {
            row: kv_heads * head_dim,
            len: 0,
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the first `len` positions (all of them if there are fewer): what processing
    /// those tokens again would put in a new cache.
    pub fn prefix(&self, len: usize) -> KvCache {
        let mut copy = KvCache::new(self.keys.len(), self.row, 1);
        copy.copy_from(self, len);
        copy
    }

    /// Extends this cache to `len` positions (at most `other`'s) with `other`'s positions
    /// from this one's length on, and says whether it grew. Meant for a cache of the same
    /// model whose positions so far hold the same tokens as `other`'s: the result is then
    /// what processing the tokens would give. A cache of another shape is left as it is.
    pub fn copy_from(&mut self, other: &KvCache, len: usize) -> bool {
        let len = len.min(other.len);
        if len <= self.len || other.row != self.row || other.keys.len() != self.keys.len() {
            return false;
        }
        let span = self.len * self.row..len * self.row;
        for (mine, theirs) in self
            .keys
            .iter_mut()
            .zip(&other.keys)
            .chain(self.values.iter_mut().zip(&other.values))
        {
            mine.extend_from_slice(&theirs[span.clone()]);
        }
        self.len = len;
        true
    }

    /// Gives back memory beyond the cached positions (rows of trees no longer kept).
    pub fn shrink_to_fit(&mut self) {
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            layer.shrink_to_fit();
        }
    }

    /// Drops every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            layer.truncate(len * self.row);
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
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            for (slot, &node) in path.iter().enumerate() {
                if slot != node {
                    let from = (prefix_len + node) * row;
                    layer.copy_within(from..from + row, (prefix_len + slot) * row);
                }
            }
            layer.truncate((prefix_len + path.len()) * row);
        }
        self.len = prefix_len + path.len();
        Ok(())
    }

    pub(crate) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        self.keys[layer].extend_from_slice(keys);
        self.values[layer].extend_from_slice(values);
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }

    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Bytes one cached position takes (keys and values of every layer).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.keys.len() * self.row * std::mem::size_of::<f32>()
    }

    /// Bytes held by keys and values.
    pub fn size_in_bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|l| l.len() * 4)
            .sum()
    }
}
