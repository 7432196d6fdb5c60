//! Quantized 2-D convolutions (NCHW in and out, NHWC inside, as fbgemm).

use ndarray::{ArrayD, ArrayView1, ArrayView4, IxDyn};

use super::tensor::{check_qparams, dims4, nhwc_to_nchw};
use super::{
    check_accumulator, check_bias, quantize_weights, quantized_weights, QTensor, QWeights,
};
use crate::error::{QuantError, Result};
use crate::kernels::conv::{self as kconv, ConvGeom};
use crate::kernels::requant::RequantCache;
use crate::kernels::{BiasMode, KernelSet, OutputQuant, PackedWeights, RequantParams};
use crate::qparams::QParams;

/// Stride, padding, dilation and groups of a 2-D convolution (PyTorch's defaults: 1, 0,
/// 1, 1). Padding is filled with the input zero point (a quantized zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Stride (height, width), at least 1.
    pub stride: (usize, usize),
    /// Padding (height, width).
    pub padding: (usize, usize),
    /// Dilation (height, width), at least 1.
    pub dilation: (usize, usize),
    /// Groups; divides both channel counts. `groups == in_channels` is depthwise.
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

#[derive(Debug, Clone)]
enum ConvKind {
    /// im2col (on the fly, per row block) + packed GEMM, one packed matrix per group; `k`
    /// ordered (ky, kx, c).
    Gemm(Vec<PackedWeights>),
    /// One input channel per group and several groups (true depthwise, any channel
    /// multiplier): direct loops; `w - w_zp` as `[tap][out_channel]`.
    Depthwise(crate::kernels::depthwise::DwWeights),
}

/// `torch.ao.nn.quantized.Conv2d` on fbgemm.
#[derive(Debug, Clone)]
pub struct QConv2d {
    c_in: usize,
    c_out: usize,
    kernel: (usize, usize),
    params: Conv2dParams,
    kind: ConvKind,
    w_scales: Vec<f32>,
    per_channel: bool,
    bias: Option<Vec<f32>>,
    out_scale: f32,
    out_zp: i32,
    relu: bool,
    rq_cache: RequantCache,
    bias_mode: BiasMode,
}

const NAME: &str = "QConv2d";

impl QConv2d {
    /// Quantizes the float `[out, in / groups, kh, kw]` weight with `w_qparams` (`qint8`,
    /// per-tensor or per-channel on axis 0) and packs it.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for zero strides, dilations, groups or kernel
    /// sizes, channel counts not divisible by `groups`, non-`qint8` weights;
    /// [`QuantError::ShapeMismatch`] for a bias or per-channel qparams of the wrong length;
    /// [`QuantError::NonFinite`], [`QuantError::InvalidScale`],
    /// [`QuantError::InvalidZeroPoint`] as [`QLinear::new`](super::QLinear::new).
    ///
    /// # Examples
    /// ```
    /// use ndarray::Array4;
    /// use ptq::nn::quantized::{Conv2dParams, QConv2d};
    /// use ptq::{DType, QParams};
    /// let w = Array4::<f32>::zeros((8, 3, 3, 3));
    /// let p = Conv2dParams { padding: (1, 1), ..Default::default() };
    /// let conv = QConv2d::new(w.view(), None, &QParams::per_tensor(0.01, 0, DType::QInt8)?, p, 0.1, 0)?;
    /// assert_eq!(conv.out_channels(), 8);
    /// let bad = Conv2dParams { groups: 3, ..Default::default() }; // 8 outputs, 3 groups
    /// assert!(QConv2d::new(w.view(), None, &QParams::per_tensor(0.01, 0, DType::QInt8)?, bad, 0.1, 0).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(
        weight: ArrayView4<'_, f32>,
        bias: Option<ArrayView1<'_, f32>>,
        w_qparams: &QParams,
        params: Conv2dParams,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let qw = quantize_weights(weight.into_dyn(), w_qparams, NAME)?;
        Self::build(qw, weight.dim(), bias, params, out_scale, out_zp)
    }

    /// Like [`QConv2d::new`] from weights already quantized with `w_qparams`.
    ///
    /// # Errors
    /// As [`QConv2d::new`], and [`QuantError::QuantizedOutOfRange`] for values outside
    /// the qparams' range.
    ///
    /// # Examples
    /// ```
    /// use ndarray::Array4;
    /// use ptq::nn::quantized::{Conv2dParams, QConv2d};
    /// use ptq::{DType, QParams};
    /// let w = Array4::<i8>::ones((4, 1, 3, 3));
    /// let dw = Conv2dParams { groups: 4, padding: (1, 1), ..Default::default() };
    /// let conv = QConv2d::from_quantized(w.view(), &QParams::per_tensor(0.1, 0, DType::QInt8)?, None, dw, 0.1, 0)?;
    /// assert_eq!(conv.in_channels(), 4);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn from_quantized(
        weight: ArrayView4<'_, i8>,
        w_qparams: &QParams,
        bias: Option<ArrayView1<'_, f32>>,
        params: Conv2dParams,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let qw = quantized_weights(weight.into_dyn(), w_qparams, NAME)?;
        Self::build(qw, weight.dim(), bias, params, out_scale, out_zp)
    }

    fn build(
        qw: QWeights,
        (c_out, cig, kh, kw): (usize, usize, usize, usize),
        bias: Option<ArrayView1<'_, f32>>,
        params: Conv2dParams,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let unsupported = |reason: String| QuantError::UnsupportedConfig {
            context: NAME.into(),
            reason,
        };
        let g = params.groups;
        if g == 0 || kh == 0 || kw == 0 || cig == 0 || c_out == 0 {
            return Err(unsupported(format!(
                "groups, kernel size and channel counts must be positive (groups {g}, weight [{c_out}, {cig}, {kh}, {kw}])"
            )));
        }
        if params.stride.0 == 0 || params.stride.1 == 0 {
            return Err(unsupported(format!(
                "stride {:?} must be positive",
                params.stride
            )));
        }
        if params.dilation.0 == 0 || params.dilation.1 == 0 {
            return Err(unsupported(format!(
                "dilation {:?} must be positive",
                params.dilation
            )));
        }
        if c_out % g != 0 {
            return Err(unsupported(format!(
                "{c_out} output channels are not divisible by {g} groups"
            )));
        }
        check_qparams(out_scale, out_zp, NAME)?;
        let bias = check_bias(bias, c_out, NAME)?;
        let taps = kh
            .checked_mul(kw)
            .ok_or_else(|| unsupported(format!("kernel {kh} x {kw} is too large")))?;
        check_accumulator(
            &qw.values,
            &qw.zero_points,
            cig * taps,
            NAME,
            &format!("weight [{c_out}, {cig}, {kh}, {kw}]"),
        )?;
        let zp = |oc: usize| {
            if qw.zero_points.len() == 1 {
                qw.zero_points[0]
            } else {
                qw.zero_points[oc]
            }
        };
        // Only true depthwise (one input channel per group, several groups) takes the
        // direct loop; a stem with one input channel and one group is a GEMM.
        let kind = if cig == 1 && g > 1 {
            let mut wv = vec![0i16; taps * c_out];
            for oc in 0..c_out {
                for t in 0..taps {
                    wv[t * c_out + oc] = (qw.values[oc * taps + t] as i32 - zp(oc)) as i16;
                }
            }
            ConvKind::Depthwise(crate::kernels::depthwise::DwWeights::new(
                wv,
                c_out,
                (kh, kw),
            ))
        } else {
            let geom = ConvGeom {
                batch: 0,
                c_in: cig * g,
                in_hw: (0, 0),
                c_out,
                kernel: (kh, kw),
                stride: params.stride,
                padding: params.padding,
                dilation: params.dilation,
                groups: g,
            };
            let packs = kconv::pack_conv_weights(&geom, &qw.values, &qw.zero_points)
                .map_err(|e| e.in_context(NAME))?;
            ConvKind::Gemm(packs)
        };
        Ok(QConv2d {
            c_in: cig * g,
            c_out,
            kernel: (kh, kw),
            params,
            kind,
            w_scales: qw.scales,
            per_channel: qw.per_channel,
            bias,
            out_scale,
            out_zp,
            relu: false,
            rq_cache: RequantCache::default(),
            bias_mode: BiasMode::Float,
        })
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.c_in
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.c_out
    }

    /// Bytes of packed weights, offsets, scales and bias held by the layer.
    pub fn weight_bytes(&self) -> usize {
        let w = match &self.kind {
            ConvKind::Gemm(p) => p.iter().map(|p| p.bytes()).sum(),
            ConvKind::Depthwise(w) => w.bytes(),
        };
        w + 4 * self.w_scales.len() + 4 * self.bias.as_ref().map_or(0, |b| b.len())
    }

    fn geom(&self, b: usize, h: usize, w: usize) -> ConvGeom {
        ConvGeom {
            batch: b,
            c_in: self.c_in,
            in_hw: (h, w),
            c_out: self.c_out,
            kernel: self.kernel,
            stride: self.params.stride,
            padding: self.params.padding,
            dilation: self.params.dilation,
            groups: self.params.groups,
        }
    }

    /// Runs the convolution on an NCHW `quint8` tensor; returns NCHW.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for an input that is not rank 4, has the wrong channel
    /// count or is smaller than the (dilated) kernel.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{Array4, ArrayD};
    /// use ptq::nn::quantized::{Conv2dParams, QConv2d, QTensor};
    /// use ptq::{DType, QParams};
    /// let w = Array4::<i8>::ones((2, 1, 2, 2));
    /// let conv = QConv2d::from_quantized(w.view(), &QParams::per_tensor(1.0, 0, DType::QInt8)?, None,
    ///     Conv2dParams::default(), 1.0, 0)?;
    /// let x = QTensor::new(ArrayD::from_elem(vec![1, 1, 3, 3], 2u8), 1.0, 0)?;
    /// let y = conv.forward(&x)?;
    /// assert_eq!(y.data().shape(), &[1, 2, 2, 2]);
    /// assert_eq!(y.data()[[0, 1, 1, 1]], 8);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        let (b, c, h, w) = dims4(x, NAME)?;
        let (geom, (oh, ow)) = self.check_input(b, c, h, w, x.data().shape())?;
        let out = self.run_nhwc(&x.to_nhwc(), &geom, (oh, ow), x.scale(), x.zero_point())?;
        let oc = self.c_out;
        let y = ArrayD::from_shape_vec(IxDyn(&[b, oc, oh, ow]), nhwc_to_nchw(&out, b, oc, oh * ow))
            .map_err(|e| QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("output [{b}, {oc}, {oh}, {ow}]"),
                actual: e.to_string(),
            })?;
        QTensor::new(y, self.out_scale, self.out_zp)
    }

    /// Runs the convolution on a channels-last tensor: `x.data()` is `[n, h, w, c]` (what
    /// fbgemm keeps between layers) and so is the result. Bit-identical to
    /// [`forward`](Self::forward) up to the layout, without its two transposes.
    ///
    /// # Errors
    /// As [`forward`](Self::forward), for the NHWC shape.
    ///
    /// # Examples
    /// ```
    /// use ndarray::{Array4, ArrayD};
    /// use ptq::nn::quantized::{Conv2dParams, QConv2d, QTensor};
    /// use ptq::{DType, QParams};
    /// let w = Array4::<i8>::ones((3, 2, 1, 1));
    /// let conv = QConv2d::from_quantized(w.view(), &QParams::per_tensor(1.0, 0, DType::QInt8)?, None,
    ///     Conv2dParams::default(), 1.0, 0)?;
    /// let x = QTensor::new(ArrayD::from_elem(vec![1, 2, 2, 2], 3u8), 1.0, 0)?; // NHWC
    /// let y = conv.forward_nhwc(&x)?;
    /// assert_eq!(y.data().shape(), &[1, 2, 2, 3]);
    /// assert_eq!(y.data()[[0, 1, 1, 2]], 6);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn forward_nhwc(&self, x: &QTensor) -> Result<QTensor> {
        let (b, h, w, c) = dims4(x, NAME)?;
        let (geom, (oh, ow)) = self.check_input(b, c, h, w, x.data().shape())?;
        let owned;
        let src = match x.data().as_slice() {
            Some(s) => s,
            None => {
                owned = x.to_vec();
                &owned[..]
            }
        };
        let out = self.run_nhwc(src, &geom, (oh, ow), x.scale(), x.zero_point())?;
        let y = ArrayD::from_shape_vec(IxDyn(&[b, oh, ow, self.c_out]), out).map_err(|e| {
            QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("output [{b}, {oh}, {ow}, {}]", self.c_out),
                actual: e.to_string(),
            }
        })?;
        QTensor::new(y, self.out_scale, self.out_zp)
    }

    /// Checks the channel count and the spatial size; returns the geometry and output size.
    fn check_input(
        &self,
        b: usize,
        c: usize,
        h: usize,
        w: usize,
        shape: &[usize],
    ) -> Result<(ConvGeom, (usize, usize))> {
        if c != self.c_in {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: format!("{} input channels", self.c_in),
                actual: format!("shape {shape:?}"),
            });
        }
        let geom = self.geom(b, h, w);
        let out = geom.out_hw().ok_or_else(|| QuantError::ShapeMismatch {
            context: NAME.into(),
            expected: format!(
                "input at least as large as the dilated kernel {:?} (dilation {:?}) after padding {:?}",
                self.kernel, self.params.dilation, self.params.padding
            ),
            actual: format!("shape {shape:?}"),
        })?;
        let total = b
            .checked_mul(out.0)
            .and_then(|v| v.checked_mul(out.1))
            .and_then(|v| v.checked_mul(self.c_out))
            .filter(|&v| v <= isize::MAX as usize);
        if total.is_none() {
            return Err(QuantError::ShapeMismatch {
                context: NAME.into(),
                expected: "an output whose size fits in memory".into(),
                actual: format!(
                    "input shape {shape:?} gives output [{b}, {}, {}, {}]",
                    self.c_out, out.0, out.1
                ),
            });
        }
        Ok((geom, out))
    }

    /// The convolution on NHWC bytes; returns NHWC bytes.
    fn run_nhwc(
        &self,
        x_nhwc: &[u8],
        geom: &ConvGeom,
        (oh, ow): (usize, usize),
        act_scale: f32,
        a_zp_in: i32,
    ) -> Result<Vec<u8>> {
        let b = geom.batch;
        let m = b * oh * ow;
        let oc = self.c_out;
        // Every byte is written below (the GEMM covers all rows and channels, as does the
        // depthwise loop), so a recycled buffer's old bytes never show.
        let mut out = output_buffer(m * oc);
        let oq = OutputQuant {
            scale: self.out_scale,
            zero_point: self.out_zp,
            relu: self.relu,
        };
        let a_zp = a_zp_in;
        let ks = KernelSet::current();
        let g = match self.kind {
            ConvKind::Gemm(_) => self.params.groups,
            ConvKind::Depthwise(_) => 1,
        };
        let cog = oc / g;
        let rqs = self.rq_cache.get(act_scale, || {
            (0..g)
                .map(|grp| {
                    let scales = if self.per_channel {
                        &self.w_scales[grp * cog..(grp + 1) * cog]
                    } else {
                        &self.w_scales[..1]
                    };
                    let bias = self.bias.as_ref().map(|b| &b[grp * cog..(grp + 1) * cog]);
                    RequantParams::with_bias_mode(
                        cog,
                        act_scale,
                        scales,
                        self.per_channel,
                        bias,
                        oq,
                        self.bias_mode,
                    )
                    .map_err(|e| e.in_context(NAME))
                })
                .collect()
        })?;
        match &self.kind {
            ConvKind::Gemm(packs) => {
                kconv::conv_gemm(
                    ks,
                    x_nhwc,
                    geom,
                    (oh, ow),
                    a_zp as u8,
                    packs,
                    &rqs,
                    &mut out,
                );
            }
            ConvKind::Depthwise(wv) => {
                crate::kernels::depthwise::depthwise(
                    ks,
                    x_nhwc,
                    geom,
                    (oh, ow),
                    a_zp,
                    wv,
                    &rqs[0],
                    &mut out,
                );
            }
        }
        Ok(out)
    }
}

/// Output buffers at least this large are recycled ([`recycle_output`]).
const RECYCLE_MIN: usize = 1 << 16;
/// At most this many recycled buffers are kept per thread ...
const RECYCLE_MAX_COUNT: usize = 8;
/// ... holding at most this many bytes together.
const RECYCLE_MAX_BYTES: usize = 64 << 20;

thread_local! {
    /// The calling thread's recycled activation buffers ([`recycle_output`]).
    static RECYCLED: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` bytes for a convolution's output, whose every byte the caller
/// overwrites: a recycled buffer (the smallest one holding `len` bytes without wasting
/// more than three quarters of it; its old bytes kept, no zero-fill) when the thread
/// has one, else a new zeroed one. Large batches allocate activations of tens of MB
/// per layer; the allocator hands them back to the system between calls and every page
/// then faults again on the next call (MobileNetV2 at batch 16: ~10,000 faults, a
/// quarter of the time), which recycling avoids.
fn output_buffer(len: usize) -> Vec<u8> {
    if len >= RECYCLE_MIN {
        let found = RECYCLED.with(|r| {
            let mut r = r.borrow_mut();
            let best = r
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len && v.capacity() / 4 <= len)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            best.map(|i| r.swap_remove(i))
        });
        if let Some(mut v) = found {
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, 0);
            }
            return v;
        }
    }
    vec![0u8; len]
}

/// Keeps an activation buffer that will not be read again (a convolution's input at its
/// last use) for the next [`output_buffer`] on this thread; a few large buffers at most
/// (the oldest dropped first), small ones are freed at once.
pub(crate) fn recycle_output(v: Vec<u8>) {
    if v.capacity() < RECYCLE_MIN || v.capacity() > RECYCLE_MAX_BYTES {
        return;
    }
    RECYCLED.with(|r| {
        let mut r = r.borrow_mut();
        r.push(v);
        let mut total: usize = r.iter().map(|v| v.capacity()).sum();
        while r.len() > RECYCLE_MAX_COUNT || total > RECYCLE_MAX_BYTES {
            total -= r.remove(0).capacity();
        }
    });
}

/// [`recycle_output`] of a tensor's bytes.
pub(crate) fn recycle_tensor(t: QTensor) {
    recycle_output(t.into_data().into_raw_vec_and_offset().0);
}

/// `torch.ao.nn.intrinsic.quantized.ConvReLU2d`: [`QConv2d`] with the ReLU fused into the
/// requantization.
#[derive(Debug, Clone)]
pub struct QConvReLU2d(QConv2d);

impl QConvReLU2d {
    /// As [`QConv2d::new`], with a fused ReLU.
    ///
    /// # Errors
    /// As [`QConv2d::new`].
    ///
    /// # Examples
    /// ```
    /// use ndarray::Array4;
    /// use ptq::nn::quantized::{Conv2dParams, QConvReLU2d};
    /// use ptq::{DType, QParams};
    /// let w = Array4::<f32>::zeros((8, 3, 1, 1));
    /// let c = QConvReLU2d::new(w.view(), None, &QParams::per_tensor(0.01, 0, DType::QInt8)?,
    ///     Conv2dParams::default(), 0.1, 0)?;
    /// assert_eq!(c.inner().out_channels(), 8);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(
        weight: ArrayView4<'_, f32>,
        bias: Option<ArrayView1<'_, f32>>,
        w_qparams: &QParams,
        params: Conv2dParams,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let mut c = QConv2d::new(weight, bias, w_qparams, params, out_scale, out_zp)
            .map_err(|e| e.in_context("QConvReLU2d"))?;
        c.relu = true;
        Ok(QConvReLU2d(c))
    }

    /// As [`QConv2d::from_quantized`], with a fused ReLU.
    ///
    /// # Errors
    /// As [`QConv2d::from_quantized`].
    ///
    /// # Examples
    /// ```
    /// use ndarray::Array4;
    /// use ptq::nn::quantized::{Conv2dParams, QConvReLU2d};
    /// use ptq::{DType, QParams};
    /// let w = Array4::<i8>::ones((2, 2, 1, 1));
    /// let c = QConvReLU2d::from_quantized(w.view(), &QParams::per_tensor(0.1, 0, DType::QInt8)?, None,
    ///     Conv2dParams::default(), 0.1, 5)?;
    /// assert_eq!(c.weight_bytes(), c.inner().weight_bytes());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn from_quantized(
        weight: ArrayView4<'_, i8>,
        w_qparams: &QParams,
        bias: Option<ArrayView1<'_, f32>>,
        params: Conv2dParams,
        out_scale: f32,
        out_zp: i32,
    ) -> Result<Self> {
        let mut c = QConv2d::from_quantized(weight, w_qparams, bias, params, out_scale, out_zp)
            .map_err(|e| e.in_context("QConvReLU2d"))?;
        c.relu = true;
        Ok(QConvReLU2d(c))
    }

    /// The underlying convolution (with `relu` set).
    pub fn inner(&self) -> &QConv2d {
        &self.0
    }

    /// Bytes of weights held by the layer.
    pub fn weight_bytes(&self) -> usize {
        self.0.weight_bytes()
    }

    /// Runs the convolution.
    ///
    /// # Errors
    /// As [`QConv2d::forward`].
    ///
    /// # Examples
    /// ```
    /// use ndarray::{Array4, ArrayD};
    /// use ptq::nn::quantized::{Conv2dParams, QConvReLU2d, QTensor};
    /// use ptq::{DType, QParams};
    /// let w = Array4::<i8>::from_elem((1, 1, 1, 1), -1);
    /// let c = QConvReLU2d::from_quantized(w.view(), &QParams::per_tensor(1.0, 0, DType::QInt8)?, None,
    ///     Conv2dParams::default(), 1.0, 4)?;
    /// let x = QTensor::new(ArrayD::from_shape_vec(vec![1, 1, 1, 2], vec![2u8, 0])?, 1.0, 1)?;
    /// assert_eq!(c.forward(&x)?.data().as_slice().unwrap(), &[4, 5]); // relu(-1) = 0, relu(1) = 1
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward(&self, x: &QTensor) -> Result<QTensor> {
        self.0.forward(x).map_err(|e| e.in_context("QConvReLU2d"))
    }
}

impl QConv2d {
    /// The `[out, in / groups, kh, kw]` int8 weights and the weight parameters they were
    /// quantized with (`qint8`, affine, per-tensor or per-channel on axis 0).
    /// `QConv2d::from_quantized` of these (with [`QConv2d::params`], the bias and the
    /// output parameters) rebuilds a layer with bit-identical outputs.
    ///
    /// Depthwise layers (one input channel per group) keep only `w - zero_point`; their
    /// zero point is recovered as the value closest to 0 that keeps every weight in
    /// `[-128, 127]`. That is the original one for symmetric weights (zero point 0, the
    /// presets); for affine weights it may differ while giving the same `w - zero_point`,
    /// hence the same outputs.
    ///
    /// # Examples
    /// ```
    /// use ndarray::Array4;
    /// use ptq::nn::quantized::{Conv2dParams, QConv2d};
    /// use ptq::{DType, QParams};
    /// let w = Array4::from_shape_fn((4, 2, 3, 3), |(o, i, y, x)| (o * 7 + i * 5 + y * 3 + x) as i8 - 20);
    /// let conv = QConv2d::from_quantized(w.view(), &QParams::per_tensor(0.1, 0, DType::QInt8)?, None,
    ///     Conv2dParams::default(), 0.1, 0)?;
    /// assert_eq!(conv.quantized_weight().0, w);
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn quantized_weight(&self) -> (ndarray::Array4<i8>, QParams) {
        let (kh, kw) = self.kernel;
        let taps = kh * kw;
        let c_out = self.c_out;
        let cig = self.c_in / self.params.groups;
        let mut values = vec![0i8; c_out * cig * taps];
        let zps: Vec<i32> = match &self.kind {
            ConvKind::Gemm(packs) => {
                let (w, zps) = kconv::unpack_conv_weights(&self.geom(0, 0, 0), packs);
                values = w;
                zps
            }
            ConvKind::Depthwise(dw) => {
                let wv = dw.values();
                // The zero point closest to 0 with every `d + zp` in [-128, 127].
                let fit = |lo: i32, hi: i32| 0i32.clamp(-128 - lo, 127 - hi);
                let range = |oc: usize| {
                    (0..taps).fold((i32::MAX, i32::MIN), |(lo, hi), t| {
                        let d = wv[t * c_out + oc] as i32;
                        (lo.min(d), hi.max(d))
                    })
                };
                let zps: Vec<i32> = if self.per_channel {
                    (0..c_out)
                        .map(|oc| {
                            let (lo, hi) = range(oc);
                            fit(lo, hi)
                        })
                        .collect()
                } else {
                    let (lo, hi) = (0..c_out)
                        .map(range)
                        .fold((i32::MAX, i32::MIN), |(a, b), (lo, hi)| {
                            (a.min(lo), b.max(hi))
                        });
                    vec![fit(lo, hi); c_out]
                };
                for oc in 0..c_out {
                    for t in 0..taps {
                        let v = wv[t * c_out + oc] as i32 + zps[oc];
                        values[oc * taps + t] = v.clamp(-128, 127) as i8;
                    }
                }
                zps
            }
        };
        let w = ndarray::Array4::from_shape_vec((c_out, cig, kh, kw), values)
            .expect("out * in/groups * kh * kw values");
        let qp = super::linear::weight_qparams_of(&self.w_scales, &zps, self.per_channel);
        (w, qp)
    }

    /// Stride, padding, dilation and groups.
    pub fn params(&self) -> Conv2dParams {
        self.params
    }

    /// Kernel size `(kh, kw)`.
    pub fn kernel_size(&self) -> (usize, usize) {
        self.kernel
    }

    /// Whether the weights are quantized per output channel.
    pub fn is_per_channel(&self) -> bool {
        self.per_channel
    }

    /// The float bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The same layer with its bias entering the requantization as `mode` says
    /// ([`BiasMode::Int32`]: ONNX Runtime's `QLinearConv` / `QGemm` arithmetic; the
    /// default [`BiasMode::Float`] is fbgemm's, bit-exact with PyTorch).
    pub fn with_bias_mode(mut self, mode: BiasMode) -> Self {
        self.bias_mode = mode;
        self.rq_cache = RequantCache::default();
        self
    }

    /// How the bias enters the requantization.
    pub fn bias_mode(&self) -> BiasMode {
        self.bias_mode
    }

    /// The output scale and zero point.
    pub fn output_qparams(&self) -> (f32, i32) {
        (self.out_scale, self.out_zp)
    }

    /// Whether a ReLU is fused into the output.
    pub fn is_relu(&self) -> bool {
        self.relu
    }
}

#[cfg(test)]
mod tests {
    //! Recycled output buffers: reused (same allocation), and their old bytes never show
    //! in a convolution's output.
    use super::{output_buffer, recycle_output, Conv2dParams, QConv2d, RECYCLE_MIN};
    use crate::nn::quantized::QTensor;
    use crate::{DType, QParams};
    use ndarray::{Array4, ArrayD};

    #[test]
    fn a_recycled_buffer_is_reused_for_an_output_it_fits() {
        let v = vec![7u8; 3 * RECYCLE_MIN];
        let p = v.as_ptr();
        recycle_output(v);
        // Too small for the smallest recycled buffer to be worth it: a new one.
        let small = output_buffer(RECYCLE_MIN / 2);
        assert_ne!(small.as_ptr(), p);
        assert!(small.iter().all(|&b| b == 0));
        let w = output_buffer(2 * RECYCLE_MIN);
        assert_eq!((w.as_ptr(), w.len()), (p, 2 * RECYCLE_MIN));
        // Taken: the next request allocates.
        let fresh = output_buffer(2 * RECYCLE_MIN);
        assert_ne!(fresh.as_ptr(), p);
        assert!(fresh.iter().all(|&b| b == 0));
    }

    #[test]
    fn recycled_bytes_never_show_in_a_convolution_output() {
        for (groups, k) in [(1, 3), (1, 1), (8, 3)] {
            let (c, hw) = (8, 66);
            let w = Array4::from_shape_fn((c, c / groups, k, k), |(o, i, y, x)| {
                ((o * 7 + i * 5 + y * 3 + x) % 11) as i8 - 5
            });
            let p = Conv2dParams {
                padding: (k / 2, k / 2),
                groups,
                ..Default::default()
            };
            let qp = QParams::per_tensor(0.05, 0, DType::QInt8).unwrap();
            let conv = QConv2d::from_quantized(w.view(), &qp, None, p, 0.2, 3).unwrap();
            let x = ArrayD::from_shape_fn(vec![2, hw, hw, c], |i| (i[1] * 3 + i[2] + i[3]) as u8);
            let x = QTensor::new(x, 0.1, 10).unwrap();
            let fresh = conv.forward_nhwc(&x).unwrap();
            let n = fresh.data().len();
            assert!(n >= RECYCLE_MIN);
            recycle_output(vec![0xA5; n]);
            recycle_output(vec![0x5A; n + 100]);
            let again = conv.forward_nhwc(&x).unwrap();
            assert_eq!(again.data(), fresh.data(), "groups {groups}, kernel {k}");
            let third = conv.forward_nhwc(&x).unwrap();
            assert_eq!(third.data(), fresh.data(), "groups {groups}, kernel {k}");
        }
    }
}
