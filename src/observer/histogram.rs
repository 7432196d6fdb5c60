//! TEMPORARY placeholder, being replaced by the real HistogramObserver.
use super::Observer;
use crate::error::Result;
use crate::qparams::{QParams, RangeConfig};
use ndarray::ArrayViewD;
use std::any::Any;

/// Placeholder.
#[derive(Debug, Clone)]
pub struct HistogramObserver {
    cfg: RangeConfig,
    bins: usize,
}
impl HistogramObserver {
    /// Placeholder.
    pub fn new(cfg: RangeConfig, bins: usize) -> Result<Self> {
        Ok(Self { cfg, bins })
    }
}
impl Observer for HistogramObserver {
    fn kind(&self) -> &'static str {
        "HistogramObserver"
    }
    fn observe(&mut self, _x: ArrayViewD<'_, f32>) -> Result<()> {
        unimplemented!()
    }
    fn qparams(&self) -> Result<QParams> {
        unimplemented!()
    }
    fn reset(&mut self) {}
    fn is_calibrated(&self) -> bool {
        false
    }
    fn observed_range(&self) -> Option<(f32, f32)> {
        None
    }
    fn merge(&mut self, _other: &dyn Observer) -> Result<()> {
        unimplemented!()
    }
    fn fresh(&self) -> Box<dyn Observer> {
        Box::new(Self {
            cfg: self.cfg,
            bins: self.bins,
        })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
