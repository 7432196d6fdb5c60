//! The quantized activation tensor.

use ndarray::ArrayD;

use crate::error::{QuantError, Result};

/// The memory format PyTorch would hold a tensor in, for the few ops whose rounding depends
/// on it (average pooling and elementwise add run different kernels on NCHW-contiguous and
/// channels-last tensors).
///
/// fbgemm's quantized convolutions return channels-last tensors, so activations after a
/// convolution are [`TorchLayout::ChannelsLast`]; a tensor straight from `quantize_per_tensor`
/// of an NCHW float tensor is [`TorchLayout::Contiguous`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TorchLayout {
    /// NHWC in memory (PyTorch's `channels_last`), the layout fbgemm convolutions return.
    #[default]
    ChannelsLast,
    /// NCHW in memory (PyTorch's default `contiguous`).
    Contiguous,
}

/// A per-tensor affine `quint8` tensor: `u8` values in PyTorch's logical layout (NCHW for
/// images), a scale and a zero point.
#[derive(Debug, Clone, PartialEq)]
pub struct QTensor {
    data: ArrayD<u8>,
    scale: f32,
    zero_point: i32,
}

impl QTensor {
    /// Wraps quantized values with their parameters.
    ///
    /// # Errors
    /// [`QuantError::InvalidScale`] for a scale that is not finite, positive and normal;
    /// [`QuantError::InvalidZeroPoint`] for a zero point outside `0..=255`.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::QTensor;
    /// let t = QTensor::new(ArrayD::from_elem(vec![2, 3], 7u8), 0.1, 7)?;
    /// assert_eq!(t.dequantize()[[0, 0]], 0.0);
    /// assert!(QTensor::new(ArrayD::from_elem(vec![1], 0u8), 0.0, 0).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(data: ArrayD<u8>, scale: f32, zero_point: i32) -> Result<Self> {
        check_qparams(scale, zero_point, "QTensor")?;
        Ok(QTensor {
            data,
            scale,
            zero_point,
        })
    }

    /// Quantizes a float tensor with PyTorch's `quantize_per_tensor` arithmetic
    /// (`quint8`, range `0..=255`).
    ///
    /// # Errors
    /// As [`QTensor::new`], and [`QuantError::NonFinite`] for NaN or infinite input.
    ///
    /// # Examples
    /// ```
    /// use ndarray::array;
    /// use ptq::nn::quantized::QTensor;
    /// let t = QTensor::from_f32(&array![0.0f32, 0.25, 1e9].into_dyn(), 0.1, 10)?;
    /// assert_eq!(t.data().as_slice().unwrap(), &[10, 12, 255]);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn from_f32(x: &ArrayD<f32>, scale: f32, zero_point: i32) -> Result<Self> {
        check_qparams(scale, zero_point, "QTensor")?;
        if let Some(src) = x.as_slice() {
            // One pass: the kernel quantizes and checks finiteness together.
            let ks = crate::kernels::KernelSet::current();
            let q =
                crate::kernels::elementwise::quantize_u8_to_vec(ks, src, scale, zero_point as u8);
            if let Some(Ok(data)) = q.map(|q| ArrayD::from_shape_vec(x.raw_dim(), q)) {
                return Ok(QTensor {
                    data,
                    scale,
                    zero_point,
                });
            }
        }
        crate::qparams::check_finite(x, "QTensor")?;
        Ok(QTensor {
            data: crate::qparams::quantize_to_u8(x, scale, zero_point),
            scale,
            zero_point,
        })
    }

    /// The quantized values.
    pub fn data(&self) -> &ArrayD<u8> {
        &self.data
    }

    /// Consumes the tensor and returns its values.
    pub fn into_data(self) -> ArrayD<u8> {
        self.data
    }

    /// The scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The zero point.
    pub fn zero_point(&self) -> i32 {
        self.zero_point
    }

    /// `(q - zero_point) * scale`, as PyTorch's `dequantize`.
    pub fn dequantize(&self) -> ArrayD<f32> {
        if let Some(src) = self.data.as_slice() {
            let ks = crate::kernels::KernelSet::current();
            let zp = self.zero_point as u8;
            let f = crate::kernels::elementwise::dequantize_u8_to_vec(ks, src, self.scale, zp);
            if let Ok(y) = ArrayD::from_shape_vec(self.data.raw_dim(), f) {
                return y;
            }
        }
        self.data
            .mapv(|q| crate::qparams::dequantize_val(q as i32, self.scale, self.zero_point))
    }

    /// The values as a contiguous row-major vector.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        match self.data.as_slice() {
            Some(s) => s.to_vec(),
            None => self.data.as_standard_layout().iter().copied().collect(),
        }
    }

    /// The values of a rank-4 NCHW tensor in NHWC order.
    pub(crate) fn to_nhwc(&self) -> Vec<u8> {
        let s = self.data.shape();
        let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
        match self.data.as_slice() {
            Some(src) => nchw_to_nhwc(src, b, c, hw),
            None => nchw_to_nhwc(&self.to_vec(), b, c, hw),
        }
    }
}

/// Checks an output (or activation) scale and zero point.
pub(crate) fn check_qparams(scale: f32, zero_point: i32, layer: &str) -> Result<()> {
    if !(scale.is_normal() && scale > 0.0) {
        return Err(QuantError::InvalidScale {
            context: layer.into(),
            channel: 0,
            value: scale,
        });
    }
    if !(0..=255).contains(&zero_point) {
        return Err(QuantError::InvalidZeroPoint {
            context: layer.into(),
            channel: 0,
            zero_point: zero_point as i64,
            quant_min: 0,
            quant_max: 255,
        });
    }
    Ok(())
}

/// Refuses an empty spatial size (PyTorch: "input dimensions must be non-zero").
pub(crate) fn check_nonempty(h: usize, w: usize, shape: &[usize], layer: &str) -> Result<()> {
    if h == 0 || w == 0 {
        return Err(QuantError::ShapeMismatch {
            context: layer.into(),
            expected: "a non-empty spatial size".into(),
            actual: format!("shape {shape:?}"),
        });
    }
    Ok(())
}

/// Checks that `t` has rank 4 and returns its dimensions.
pub(crate) fn dims4(t: &QTensor, layer: &str) -> Result<(usize, usize, usize, usize)> {
    match *t.data.shape() {
        [b, c, h, w] => Ok((b, c, h, w)),
        ref s => Err(QuantError::ShapeMismatch {
            context: layer.into(),
            expected: "a rank-4 NCHW tensor".into(),
            actual: format!("shape {s:?}"),
        }),
    }
}

use rayon::prelude::*;

use crate::kernels::{transpose_u8, KernelSet};

/// Transposes each of the `b` planes of `rows x cols` bytes; planes in parallel when
/// the tensor is large.
fn transpose_planes(src: &[u8], b: usize, rows: usize, cols: usize) -> Vec<u8> {
    let mut dst = vec![0u8; src.len()];
    let plane = rows * cols;
    if b == 0 || plane == 0 {
        return dst;
    }
    let ks = KernelSet::current();
    let one = |(d, s): (&mut [u8], &[u8])| transpose_u8(ks, s, rows, cols, d);
    if b > 1 && src.len() >= 1 << 18 {
        dst.par_chunks_mut(plane)
            .zip(src.par_chunks(plane))
            .for_each(one);
    } else {
        dst.chunks_mut(plane).zip(src.chunks(plane)).for_each(one);
    }
    dst
}

/// `[b][c][hw]` to `[b][hw][c]`.
pub(crate) fn nchw_to_nhwc(src: &[u8], b: usize, c: usize, hw: usize) -> Vec<u8> {
    transpose_planes(src, b, c, hw)
}

/// `[b][hw][c]` to `[b][c][hw]`.
pub(crate) fn nhwc_to_nchw(src: &[u8], b: usize, c: usize, hw: usize) -> Vec<u8> {
    transpose_planes(src, b, hw, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_round_trip_and_match_naive() {
        for &(b, c, hw) in &[
            (1, 1, 1),
            (2, 3, 5),
            (1, 8, 8),
            (2, 16, 24),
            (1, 13, 70),
            (3, 64, 9),
        ] {
            let src: Vec<u8> = (0..b * c * hw).map(|i| (i * 37 % 251) as u8).collect();
            for ks in KernelSet::all_available() {
                let t = ks.install(|| nchw_to_nhwc(&src, b, c, hw));
                for bi in 0..b {
                    for ci in 0..c {
                        for p in 0..hw {
                            assert_eq!(t[(bi * hw + p) * c + ci], src[(bi * c + ci) * hw + p]);
                        }
                    }
                }
                assert_eq!(ks.install(|| nhwc_to_nchw(&t, b, c, hw)), src);
            }
        }
    }
}
