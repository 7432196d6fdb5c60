//! Quantized elementwise multiplication (squeeze-excite gates) and multiplication or
//! addition by a scalar.

use ndarray::{ArrayD, IxDyn};

use super::elementwise::{scalar_requantize, vec_requantize, vector_mask_in};
use super::tensor::check_qparams;
use super::{QTensor, TorchLayout};
use crate::error::{QuantError, Result};

const NAME: &str = "QMul";

/// `torch.ops.quantized.mul` / `mul_relu` (what `QFunctional.mul` and `mul_relu` run after
/// conversion), with numpy broadcasting: `[N, C, H, W] * [N, C, 1, 1]` is the
/// squeeze-excite case.
///
/// PyTorch (`qmul_kernel` in `aten/src/ATen/native/quantized/cpu/kernels/
/// QuantizedOpKernels.cpp`) multiplies in integers and requantizes once:
/// ```text
/// multiplier = (a_scale * b_scale) * (1 / out_scale)          (f32)
/// c          = (qa - a_zp) * (qb - b_zp)                       (i32)
/// vector:  y = clamp(cvtps2dq(c * multiplier) + out_zp, 0, 255)
/// scalar:  y = clamp(out_zp + lrintf(c * multiplier), 0, 255)
/// relu:    y = max(y, out_zp)
/// ```
/// Both round half to even and agree unless `|c * multiplier| >= 2^31` (a multiplier above
/// about 33000), where the vector path overflows to `i32::MIN` and gives 0; which elements
/// take which path follows PyTorch's `TensorIterator` (see [`TorchLayout`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QMul {
    out_scale: f32,
    out_zp: i32,
    relu: bool,
    layout: TorchLayout,
}

/// The numpy-broadcast shape of `a` and `b`.
pub(crate) fn broadcast_shapes(a: &[usize], b: &[usize], layer: &str) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0usize; r];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        *o = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(QuantError::ShapeMismatch {
                context: layer.into(),
                expected: format!("shapes that broadcast together, like {a:?}"),
                actual: format!("{b:?} (dimension {i}: {da} vs {db})"),
            });
        };
    }
    Ok(out)
}

fn broadcast_view<'a>(t: &'a QTensor, shape: &[usize]) -> Result<ndarray::ArrayViewD<'a, u8>> {
    t.data()
        .broadcast(IxDyn(shape))
        .ok_or_else(|| QuantError::ShapeMismatch {
            context: NAME.into(),
            expected: format!("a shape that broadcasts to {shape:?}"),
            actual: format!("{:?}", t.data().shape()),
        })
}

impl QMul {
    /// A multiplication whose result is quantized with `out_scale` and `out_zp`, for inputs
    /// in PyTorch's channels-last layout (what fbgemm convolutions return).
    ///
    /// # Errors
    /// [`QuantError::InvalidScale`] / [`QuantError::InvalidZeroPoint`] for bad qparams.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QMul, QTensor};
    /// let mul = QMul::new(0.05, 0)?;
    /// let x = QTensor::new(ArrayD::from_elem(vec![1, 2, 3, 3], 20u8), 0.1, 0)?; // 2.0
    /// let gate = QTensor::new(ArrayD::from_elem(vec![1, 2, 1, 1], 128u8), 1.0 / 256.0, 0)?; // 0.5
    /// let y = mul.forward(&x, &gate)?;
    /// assert_eq!(y.data().shape(), &[1, 2, 3, 3]);
    /// assert_eq!(y.data()[[0, 1, 2, 2]], 20); // 1.0 / 0.05
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(out_scale: f32, out_zp: i32) -> Result<Self> {
        check_qparams(out_scale, out_zp, NAME)?;
        Ok(QMul {
            out_scale,
            out_zp,
            relu: false,
            layout: TorchLayout::ChannelsLast,
        })
    }

    /// Fuses a ReLU (`quantized::mul_relu`).
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }

    /// Sets the memory layout PyTorch holds the inputs in (rank-4 tensors only).
    pub fn with_layout(mut self, layout: TorchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }

    /// Whether a ReLU is fused into the multiplication.
    pub fn is_relu(&self) -> bool {
        self.relu
    }

    /// PyTorch's memory layout of the inputs.
    pub fn layout(&self) -> TorchLayout {
        self.layout
    }

    /// `requantize(dequantize(a) * dequantize(b))` with numpy broadcasting.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] naming both shapes when they do not broadcast.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QMul, QTensor};
    /// let a = QTensor::new(ArrayD::from_elem(vec![2, 3], 7u8), 0.1, 5)?;
    /// let b = QTensor::new(ArrayD::from_elem(vec![3, 2], 7u8), 0.1, 5)?;
    /// assert!(QMul::new(0.1, 0)?.forward(&a, &b).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward(&self, a: &QTensor, b: &QTensor) -> Result<QTensor> {
        self.run(a, b, false)
    }

    /// As [`forward`](Self::forward) on two rank-4 tensors held `[n, h, w, c]` (the gate of
    /// a squeeze-excite `[n, 1, 1, c]`), giving the result held `[n, h, w, c]`: the same
    /// values, element for element, without transposes. The rounding still follows
    /// [`with_layout`](Self::with_layout), PyTorch's memory format.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for tensors that are not rank 4 or do not broadcast.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QMul, QTensor};
    /// let x = QTensor::new(ArrayD::from_elem(vec![1, 3, 3, 2], 20u8), 0.1, 0)?; // NHWC
    /// let gate = QTensor::new(ArrayD::from_elem(vec![1, 1, 1, 2], 128u8), 1.0 / 256.0, 0)?;
    /// let y = QMul::new(0.05, 0)?.forward_nhwc(&x, &gate)?;
    /// assert_eq!((y.data().shape(), y.data()[[0, 2, 2, 1]]), (&[1, 3, 3, 2][..], 20));
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward_nhwc(&self, a: &QTensor, b: &QTensor) -> Result<QTensor> {
        super::tensor::dims4(a, NAME)?;
        super::tensor::dims4(b, NAME)?;
        self.run(a, b, true)
    }

    fn run(&self, a: &QTensor, b: &QTensor, held_nhwc: bool) -> Result<QTensor> {
        let (sa, sb) = (a.data().shape(), b.data().shape());
        let shape = broadcast_shapes(sa, sb, NAME)?;
        let logical = |s: &[usize]| -> Vec<usize> {
            if held_nhwc {
                vec![s[0], s[3], s[1], s[2]]
            } else {
                s.to_vec()
            }
        };
        let (la, lb, lo) = (logical(sa), logical(sb), logical(&shape));
        let mask = vector_mask_in(
            (&lo, self.layout),
            &[(&la, self.layout), (&lb, self.layout)],
            held_nhwc,
        );
        let (va, vb) = (broadcast_view(a, &shape)?, broadcast_view(b, &shape)?);
        let mult = a.scale() * b.scale() * (1.0f32 / self.out_scale);
        let (za, zb, zo) = (a.zero_point(), b.zero_point(), self.out_zp);
        let lo = if self.relu { zo.clamp(0, 255) as u8 } else { 0 };
        let y: Vec<u8> = va
            .iter()
            .zip(vb.iter())
            .zip(mask.iter())
            .map(|((&qa, &qb), &vector)| {
                let c = (qa as i32 - za) * (qb as i32 - zb);
                let q = if vector {
                    vec_requantize(c, mult, zo)
                } else {
                    scalar_requantize(c, mult, zo)
                };
                q.max(lo)
            })
            .collect();
        let data =
            ArrayD::from_shape_vec(IxDyn(&shape), y).map_err(|e| QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("{shape:?}"),
                actual: e.to_string(),
            })?;
        QTensor::new(data, self.out_scale, self.out_zp)
    }

    /// `torch.ops.quantized.mul(x, c)` (`QFunctional.mul_scalar`; `relu` for `mul_relu`):
    /// PyTorch changes the quantization parameters instead of the values
    /// (`_mul_scalar_out` in `aten/src/ATen/native/quantized/cpu/qmul.cpp`):
    /// `c > 0`: scale `c * s`, values kept (`max(q, zp)` with ReLU);
    /// `c == 0`: scale 1, zero point 0, values 0;
    /// `c < 0`: scale `|c| * s`, zero point `255 - zp`, values `255 - q` (then `max(., 255 - zp)` with ReLU).
    /// The new scale is computed in `f64` as PyTorch does, then stored as `f32`.
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] for a NaN or infinite `c`; [`QuantError::InvalidScale`]
    /// when `|c| * s` is not a normal `f32`.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QMul, QTensor};
    /// let x = QTensor::new(ArrayD::from_elem(vec![2], 30u8), 0.1, 10)?; // 2.0
    /// let y = QMul::mul_scalar(&x, -0.5, false)?;
    /// assert_eq!((y.zero_point(), y.data()[[0]]), (245, 225));
    /// assert!((y.dequantize()[[0]] + 1.0).abs() < 1e-6);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn mul_scalar(x: &QTensor, c: f64, relu: bool) -> Result<QTensor> {
        if !c.is_finite() {
            return Err(QuantError::NonFinite {
                context: "QMul::mul_scalar".into(),
                nan: c.is_nan() as usize,
                inf: c.is_infinite() as usize,
                total: 1,
            });
        }
        let (s, zp) = (x.scale(), x.zero_point());
        let zpu = zp.clamp(0, 255) as u8;
        if c > 0.0 {
            let scale = (c * s as f64) as f32;
            let data = if relu {
                x.data().mapv(|q| q.max(zpu))
            } else {
                x.data().clone()
            };
            QTensor::new(data, scale, zp).map_err(|e| e.in_context("QMul::mul_scalar"))
        } else if c == 0.0 {
            QTensor::new(x.data().mapv(|_| 0), 1.0, 0)
        } else {
            let scale = (c.abs() * s as f64) as f32;
            let zp2 = 255 - zp;
            let lo = if relu { zp2 as u8 } else { 0 };
            let data = x.data().mapv(|q| (255 - q).max(lo));
            QTensor::new(data, scale, zp2).map_err(|e| e.in_context("QMul::mul_scalar"))
        }
    }
}
