//! Quantized elementwise addition (residual connections).

use ndarray::{ArrayD, IxDyn};

use rayon::prelude::*;

use super::tensor::check_qparams;
use super::{QTensor, TorchLayout};
use crate::error::{QuantError, Result};
use crate::kernels::elementwise::{self, AddParams};
use crate::kernels::KernelSet;
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
    onnxruntime: bool,
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
            onnxruntime: false,
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

    /// Uses ONNX Runtime's `QLinearAdd` arithmetic (MLAS, x86 AVX2 kernel) instead of
    /// PyTorch's: with `r_a = s_a / s_out`, `r_b = s_b / s_out` and
    /// `f = zp_out - fma(r_a, zp_a, r_b * zp_b)` (all `f32`),
    /// `y = clamp(round_half_even(fma(a, r_a, fma(b, r_b, f))), 0, 255)` (then the fused
    /// ReLU's clamp at `zp_out`). Checked against onnxruntime 1.32.0 on every `(a, b)` pair
    /// for 150 random scale / zero-point sets. The layout does not matter (elementwise,
    /// one rounding).
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAdd, QTensor};
    /// let add = QAdd::new(0.2, 0)?.with_onnxruntime_arithmetic();
    /// let a = QTensor::new(ArrayD::from_elem(vec![1, 2, 2, 2], 10u8), 0.1, 0)?;
    /// assert_eq!(add.forward(&a, &a)?.data()[[0, 1, 1, 1]], 10);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn with_onnxruntime_arithmetic(mut self) -> Self {
        self.onnxruntime = true;
        self
    }

    /// Whether ONNX Runtime's arithmetic is used.
    pub fn is_onnxruntime_arithmetic(&self) -> bool {
        self.onnxruntime
    }

    fn forward_onnxruntime(&self, a: &QTensor, b: &QTensor) -> Result<QTensor> {
        let (so, zo) = (self.out_scale, self.out_zp);
        let ra = a.scale() / so;
        let rb = b.scale() / so;
        let fixed = zo as f32 - ra.mul_add(a.zero_point() as f32, rb * b.zero_point() as f32);
        let lo = if self.relu { zo } else { 0 };
        let y = ndarray::Zip::from(a.data())
            .and(b.data())
            .map_collect(|&qa, &qb| {
                let v = (qa as f32).mul_add(ra, (qb as f32).mul_add(rb, fixed));
                // cvtps2dq: NaN / out of range give i32::MIN, which saturates to 0
                let r = if v.is_nan() || !(-2147483648.0f32..2147483648.0f32).contains(&v) {
                    i32::MIN
                } else {
                    v.round_ties_even() as i32
                };
                r.clamp(lo, 255) as u8
            });
        QTensor::new(y, so, zo)
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
        self.run(a, b, false)
    }

    /// As [`forward`](Self::forward) on two rank-4 tensors held `[n, h, w, c]` (the result
    /// too): the same values, element for element, without transposes. The rounding
    /// still follows [`with_layout`](Self::with_layout), PyTorch's memory format.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] when the shapes differ or are not rank 4.
    ///
    /// # Examples
    /// ```
    /// use ndarray::ArrayD;
    /// use ptq::nn::quantized::{QAdd, QTensor};
    /// let add = QAdd::new(0.2, 0)?;
    /// let a = QTensor::new(ArrayD::from_elem(vec![1, 2, 2, 3], 10u8), 0.1, 0)?; // NHWC
    /// assert_eq!(add.forward_nhwc(&a, &a)?.data()[[0, 1, 1, 2]], 10);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward_nhwc(&self, a: &QTensor, b: &QTensor) -> Result<QTensor> {
        super::tensor::dims4(a, NAME)?;
        self.run(a, b, true)
    }

    /// The add on data held in logical order (`held_nhwc` false) or NHWC.
    fn run(&self, a: &QTensor, b: &QTensor, held_nhwc: bool) -> Result<QTensor> {
        if a.data().shape() != b.data().shape() {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("both inputs of shape {:?}", a.data().shape()),
                actual: format!("shape {:?}", b.data().shape()),
            });
        }
        if self.onnxruntime {
            return self.forward_onnxruntime(a, b);
        }
        let shape = a.data().shape().to_vec();
        // PyTorch's memory order is NHWC for channels-last rank-4 tensors.
        let memory_nhwc = self.layout == TorchLayout::ChannelsLast && shape.len() == 4;
        let (xa, xb) = (a.data().as_slice(), b.data().as_slice());
        let (ca, cb);
        let (xa, xb) = match (xa, xb) {
            (Some(x), Some(y)) => (x, y),
            _ => {
                ca = a.to_vec();
                cb = b.to_vec();
                (&ca[..], &cb[..])
            }
        };
        let n = xa.len();
        let (sa, za, sb, zb) = (a.scale(), a.zero_point(), b.scale(), b.zero_point());
        let (so, zo) = (self.out_scale, self.out_zp);
        let p = AddParams::new(sa, za, sb, zb, so, zo, self.relu);
        // Both inputs share the layout they are held in, so the vectorized formula runs
        // straight on that order: no transposes.
        let mut y = vec![0u8; n];
        let ks = KernelSet::current();
        const PAR_CHUNK: usize = 1 << 16;
        if n >= 4 * PAR_CHUNK {
            y.par_chunks_mut(PAR_CHUNK)
                .zip(xa.par_chunks(PAR_CHUNK).zip(xb.par_chunks(PAR_CHUNK)))
                .for_each(|(o, (x1, x2))| elementwise::add_u8(ks, x1, x2, &p, o));
        } else {
            elementwise::add_u8(ks, xa, xb, &p, &mut y);
        }
        // PyTorch's scalar tail: the last `n % 64` elements in *memory* order (NHWC for
        // channels-last tensors), rounded as `quantize_val`; `at(i)` is where the memory
        // position `i` sits in the data as held.
        let (relu, nv) = (self.relu, n / 64 * 64);
        let (c, hw) = if shape.len() == 4 {
            if held_nhwc {
                (shape[3], shape[1] * shape[2])
            } else {
                (shape[1], shape[2] * shape[3])
            }
        } else {
            (1, 1)
        };
        let at = |i: usize| -> usize {
            if memory_nhwc == held_nhwc || shape.len() != 4 {
                i
            } else if memory_nhwc {
                // memory NHWC, held NCHW
                let (bi, pix, ch) = (i / (hw * c), (i / c) % hw, i % c);
                (bi * c + ch) * hw + pix
            } else {
                // memory NCHW, held NHWC
                let (bi, ch, pix) = (i / (hw * c), (i / hw) % c, i % hw);
                (bi * hw + pix) * c + ch
            }
        };
        for i in nv..n {
            let li = at(i);
            let (qa, qb) = (xa[li] as f32, xb[li] as f32);
            let mut v = (qa - za as f32) * sa + (qb - zb as f32) * sb;
            if relu {
                v = v.max(0.0);
            }
            y[li] = quantize_val(v, so, zo, 0, 255) as u8;
        }
        let data =
            ArrayD::from_shape_vec(IxDyn(&shape), y).map_err(|e| QuantError::ShapeMismatch {
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
