//! Elementwise int8 kernels: PyTorch's quantized add (and add + ReLU), and the
//! `f32 <-> u8` conversions at the borders of an int8 model ([`quantize_u8`],
//! [`dequantize_u8`]).
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

/// `dst[i] = clamp(zero_point + round_half_even(src[i] * (1 / scale)), 0, 255)`:
/// PyTorch's `quantize_per_tensor` to `quint8`, bit for bit (the crate's 8-bit
/// quantization formula), on the set's fastest kernel (sixteen lanes with AVX-512,
/// eight with AVX2). Returns whether every input was finite; when it was not, `dst` is
/// unspecified and the caller must report the NaN or infinity.
///
/// # Panics
/// When `src` and `dst` differ in length.
///
/// # Examples
/// ```
/// use ptq::kernels::{elementwise::quantize_u8, KernelSet};
/// let mut q = [0u8; 4];
/// assert!(quantize_u8(KernelSet::best(), &[0.0, 0.25, -1.0, 1e9], 0.1, 10, &mut q));
/// assert_eq!(q, [10, 12, 0, 255]);
/// assert!(!quantize_u8(KernelSet::portable(), &[0.0, f32::NAN, 0.0, 0.0], 0.1, 10, &mut q));
/// ```
pub fn quantize_u8(ks: KernelSet, src: &[f32], scale: f32, zero_point: u8, dst: &mut [u8]) -> bool {
    assert_eq!(src.len(), dst.len(), "quantize_u8: lengths differ");
    let inv = 1.0f32 / scale;
    let zpf = zero_point as f32;
    #[allow(unused_mut)]
    let mut done = 0;
    #[allow(unused_mut)]
    let mut finite = true;
    #[cfg(target_arch = "x86_64")]
    if let Some(s) = ks.simd {
        (done, finite) = s.quantize_u8(src, inv, zpf, dst);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ks;
    for (o, &v) in dst[done..].iter_mut().zip(&src[done..]) {
        finite &= v.is_finite();
        *o = crate::qparams::quantize_val_8bit(v, inv, zpf, 0.0, 255.0) as u8;
    }
    finite
}

/// `dst[i] = (src[i] - zero_point) as f32 * scale`: PyTorch's `dequantize` of `quint8`,
/// on the set's fastest kernel (the arithmetic is exact up to the one rounded multiply,
/// so every kernel gives the same bits).
///
/// # Panics
/// When `src` and `dst` differ in length.
///
/// # Examples
/// ```
/// use ptq::kernels::{elementwise::dequantize_u8, KernelSet};
/// let mut f = [0f32; 3];
/// dequantize_u8(KernelSet::best(), &[10, 12, 0], 0.5, 10, &mut f);
/// assert_eq!(f, [0.0, 1.0, -5.0]);
/// ```
pub fn dequantize_u8(ks: KernelSet, src: &[u8], scale: f32, zero_point: u8, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "dequantize_u8: lengths differ");
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if let Some(s) = ks.simd {
        done = s.dequantize_u8(src, scale, zero_point, dst);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ks;
    let zp = zero_point as i32;
    for (o, &q) in dst[done..].iter_mut().zip(&src[done..]) {
        *o = (q as i32 - zp) as f32 * scale;
    }
}

/// [`quantize_u8`] into a new vector (not zero-filled first on SIMD sets); `None` when
/// an input is NaN or infinite.
///
/// # Examples
/// ```
/// use ptq::kernels::{elementwise::quantize_u8_to_vec, KernelSet};
/// assert_eq!(quantize_u8_to_vec(KernelSet::best(), &[0.0, 0.25], 0.1, 10), Some(vec![10, 12]));
/// assert_eq!(quantize_u8_to_vec(KernelSet::best(), &[f32::INFINITY], 0.1, 10), None);
/// ```
pub fn quantize_u8_to_vec(
    ks: KernelSet,
    src: &[f32],
    scale: f32,
    zero_point: u8,
) -> Option<Vec<u8>> {
    #[cfg(target_arch = "x86_64")]
    if let Some(s) = ks.simd {
        return s.quantize_u8_vec(src, 1.0f32 / scale, zero_point as f32);
    }
    let mut v = vec![0u8; src.len()];
    quantize_u8(ks, src, scale, zero_point, &mut v).then_some(v)
}

/// [`dequantize_u8`] into a new vector (not zero-filled first on SIMD sets).
///
/// # Examples
/// ```
/// use ptq::kernels::{elementwise::dequantize_u8_to_vec, KernelSet};
/// assert_eq!(dequantize_u8_to_vec(KernelSet::best(), &[10, 12], 0.5, 10), vec![0.0, 1.0]);
/// ```
pub fn dequantize_u8_to_vec(ks: KernelSet, src: &[u8], scale: f32, zero_point: u8) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if let Some(s) = ks.simd {
        return s.dequantize_u8_vec(src, scale, zero_point);
    }
    let mut v = vec![0f32; src.len()];
    dequantize_u8(ks, src, scale, zero_point, &mut v);
    v
}

/// Checks the lengths of a `b x c x hw` border conversion.
fn check_border(kind: &str, src: usize, dst: usize, b: usize, c: usize, hw: usize) {
    let n = b
        .checked_mul(c)
        .and_then(|n| n.checked_mul(hw))
        .unwrap_or_else(|| panic!("{kind}: {b} x {c} x {hw} overflows"));
    assert!(
        src == n && dst == n,
        "{kind}: {b} x {c} x {hw} needs {n} values, got {src} in and {dst} out"
    );
}

/// Whether the SIMD sets convert a `c`-channel border in one fused pass (blocks of 16
/// channels transposed in registers, or RGB triples interleaved by `pshufb`); other
/// channel counts go through a flat conversion and a byte transpose in cache.
#[cfg(target_arch = "x86_64")]
fn fused_border(c: usize) -> bool {
    c >= 16 || c == 3
}

/// Tensors of at least this many elements spread their images over rayon's pool.
const PAR_MIN: usize = 1 << 18;

/// Runs `f(src_plane, dst_plane, scratch)` over the `b` planes of `plane` elements, with
/// `scratch` bytes of scratch per worker (none allocated when 0; in parallel for large
/// tensors with more than one image); true when every call returned true.
pub(crate) fn for_planes<S: Sync, D: Send>(
    src: &[S],
    dst: &mut [D],
    plane: usize,
    scratch: usize,
    f: impl Fn(&[S], &mut [D], &mut [u8]) -> bool + Sync,
) -> bool {
    use rayon::prelude::*;
    if plane == 0 {
        return true;
    }
    if src.len() > plane && src.len() >= PAR_MIN {
        dst.par_chunks_mut(plane)
            .zip(src.par_chunks(plane))
            .map_init(|| vec![0u8; scratch], |tmp, (d, s)| f(s, d, tmp))
            .reduce(|| true, |a, b| a & b)
    } else {
        let mut tmp = vec![0u8; scratch];
        dst.chunks_mut(plane)
            .zip(src.chunks(plane))
            .fold(true, |ok, (d, s)| f(s, d, &mut tmp) & ok)
    }
}

/// [`quantize_u8`] of `b` NCHW images (`c` channels of `hw` pixels) written in NHWC
/// order: `dst[(i * hw + p) * c + ch] = quantize(src[(i * c + ch) * hw + p])`, in one pass
/// (the quantize border before a convolution). The portable set runs the plain loops;
/// the SIMD sets quantize blocks of 16 channels x 16 pixels and transpose them in
/// registers (three channels: interleaved by `pshufb`). Returns whether every input was finite; when it was not, `dst` is
/// unspecified and the caller must report the NaN or infinity.
///
/// # Panics
/// When `src` or `dst` does not hold `b * c * hw` values.
///
/// # Examples
/// ```
/// use ptq::kernels::{elementwise::quantize_nchw_to_nhwc, KernelSet};
/// // one image, 2 channels of 3 pixels
/// let x = [0.0f32, 0.1, 0.2, 1.0, 1.1, 1.2];
/// let mut q = [0u8; 6];
/// assert!(quantize_nchw_to_nhwc(KernelSet::best(), &x, 1, 2, 3, 0.1, 0, &mut q));
/// assert_eq!(q, [0, 10, 1, 11, 2, 12]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn quantize_nchw_to_nhwc(
    ks: KernelSet,
    src: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    scale: f32,
    zero_point: u8,
    dst: &mut [u8],
) -> bool {
    check_border("quantize_nchw_to_nhwc", src.len(), dst.len(), b, c, hw);
    let inv = 1.0f32 / scale;
    let zpf = zero_point as f32;
    #[cfg(target_arch = "x86_64")]
    if let (Some(s), true) = (ks.simd, fused_border(c)) {
        return s.quantize_nchw_to_nhwc(src, b, c, hw, inv, zpf, dst);
    }
    if ks.simd.is_some() {
        // Few channels (an RGB stem): quantize in memory order, then interleave the
        // planes from cache (the 16-channel blocks would be mostly empty).
        return for_planes(src, dst, c * hw, c * hw, |s, d, tmp| {
            let ok = quantize_u8(ks, s, scale, zero_point, tmp);
            super::transpose_u8(ks, tmp, c, hw, d);
            ok
        });
    }
    quantize_nchw_to_nhwc_portable(src, b, c, hw, inv, zpf, dst)
}

/// The plain loops of [`quantize_nchw_to_nhwc`].
fn quantize_nchw_to_nhwc_portable(
    src: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    inv: f32,
    zpf: f32,
    dst: &mut [u8],
) -> bool {
    let plane = c * hw;
    let mut finite = true;
    if plane == 0 {
        return true;
    }
    for (s, d) in src.chunks(plane).zip(dst.chunks_mut(plane)).take(b) {
        for (p, px) in d.chunks_mut(c).enumerate() {
            for (ch, o) in px.iter_mut().enumerate() {
                let v = s[ch * hw + p];
                finite &= v.is_finite();
                *o = crate::qparams::quantize_val_8bit(v, inv, zpf, 0.0, 255.0) as u8;
            }
        }
    }
    finite
}

/// [`quantize_nchw_to_nhwc`] into a new vector (not zero-filled first on SIMD sets);
/// `None` when an input is NaN or infinite.
///
/// # Panics
/// When `src` does not hold `b * c * hw` values.
///
/// # Examples
/// ```
/// use ptq::kernels::{elementwise::quantize_nchw_to_nhwc_vec, KernelSet};
/// let x = [0.0f32, 0.1, 1.0, 1.1];
/// let ks = KernelSet::best();
/// assert_eq!(quantize_nchw_to_nhwc_vec(ks, &x, 1, 2, 2, 0.1, 0), Some(vec![0, 10, 1, 11]));
/// assert_eq!(quantize_nchw_to_nhwc_vec(ks, &[f32::NAN], 1, 1, 1, 0.1, 0), None);
/// ```
pub fn quantize_nchw_to_nhwc_vec(
    ks: KernelSet,
    src: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    scale: f32,
    zero_point: u8,
) -> Option<Vec<u8>> {
    check_border("quantize_nchw_to_nhwc", src.len(), src.len(), b, c, hw);
    #[cfg(target_arch = "x86_64")]
    if let (Some(s), true) = (ks.simd, fused_border(c)) {
        return s.quantize_nchw_to_nhwc_vec(src, b, c, hw, 1.0f32 / scale, zero_point as f32);
    }
    let mut v = vec![0u8; src.len()];
    quantize_nchw_to_nhwc(ks, src, b, c, hw, scale, zero_point, &mut v).then_some(v)
}

/// [`dequantize_u8`] of `b` NHWC images (`hw` pixels of `c` channels) written in NCHW
/// order: `dst[(i * c + ch) * hw + p] = dequantize(src[(i * hw + p) * c + ch])` (the
/// dequantize border after a convolution). The SIMD sets transpose blocks of 16 pixels x
/// 16 channels in registers and write the floats straight to `dst` (three channels:
/// de-interleaved by `pshufb`); other channel counts, and the portable set, transpose
/// each image into byte scratch and dequantize it in memory order. Every set gives the
/// same bits.
///
/// # Panics
/// When `src` or `dst` does not hold `b * c * hw` values.
///
/// # Examples
/// ```
/// use ptq::kernels::{elementwise::dequantize_nhwc_to_nchw, KernelSet};
/// let q = [0u8, 10, 1, 11, 2, 12];
/// let mut f = [0f32; 6];
/// dequantize_nhwc_to_nchw(KernelSet::best(), &q, 1, 2, 3, 0.5, 0, &mut f);
/// assert_eq!(f, [0.0, 0.5, 1.0, 5.0, 5.5, 6.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn dequantize_nhwc_to_nchw(
    ks: KernelSet,
    src: &[u8],
    b: usize,
    c: usize,
    hw: usize,
    scale: f32,
    zero_point: u8,
    dst: &mut [f32],
) {
    check_border("dequantize_nhwc_to_nchw", src.len(), dst.len(), b, c, hw);
    #[cfg(target_arch = "x86_64")]
    if let (Some(s), true) = (ks.simd, fused_border(c)) {
        return s.dequantize_nhwc_to_nchw(src, b, c, hw, scale, zero_point, dst);
    }
    for_planes(src, dst, c * hw, c * hw, |s, d, tmp| {
        super::transpose_u8(ks, s, hw, c, tmp);
        dequantize_u8(ks, tmp, scale, zero_point, d);
        true
    });
}

/// [`dequantize_nhwc_to_nchw`] into a new vector.
///
/// # Panics
/// When `src` does not hold `b * c * hw` values.
///
/// # Examples
/// ```
/// use ptq::kernels::{elementwise::dequantize_nhwc_to_nchw_vec, KernelSet};
/// let f = dequantize_nhwc_to_nchw_vec(KernelSet::best(), &[0, 10, 1, 11], 1, 2, 2, 0.5, 0);
/// assert_eq!(f, vec![0.0, 0.5, 5.0, 5.5]);
/// ```
pub fn dequantize_nhwc_to_nchw_vec(
    ks: KernelSet,
    src: &[u8],
    b: usize,
    c: usize,
    hw: usize,
    scale: f32,
    zero_point: u8,
) -> Vec<f32> {
    check_border("dequantize_nhwc_to_nchw", src.len(), src.len(), b, c, hw);
    #[cfg(target_arch = "x86_64")]
    if let (Some(s), true) = (ks.simd, fused_border(c)) {
        return s.dequantize_nhwc_to_nchw_vec(src, b, c, hw, scale, zero_point);
    }
    // Transposing the bytes first then dequantizing into a vector that is not zero-filled
    // measured faster here than zero-filling the floats for the image-by-image pass.
    let mut t = vec![0u8; src.len()];
    for_planes(src, &mut t, c * hw, 0, |s, d, _| {
        super::transpose_u8(ks, s, hw, c, d);
        true
    });
    dequantize_u8_to_vec(ks, &t, scale, zero_point)
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

    /// Awkward floats: exact ties, the 2^22 clamp, subnormals, signed zeros, values that
    /// saturate both ways, and a deterministic spread.
    fn awkward_floats() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            127.5,
            128.5,
            254.5,
            255.5,
            -10.5,
            4_194_304.0,
            -4_194_304.0,
            4_194_305.0,
            8_388_609.0,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            0.049999997,
            0.050000004,
        ];
        let mut s = 0x1234_5678u32;
        for _ in 0..5000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            v.push((s as i32) as f32 / (1u32 << (s % 31)) as f32);
        }
        v
    }

    /// Every set against the scalar 8-bit formula (`qparams::quantize`), on every length
    /// up to two registers past the SIMD width and at odd offsets; non-finite input is
    /// reported wherever it sits.
    #[test]
    fn quantize_kernels_match_the_definition() {
        let x = awkward_floats();
        for &(scale, zp) in &[
            (1.0f32, 0u8),
            (0.1, 10),
            (0.05, 128),
            (3.7, 255),
            (1e-3, 77),
        ] {
            let inv = 1.0f32 / scale;
            let want: Vec<u8> = x
                .iter()
                .map(|&v| crate::qparams::quantize_val_8bit(v, inv, zp as f32, 0.0, 255.0) as u8)
                .collect();
            for ks in KernelSet::all_available() {
                let mut got = vec![0u8; x.len()];
                assert!(quantize_u8(ks, &x, scale, zp, &mut got));
                assert_eq!(got, want, "{:?} scale {scale} zp {zp}", ks.backend());
                let got = quantize_u8_to_vec(ks, &x, scale, zp);
                assert_eq!(got.as_ref(), Some(&want), "{:?} to_vec", ks.backend());
                for len in 0..40 {
                    let mut got = vec![0u8; len];
                    assert!(quantize_u8(ks, &x[3..3 + len], scale, zp, &mut got));
                    assert_eq!(got, want[3..3 + len], "{:?} len {len}", ks.backend());
                    let got = quantize_u8_to_vec(ks, &x[3..3 + len], scale, zp).unwrap();
                    assert_eq!(got, want[3..3 + len], "{:?} to_vec len {len}", ks.backend());
                }
            }
        }
        for ks in KernelSet::all_available() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, 7, 15, 16, 31, 33] {
                    let mut x = vec![1.0f32; 34];
                    x[at] = bad;
                    let mut q = vec![0u8; 34];
                    assert!(
                        !quantize_u8(ks, &x, 0.1, 3, &mut q),
                        "{:?} {bad} at {at}",
                        ks.backend()
                    );
                }
            }
        }
    }

    /// Every set against `(q - zp) * scale`, every byte, lengths around the SIMD width.
    #[test]
    fn dequantize_kernels_match_the_definition() {
        let q: Vec<u8> = (0..1000u32).map(|i| (i * 37 % 256) as u8).collect();
        for &(scale, zp) in &[(1.0f32, 0u8), (0.1, 10), (0.0123, 128), (3.7, 255)] {
            let want: Vec<f32> = q
                .iter()
                .map(|&v| (v as i32 - zp as i32) as f32 * scale)
                .collect();
            for ks in KernelSet::all_available() {
                for len in (0..40).chain([1000]) {
                    let mut got = vec![0f32; len];
                    dequantize_u8(ks, &q[..len], scale, zp, &mut got);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{:?} len {len} scale {scale}", ks.backend());
                }
            }
        }
    }

    /// The border conversions with the layout change, on every set, against the plain
    /// definition (index formula + the 8-bit formula): every channel count around the
    /// 16-channel blocks, pixel counts with and without a tail, one and several images
    /// (the parallel split), awkward floats, and non-finite input anywhere.
    #[test]
    fn layout_borders_match_the_definition_on_every_set() {
        let pool = awkward_floats();
        for &(b, c, hw) in &[
            (1usize, 1usize, 1usize),
            (1, 3, 12544 / 16),
            (2, 3, 17),
            (1, 3, 15),
            (3, 3, 16),
            (2, 3, 100_000),
            (1, 2, 40),
            (1, 4, 33),
            (1, 15, 16),
            (2, 16, 16),
            (3, 17, 33),
            (1, 31, 5),
            (2, 32, 49),
            (8, 128, 784 / 4),
            (1, 40, 64),
            (0, 8, 8),
            (2, 0, 8),
            (2, 8, 0),
            (5, 64, 1024),
        ] {
            let n = b * c * hw;
            let x: Vec<f32> = (0..n).map(|i| pool[(i * 7 + 3) % pool.len()]).collect();
            let q: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            for &(scale, zp) in &[(0.1f32, 10u8), (0.05, 128), (3.7, 255), (1e-3, 0)] {
                let inv = 1.0f32 / scale;
                let mut want_q = vec![0u8; n];
                let mut want_f = vec![0f32; n];
                for i in 0..b {
                    for ch in 0..c {
                        for p in 0..hw {
                            let (nchw, nhwc) = ((i * c + ch) * hw + p, (i * hw + p) * c + ch);
                            want_q[nhwc] = crate::qparams::quantize_val_8bit(
                                x[nchw], inv, zp as f32, 0.0, 255.0,
                            ) as u8;
                            want_f[nchw] = (q[nhwc] as i32 - zp as i32) as f32 * scale;
                        }
                    }
                }
                for ks in KernelSet::all_available() {
                    let what = format!("{:?} {b}x{c}x{hw} scale {scale}", ks.backend());
                    let mut got = vec![0u8; n];
                    assert!(quantize_nchw_to_nhwc(ks, &x, b, c, hw, scale, zp, &mut got));
                    assert_eq!(got, want_q, "{what}");
                    let got = quantize_nchw_to_nhwc_vec(ks, &x, b, c, hw, scale, zp);
                    assert_eq!(got.as_ref(), Some(&want_q), "{what} vec");
                    let mut got = vec![0f32; n];
                    dequantize_nhwc_to_nchw(ks, &q, b, c, hw, scale, zp, &mut got);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want_f), "{what}");
                    let got = dequantize_nhwc_to_nchw_vec(ks, &q, b, c, hw, scale, zp);
                    assert_eq!(bits(&got), bits(&want_f), "{what} vec");
                }
            }
        }
        // NaN / infinity in the block part, the partial channel block and the pixel tail
        // (and for three channels: each channel of the pshufb blocks and the tail)
        for (b, c, hw, ats) in [
            (
                2,
                20,
                18,
                vec![0, 5, 16 * 18 + 3, 19 * 18 + 17, 2 * 20 * 18 - 1],
            ),
            (
                2,
                3,
                37,
                vec![0, 15, 37 + 31, 2 * 37 + 2, 36, 3 * 37 + 33, 2 * 3 * 37 - 1],
            ),
        ] {
            for ks in KernelSet::all_available() {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    for &at in &ats {
                        let mut x = vec![0.5f32; b * c * hw];
                        x[at] = bad;
                        let mut q = vec![0u8; x.len()];
                        let what = format!("{:?} {bad} at {at}", ks.backend());
                        assert!(
                            !quantize_nchw_to_nhwc(ks, &x, b, c, hw, 0.1, 3, &mut q),
                            "{what}"
                        );
                        assert_eq!(quantize_nchw_to_nhwc_vec(ks, &x, b, c, hw, 0.1, 3), None);
                    }
                }
            }
        }
    }
}
