//! A sequence's keys and values on a candle device.

use candle_core::{DType, Device, Tensor};

/// One sequence's keys and values on a device: per layer `[capacity, kv_heads * head_dim]`
/// tensors of `f32`, of which the owning [`crate::KvCache`]'s length is in use.
pub(crate) struct TensorKv {
    device: Device,
    row: usize,
    layers: usize,
    capacity: usize,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl std::fmt::Debug for TensorKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorKv")
            .field("device", &self.device)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl TensorKv {
    /// A cache with no positions and nothing allocated.
    pub(super) fn empty(device: &Device, row: usize, layers: usize) -> Self {
        Self {
            device: device.clone(),
            row,
            layers,
            capacity: 0,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    pub(super) fn device(&self) -> &Device {
        &self.device
    }

    /// Makes room for `len` positions, keeping what is held. Grows by half again at least,
    /// so that appends are amortized.
    pub(super) fn reserve(&mut self, len: usize) -> Result<(), candle_core::Error> {
        if len <= self.capacity {
            return Ok(());
        }
        let capacity = len.max(self.capacity + self.capacity / 2).max(16);
        self.resize(capacity, self.capacity)
    }

    /// New tensors of `capacity` positions holding the first `keep` positions.
    fn resize(&mut self, capacity: usize, keep: usize) -> Result<(), candle_core::Error> {
        let grow = |old: Option<&Tensor>| -> Result<Tensor, candle_core::Error> {
            let new = Tensor::zeros((capacity, self.row), DType::F32, &self.device)?;
            if let Some(old) = old.filter(|_| keep > 0) {
                new.slice_set(&old.narrow(0, 0, keep)?, 0, 0)?;
            }
            Ok(new)
        };
        let keys = (0..self.layers)
            .map(|l| grow(self.keys.get(l)))
            .collect::<Result<Vec<_>, _>>()?;
        let values = (0..self.layers)
            .map(|l| grow(self.values.get(l)))
            .collect::<Result<Vec<_>, _>>()?;
        self.keys = keys;
        self.values = values;
        self.capacity = capacity;
        Ok(())
    }

    pub(super) fn write(
        &mut self,
        layer: usize,
        at: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(), candle_core::Error> {
        self.keys[layer].slice_set(&keys.contiguous()?, 0, at)?;
        self.values[layer].slice_set(&values.contiguous()?, 0, at)
    }

    pub(super) fn layer(
        &self,
        layer: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor), candle_core::Error> {
        Ok((
            self.keys[layer].narrow(0, 0, len)?,
            self.values[layer].narrow(0, 0, len)?,
        ))
    }

    /// A copy holding the first `len` positions, with room for exactly those (none, and
    /// nothing allocated, for 0).
    pub(crate) fn copy(&self, len: usize) -> Result<Self, candle_core::Error> {
        let mut copy = Self::empty(&self.device, self.row, self.layers);
        if len > 0 {
            copy.resize(len, 0)?;
            copy.copy_from(self, 0, len)?;
        }
        Ok(copy)
    }

    /// Writes positions `from..to` of `other` at the same positions here.
    pub(crate) fn copy_from(
        &mut self,
        other: &TensorKv,
        from: usize,
        to: usize,
    ) -> Result<(), candle_core::Error> {
        if to <= from {
            return Ok(());
        }
        self.reserve(to)?;
        for l in 0..self.layers {
            let span = |t: &Tensor| t.narrow(0, from, to - from);
            self.keys[l].slice_set(&span(&other.keys[l])?, 0, from)?;
            self.values[l].slice_set(&span(&other.values[l])?, 0, from)?;
        }
        Ok(())
    }

    /// Moves the rows `prefix_len + path[i]` to `prefix_len + i`.
    pub(crate) fn keep_path(
        &mut self,
        prefix_len: usize,
        path: &[usize],
    ) -> Result<(), candle_core::Error> {
        if path.iter().enumerate().all(|(slot, &node)| slot == node) {
            return Ok(());
        }
        let rows: Vec<u32> = path.iter().map(|&p| (prefix_len + p) as u32).collect();
        let index = Tensor::from_vec(rows, path.len(), &self.device)?;
        for layer in self.keys.iter().chain(&self.values) {
            let kept = layer.index_select(&index, 0)?;
            layer.slice_set(&kept, 0, prefix_len)?;
        }
        Ok(())
    }

    /// Gives back room beyond `len` positions.
    pub(crate) fn shrink(&mut self, len: usize) -> Result<(), candle_core::Error> {
        if len == 0 {
            *self = self.copy(0)?;
        } else if len < self.capacity {
            self.resize(len, len)?;
        }
        Ok(())
    }

    pub(crate) fn layers(&self) -> usize {
        self.layers
    }

    pub(crate) fn same_shape(&self, other: &TensorKv) -> bool {
        self.row == other.row
            && self.layers == other.layers
            && self.device.same_device(&other.device)
    }
}
