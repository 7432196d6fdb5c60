//! Quantized layers.
