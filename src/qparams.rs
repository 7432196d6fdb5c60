//! Quantized dtypes, quantization schemes, quantization parameters, and the arithmetic that
//! maps floats to integers and back, exactly as PyTorch does it on the CPU.
//!
//! The scheme (what to do) and the values (scale, zero point) are kept apart: [`QScheme`]
//! and [`DType`] are small `Copy` enums, [`QParams`] holds the numbers.
//!
//! # The arithmetic
//! * quantize: `q = clamp(zero_point + round_half_even(x * (1.0f32 / scale)), quant_min, quant_max)`,
//!   the reciprocal and the product both rounded to `f32` (PyTorch's `quantize_val` /
//!   fbgemm's `Quantize`: a multiply by the reciprocal, not a division).
//! * dequantize: `x = (q - zero_point) as f32 * scale`.
//! * fake quantize: `dequantize(quantize(x))`.
//! * [`qparams_from_min_max`]: PyTorch's `UniformQuantizationObserverBase._calculate_qparams`
//!   in `f32`, including the widening of the range to contain 0, `eps` as the smallest
//!   scale, and zero points rounded half to even then clamped.

use ndarray::{Array, ArrayBase, ArrayD, Axis, Data, Dimension};

use crate::error::{QuantError, Result};

/// The integer type quantized values are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// Unsigned 8-bit (`torch.quint8`), the usual activation dtype: 0..=255.
    QUInt8,
    /// Signed 8-bit (`torch.qint8`), the usual weight dtype: -128..=127.
    QInt8,
    /// Signed 32-bit (`torch.qint32`), used for biases.
    QInt32,
}

impl DType {
    /// PyTorch's name for the dtype (`"quint8"`, `"qint8"`, `"qint32"`).
    pub fn name(self) -> &'static str {
        match self {
            DType::QUInt8 => "quint8",
            DType::QInt8 => "qint8",
            DType::QInt32 => "qint32",
        }
    }

    /// Number of bits of storage.
    pub fn bits(self) -> u32 {
        match self {
            DType::QUInt8 | DType::QInt8 => 8,
            DType::QInt32 => 32,
        }
    }

    /// The smallest and largest value the storage type can hold.
    pub fn storage_range(self) -> (i64, i64) {
        match self {
            DType::QUInt8 => (0, 255),
            DType::QInt8 => (-128, 127),
            DType::QInt32 => (i32::MIN as i64, i32::MAX as i64),
        }
    }

    /// The default quantized range, as PyTorch's `calculate_qmin_qmax` picks it when no
    /// custom range is given: the full storage range, or one bit less with `reduce_range`
    /// (`quint8` 0..=127, `qint8` -64..=63; `qint32` ignores `reduce_range`).
    pub fn default_range(self, reduce_range: bool) -> (i32, i32) {
        match (self, reduce_range) {
            (DType::QUInt8, false) => (0, 255),
            (DType::QUInt8, true) => (0, 127),
            (DType::QInt8, false) => (-128, 127),
            (DType::QInt8, true) => (-64, 63),
            (DType::QInt32, _) => (i32::MIN, i32::MAX),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How scales and zero points are laid out and chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QScheme {
    /// One scale and zero point for the whole tensor; the range `[min, max]` is mapped
    /// onto `[quant_min, quant_max]` (`torch.per_tensor_affine`).
    PerTensorAffine,
    /// One scale for the whole tensor, the range symmetric around 0, zero point fixed
    /// (`torch.per_tensor_symmetric`).
    PerTensorSymmetric,
    /// One affine scale and zero point per slice along `axis` (`torch.per_channel_affine`).
    PerChannelAffine {
        /// The channel axis (0 for conv/linear weights, which are `[out, in, ...]`).
        axis: usize,
    },
    /// One symmetric scale per slice along `axis` (`torch.per_channel_symmetric`).
    PerChannelSymmetric {
        /// The channel axis.
        axis: usize,
    },
}

impl QScheme {
    /// Whether there is one scale per channel.
    pub fn is_per_channel(self) -> bool {
        matches!(
            self,
            QScheme::PerChannelAffine { .. } | QScheme::PerChannelSymmetric { .. }
        )
    }

    /// Whether the range is symmetric around 0 (zero point fixed).
    pub fn is_symmetric(self) -> bool {
        matches!(
            self,
            QScheme::PerTensorSymmetric | QScheme::PerChannelSymmetric { .. }
        )
    }

    /// The channel axis of a per-channel scheme, `None` for per-tensor schemes.
    pub fn axis(self) -> Option<usize> {
        match self {
            QScheme::PerChannelAffine { axis } | QScheme::PerChannelSymmetric { axis } => {
                Some(axis)
            }
            _ => None,
        }
    }

    /// PyTorch's name for the scheme (`"per_tensor_affine"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            QScheme::PerTensorAffine => "per_tensor_affine",
            QScheme::PerTensorSymmetric => "per_tensor_symmetric",
            QScheme::PerChannelAffine { .. } => "per_channel_affine",
            QScheme::PerChannelSymmetric { .. } => "per_channel_symmetric",
        }
    }
}

/// Resolves the quantized range `(quant_min, quant_max)` from a dtype, `reduce_range` and
/// an optional custom range, with PyTorch's rules (`validate_qmin_qmax` and
/// `calculate_qmin_qmax`): a custom range must contain 0 and be non-empty; with
/// `reduce_range` a custom range is halved with floor division (`-127..=127` becomes
/// `-64..=63`).
///
/// `ptq` is stricter than PyTorch in one way: the (custom) range must fit the dtype's
/// storage, where PyTorch only checks the length of `qint8`/`qint32` ranges and would
/// accept e.g. `quint8` with `quant_max = 300`.
///
/// # Errors
/// [`QuantError::InvalidQuantRange`] when a custom range breaks one of those rules.
///
/// # Examples
/// ```
/// use ptq::{resolve_quant_range, DType};
/// assert_eq!(resolve_quant_range(DType::QUInt8, true, None)?, (0, 127));
/// assert_eq!(resolve_quant_range(DType::QInt8, true, Some((-127, 127)))?, (-64, 63));
/// assert!(resolve_quant_range(DType::QUInt8, false, Some((1, 255))).is_err());
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn resolve_quant_range(
    dtype: DType,
    reduce_range: bool,
    custom: Option<(i64, i64)>,
) -> Result<(i32, i32)> {
    let Some((qmin, qmax)) = custom else {
        return Ok(dtype.default_range(reduce_range));
    };
    let bad = |reason| QuantError::InvalidQuantRange {
        quant_min: qmin,
        quant_max: qmax,
        dtype: dtype.name(),
        reason,
    };
    if !(qmin <= 0 && 0 <= qmax) {
        return Err(bad("a custom quantization range must include 0"));
    }
    if qmin >= qmax {
        return Err(bad("quant_min must be strictly less than quant_max"));
    }
    let (smin, smax) = dtype.storage_range();
    if qmin < smin || qmax > smax {
        return Err(bad("the range does not fit in the dtype's storage"));
    }
    let (qmin, qmax) = if reduce_range {
        (qmin.div_euclid(2), qmax.div_euclid(2))
    } else {
        (qmin, qmax)
    };
    // Both bounds are inside the storage range, which fits in i32.
    Ok((qmin as i32, qmax as i32))
}

/// Quantization parameters: the scheme, the dtype, the quantized range and the values
/// (one scale and zero point per tensor, or one per channel).
///
/// A `QParams` is always valid: every constructor checks that scales are finite, positive
/// and normal, that zero points lie in `quant_min..=quant_max`, and that the range fits the
/// dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct QParams {
    scheme: QScheme,
    dtype: DType,
    quant_min: i32,
    quant_max: i32,
    scales: Vec<f32>,
    zero_points: Vec<i32>,
}

impl QParams {
    /// Builds and validates quantization parameters.
    ///
    /// `scales` and `zero_points` must have one element for a per-tensor scheme and one
    /// per channel for a per-channel scheme.
    ///
    /// # Errors
    /// [`QuantError::InvalidQuantRange`] for a range outside the dtype,
    /// [`QuantError::ShapeMismatch`] for wrong lengths, [`QuantError::InvalidScale`] and
    /// [`QuantError::InvalidZeroPoint`] for bad values.
    ///
    /// # Examples
    /// ```
    /// use ptq::{DType, QParams, QScheme};
    /// let qp = QParams::new(QScheme::PerTensorAffine, DType::QUInt8, (0, 255), vec![0.1], vec![3])?;
    /// assert_eq!(qp.scale(), 0.1);
    /// assert!(QParams::new(QScheme::PerTensorAffine, DType::QUInt8, (0, 255), vec![0.0], vec![3]).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(
        scheme: QScheme,
        dtype: DType,
        range: (i32, i32),
        scales: Vec<f32>,
        zero_points: Vec<i32>,
    ) -> Result<Self> {
        const CTX: &str = "QParams";
        let (qmin, qmax) = range;
        let (smin, smax) = dtype.storage_range();
        if qmin as i64 >= qmax as i64 || (qmin as i64) < smin || (qmax as i64) > smax {
            return Err(QuantError::InvalidQuantRange {
                quant_min: qmin as i64,
                quant_max: qmax as i64,
                dtype: dtype.name(),
                reason: "quant_min must be below quant_max and both inside the dtype's storage",
            });
        }
        if scales.len() != zero_points.len()
            || scales.is_empty()
            || (!scheme.is_per_channel() && scales.len() != 1)
        {
            return Err(QuantError::ShapeMismatch {
                context: CTX.into(),
                expected: if scheme.is_per_channel() {
                    "as many zero points as scales, at least one".into()
                } else {
                    "one scale and one zero point for a per-tensor scheme".into()
                },
                actual: format!(
                    "{} scales and {} zero points",
                    scales.len(),
                    zero_points.len()
                ),
            });
        }
        for (channel, (&s, &z)) in scales.iter().zip(&zero_points).enumerate() {
            if !(s.is_normal() && s > 0.0) {
                return Err(QuantError::InvalidScale {
                    context: CTX.into(),
                    channel,
                    value: s,
                });
            }
            if z < qmin || z > qmax {
                return Err(QuantError::InvalidZeroPoint {
                    context: CTX.into(),
                    channel,
                    zero_point: z as i64,
                    quant_min: qmin as i64,
                    quant_max: qmax as i64,
                });
            }
        }
        Ok(QParams {
            scheme,
            dtype,
            quant_min: qmin,
            quant_max: qmax,
            scales,
            zero_points,
        })
    }

    /// Per-tensor affine parameters over the dtype's full range.
    ///
    /// # Errors
    /// As [`QParams::new`].
    ///
    /// # Examples
    /// ```
    /// use ptq::{DType, QParams};
    /// let qp = QParams::per_tensor(0.5, 10, DType::QUInt8)?;
    /// assert_eq!((qp.quant_min(), qp.quant_max()), (0, 255));
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn per_tensor(scale: f32, zero_point: i32, dtype: DType) -> Result<Self> {
        Self::new(
            QScheme::PerTensorAffine,
            dtype,
            dtype.default_range(false),
            vec![scale],
            vec![zero_point],
        )
    }

    /// The scheme.
    pub fn scheme(&self) -> QScheme {
        self.scheme
    }
    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The smallest quantized value.
    pub fn quant_min(&self) -> i32 {
        self.quant_min
    }
    /// The largest quantized value.
    pub fn quant_max(&self) -> i32 {
        self.quant_max
    }
    /// All scales (one per channel, or one).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// All zero points (one per channel, or one).
    pub fn zero_points(&self) -> &[i32] {
        &self.zero_points
    }
    /// The first scale: the scale of a per-tensor scheme.
    pub fn scale(&self) -> f32 {
        self.scales[0]
    }
    /// The first zero point: the zero point of a per-tensor scheme.
    pub fn zero_point(&self) -> i32 {
        self.zero_points[0]
    }
    /// Number of channels (1 for per-tensor schemes).
    pub fn num_channels(&self) -> usize {
        self.scales.len()
    }
}

/// The quantization parameters of an int8 activation: `quint8`, per tensor, affine — the
/// one form the int8 kernels take. One validated type from the observer (via
/// [`ActQParams::from_qparams`]) to the kernel, the saved file and the accessors.
///
/// A value is always valid: the scale is finite, positive and normal, the zero point lies
/// in `0..=255`.
///
/// # Examples
/// ```
/// use ptq::{ActQParams, DType, QParams};
/// let a = ActQParams::new(0.05, 128)?;
/// assert_eq!((a.scale(), a.zero_point()), (0.05, 128));
/// assert_eq!(a.quantize(0.1), 130);
/// assert!(ActQParams::new(0.0, 0).is_err());
/// assert!(ActQParams::new(0.1, 256).is_err());
/// // per-channel or qint8 parameters are refused with the place named
/// let w = QParams::per_tensor(0.1, 0, DType::QInt8)?;
/// assert!(ActQParams::from_qparams(&w, "conv1").unwrap_err().to_string().contains("conv1"));
/// # Ok::<(), ptq::QuantError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActQParams {
    scale: f32,
    zero_point: u8,
}

impl ActQParams {
    /// Validates a scale and a zero point.
    ///
    /// # Errors
    /// [`QuantError::InvalidScale`] for a scale that is not finite, positive and normal;
    /// [`QuantError::InvalidZeroPoint`] for a zero point outside `0..=255`.
    pub fn new(scale: f32, zero_point: i32) -> Result<Self> {
        Self::new_in(scale, zero_point, "ActQParams")
    }

    /// As [`ActQParams::new`], errors naming `context`.
    pub(crate) fn new_in(scale: f32, zero_point: i32, context: &str) -> Result<Self> {
        if !(scale.is_normal() && scale > 0.0) {
            return Err(QuantError::InvalidScale {
                context: context.into(),
                channel: 0,
                value: scale,
            });
        }
        if !(0..=255).contains(&zero_point) {
            return Err(QuantError::InvalidZeroPoint {
                context: context.into(),
                channel: 0,
                zero_point: zero_point as i64,
                quant_min: 0,
                quant_max: 255,
            });
        }
        Ok(ActQParams {
            scale,
            zero_point: zero_point as u8,
        })
    }

    /// Takes an observer's parameters, which must be `quint8` per-tensor (any quantized
    /// range inside `0..=255`, e.g. fbgemm's reduced `0..=127`).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] naming `context` for another dtype or a
    /// per-channel scheme.
    pub fn from_qparams(qp: &QParams, context: &str) -> Result<Self> {
        if qp.dtype() != DType::QUInt8 || qp.scheme().is_per_channel() {
            return Err(QuantError::UnsupportedConfig {
                context: context.into(),
                reason: format!(
                    "int8 activations must be quint8 per-tensor; got {} {}",
                    qp.dtype(),
                    qp.scheme().name()
                ),
            });
        }
        Self::new_in(qp.scale(), qp.zero_point(), context)
    }

    /// The scale.
    pub fn scale(self) -> f32 {
        self.scale
    }

    /// The zero point.
    pub fn zero_point(self) -> i32 {
        self.zero_point as i32
    }

    /// Quantizes one value over `0..=255` with PyTorch's arithmetic.
    pub fn quantize(self, x: f32) -> u8 {
        quantize_val(x, self.scale, self.zero_point as i32, 0, 255) as u8
    }

    /// Dequantizes one value: `(q - zero_point) * scale`.
    pub fn dequantize(self, q: u8) -> f32 {
        dequantize_val(q as i32, self.scale, self.zero_point as i32)
    }

    /// As [`QParams`] (per tensor affine, `quint8`, `0..=255`).
    pub fn to_qparams(self) -> QParams {
        QParams {
            scheme: QScheme::PerTensorAffine,
            dtype: DType::QUInt8,
            quant_min: 0,
            quant_max: 255,
            scales: vec![self.scale],
            zero_points: vec![self.zero_point as i32],
        }
    }
}

impl std::fmt::Display for ActQParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "scale={:e}, zero_point={}", self.scale, self.zero_point)
    }
}

impl QParams {
    /// Checks that the parameters fit a tensor of this shape (the channel axis exists and
    /// has one entry per scale).
    fn check_shape(&self, shape: &[usize], context: &str) -> Result<()> {
        if let Some(axis) = self.scheme.axis() {
            if axis >= shape.len() || shape[axis] != self.scales.len() {
                return Err(QuantError::ShapeMismatch {
                    context: context.into(),
                    expected: format!("{} channels on axis {axis}", self.scales.len()),
                    actual: format!("shape {shape:?}"),
                });
            }
        }
        Ok(())
    }
}

/// Quantizes one value: `clamp(zero_point + round_half_even(x * (1/scale)), qmin, qmax)`,
/// with PyTorch's `f32` operation order. NaN maps to `quant_min` (the whole-tensor
/// functions refuse NaN before they get here); infinities saturate.
///
/// # Examples
/// ```
/// assert_eq!(ptq::quantize_val(0.25, 0.1, 10, 0, 255), 12); // 2.5 rounds to even
/// assert_eq!(ptq::quantize_val(1e9, 0.1, 10, 0, 255), 255);
/// ```
#[inline]
pub fn quantize_val(x: f32, scale: f32, zero_point: i32, quant_min: i32, quant_max: i32) -> i32 {
    let inv_scale = 1.0f32 / scale;
    let rounded = (x * inv_scale).round_ties_even();
    // PyTorch adds the zero point in f32 (`zero_point + nearbyint(...)`), then clamps in f64.
    let v = (zero_point as f32 + rounded) as f64;
    if v >= quant_max as f64 {
        quant_max
    } else if v >= quant_min as f64 {
        v as i32
    } else {
        quant_min
    }
}

/// Dequantizes one value: `(q - zero_point) as f32 * scale`.
///
/// # Examples
/// ```
/// assert_eq!(ptq::dequantize_val(12, 0.5, 10), 1.0);
/// ```
#[inline]
pub fn dequantize_val(q: i32, scale: f32, zero_point: i32) -> f32 {
    ((q as i64 - zero_point as i64) as f32) * scale
}

fn count_non_finite<'a>(values: impl Iterator<Item = &'a f32>) -> (usize, usize, usize) {
    let (mut nan, mut inf, mut total) = (0, 0, 0);
    for v in values {
        total += 1;
        if v.is_nan() {
            nan += 1;
        } else if v.is_infinite() {
            inf += 1;
        }
    }
    (nan, inf, total)
}

/// Counts NaN and infinite values of a tensor and turns any into a
/// [`QuantError::NonFinite`] naming `context`. Observers use it to refuse poisoned data.
pub(crate) fn check_finite<S, D>(x: &ArrayBase<S, D>, context: &str) -> Result<()>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    // Fast path: one pass that only asks "is everything finite?" (over contiguous memory
    // in 16-lane blocks without early exit, so that it vectorizes).
    let all_finite = match x.as_slice_memory_order() {
        Some(s) => {
            let blocks = s.chunks_exact(16);
            let tail = blocks.remainder().iter().all(|v| v.is_finite());
            // A value is NaN or infinite when its exponent bits are all ones.
            const EXP: u32 = 0x7f80_0000;
            let bad = blocks.fold(0u32, |acc, b| {
                b.iter()
                    .fold(acc, |acc, v| acc | ((v.to_bits() & EXP) == EXP) as u32)
            });
            tail && bad == 0
        }
        None => x.iter().all(|v| v.is_finite()),
    };
    if all_finite {
        return Ok(());
    }
    let (nan, inf, total) = count_non_finite(x.iter());
    Err(QuantError::NonFinite {
        context: context.into(),
        nan,
        inf,
        total,
    })
}

/// Applies `f(value, channel)` to every element, where `channel` indexes the parameters
/// (always 0 for per-tensor schemes).
fn map_with_channel<S, D, A, B>(
    x: &ArrayBase<S, D>,
    qp: &QParams,
    f: impl Fn(A, usize) -> B,
) -> Array<B, D>
where
    S: Data<Elem = A>,
    A: Copy,
    B: Copy + Default,
    D: Dimension,
{
    match qp.scheme.axis() {
        None => x.mapv(|v| f(v, 0)),
        Some(axis) => {
            let xd = x.view().into_dyn();
            let mut out = ArrayD::from_elem(xd.raw_dim(), B::default());
            for (c, (mut o, i)) in out
                .axis_iter_mut(Axis(axis))
                .zip(xd.axis_iter(Axis(axis)))
                .enumerate()
            {
                o.zip_mut_with(&i, |o, &v| *o = f(v, c));
            }
            out.into_dimensionality::<D>()
                .expect("the output has the input's dimensionality")
        }
    }
}

/// Quantizes a float tensor with the given parameters (per tensor, or per channel along
/// the scheme's axis). Values outside the representable range saturate to
/// `quant_min`/`quant_max`; infinities saturate too.
///
/// # Errors
/// [`QuantError::NonFinite`] if `x` holds NaN (nothing else would be meaningful), and
/// [`QuantError::ShapeMismatch`] if a per-channel axis does not match `x`.
///
/// # Examples
/// ```
/// use ndarray::array;
/// use ptq::{quantize, DType, QParams};
/// let qp = QParams::per_tensor(0.1, 10, DType::QUInt8)?;
/// let q = quantize(&array![-1.0f32, 0.0, 0.25, 100.0], &qp)?;
/// assert_eq!(q, array![0, 10, 12, 255]);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn quantize<S, D>(x: &ArrayBase<S, D>, qp: &QParams) -> Result<Array<i32, D>>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    const CTX: &str = "quantize";
    qp.check_shape(x.shape(), CTX)?;
    if x.iter().any(|v| v.is_nan()) {
        let (nan, inf, total) = count_non_finite(x.iter());
        return Err(QuantError::NonFinite {
            context: CTX.into(),
            nan,
            inf,
            total,
        });
    }
    let (lo, hi) = (qp.quant_min, qp.quant_max);
    if qp.dtype == DType::QInt32 {
        return Ok(map_with_channel(x, qp, |v, c| {
            quantize_val(v, qp.scales[c], qp.zero_points[c], lo, hi)
        }));
    }
    let inv: Vec<f32> = qp.scales.iter().map(|s| 1.0f32 / s).collect();
    let zpf: Vec<f32> = qp.zero_points.iter().map(|&z| z as f32).collect();
    let (lof, hif) = (lo as f32, hi as f32);
    if let (None, Some(src)) = (qp.scheme.axis(), x.as_slice()) {
        // Standard-layout per-tensor input: one flat loop the compiler vectorizes.
        let (i, z) = (inv[0], zpf[0]);
        let flat: Vec<i32> = src
            .iter()
            .map(|&v| quantize_val_8bit(v, i, z, lof, hif))
            .collect();
        if let Ok(out) = Array::from_shape_vec(x.raw_dim(), flat) {
            return Ok(out);
        }
    }
    Ok(map_with_channel(x, qp, |v, c| {
        quantize_val_8bit(v, inv[c], zpf[c], lof, hif)
    }))
}

/// Quantizes to `u8` over the full `0..=255` range (what PyTorch's `quantize_per_tensor`
/// to `quint8` clamps to) with the vectorizable 8-bit path. The caller has checked that
/// `x` holds no NaN and that `zero_point` is in `0..=255`.
pub(crate) fn quantize_to_u8<D: Dimension>(
    x: &Array<f32, D>,
    scale: f32,
    zero_point: i32,
) -> Array<u8, D> {
    let (inv, zpf) = (1.0f32 / scale, zero_point as f32);
    match x.as_slice() {
        Some(src) => {
            let flat: Vec<u8> = src
                .iter()
                .map(|&v| quantize_val_8bit(v, inv, zpf, 0.0, 255.0) as u8)
                .collect();
            Array::from_shape_vec(x.raw_dim(), flat).expect("same element count")
        }
        None => x.mapv(|v| quantize_val_8bit(v, inv, zpf, 0.0, 255.0) as u8),
    }
}

/// [`quantize_val`] for 8-bit ranges, branch-free so the compiler can vectorize it:
/// `x * inv` is first clamped to +-2^22 (anything that large saturates an 8-bit range
/// anyway), rounded half to even by adding and subtracting 1.5 * 2^23 (exact in that
/// range under the default rounding mode), offset by the zero point in `f32` as PyTorch
/// does, and clamped. Bit-identical to [`quantize_val`] for every non-NaN input.
#[inline(always)]
pub(crate) fn quantize_val_8bit(x: f32, inv_scale: f32, zero_point: f32, lo: f32, hi: f32) -> i32 {
    const LIMIT: f32 = 4_194_304.0; // 2^22
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let t = x * inv_scale;
    let t = if t < -LIMIT { -LIMIT } else { t };
    let t = if t > LIMIT { LIMIT } else { t };
    let v = ((t + MAGIC) - MAGIC) + zero_point;
    let v = if v < lo { lo } else { v };
    let v = if v > hi { hi } else { v };
    v as i32
}

/// Dequantizes integers produced by [`quantize`] (or by an int8 kernel) back to floats.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if a per-channel axis does not match `q`, and
/// [`QuantError::QuantizedOutOfRange`] for a value outside `quant_min..=quant_max` (it
/// cannot have come from these parameters).
///
/// # Examples
/// ```
/// use ndarray::array;
/// use ptq::{dequantize, DType, QParams};
/// let qp = QParams::per_tensor(0.5, 10, DType::QUInt8)?;
/// assert_eq!(dequantize(&array![10, 12, 0], &qp)?, array![0.0f32, 1.0, -5.0]);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn dequantize<S, D>(q: &ArrayBase<S, D>, qp: &QParams) -> Result<Array<f32, D>>
where
    S: Data<Elem = i32>,
    D: Dimension,
{
    qp.check_shape(q.shape(), "dequantize")?;
    if let Some(&bad) = q.iter().find(|&&v| v < qp.quant_min || v > qp.quant_max) {
        return Err(QuantError::QuantizedOutOfRange {
            context: "dequantize".into(),
            value: bad as i64,
            quant_min: qp.quant_min as i64,
            quant_max: qp.quant_max as i64,
        });
    }
    Ok(map_with_channel(q, qp, |v, c| {
        dequantize_val(v, qp.scales[c], qp.zero_points[c])
    }))
}

/// Quantizes and dequantizes in one step (`torch.fake_quantize_per_tensor_affine` /
/// `fake_quantize_per_channel_affine`): the float value the int8 model will actually see.
///
/// # Errors
/// As [`quantize`].
///
/// # Examples
/// ```
/// use ndarray::array;
/// use ptq::{fake_quantize, DType, QParams};
/// let qp = QParams::per_tensor(0.5, 0, DType::QUInt8)?;
/// assert_eq!(fake_quantize(&array![0.2f32, 0.3, -1.0], &qp)?, array![0.0, 0.5, 0.0]);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn fake_quantize<S, D>(x: &ArrayBase<S, D>, qp: &QParams) -> Result<Array<f32, D>>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    let q = quantize(x, qp).map_err(|e| e.in_context("fake_quantize"))?;
    Ok(map_with_channel(&q, qp, |v, c| {
        dequantize_val(v, qp.scales[c], qp.zero_points[c])
    }))
}

/// Everything needed to turn an observed `[min, max]` into scales and zero points:
/// PyTorch's observer arguments `dtype`, `qscheme`, `reduce_range`,
/// `quant_min`/`quant_max` and `eps`, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RangeConfig {
    dtype: DType,
    scheme: QScheme,
    quant_min: i32,
    quant_max: i32,
    custom_range: bool,
    reduce_range: bool,
    eps: f32,
}

impl RangeConfig {
    /// Validates a configuration with PyTorch's rules (see [`resolve_quant_range`]), and
    /// refuses what PyTorch refuses: `reduce_range` with a symmetric `quint8` scheme
    /// ("Cannot reduce range for symmetric quantization for quint8"), and an `eps` that is
    /// not a positive normal float.
    ///
    /// # Errors
    /// [`QuantError::InvalidQuantRange`] or [`QuantError::UnsupportedConfig`].
    ///
    /// # Examples
    /// ```
    /// use ptq::{DType, QScheme, RangeConfig};
    /// let c = RangeConfig::new(DType::QUInt8, QScheme::PerTensorAffine, true, None, f32::EPSILON)?;
    /// assert_eq!(c.quant_range(), (0, 127));
    /// assert!(RangeConfig::new(DType::QUInt8, QScheme::PerTensorSymmetric, true, None, f32::EPSILON).is_err());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(
        dtype: DType,
        scheme: QScheme,
        reduce_range: bool,
        custom_range: Option<(i64, i64)>,
        eps: f32,
    ) -> Result<Self> {
        let (quant_min, quant_max) = resolve_quant_range(dtype, reduce_range, custom_range)?;
        if scheme.is_symmetric() && reduce_range && dtype == DType::QUInt8 {
            return Err(QuantError::UnsupportedConfig {
                context: "observer".into(),
                reason: "cannot reduce range for symmetric quantization for quint8 (PyTorch refuses it too)"
                    .into(),
            });
        }
        if !(eps.is_normal() && eps > 0.0) {
            return Err(QuantError::UnsupportedConfig {
                context: "observer".into(),
                reason: format!("eps must be a positive normal float, got {eps:e}"),
            });
        }
        Ok(RangeConfig {
            dtype,
            scheme,
            quant_min,
            quant_max,
            custom_range: custom_range.is_some(),
            reduce_range,
            eps,
        })
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The scheme.
    pub fn scheme(&self) -> QScheme {
        self.scheme
    }
    /// The resolved `(quant_min, quant_max)`.
    pub fn quant_range(&self) -> (i32, i32) {
        (self.quant_min, self.quant_max)
    }
    /// Whether `reduce_range` was asked for.
    pub fn reduce_range(&self) -> bool {
        self.reduce_range
    }
    /// Whether a custom `quant_min`/`quant_max` was given.
    pub fn has_custom_range(&self) -> bool {
        self.custom_range
    }
    /// The smallest scale ever chosen.
    pub fn eps(&self) -> f32 {
        self.eps
    }
}

/// Computes one scale and zero point from an observed range, with the arithmetic of
/// PyTorch's `_calculate_qparams` in `f32`:
///
/// * the range is widened to contain 0: `min_neg = min(min, 0)`, `max_pos = max(max, 0)`;
/// * symmetric: `scale = max(-min_neg, max_pos) / ((quant_max - quant_min) / 2)`, zero
///   point 0 for signed dtypes, 128 for `quint8` (or the floor of the custom range's
///   midpoint);
/// * affine: `scale = (max_pos - min_neg) / (quant_max - quant_min)`, `zero_point =
///   quant_min - round_half_even(min_neg / scale)`, clamped to the range;
/// * the scale is at least `eps`.
///
/// # Errors
/// [`QuantError::NonFinite`] for a NaN or infinite bound and
/// [`QuantError::UnsupportedConfig`] when `min > max`.
///
/// # Examples
/// ```
/// use ptq::{qparams_from_min_max, DType, QScheme, RangeConfig};
/// let cfg = RangeConfig::new(DType::QUInt8, QScheme::PerTensorAffine, false, None, f32::EPSILON)?;
/// let (scale, zp) = qparams_from_min_max(-1.0, 3.0, &cfg)?;
/// assert_eq!(scale, 4.0f32 / 255.0);
/// assert_eq!(zp, 64);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn qparams_from_min_max(min: f32, max: f32, cfg: &RangeConfig) -> Result<(f32, i32)> {
    const CTX: &str = "qparams_from_min_max";
    if !min.is_finite() || !max.is_finite() {
        let (nan, inf, total) = count_non_finite([min, max].iter());
        return Err(QuantError::NonFinite {
            context: CTX.into(),
            nan,
            inf,
            total,
        });
    }
    if min > max {
        return Err(QuantError::UnsupportedConfig {
            context: CTX.into(),
            reason: format!("min {min} must not exceed max {max}"),
        });
    }
    let (qmin, qmax) = (cfg.quant_min, cfg.quant_max);
    let min_neg = min.min(0.0);
    let max_pos = max.max(0.0);
    let levels = (qmax as i64 - qmin as i64) as f64;
    if cfg.scheme.is_symmetric() {
        let bound = (-min_neg).max(max_pos);
        // PyTorch divides the f32 tensor by the Python float `levels / 2`, cast to f32.
        let scale = (bound / (levels / 2.0) as f32).max(cfg.eps);
        let zp = match cfg.dtype {
            DType::QUInt8 if cfg.custom_range => (qmin + qmax).div_euclid(2),
            DType::QUInt8 => 128,
            DType::QInt8 | DType::QInt32 => 0,
        };
        Ok((scale, zp))
    } else {
        let scale = ((max_pos - min_neg) / levels as f32).max(cfg.eps);
        let shift = (min_neg / scale).round_ties_even() as i64;
        let zp = (qmin as i64 - shift).clamp(qmin as i64, qmax as i64) as i32;
        Ok((scale, zp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn reduce_range_halves_custom_ranges_with_floor_division() {
        assert_eq!(
            resolve_quant_range(DType::QInt8, true, Some((-127, 127))).unwrap(),
            (-64, 63)
        );
        assert_eq!(
            resolve_quant_range(DType::QUInt8, true, Some((0, 255))).unwrap(),
            (0, 127)
        );
    }

    #[test]
    fn per_channel_quantize_uses_each_channels_parameters() {
        let qp = QParams::new(
            QScheme::PerChannelAffine { axis: 1 },
            DType::QUInt8,
            (0, 255),
            vec![1.0, 0.5],
            vec![0, 100],
        )
        .unwrap();
        let x = array![[1.0f32, 1.0], [2.0, -2.0]];
        assert_eq!(quantize(&x, &qp).unwrap(), array![[1, 102], [2, 96]]);
        let wrong = array![[1.0f32, 1.0, 1.0]];
        assert!(matches!(
            quantize(&wrong, &qp),
            Err(QuantError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn the_vectorizable_8bit_path_equals_the_scalar_reference() {
        let mut x = 0x1234_5678u32;
        for i in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = match i % 4 {
                0 => f32::from_bits(x),               // any bit pattern
                1 => (x % 2001) as f32 * 0.5 - 500.0, // exact ties
                2 => ((x % 100_000) as f32 - 50_000.0) * 1e-3,
                _ => [
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    0.0,
                    -0.0,
                    f32::MAX,
                    f32::MIN,
                ][(x % 6) as usize],
            };
            if v.is_nan() {
                continue;
            }
            for (s, z, lo, hi) in [
                (0.1f32, 3, 0, 255),
                (0.5, -7, -128, 127),
                (3e-5, 64, 0, 127),
                (7.0, 0, -64, 63),
            ] {
                assert_eq!(
                    quantize_val_8bit(v, 1.0 / s, z as f32, lo as f32, hi as f32),
                    quantize_val(v, s, z, lo, hi),
                    "x={v:e} scale={s}"
                );
            }
        }
    }

    #[test]
    fn nan_is_refused_and_counted() {
        let qp = QParams::per_tensor(0.1, 0, DType::QUInt8).unwrap();
        let x = array![f32::NAN, 1.0, f32::INFINITY, f32::NAN];
        assert_eq!(
            quantize(&x, &qp),
            Err(QuantError::NonFinite {
                context: "quantize".into(),
                nan: 2,
                inf: 1,
                total: 4
            })
        );
    }

    #[test]
    fn subnormal_and_negative_scales_are_refused() {
        for s in [0.0, -1.0, 1e-40, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                QParams::per_tensor(s, 0, DType::QInt8),
                Err(QuantError::InvalidScale { .. })
            ));
        }
        assert!(matches!(
            QParams::per_tensor(1.0, 200, DType::QInt8),
            Err(QuantError::InvalidZeroPoint {
                zero_point: 200,
                ..
            })
        ));
    }
}
