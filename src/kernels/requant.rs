//! Requantization of `i32` accumulators to `u8`, with fbgemm's exact `f32` arithmetic.
//!
//! For output column `j`, fbgemm (torch 2.15.0, engine `fbgemm`, its AVX2 path
//! `requantizeOutputProcessingAvx2`, compiled with FMA contraction) computes:
//!
//! ```text
//! raw  = acc - a_zp * col_offset[j] - w_zp[j] * row_offset[i]      (i32, wrapping)
//! atws = act_scale * w_scale[j]                                      (f32)
//! mult = atws / out_scale                                            (f32)
//! per-tensor weights:  xf = fma(bias[j], rcp, raw as f32),  rcp = (1.0f64 / atws as f64) as f32
//! per-channel weights: xf = raw as f32 + bias[j] / atws[j]          (division, no fusion)
//! x    = xf * mult                                                   (f32)
//! q    = clamp(cvtps2dq(x) + out_zp, relu ? out_zp : 0, 255)
//! ```
//!
//! `cvtps2dq` rounds half to even and turns NaN and values outside the `i32` range into
//! `i32::MIN` (which then clamps to the lower bound). Both forms of the bias term are
//! stored here as one fused multiply-add `fma(bias_b[j], bias_s[j], raw)`: per-tensor
//! `(bias, rcp)`, per-channel `(bias / atws, 1.0)` (an FMA by 1.0 is a plain add), no bias
//! `(0, 0)`.
//!
//! [`BiasMode::Int32`] reproduces ONNX Runtime's `QLinearConv` / `QGemm` instead (MLAS
//! `MlasRequantizeOutput`): the bias is an `i32` added to the accumulator,
//! `q = clamp(cvtps2dq((raw + bias_i32[j]) as f32 * mult) + out_zp)` with
//! `bias_i32[j] = round_half_even(bias[j] / atws[j])` (the `f32` quotient, as the QDQ export
//! writes it). It is stored as `(bias_i32 as f32, 1.0)`: `fma(bias_i32, 1.0, raw as f32)`
//! is the correctly rounded `f32` of the exact sum, i.e. `(raw + bias_i32) as f32`, whenever
//! `|raw|` and `|bias_i32|` are at most `2^24` (both exact in `f32`) and the `i32` sum does
//! not overflow, so the kernels need no second code path.

use crate::error::{QuantError, Result};

/// The output's quantization: scale, zero point (`0..=255`) and fused ReLU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputQuant {
    /// Output scale.
    pub scale: f32,
    /// Output zero point, `0..=255`.
    pub zero_point: i32,
    /// Clamp at the zero point (fused ReLU).
    pub relu: bool,
}

/// How a layer's float bias enters the requantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BiasMode {
    /// fbgemm / PyTorch: the exact `f32` bias term `bias / (act_scale * w_scale)` is added
    /// to the accumulator in float (bit-exact with `torch.ao.nn.quantized` on fbgemm).
    #[default]
    Float,
    /// ONNX Runtime (QDQ `QLinearConv` / `QGemm`): the bias is first rounded half to even to
    /// an `i32` in units of `act_scale * w_scale`, as a QDQ model stores it, and added to the
    /// integer accumulator (see the module documentation).
    Int32,
}

/// Per-output-column requantization parameters, computed for one activation scale.
///
/// Vectors are padded with zeros to a multiple of 16 columns so SIMD code can load whole
/// registers.
#[derive(Debug, Clone, PartialEq)]
pub struct RequantParams {
    pub(crate) n: usize,
    pub(crate) bias_b: Vec<f32>,
    pub(crate) bias_s: Vec<f32>,
    pub(crate) mult: Vec<f32>,
    pub(crate) out_zp: i32,
    pub(crate) lo: i32,
}

/// Rounds up to a multiple of `m`.
pub(crate) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

impl RequantParams {
    /// Builds the parameters of `n` output columns.
    ///
    /// `w_scales` holds one scale, or `n` when `per_channel` (per-channel weights, even
    /// with one channel, take fbgemm's division path for the bias); `bias` is the float
    /// bias (length `n`) or `None`; `out` is the output's scale, zero point and fused ReLU.
    ///
    /// # Errors
    /// [`QuantError::ShapeMismatch`] for wrong lengths, [`QuantError::InvalidScale`] for a
    /// non-positive or non-normal scale, [`QuantError::InvalidZeroPoint`] for an output zero
    /// point outside `0..=255`.
    ///
    /// # Examples
    /// ```
    /// use ptq::kernels::{OutputQuant, RequantParams};
    /// let out = OutputQuant { scale: 0.1, zero_point: 128, relu: false };
    /// let rq = RequantParams::new(3, 0.02, &[0.01], false, Some(&[0.5, -0.5, 0.0]), out)?;
    /// assert_eq!(rq.requantize(0, 0), 133); // 0.5 / 0.1 = 5
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn new(
        n: usize,
        act_scale: f32,
        w_scales: &[f32],
        per_channel: bool,
        bias: Option<&[f32]>,
        out: OutputQuant,
    ) -> Result<Self> {
        Self::with_bias_mode(
            n,
            act_scale,
            w_scales,
            per_channel,
            bias,
            out,
            BiasMode::Float,
        )
    }

    /// As [`RequantParams::new`], with the bias entering as `mode` says
    /// ([`BiasMode::Int32`]: ONNX Runtime's integer bias).
    ///
    /// # Errors
    /// As [`RequantParams::new`].
    ///
    /// # Examples
    /// ```
    /// use ptq::kernels::{BiasMode, OutputQuant, RequantParams};
    /// let out = OutputQuant { scale: 1.0, zero_point: 0, relu: false };
    /// // bias / (act_scale * w_scale) = 0.5 + 0.25: fbgemm keeps the fraction, ORT rounds it
    /// // to 1 (half to even of 0.75) before adding it to the accumulator.
    /// let b = [0.75f32];
    /// let fb = RequantParams::new(1, 1.0, &[1.0], true, Some(&b), out)?;
    /// let ort = RequantParams::with_bias_mode(1, 1.0, &[1.0], true, Some(&b), out, BiasMode::Int32)?;
    /// assert_eq!(fb.requantize(2, 0), 3); // 2.75 -> 3
    /// assert_eq!(ort.requantize(2, 0), 3); // 2 + 1 = 3
    /// assert_eq!(fb.requantize(1, 0), 2); // 1.75 -> 2
    /// let half = [0.5f32];
    /// let fb = RequantParams::new(1, 1.0, &[1.0], true, Some(&half), out)?;
    /// let ort = RequantParams::with_bias_mode(1, 1.0, &[1.0], true, Some(&half), out, BiasMode::Int32)?;
    /// assert_eq!(fb.requantize(1, 0), 2); // 1.5 -> 2 (half to even)
    /// assert_eq!(ort.requantize(1, 0), 1); // bias 0.5 -> 0, 1 + 0 = 1
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn with_bias_mode(
        n: usize,
        act_scale: f32,
        w_scales: &[f32],
        per_channel: bool,
        bias: Option<&[f32]>,
        out: OutputQuant,
        mode: BiasMode,
    ) -> Result<Self> {
        let OutputQuant {
            scale: out_scale,
            zero_point: out_zp,
            relu,
        } = out;
        const CTX: &str = "RequantParams";
        let want = if per_channel { n } else { 1 };
        if w_scales.len() != want {
            return Err(QuantError::ShapeMismatch {
                context: CTX.into(),
                expected: format!("{want} weight scales"),
                actual: format!("{} weight scales", w_scales.len()),
            });
        }
        if let Some(b) = bias {
            if b.len() != n {
                return Err(QuantError::ShapeMismatch {
                    context: CTX.into(),
                    expected: format!("bias of {n} elements"),
                    actual: format!("bias of {} elements", b.len()),
                });
            }
        }
        for (channel, &s) in [act_scale, out_scale]
            .iter()
            .chain(w_scales.iter())
            .enumerate()
        {
            if !(s.is_normal() && s > 0.0) {
                return Err(QuantError::InvalidScale {
                    context: CTX.into(),
                    channel: channel.saturating_sub(2),
                    value: s,
                });
            }
        }
        if !(0..=255).contains(&out_zp) {
            return Err(QuantError::InvalidZeroPoint {
                context: CTX.into(),
                channel: 0,
                zero_point: out_zp as i64,
                quant_min: 0,
                quant_max: 255,
            });
        }
        let np = round_up(n.max(1), 16);
        let mut bias_b = vec![0.0f32; np];
        let mut bias_s = vec![0.0f32; np];
        let mut mult = vec![0.0f32; np];
        for j in 0..n {
            let ws = if w_scales.len() == 1 {
                w_scales[0]
            } else {
                w_scales[j]
            };
            let atws = act_scale * ws;
            mult[j] = atws / out_scale;
            if let Some(b) = bias {
                if mode == BiasMode::Int32 {
                    // the QDQ export's int32 bias: f32 quotient, half to even, saturating
                    let bi = (b[j] / atws).round_ties_even() as i32;
                    bias_b[j] = bi as f32;
                    bias_s[j] = 1.0;
                } else if per_channel {
                    bias_b[j] = b[j] / atws;
                    bias_s[j] = 1.0;
                } else {
                    bias_b[j] = b[j];
                    bias_s[j] = (1.0f64 / atws as f64) as f32;
                }
            }
        }
        Ok(RequantParams {
            n,
            bias_b,
            bias_s,
            mult,
            out_zp,
            lo: if relu { out_zp } else { 0 },
        })
    }

    /// Number of output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Requantizes one zero-point-corrected accumulator `raw` of column `j` (the scalar
    /// definition every kernel follows bit for bit). `j` must be below [`n`](Self::n);
    /// columns past it use zero parameters.
    pub fn requantize(&self, raw: i32, j: usize) -> u8 {
        let j = j.min(self.mult.len() - 1);
        requant_one(
            raw,
            self.bias_b[j],
            self.bias_s[j],
            self.mult[j],
            self.out_zp,
            self.lo,
        )
    }
}

/// `cvtps2dq`: round half to even; NaN and out-of-range values give `i32::MIN`.
#[inline(always)]
pub(crate) fn cvt_round(x: f32) -> i32 {
    // 2^31 as f32 is exact; the valid range is [-2^31, 2^31).
    if x.is_nan() || !(-2147483648.0f32..2147483648.0f32).contains(&x) {
        i32::MIN
    } else {
        x.round_ties_even() as i32
    }
}

/// One output value; see the module documentation.
#[inline(always)]
pub(crate) fn requant_one(raw: i32, bb: f32, bs: f32, mult: f32, out_zp: i32, lo: i32) -> u8 {
    let xf = bb.mul_add(bs, raw as f32);
    let r = cvt_round(xf * mult) as i64 + out_zp as i64;
    r.clamp(lo as i64, 255) as u8
}

/// Requantization parameters of a layer, built for the activation scale of the last call
/// and reused while the scale stays the same (a converted model always feeds a layer the
/// same scale): no per-call rebuild or allocation on the hot path.
#[derive(Default)]
pub(crate) struct RequantCache(std::sync::Mutex<Option<(u32, std::sync::Arc<Vec<RequantParams>>)>>);

impl RequantCache {
    /// The parameters for `act_scale`, built by `build` on a miss.
    pub(crate) fn get(
        &self,
        act_scale: f32,
        build: impl FnOnce() -> Result<Vec<RequantParams>>,
    ) -> Result<std::sync::Arc<Vec<RequantParams>>> {
        let key = act_scale.to_bits();
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, rq)) = slot.as_ref() {
            if *k == key {
                return Ok(rq.clone());
            }
        }
        let rq = std::sync::Arc::new(build()?);
        *slot = Some((key, rq.clone()));
        Ok(rq)
    }

    fn snapshot(&self) -> Option<(u32, std::sync::Arc<Vec<RequantParams>>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Clone for RequantCache {
    fn clone(&self) -> Self {
        RequantCache(std::sync::Mutex::new(self.snapshot()))
    }
}

impl std::fmt::Debug for RequantCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scale = self.snapshot().map(|(k, _)| f32::from_bits(k));
        f.debug_struct("RequantCache")
            .field("act_scale", &scale)
            .finish()
    }
}
