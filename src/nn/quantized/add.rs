//! Quantized elementwise addition (residual connections).

use ndarray::{ArrayD, IxDyn};

use super::tensor::{check_qparams, nhwc_to_nchw};
use super::{QTensor, TorchLayout};
use crate::error::{QuantError, Result};
use crate::kernels::requant::cvt_round;
use crate::qparams::quantize_val;

/// `torch.ops.quantized.add` (and `add_relu`, as used by `FloatFunctional.add` after
/// conversion): `requant(dequant(a) + dequant(b))` with its own output qparams.
///
/// PyTorch runs this through a vectorized kernel over the elements in memory order, in
/// blocks of 64, and a scalar loop over the remaining `numel % 64`; the two round
/// differently, so the memory order ([`TorchLayout`]) matters:
/// * blocks of 64: `d = fma(scale, q, -(zp * scale))`, `y = cvtps2dq((da + db) * (1 / s_out)) + zp_out`;
/// * the tail: `d = (q - zp) * scale`, `y = quantize_val(da + db)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QAdd {
    out_scale: f32,
    out_zp: i32,
    relu: bool,
    layout: TorchLayout,
}

const NAME: &str = "QAdd";

impl QAdd {
    /// An addition whose result is quantized with `out_scale` and `out_zp`, for inputs in
    /// PyTorch's channels-last layout (what fbgemm convolutions return).
    ///
    /// # Errors
    /// [`QuantError::InvalidScale`] / [`QuantError::InvalidZeroPoint`] for bad qparams.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAdd, QTensor};
    /// let add = QAdd::new(0.2, 0)?;
    /// let a = QTensor::new(ArrayD::from_elem(vec![1, 2, 2, 2], 10u8), 0.1, 0)?;
    /// assert_eq!(add.forward(&a, &a)?.data()[[0, 1, 1, 1]], 10);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(out_scale: f32, out_zp: i32) -> Result<Self> {
        check_qparams(out_scale, out_zp, NAME)?;
        Ok(QAdd {
            out_scale,
            out_zp,
            relu: false,
            layout: TorchLayout::ChannelsLast,
        })
    }

    /// Fuses a ReLU (`quantized::add_relu`).
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }

    /// Sets the memory layout PyTorch holds the inputs in (rank-4 tensors only).
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Adds two tensors of the same shape.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when the shapes differ.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAdd, QTensor, TorchLayout};
    /// let add = QAdd::new(0.1, 10)?.with_relu().with_layout(TorchLayout::Contiguous);
    /// let a = QTensor::new(ArrayD::from_elem(vec![2, 3], 0u8), 0.1, 5)?; // -0.5
    /// let b = QTensor::new(ArrayD::from_elem(vec![2, 3], 7u8), 0.1, 5)?; // 0.2
    /// assert_eq!(add.forward(&a, &b)?.data()[[1, 2]], 10); // relu(-0.3) = 0
    /// assert!(add.forward(&a, &QTensor::new(ArrayD::zeros(vec![3, 2]), 0.1, 0)?).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward(&self, a: &QTensor, b: &QTensor) -> Result<QTensor> {
        if a.data().shape() != b.data().shape() {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("both inputs of shape {:?}", a.data().shape()),
                actual: format!("shape {:?}", b.data().shape()),
            });
        }
        let nhwc = self.layout == TorchLayout::ChannelsLast && a.data().ndim() == 4;
        let order = |t: &QTensor| -> Vec<u8> {
            if nhwc {
                t.to_nhwc()
            } else {
                t.to_vec()
            }
        };
        let (xa, xb) = (order(a), order(b));
        let n = xa.len();
        let nv = n / 64 * 64;
        let (sa, za, sb, zb) = (a.scale(), a.zero_point(), b.scale(), b.zero_point());
        let (so, zo) = (self.out_scale, self.out_zp);
        let inv = 1.0f32 / so;
        let pa = sa * -(za as f32);
        let pb = sb * -(zb as f32);
        let relu = self.relu;
        let mut y = vec![0u8; n];
        for i in 0..n {
            let (qa, qb) = (xa[i] as f32, xb[i] as f32);
            y[i] = if i < nv {
                let mut c = sa.mul_add(qa, pa) + sb.mul_add(qb, pb);
                if relu {
                    c = c.max(0.0);
                }
                // The vectorized quantizer clips at the largest f32 below 2^31 first.
                let r = cvt_round((c * inv).min(2147483520.0)) as i64 + zo as i64;
                r.clamp(0, 255) as u8
            } else {
                let mut c = (qa - za as f32) * sa + (qb - zb as f32) * sb;
                if relu {
                    c = c.max(0.0);
                }
                quantize_val(c, so, zo, 0, 255) as u8
            };
        }
        let shape = a.data().shape().to_vec();
        let data = if nhwc {
            let (bn, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
            ArrayD::from_shape_vec(IxDyn(&shape), nhwc_to_nchw(&y, bn, c, h * w))
        } else {
            ArrayD::from_shape_vec(IxDyn(&shape), y)
        }
        .map_err(|e| QuantError::ShapeMismatch {
            context: NAME.into(),
            expected: format!("{shape:?}"),
            actual: e.to_string(),
        })?;
        QTensor::new(data, so, zo)
    }
}

impl QAdd {
    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }
    /// Whether a ReLU is fused into the add.
    pub fn is_relu(&self) -> bool {
        self.relu
    }
    /// PyTorch's memory layout of the first input, which decides the rounding.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }
}
