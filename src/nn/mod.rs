//! Neural-network layers.

pub mod quantized;
