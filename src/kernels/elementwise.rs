//! Elementwise int8 kernels: PyTorch's quantized add (and add + ReLU).
//!
//! PyTorch's vectorized add (`qadd_kernel`, blocks of 64 elements in memory order)
//! computes, per element, in `f32`:
//!
//! ```text
//! da = fma(sa, qa, -(za * sa))         db likewise
//! c  = da + db                         (ReLU: max(c, 0))
//! q  = clamp(cvtps2dq(min(c * (1 / so), 2147483520.0)) + zo, 0, 255)
//! ```
//!
//! `add_u8` applies that formula to every element; the caller handles PyTorch's scalar
//! tail (the last `numel % 64` elements in memory order), which rounds differently.

use super::requant::cvt_round;
use super::KernelSet;

/// The constants of the vectorized add formula (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddParams {
    /// First input's scale.
    pub sa: f32,
    /// `-(za as f32) * sa`.
    pub pa: f32,
    /// Second input's scale.
    pub sb: f32,
    /// `-(zb as f32) * sb`.
    pub pb: f32,
    /// `1 / out_scale` in `f32`.
    pub inv: f32,
    /// Output zero point, `0..=255`.
    pub zo: i32,
    /// Clamp the float sum at 0 (fused ReLU).
    pub relu: bool,
}

impl AddParams {
    /// The parameters for inputs `(sa, za)`, `(sb, zb)` and output `(so, zo)`.
    pub fn new(sa: f32, za: i32, sb: f32, zb: i32, so: f32, zo: i32, relu: bool) -> Self {
        AddParams {
            sa,
            pa: sa * -(za as f32),
            sb,
            pb: sb * -(zb as f32),
            inv: 1.0f32 / so,
            zo,
            relu,
        }
    }

    /// The formula on one element pair (the definition every kernel follows bit for bit).
    #[inline]
    pub fn one(&self, qa: u8, qb: u8) -> u8 {
        let da = self.sa.mul_add(qa as f32, self.pa);
        let db = self.sb.mul_add(qb as f32, self.pb);
        self.finish(da, db)
    }

    /// Sum, ReLU and quantization of two dequantized values.
    #[inline(always)]
    pub(crate) fn finish(&self, da: f32, db: f32) -> u8 {
        let mut c = da + db;
        if self.relu {
            c = c.max(0.0);
        }
        let r = cvt_round((c * self.inv).min(2147483520.0)) as i64 + self.zo as i64;
        r.clamp(0, 255) as u8
    }
}

/// Portable kernel: the two `fma` terms take only 256 values each, so they are tabulated
/// (exactly, with `f32::mul_add`) once per call.
pub(crate) fn add_portable(a: &[u8], b: &[u8], p: &AddParams, out: &mut [u8]) {
    let mut ta = [0f32; 256];
    let mut tb = [0f32; 256];
    for q in 0..256 {
        ta[q] = p.sa.mul_add(q as f32, p.pa);
        tb[q] = p.sb.mul_add(q as f32, p.pb);
    }
    // cvtps2dq then clamping to 0..=255 only needs the rounding of values in
    // [-512, 512]: beyond that the clamp decides. There, adding and subtracting 1.5 * 2^23
    // rounds half to even exactly (default rounding mode), without a libm call.
    const MAGIC: f32 = 12582912.0;
    let zo = p.zo;
    let one = |qa: u8, qb: u8| {
        let mut c = ta[qa as usize] + tb[qb as usize];
        if p.relu {
            c = c.max(0.0);
        }
        let x = (c * p.inv).clamp(-512.0, 512.0);
        let r = ((x + MAGIC) - MAGIC) as i32 + zo;
        r.clamp(0, 255) as u8
    };
    for ((o, &qa), &qb) in out.iter_mut().zip(a).zip(b) {
        *o = one(qa, qb);
    }
}

/// `out[i] = add(a[i], b[i])` by the vectorized formula, on the set's fastest kernel.
///
/// # Panics
/// When the three slices differ in length.
pub(crate) fn add_u8(ks: KernelSet, a: &[u8], b: &[u8], p: &AddParams, out: &mut [u8]) {
    assert!(a.len() == out.len() && b.len() == out.len());
    match ks.simd {
        #[cfg(target_arch = "x86_64")]
        Some(s) => s.add_u8(a, b, p, out),
        _ => add_portable(a, b, p, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every set, every (qa, qb) pair, against the scalar definition, with extreme output
    /// scales (saturation both ways, values past the i32 range).
    #[test]
    fn add_kernels_match_the_definition_on_every_pair() {
        let a: Vec<u8> = (0..65536u32).map(|i| (i >> 8) as u8).collect();
        let b: Vec<u8> = (0..65536u32).map(|i| i as u8).collect();
        for &(sa, za, sb, zb, so, zo) in &[
            (0.02f32, 120, 0.03f32, 130, 0.04f32, 128),
            (0.1, 0, 0.1, 255, 0.0123, 3),
            (1e-3, 77, 2.5, 0, 1e-6, 255),
            (3.0, 255, 3.0, 255, 1e9, 0),
            (0.0071, 31, 0.0093, 200, 0.0137, 91),
        ] {
            for relu in [false, true] {
                let p = AddParams::new(sa, za, sb, zb, so, zo, relu);
                let want: Vec<u8> = a.iter().zip(&b).map(|(&x, &y)| p.one(x, y)).collect();
                for ks in KernelSet::all_available() {
                    let mut got = vec![0u8; a.len()];
                    add_u8(ks, &a, &b, &p, &mut got);
                    assert_eq!(got, want, "{:?} {p:?}", ks.backend());
                    // Odd lengths and offsets (SIMD tails).
                    let mut got = vec![0u8; 1001];
                    add_u8(ks, &a[7..1008], &b[7..1008], &p, &mut got);
                    assert_eq!(got, want[7..1008], "{:?} tail", ks.backend());
                }
            }
        }
    }
}
