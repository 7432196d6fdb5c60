//! `f32` kernels for the float layers (`nn::Conv2d`, `nn::Linear`), used by calibration
//! and float islands:
//! - a direct depthwise convolution that reads a zero-padded, column-phase-split copy of
//!   each input plane ([`PadPlan`]), so every tap is a contiguous, branch-free run of 16
//!   lanes that LLVM vectorizes (the x86 module compiles the same body with AVX2 + FMA);
//! - an im2col built from the same padded planes (one slice copy per kernel tap and output
//!   row, strided convolutions included);
//! - a blocked matrix-vector product for the few-row `Linear` (each weight row is read
//!   once for up to four input rows; a packed GEMM would spend its time packing);
//! - a GEMM for convolutions ([`gemm_bias`]): the weights packed once per call into strips
//!   of 8 (AVX-512) or 6 (AVX2) rows, the im2col columns (or a pointwise convolution's
//!   input) read in place in tiles of 32 / 16 columns; each sum starts from the bias and
//!   ReLU is applied as the tile is stored (no second pass over the output).
//!
//! Linear layers with many rows still go to `matrixmultiply` (through ndarray), which
//! selects AVX2 + FMA (or AVX-512) at run time.
//!
//! Summation orders differ from PyTorch's (as any two float libraries do); results agree
//! to float rounding (the float parity tests allow 1e-5 relative). Every kernel set
//! (portable, AVX2, AVX-512) computes the depthwise and GEMM sums in the same order with
//! fused multiply-adds (`f32::mul_add` in the portable bodies: one instruction where the
//! target has FMA, a correctly rounded library call elsewhere), so convolutions agree bit
//! for bit across sets. The few-row Linear kernel's x86 bodies sum in vector lanes and
//! differ from the portable body in the last bits.

use std::cell::RefCell;

use rayon::prelude::*;

/// Geometry of a float convolution on NCHW data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    /// Input `(h, w)`.
    pub in_hw: (usize, usize),
    /// Output `(h, w)`.
    pub out_hw: (usize, usize),
    /// Kernel `(h, w)`.
    pub kernel: (usize, usize),
    /// Stride `(h, w)`.
    pub stride: (usize, usize),
    /// Zero padding `(top, left)`; the bottom / right padding is whatever `out_hw` needs.
    pub padding: (usize, usize),
    /// Dilation `(h, w)`.
    pub dilation: (usize, usize),
}

/// Lanes of the portable kernels' accumulators.
const L: usize = 16;

/// Columns past an output row's last column that the padded plane of a depthwise
/// convolution provides (the widest kernel's lane group; at least `L`).
const OVERREAD: usize = 32;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[path = "f32_x86.rs"]
mod x86;

/// The x86 vector kernels this thread's kernel set selects, if any.
#[cfg(target_arch = "x86_64")]
fn isa() -> Isa {
    x86::Isa::of(super::KernelSet::current())
}

/// The vector kernels a call uses (`None`: the portable bodies).
#[cfg(target_arch = "x86_64")]
type Isa = Option<x86::Isa>;
#[cfg(not(target_arch = "x86_64"))]
type Isa = Option<()>;

/// The vector kernels a call uses: none off x86.
#[cfg(not(target_arch = "x86_64"))]
fn isa() -> Isa {
    None
}

/// `rows` rows of `wo` values: row `i` of `dst` (at `i * wo`) from `src[off + i * step..]`;
/// with vector moves on x86 (short rows: no `memcpy` call per row).
#[inline]
fn copy_rows(isa: Isa, dst: &mut [f32], src: &[f32], at: (usize, usize), rows: usize, wo: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = isa {
        return x86::copy_rows(isa, dst, src, at, rows, wo);
    }
    let _ = isa;
    let (off, step) = at;
    for (i, d) in dst.chunks_exact_mut(wo.max(1)).take(rows).enumerate() {
        d.copy_from_slice(&src[off + i * step..off + i * step + wo]);
    }
}

type Scratch = std::thread::LocalKey<RefCell<Vec<f32>>>;

thread_local! {
    /// Per-thread scratch for padded planes, kept between calls with the key of the
    /// plan it last held (its zeros are reused).
    static PAD: RefCell<(Vec<f32>, Option<PadKey>)> = const { RefCell::new((Vec::new(), None)) };
    /// Per-thread scratch for im2col columns, kept between calls.
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread scratch for GEMM products, kept between calls.
    static PROD: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Scratch larger than this (in values) is freed after the call instead of kept.
const KEEP_SCRATCH: usize = 16 << 20;

/// Runs `f` with this thread's scratch buffer `key` resized to `len` (contents
/// unspecified). A nested call on the same key gets a fresh buffer.
fn with_scratch<R>(key: &'static Scratch, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = key.with(|s| s.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    if buf.len() <= KEEP_SCRATCH {
        key.with(|s| s.replace(buf));
    }
    r
}

/// Runs `f` with two per-thread buffers of `cols` and `prod` values (for im2col columns
/// and a GEMM product; contents unspecified; reused between calls instead of allocated).
pub(crate) fn with_cols<R>(
    cols: usize,
    prod: usize,
    f: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    with_scratch(&COLS, cols, |c| with_scratch(&PROD, prod, |p| f(c, p)))
}

/// How one input plane is laid out zero-padded for the direct kernels: `sw` column phases
/// (phase `p` holds padded columns `p, p + sw, p + 2 sw, ...`), each `hp` rows of `wq`
/// values. Kernel tap `(ky, kx)` of output `(oy, ox)` is then element
/// `tap_offset(ky, kx) + oy * sh * wq + ox` for every stride and dilation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PadPlan {
    g: Geom,
    hp: usize,
    wq: usize,
}

impl PadPlan {
    /// The layout for `g`, with at least `extra` readable columns past the last output
    /// column (so a kernel may read whole lane groups).
    fn new(g: &Geom, extra: usize) -> Self {
        let (ho, wo) = g.out_hw;
        let (kh, kw) = g.kernel;
        let (sh, sw) = g.stride;
        let (dh, dw) = g.dilation;
        let hp = (ho.max(1) - 1) * sh + (kh.max(1) - 1) * dh + 1;
        let wq = wo + extra + (kw.max(1) - 1) * dw / sw;
        PadPlan { g: *g, hp, wq }
    }

    /// Values in one padded plane.
    fn len(&self) -> usize {
        self.g.stride.1 * self.hp * self.wq
    }

    /// Offset of kernel tap `(ky, kx)` for output `(0, 0)`.
    #[inline]
    fn tap_offset(&self, ky: usize, kx: usize) -> usize {
        let (sw, dh, dw) = (self.g.stride.1, self.g.dilation.0, self.g.dilation.1);
        ((kx * dw) % sw * self.hp + ky * dh) * self.wq + kx * dw / sw
    }

    /// What decides where [`fill`](Self::fill) writes input values (everything else in
    /// the plane is zero).
    fn key(&self) -> PadKey {
        (
            self.g.in_hw,
            self.g.padding,
            self.g.stride.1,
            self.hp,
            self.wq,
        )
    }

    /// Writes the padded copy of plane `x` (`h * w` values) into `dst` (`self.len()`).
    /// With `zeroed`, `dst` already holds a padded plane of the same [`key`](Self::key):
    /// its zeros are in place and only the input values are written.
    fn fill(&self, x: &[f32], dst: &mut [f32], zeroed: bool, isa: Isa) {
        let (h, w) = self.g.in_hw;
        let (pt, pl) = self.g.padding;
        let sw = self.g.stride.1;
        let wq = self.wq;
        if !zeroed {
            dst.fill(0.0);
        }
        for p in 0..sw {
            // Columns j whose input column j * sw + p - pl lies in 0..w.
            let hi = (w + pl).saturating_sub(p).div_ceil(sw).min(wq);
            let lo = pl.saturating_sub(p).div_ceil(sw).min(hi);
            if lo == hi {
                continue;
            }
            let ix0 = lo * sw + p - pl;
            let rows = (pt..self.hp.min(pt + h)).map(|r| (r, r - pt));
            for (r, iy) in rows {
                let xr = &x[iy * w + ix0..(iy + 1) * w];
                let span = &mut dst[(p * self.hp + r) * wq + lo..(p * self.hp + r) * wq + hi];
                match sw {
                    1 => {
                        let n = span.len();
                        copy_rows(isa, span, xr, (0, 0), 1, n);
                    }
                    2 => {
                        for (v, pair) in span.iter_mut().zip(xr.chunks(2)) {
                            *v = pair[0];
                        }
                    }
                    _ => {
                        for (v, &xv) in span.iter_mut().zip(xr.iter().step_by(sw)) {
                            *v = xv;
                        }
                    }
                }
            }
        }
    }
}

/// See [`PadPlan::key`].
type PadKey = ((usize, usize), (usize, usize), usize, usize, usize);

/// Runs `f` with this thread's padded-plane buffer for `plan` and whether it already holds
/// `plan`'s zeros (see [`PadPlan::fill`]).
fn with_pad<R>(plan: &PadPlan, f: impl FnOnce(&mut [f32], bool) -> R) -> R {
    let (mut buf, key) = PAD.with(|s| s.take());
    let len = plan.len();
    let zeroed = key == Some(plan.key()) && buf.len() >= len;
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len], zeroed);
    if buf.len() <= KEEP_SCRATCH {
        PAD.with(|s| s.replace((buf, Some(plan.key()))));
    }
    r
}

/// One output plane of a depthwise convolution, as its kernels read it.
pub(crate) struct DwArgs<'a> {
    /// The padded input plane (see [`PadPlan`]).
    pub pad: &'a [f32],
    /// Tap offsets into `pad` for output `(0, 0)`, kernel order (`ky`-major).
    pub offs: &'a [usize],
    /// Tap weights, kernel order (`offs.len()` of them).
    pub wk: &'a [f32],
    /// Bias (the sums start from it).
    pub bias: f32,
    /// Whether ReLU follows.
    pub relu: bool,
    /// Output rows.
    pub ho: usize,
    /// Output columns.
    pub wo: usize,
    /// Offset in `pad` between two output rows.
    pub step: usize,
}

/// Computes one depthwise output plane (`ho * wo` values) into `o`: bias, then the taps in
/// kernel order, `L` output columns at a time (portable body).
fn dw_plane(p: &DwArgs<'_>, o: &mut [f32]) {
    let wo = p.wo;
    for (oy, orow) in o.chunks_exact_mut(wo.max(1)).take(p.ho).enumerate() {
        let base = oy * p.step;
        for c in (0..wo).step_by(L) {
            let mut a = [p.bias; L];
            for (&off, &wv) in p.offs.iter().zip(p.wk) {
                let at = base + off + c;
                let s: &[f32; L] = p.pad[at..at + L].try_into().expect("L values");
                for i in 0..L {
                    a[i] = wv.mul_add(s[i], a[i]);
                }
            }
            store_row(orow, c, &mut a, p.relu);
        }
    }
}

/// Writes lanes `c..` of an output row from `a` (at most `L`, fewer at the row's end),
/// through ReLU when `relu`.
#[inline(always)]
fn store_row(row: &mut [f32], c: usize, a: &mut [f32; L], relu_on: bool) {
    if relu_on {
        for v in a.iter_mut() {
            *v = relu(*v);
        }
    }
    let n = (row.len() - c).min(L);
    let dst = &mut row[c..c + n];
    match <&mut [f32; L]>::try_from(&mut *dst) {
        Ok(d) => *d = *a,
        Err(_) => {
            for (d, v) in dst.iter_mut().zip(a.iter()) {
                *d = *v;
            }
        }
    }
}

/// `max(v, 0)`, NaN kept (`torch.relu`).
#[inline(always)]
pub(crate) fn relu(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

/// Depthwise convolution (groups == input channels, `mult` outputs per input channel) on
/// NCHW: `x` is `[n, c, h, w]`, `weight` `[c * mult, 1, kh, kw]`, `out` `[n, c * mult, ho,
/// wo]` (overwritten; the bias added, then ReLU when `relu`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise_nchw(
    x: &[f32],
    (n, c): (usize, usize),
    weight: &[f32],
    mult: usize,
    bias: Option<&[f32]>,
    relu: bool,
    g: &Geom,
    out: &mut [f32],
) {
    let (h, w) = g.in_hw;
    let (ho, wo) = g.out_hw;
    let (kh, kw) = g.kernel;
    let oc = c * mult;
    let plane_out = ho * wo;
    if plane_out == 0 || n * oc == 0 {
        return;
    }
    let plan = PadPlan::new(g, OVERREAD);
    let offs: Vec<usize> = (0..kh)
        .flat_map(|ky| (0..kw).map(move |kx| (ky, kx)))
        .map(|(ky, kx)| plan.tap_offset(ky, kx))
        .collect();
    let isa = isa();
    let step = g.stride.0 * plan.wq;
    // One task: the `mult` output planes of input plane `p` (they share its padded copy).
    let one = |(p, o): (usize, &mut [f32])| {
        with_pad(&plan, |pad, zeroed| {
            plan.fill(&x[p * h * w..(p + 1) * h * w], pad, zeroed, isa);
            for (m, om) in o.chunks_exact_mut(plane_out).enumerate() {
                let och = (p % c) * mult + m;
                let args = DwArgs {
                    pad,
                    offs: &offs,
                    wk: &weight[och * kh * kw..(och + 1) * kh * kw],
                    bias: bias.map_or(0.0, |bv| bv[och]),
                    relu,
                    ho,
                    wo,
                    step,
                };
                #[cfg(target_arch = "x86_64")]
                if let Some(isa) = isa {
                    x86::dw_plane(isa, &args, om);
                    continue;
                }
                dw_plane(&args, om);
            }
        })
    };
    let chunk = mult * plane_out;
    if n * oc * plane_out * kh * kw >= 1 << 18 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(chunk).enumerate().for_each(one);
    } else {
        out.chunks_mut(chunk).enumerate().for_each(one);
    }
}

/// A leading dimension for `cols` values a row that keeps successive rows off the same
/// L1 sets: a multiple of 16 values whose count of 64-byte lines is odd (a row of 1024
/// values, 4 KiB, would map every row of a GEMM block to one set).
fn spread_ld(cols: usize) -> usize {
    let ld = cols.next_multiple_of(16);
    if (ld / 16).is_multiple_of(2) {
        ld + 16
    } else {
        ld
    }
}

/// Columns one GEMM of [`conv_nchw`] aims for: images with smaller output planes are
/// unfolded side by side until they fill about this many.
const CONV_COLS: usize = 384;

/// Convolution on NCHW `f32` data: `x` is `[n, c, h, w]`, `weight` `[o, c / groups, kh,
/// kw]`, `out` `[n, o, ho, wo]` (overwritten): each output the products summed in `(ci,
/// ky, kx)` order from zero with fused multiply-adds, then the bias added, then ReLU when
/// `relu` (NaN kept). Depthwise convolutions (one input channel per group) run
/// [`depthwise_nchw`]; the others unfold the input ([`im2col_nchw`]; a pointwise
/// convolution reads its input as it is) and run [`gemm_bias`] per group, several images
/// side by side when their output planes are small. Images are split across rayon's pool.
///
/// # Panics
/// If a slice is shorter than the shapes say, or `groups` does not divide `c` and `o`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_nchw(
    x: &[f32],
    (n, c): (usize, usize),
    weight: &[f32],
    (o, groups): (usize, usize),
    bias: Option<&[f32]>,
    relu: bool,
    g: &Geom,
    out: &mut [f32],
) {
    let (h, w) = g.in_hw;
    let (ho, wo) = g.out_hw;
    let (kh, kw) = g.kernel;
    let cg = c / groups;
    let og = o / groups;
    let plane = ho * wo;
    if n * o * plane == 0 {
        return;
    }
    if cg == 1 && groups > 1 {
        return depthwise_nchw(x, (n, c), weight, og, bias, relu, g, out);
    }
    let kdim = cg * kh * kw;
    let pointwise =
        (kh, kw) == (1, 1) && g.stride == (1, 1) && g.padding == (0, 0) && (ho, wo) == (h, w);
    // Each group's weights packed once per call.
    let packs: Vec<PackedA> = (0..groups)
        .map(|gi| PackedA::new(&weight[gi * og * kdim..], og, kdim, kdim))
        .collect();
    // Images per GEMM, and the row stride of their unfolded columns / products.
    // (A pointwise convolution reads its input in place, one image at a time: copying
    // small planes side by side costs more than the narrow GEMM saves.)
    let nb = if pointwise {
        1
    } else {
        CONV_COLS.div_ceil(plane).clamp(1, n)
    };
    let ld = spread_ld(nb * plane);
    // A pointwise convolution of one image at a time reads the input in place and writes
    // the output in place (copying it only to spread its rows off L1 set conflicts cost
    // more than the conflicts: MobileNetV2-style float 2x slower at batch 16).
    let in_place = pointwise && nb == 1;
    let direct_out = nb == 1;
    let cols_len = if in_place { 0 } else { kdim * ld };
    let prod_len = if direct_out { 0 } else { og * ld };
    let chunk = |b0: usize, ob: &mut [f32]| {
        let imgs = ob.len() / (o * plane);
        with_cols(cols_len, prod_len, |cols, prod| {
            for (gi, pack) in packs.iter().enumerate() {
                let src: &[f32] = if in_place {
                    &x[(b0 * c + gi * cg) * h * w..(b0 * c + (gi + 1) * cg) * h * w]
                } else {
                    for i in 0..imgs {
                        let b = b0 + i;
                        let xg = &x[(b * c + gi * cg) * h * w..(b * c + (gi + 1) * cg) * h * w];
                        let dst = &mut cols[i * plane..];
                        if pointwise {
                            for (ci, xc) in xg.chunks_exact(plane).enumerate() {
                                dst[ci * ld..ci * ld + plane].copy_from_slice(xc);
                            }
                        } else {
                            im2col_nchw(xg, cg, g, dst, ld);
                        }
                    }
                    cols
                };
                let bg = bias.map(|bv| &bv[gi * og..(gi + 1) * og]);
                let ldb = if in_place { plane } else { ld };
                if direct_out {
                    let dst = &mut ob[gi * og * plane..(gi + 1) * og * plane];
                    gemm_bias(pack, src, ldb, plane, bg, relu, dst, plane);
                } else {
                    gemm_bias(pack, src, ldb, imgs * plane, bg, relu, prod, ld);
                    for i in 0..imgs {
                        for r in 0..og {
                            let at = (i * o + gi * og + r) * plane;
                            ob[at..at + plane].copy_from_slice(
                                &prod[r * ld + i * plane..r * ld + (i + 1) * plane],
                            );
                        }
                    }
                }
            }
        })
    };
    let per = nb * o * plane;
    if n > nb && rayon::current_num_threads() > 1 {
        out[..n * o * plane]
            .par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, ob)| chunk(i * nb, ob));
    } else {
        for (i, ob) in out[..n * o * plane].chunks_mut(per).enumerate() {
            chunk(i * nb, ob);
        }
    }
}

/// Unfolds one image's group of channels (`x`: `[cg, h, w]`) into `cols`
/// `[cg * kh * kw, ho * wo]`, row `r` starting at `r * ld` (`ld >= ho * wo`); taps in the
/// padding read 0.
pub(crate) fn im2col_nchw(x: &[f32], cg: usize, g: &Geom, cols: &mut [f32], ld: usize) {
    let (h, w) = g.in_hw;
    let (ho, wo) = g.out_hw;
    let (kh, kw) = g.kernel;
    let plan = PadPlan::new(g, 0);
    let step = g.stride.0 * plan.wq;
    let taps = kh * kw;
    let isa = isa();
    if ho * wo == 0 {
        return;
    }
    with_pad(&plan, |pad, mut zeroed| {
        for ci in 0..cg {
            plan.fill(&x[ci * h * w..(ci + 1) * h * w], pad, zeroed, isa);
            zeroed = true;
            for t in 0..taps {
                let r = ci * taps + t;
                let dst = &mut cols[r * ld..r * ld + ho * wo];
                let off = plan.tap_offset(t / kw, t % kw);
                copy_rows(isa, dst, pad, (off, step), ho, wo);
            }
        }
    })
}

/// Dot products of `R` (up to four) rows of `x` with one weight row `wr`: the weight row
/// is read once per block. Each dot keeps 16 partial sums, reduced pairwise (vectorizes
/// without reassociation flags).
#[inline(always)]
fn dot_rows<const R: usize>(xs: [&[f32]; R], wr: &[f32]) -> [f32; R] {
    let k = wr.len();
    let (wc, wt) = wr.as_chunks::<L>();
    let xc: [&[[f32; L]]; R] = xs.map(|x| x[..k].as_chunks::<L>().0);
    let mut acc = [[0f32; L]; R];
    for (c, w) in wc.iter().enumerate() {
        for r in 0..R {
            let x = &xc[r][c];
            for i in 0..L {
                acc[r][i] += x[i] * w[i];
            }
        }
    }
    let full = k - wt.len();
    let mut out = [0f32; R];
    for r in 0..R {
        let mut s = 0.0;
        for (a, b) in xs[r][full..k].iter().zip(wt) {
            s += a * b;
        }
        let a = &mut acc[r];
        let mut width = L;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                a[i] += a[i + width];
            }
        }
        out[r] = a[0] + s;
    }
    out
}

/// Portable body of [`gemv_rows`]: one input row at a time.
fn gemv_body(x: &[f32], rows: usize, k: usize, w: &[f32], out: &mut [f32]) {
    let n = w.len() / k.max(1);
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        for (j, wr) in w.chunks_exact(k).enumerate() {
            out[r * n + j] = dot_rows([xr], wr)[0];
        }
    }
}

/// `out[r][j] = dot(x[r], w[j])` for `x` `[rows, k]` and `w` `[n, k]` (PyTorch's Linear
/// weight layout), output `[rows, n]`; for few rows, where the weight is read once per
/// four rows anyway. Output columns are split across rayon's pool when large.
pub(crate) fn gemv_rows(x: &[f32], rows: usize, k: usize, w: &[f32], out: &mut [f32]) {
    let Some(n) = w.len().checked_div(k) else {
        out.fill(0.0);
        return;
    };
    #[cfg(target_arch = "x86_64")]
    let isa = isa();
    let run = |w: &[f32], out: &mut [f32], cols: usize| {
        let wc = &w[..cols * k];
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = isa {
            return x86::gemv(isa, x, rows, k, wc, out);
        }
        gemv_body(x, rows, k, wc, out)
    };
    const COLS: usize = 64;
    let parallel = rows * n * k >= 1 << 18 && rayon::current_num_threads() > 1 && n > COLS;
    if parallel && rows == 1 {
        out.par_chunks_mut(COLS)
            .zip(w.par_chunks(COLS * k))
            .for_each(|(o, wc)| run(wc, o, o.len()));
    } else if parallel {
        // Column blocks write strided output rows: compute each block into its own
        // `[rows, cols]` buffer, then scatter.
        let blocks: Vec<(usize, Vec<f32>)> = w
            .par_chunks(COLS * k)
            .enumerate()
            .map(|(b, wc)| {
                let cols = wc.len() / k;
                let mut o = vec![0f32; rows * cols];
                run(wc, &mut o, cols);
                (b, o)
            })
            .collect();
        for (b, o) in blocks {
            let cols = o.len() / rows.max(1);
            for r in 0..rows {
                out[r * n + b * COLS..r * n + b * COLS + cols]
                    .copy_from_slice(&o[r * cols..(r + 1) * cols]);
            }
        }
    } else {
        run(w, out, n);
    }
}

/// Rows, lanes per vector, and the most vectors across one product tile of [`gemm_bias`]
/// with `isa` (the portable body's tile is small enough for LLVM to keep in registers).
fn gemm_tile_dims(isa: Isa) -> (usize, usize, usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = isa {
        return isa.gemm_tile();
    }
    let _ = isa;
    (PMR, PNR, 1)
}

/// Portable tile rows.
const PMR: usize = 4;
/// Portable tile columns.
const PNR: usize = 16;

/// Portable body of one `PMR x PNR` tile (see `x86::gemm_tile` for the contract): fused
/// multiply-adds in step order, so its sums are bit-identical to the AVX2 and AVX-512 tiles'
/// (`f32::mul_add` is one instruction where the target has FMA, a correctly rounded
/// library call elsewhere).
#[allow(clippy::too_many_arguments)]
fn gemm_tile_portable(
    kc: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    load: bool,
    bias: Option<&[f32]>,
    relu_on: bool,
) {
    let mut acc = [[0f32; PNR]; PMR];
    if load {
        for (r, t) in acc.iter_mut().enumerate() {
            t.copy_from_slice(&c[r * ldc..r * ldc + PNR]);
        }
    }
    for p in 0..kc {
        let bp: &[f32; PNR] = b[p * ldb..p * ldb + PNR].try_into().expect("PNR values");
        let ap = &a[p * PMR..(p + 1) * PMR];
        for (t, &av) in acc.iter_mut().zip(ap) {
            for j in 0..PNR {
                t[j] = av.mul_add(bp[j], t[j]);
            }
        }
    }
    for (r, t) in acc.iter().enumerate() {
        for (d, &v) in c[r * ldc..r * ldc + PNR].iter_mut().zip(t) {
            let v = bias.map_or(v, |bv| v + bv[r]);
            *d = if relu_on { relu(v) } else { v };
        }
    }
}

/// A weight matrix `[m, k]` packed for [`gemm_bias`]: strips of `mr` rows (zero rows past
/// `m`), each stored step-major (`[k][mr]`), so a tile reads one contiguous run.
#[derive(Debug, Clone)]
pub(crate) struct PackedA {
    isa: Isa,
    mr: usize,
    m: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedA {
    /// Packs `a` (`m` rows of `k` values, row `i` at `i * lda`) for this thread's kernel set.
    pub(crate) fn new(a: &[f32], m: usize, k: usize, lda: usize) -> Self {
        let isa = isa();
        let (mr, _, _) = gemm_tile_dims(isa);
        let strips = m.div_ceil(mr);
        let mut data = vec![0f32; strips * k * mr];
        for (s, strip) in data.chunks_exact_mut((k * mr).max(1)).enumerate() {
            for r in 0..mr.min(m - s * mr) {
                let row = &a[(s * mr + r) * lda..(s * mr + r) * lda + k];
                for (p, &v) in row.iter().enumerate() {
                    strip[p * mr + r] = v;
                }
            }
        }
        PackedA {
            isa,
            mr,
            m,
            k,
            data,
        }
    }
}

/// One product tile of [`gemm_bias`] with `isa`, `nv` vectors wide (see `x86::gemm_tile`).
#[allow(clippy::too_many_arguments)]
#[inline]
fn gemm_tile(
    isa: Isa,
    nv: usize,
    kc: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    load: bool,
    bias: Option<&[f32]>,
    relu_on: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = isa {
        return x86::gemm_tile(isa, nv, kc, a, b, ldb, c, ldc, load, bias, relu_on);
    }
    let _ = (isa, nv);
    gemm_tile_portable(kc, a, b, ldb, c, ldc, load, bias, relu_on)
}

/// Steps of one block of [`gemm_bias`]: a `kc x nr` slice of `B` (36 KiB with AVX-512's
/// 48 columns) stays in L1 while every weight strip passes over it.
const KC: usize = 192;

/// `C = A B + bias`, then ReLU when `relu`: `A` packed (`[m, k]`), `B` `[k, n]` read in place
/// (row `p` at `p * ldb`), `C` `[m, n]` (row `i` at `i * ldc`, overwritten), `bias` one
/// value per row of `C`. Each value is the products summed from zero in step order (fused
/// on x86), then the bias added (as PyTorch's and `matrixmultiply`'s `beta = 1` sums
/// round). The steps go in blocks of about [`KC`] (a block continues the previous one's
/// sums); columns in tiles of the kernel's width (the last, narrower one as many vectors
/// as it needs, through a zero-padded copy when it ends inside a vector).
///
/// # Panics
/// If a slice is shorter than the shapes say.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bias(
    a: &PackedA,
    b: &[f32],
    ldb: usize,
    n: usize,
    bias: Option<&[f32]>,
    relu_on: bool,
    c: &mut [f32],
    ldc: usize,
) {
    let (m, k, mr, isa) = (a.m, a.k, a.mr, a.isa);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n && bias.is_none_or(|v| v.len() >= m));
    if k == 0 {
        for i in 0..m {
            let v = bias.map_or(0.0, |bv| bv[i]);
            c[i * ldc..i * ldc + n].fill(if relu_on { relu(v) } else { v });
        }
        return;
    }
    assert!(b.len() >= (k - 1) * ldb + n);
    let (_, lanes, most) = gemm_tile_dims(isa);
    let nr = lanes * most;
    let strips = m.div_ceil(mr);
    let mut bias_pad = vec![0f32; strips * mr];
    if let Some(bv) = bias {
        bias_pad[..m].copy_from_slice(&bv[..m]);
    }
    let blocks = k.div_ceil(KC);
    let kcb = k.div_ceil(blocks);
    // Columns go in tiles of `nr`; the last, narrower tile is as many whole vectors as it
    // needs, its `B` columns copied zero-padded when they do not fill the last vector. A
    // tile with rows past `m` goes through a whole-tile copy of `C`.
    let rem = n % nr;
    let ragged = !rem.is_multiple_of(lanes);
    let mut btail = vec![
        0f32;
        if ragged {
            kcb * rem.next_multiple_of(lanes)
        } else {
            0
        }
    ];
    let mut ctile = vec![0f32; mr * nr];
    for k0 in (0..k).step_by(kcb) {
        let kc = kcb.min(k - k0);
        let (first, last) = (k0 == 0, k0 + kc == k);
        for j0 in (0..n).step_by(nr) {
            let nb = nr.min(n - j0);
            let nv = nb.div_ceil(lanes);
            let width = nv * lanes;
            let (bp, ldbp): (&[f32], usize) = if nb == width {
                (&b[k0 * ldb + j0..], ldb)
            } else {
                for p in 0..kc {
                    let src = &b[(k0 + p) * ldb + j0..(k0 + p) * ldb + j0 + nb];
                    btail[p * width..p * width + nb].copy_from_slice(src);
                }
                (&btail[..], width)
            };
            for s in 0..strips {
                let mb = mr.min(m - s * mr);
                let ap = &a.data[(s * k + k0) * mr..(s * k + k0 + kc) * mr];
                let bias_s = (last && bias.is_some()).then(|| &bias_pad[s * mr..(s + 1) * mr]);
                let at = s * mr * ldc + j0;
                let r = last && relu_on;
                if mb == mr && nb == width {
                    gemm_tile(
                        isa,
                        nv,
                        kc,
                        ap,
                        bp,
                        ldbp,
                        &mut c[at..],
                        ldc,
                        !first,
                        bias_s,
                        r,
                    );
                } else {
                    if !first {
                        for i in 0..mb {
                            let src = &c[at + i * ldc..at + i * ldc + nb];
                            ctile[i * width..i * width + nb].copy_from_slice(src);
                        }
                    }
                    gemm_tile(
                        isa, nv, kc, ap, bp, ldbp, &mut ctile, width, !first, bias_s, r,
                    );
                    for i in 0..mb {
                        let dst = &mut c[at + i * ldc..at + i * ldc + nb];
                        dst.copy_from_slice(&ctile[i * width..i * width + nb]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_conv(
        x: &[f32],
        (n, c): (usize, usize),
        wt: &[f32],
        o: usize,
        groups: usize,
        g: &Geom,
    ) -> Vec<f32> {
        let (h, w) = g.in_hw;
        let (ho, wo) = g.out_hw;
        let (kh, kw) = g.kernel;
        let (cg, og) = (c / groups, o / groups);
        let mut out = vec![0f32; n * o * ho * wo];
        for b in 0..n {
            for oc in 0..o {
                let gi = oc / og;
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = 0f64;
                        for ci in 0..cg {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * g.stride.0 + ky * g.dilation.0) as isize
                                        - g.padding.0 as isize;
                                    let ix = (ox * g.stride.1 + kx * g.dilation.1) as isize
                                        - g.padding.1 as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((b * c + gi * cg + ci) * h + iy as usize) * w
                                        + ix as usize];
                                    let wv = wt[((oc * cg + ci) * kh + ky) * kw + kx];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * o + oc) * ho + oy) * wo + ox] = s as f32;
                    }
                }
            }
        }
        out
    }

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 20) as f32 / 2048.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn depthwise_and_im2col_match_naive() {
        for &(hw, k, s, p, d, mult) in &[
            (
                (7usize, 9usize),
                (3usize, 3usize),
                (1usize, 1usize),
                (1usize, 1usize),
                (1usize, 1usize),
                1usize,
            ),
            ((8, 8), (3, 3), (2, 2), (1, 1), (1, 1), 1),
            ((5, 5), (3, 1), (1, 2), (0, 1), (1, 1), 2),
            ((1, 1), (1, 1), (1, 1), (2, 2), (1, 1), 1),
            ((9, 6), (5, 3), (2, 3), (2, 3), (1, 2), 1),
            // Wider than one 32-lane group, odd widths, stride 2 and 3 phases.
            ((6, 45), (3, 3), (1, 1), (1, 1), (1, 1), 1),
            ((7, 70), (3, 5), (2, 2), (1, 2), (1, 1), 1),
            ((5, 50), (3, 3), (1, 3), (2, 0), (2, 2), 3),
            ((3, 17), (3, 3), (1, 1), (0, 0), (1, 1), 1),
        ] {
            let out_len = |i: usize, k: usize, s: usize, p: usize, d: usize| {
                (i + 2 * p - d * (k - 1) - 1) / s + 1
            };
            let g = Geom {
                in_hw: hw,
                out_hw: (
                    out_len(hw.0, k.0, s.0, p.0, d.0),
                    out_len(hw.1, k.1, s.1, p.1, d.1),
                ),
                kernel: k,
                stride: s,
                padding: p,
                dilation: d,
            };
            let (n, c) = (2, 5);
            let x = vals(n * c * hw.0 * hw.1, 1);
            let wt = vals(c * mult * k.0 * k.1, 7);
            let want = naive_conv(&x, (n, c), &wt, c * mult, c, &g);
            let bias = vals(c * mult, 11);
            for ks in super::super::KernelSet::all_available() {
                for relu_on in [false, true] {
                    // Twice: the second call reuses the padded-plane scratch.
                    for _ in 0..2 {
                        let mut got = vec![f32::NAN; want.len()];
                        ks.install(|| {
                            depthwise_nchw(
                                &x,
                                (n, c),
                                &wt,
                                mult,
                                Some(&bias),
                                relu_on,
                                &g,
                                &mut got,
                            )
                        });
                        let plane = g.out_hw.0 * g.out_hw.1;
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            let mut b = b + bias[(i / plane) % (c * mult)];
                            if relu_on {
                                b = b.max(0.0);
                            }
                            assert!(
                                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                                "{a} {b} {g:?} {:?} relu {relu_on}",
                                ks.backend()
                            );
                        }
                    }
                }
            }
            // im2col of one image times the weight matrix gives the dense conv.
            let o = 3;
            let wd = vals(o * c * k.0 * k.1, 3);
            let want = naive_conv(&x, (n, c), &wd, o, 1, &g);
            let (ho, wo) = g.out_hw;
            let kd = c * k.0 * k.1;
            let mut cols = vec![f32::NAN; kd * ho * wo];
            im2col_nchw(&x[..c * hw.0 * hw.1], c, &g, &mut cols, ho * wo);
            for oc in 0..o {
                for pix in 0..ho * wo {
                    let s: f32 = (0..kd)
                        .map(|r| wd[oc * kd + r] * cols[r * ho * wo + pix])
                        .sum();
                    let b = want[oc * ho * wo + pix];
                    assert!((s - b).abs() <= 1e-5 * (1.0 + b.abs()), "{s} {b}");
                }
            }
        }
    }

    #[test]
    fn conv_matches_naive_and_is_identical_on_every_set() {
        // (n, c, o, groups, in_hw, kernel, stride, pad): small planes batched side by side,
        // planes whose rows would alias (32x32, 16x16), pointwise in place and copied,
        // grouped, strided, and depthwise.
        for &(n, c, o, groups, hw, k, s, p) in &[
            (
                5usize,
                4usize,
                6usize,
                1usize,
                (8usize, 8usize),
                3usize,
                1usize,
                1usize,
            ),
            (3, 3, 8, 1, (32, 32), 3, 1, 1),
            (2, 8, 16, 1, (16, 16), 1, 1, 0),
            (2, 8, 16, 1, (28, 28), 1, 1, 0),
            (1, 8, 16, 1, (32, 32), 1, 1, 0),
            (7, 6, 4, 2, (4, 4), 3, 1, 1),
            (3, 3, 5, 1, (11, 13), 3, 2, 1),
            (2, 6, 12, 6, (9, 9), 3, 2, 1),
            (40, 2, 3, 1, (2, 3), 1, 1, 0),
        ] {
            let out = |i: usize| (i + 2 * p - k) / s + 1;
            let g = Geom {
                in_hw: hw,
                out_hw: (out(hw.0), out(hw.1)),
                kernel: (k, k),
                stride: (s, s),
                padding: (p, p),
                dilation: (1, 1),
            };
            let x = vals(n * c * hw.0 * hw.1, 4);
            let wt = vals(o * (c / groups) * k * k, 6);
            let bias = vals(o, 8);
            let want = naive_conv(&x, (n, c), &wt, o, groups, &g);
            let plane = g.out_hw.0 * g.out_hw.1;
            let mut first: Option<Vec<u32>> = None;
            for ks in super::super::KernelSet::all_available() {
                for relu_on in [false, true] {
                    let mut got = vec![f32::NAN; want.len()];
                    ks.install(|| {
                        conv_nchw(
                            &x,
                            (n, c),
                            &wt,
                            (o, groups),
                            Some(&bias),
                            relu_on,
                            &g,
                            &mut got,
                        )
                    });
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        let mut b = b + bias[(i / plane) % o];
                        if relu_on {
                            b = b.max(0.0);
                        }
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "{a} {b} {g:?} n {n} {:?}",
                            ks.backend()
                        );
                    }
                    if !relu_on {
                        let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                        match &first {
                            Some(f) => assert!(f == &bits, "{g:?}: {:?} differs", ks.backend()),
                            None => first = Some(bits),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gemv_matches_naive_on_every_set() {
        for &(rows, k, n) in &[
            (1usize, 1usize, 1usize),
            (1, 37, 5),
            (3, 100, 70),
            (2, 1024, 65),
            (5, 37, 9),
            (8, 64, 4),
            (4, 300, 13),
        ] {
            let x = vals(rows * k, 5);
            let w = vals(n * k, 9);
            for ks in super::super::KernelSet::all_available() {
                let mut out = vec![0f32; rows * n];
                ks.install(|| gemv_rows(&x, rows, k, &w, &mut out));
                for r in 0..rows {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                            .sum();
                        let got = out[r * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{got} {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_bias_matches_naive_on_every_set() {
        // Shapes around every tile size (4/6/8 rows, 16/32 columns), steps past one
        // block, strided B and C, with and without bias and ReLU.
        for &(m, k, n) in &[
            (1usize, 1usize, 1usize),
            (4, 3, 16),
            (6, 7, 32),
            (8, 9, 33),
            (8, 5, 48),
            (9, 5, 96),
            (7, 4, 112),
            (10, 6, 8),
            (13, 20, 47),
            (16, 300, 64),
            (64, 576, 50),
            (5, 600, 100),
            (3, 0, 5),
        ] {
            let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
            let a = vals(m * lda, 1);
            let b = vals(k.max(1) * ldb, 2);
            let bias = vals(m, 3);
            for ks in super::super::KernelSet::all_available() {
                for (with_bias, relu_on) in [(true, false), (false, true), (true, true)] {
                    let mut c = vec![f32::NAN; m * ldc];
                    let bv = with_bias.then_some(&bias[..]);
                    ks.install(|| {
                        let pa = PackedA::new(&a, m, k, lda);
                        gemm_bias(&pa, &b, ldb, n, bv, relu_on, &mut c, ldc);
                    });
                    for i in 0..m {
                        for j in 0..n {
                            let mut want: f64 = (0..k)
                                .map(|p| a[i * lda + p] as f64 * b[p * ldb + j] as f64)
                                .sum::<f64>()
                                + bv.map_or(0.0, |bv| bv[i] as f64);
                            if relu_on {
                                want = want.max(0.0);
                            }
                            let got = c[i * ldc + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{m}x{k}x{n} ({i},{j}): {got} {want} {:?}",
                                ks.backend()
                            );
                        }
                        // Columns between rows are left alone.
                        if i + 1 < m {
                            assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                        }
                    }
                }
            }
        }
        // NaN in B survives ReLU, as `torch.relu` keeps it.
        let pa = PackedA::new(&[1.0, 1.0], 1, 2, 2);
        let mut c = [0f32; 3];
        gemm_bias(
            &pa,
            &[f32::NAN, -1.0, 2.0, 0.0, 0.0, 0.0],
            3,
            3,
            None,
            true,
            &mut c,
            3,
        );
        assert!(c[0].is_nan() && c[1] == 0.0 && c[2] == 2.0, "{c:?}");
    }
}
