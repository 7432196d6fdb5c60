//! Loading weights into a graph by node name.

use std::collections::BTreeMap;

use ndarray::ArrayD;

use super::Graph;
use crate::error::Result;
use crate::io::LoadReport;

impl Graph {
    /// Copies a `state_dict` into the graph's parameters by node name; see
    /// [`io::load_state_dict_graph`](crate::io::load_state_dict_graph).
    ///
    /// # Errors
    /// [`QuantError::StateDictMismatch`](crate::QuantError::StateDictMismatch) listing every
    /// missing, unexpected (when `strict`) and mis-shaped key.
    pub fn load_state_dict(
        &mut self,
        state_dict: &BTreeMap<String, ArrayD<f32>>,
        strict: bool,
    ) -> Result<LoadReport> {
        crate::io::load_state_dict_graph(self, state_dict, strict)
    }
}
