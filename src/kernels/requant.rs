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
                if per_channel {
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
