//! Convolution drivers on channels-last (`NHWC`) bytes: im2col + packed GEMM (the direct
//! depthwise convolution is in `kernels::depthwise`). The layer types
//! (`nn::quantized::QConv2d`) hold the parameters and call these.

use super::gemm::gemm;
use super::{KernelSet, PackedWeights, RequantParams, RowSource};

/// Geometry of a 2-D convolution (NCHW input, `[out, in / groups, kh, kw]` weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch size.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height and width.
    pub in_hw: (usize, usize),
    /// Output channels.
    pub c_out: usize,
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Stride (height, width).
    pub stride: (usize, usize),
    /// Zero padding (height, width), filled with the input zero point.
    pub padding: (usize, usize),
    /// Dilation (height, width).
    pub dilation: (usize, usize),
    /// Groups.
    pub groups: usize,
}

/// PyTorch's output length of a convolution or pooling window along one axis
/// (`ceil_mode` as `torch.nn.MaxPool2d`: the last window must start inside the input or
/// the left padding), or `None` when the window does not fit or a size overflows.
///
/// # Examples
/// ```
/// use ptq::kernels::conv::out_len;
/// assert_eq!(out_len(7, 3, 2, 1, 1, false), Some(4));
/// assert_eq!(out_len(8, 3, 2, 1, 1, true), Some(5)); // floor mode gives 4
/// assert_eq!(out_len(1, 3, 1, 0, 1, false), None);
/// assert_eq!(out_len(usize::MAX, 1, 1, 1, 1, false), None);
/// ```
pub fn out_len(i: usize, k: usize, s: usize, p: usize, d: usize, ceil_mode: bool) -> Option<usize> {
    let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
    let padded = i.checked_add(p.checked_mul(2)?)?;
    if s == 0 || padded < span {
        return None;
    }
    let room = padded - span;
    let mut out = if ceil_mode {
        room.checked_add(s - 1)? / s + 1
    } else {
        room / s + 1
    };
    if ceil_mode && (out - 1).checked_mul(s)? >= i.checked_add(p)? {
        out -= 1;
    }
    Some(out)
}

impl ConvGeom {
    /// Output height and width, or `None` when the kernel does not fit or a size
    /// overflows.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        Some((
            out_len(
                self.in_hw.0,
                self.kernel.0,
                self.stride.0,
                self.padding.0,
                self.dilation.0,
                false,
            )?,
            out_len(
                self.in_hw.1,
                self.kernel.1,
                self.stride.1,
                self.padding.1,
                self.dilation.1,
                false,
            )?,
        ))
    }

    /// Input column of output column `ox` at kernel column `kx`, or `None` in the padding.
    #[inline(always)]
    fn ix(&self, ox: usize, kx: usize) -> Option<usize> {
        let ix = (ox * self.stride.1 + kx * self.dilation.1).checked_sub(self.padding.1)?;
        (ix < self.in_hw.1).then_some(ix)
    }

    /// Input row of output row `oy` at kernel row `ky`, or `None` in the padding.
    #[inline(always)]
    fn iy(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.stride.0 + ky * self.dilation.0).checked_sub(self.padding.0)?;
        (iy < self.in_hw.0).then_some(iy)
    }
}

/// Rows of the im2col matrix of one group, built on the fly: row `(b, oy, ox)`, columns
/// `(ky, kx, c)`, padding filled with the input zero point.
struct Im2col<'a> {
    x: &'a [u8],
    geom: &'a ConvGeom,
    out_hw: (usize, usize),
    c0: usize,
    cig: usize,
    a_zp: u8,
    /// For few input channels (one group, no horizontal dilation): the input with its
    /// padding written out (`[n, h + 2 * ph, w + 2 * pw, c]`, border bytes the zero
    /// point), so that every kernel row is one in-bounds run of `kw * c` bytes.
    padded: Option<&'a [u8]>,
}

/// Input channels up to which a one-group convolution reads a padded copy of its input
/// ([`Im2col::padded`]).
const PADDED_MAX_C: usize = 8;

/// `dst.copy_from_slice(src)` for the short runs of im2col (a few bytes to a few hundred)
/// without a `memcpy` call: overlapping fixed-size moves.
#[inline(always)]
fn copy_small(dst: &mut [u8], src: &[u8]) {
    let n = dst.len();
    debug_assert_eq!(n, src.len());
    match n {
        0 => {}
        1..=3 => {
            dst[0] = src[0];
            dst[n / 2] = src[n / 2];
            dst[n - 1] = src[n - 1];
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        8..=15 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        16..=32 => {
            dst[..16].copy_from_slice(&src[..16]);
            dst[n - 16..].copy_from_slice(&src[n - 16..]);
        }
        33..=512 => {
            // Whole 32-byte moves, the last one overlapping: a few hundred bytes (a
            // kernel row of 64 channels) cost less inline than a `memmove` call.
            for (d, s) in dst.chunks_exact_mut(32).zip(src.chunks_exact(32)) {
                d.copy_from_slice(s);
            }
            dst[n - 32..].copy_from_slice(&src[n - 32..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

/// `dst.fill(v)` for the short runs of im2col padding without a `memset` call.
#[inline(always)]
pub(crate) fn fill_small(dst: &mut [u8], v: u8) {
    let n = dst.len();
    if n <= 32 {
        copy_small(dst, &[v; 32][..n]);
    } else {
        dst.fill(v);
    }
}

impl Im2col<'_> {
    /// [`RowSource::fill`] from the padded input `xp` ([`Im2col::padded`]): each kernel
    /// row is one copy of `kw * c_in` bytes at a position computed without bounds logic.
    fn fill_padded(&self, xp: &[u8], r0: usize, rows: usize, kp: usize, dst: &mut [u8]) {
        let g = self.geom;
        let (oh, ow) = self.out_hw;
        let (kh, kw) = g.kernel;
        let c = g.c_in;
        let hp = g.in_hw.0 + 2 * g.padding.0;
        let wp = g.in_hw.1 + 2 * g.padding.1;
        let (sy, sx) = g.stride;
        let seg_len = kw * c;
        let k = kh * seg_len;
        let ky_step = g.dilation.0 * wp * c;
        if rows == 0 || oh == 0 || ow == 0 || kp == 0 || seg_len == 0 {
            return;
        }
        let mut b = r0 / (oh * ow);
        let mut oy = (r0 / ow) % oh;
        let mut ox = r0 % ow;
        for d in dst.chunks_exact_mut(kp).take(rows) {
            let base = ((b * hp + oy * sy) * wp + ox * sx) * c;
            for (ky, seg) in d[..k].chunks_exact_mut(seg_len).enumerate() {
                let p = base + ky * ky_step;
                copy_small(seg, &xp[p..p + seg_len]);
            }
            ox += 1;
            if ox == ow {
                ox = 0;
                oy += 1;
                if oy == oh {
                    oy = 0;
                    b += 1;
                }
            }
        }
    }

    /// [`RowSource::fill`] for one group (`cig == c_in`) without horizontal dilation:
    /// the valid taps of a kernel row are one contiguous run of `(hi - lo) * c_in` NHWC
    /// bytes, copied in one move (for a stem with 3 input channels, 9 or 21 bytes
    /// instead of 3 or 7 pieces of 3). The output position advances row by row without
    /// divisions, and the valid kernel columns come from the geometry in closed form.
    fn fill_runs(&self, r0: usize, rows: usize, kp: usize, dst: &mut [u8]) {
        let g = self.geom;
        let (h, w) = g.in_hw;
        let (oh, ow) = self.out_hw;
        let (kh, kw) = g.kernel;
        let c = g.c_in;
        let zp = self.a_zp;
        let (sy, sx) = g.stride;
        let (py, px) = g.padding;
        let dy = g.dilation.0;
        let seg_len = kw * c;
        let k = kh * seg_len;
        if rows == 0 || oh == 0 || ow == 0 || kp == 0 {
            return;
        }
        let mut b = r0 / (oh * ow);
        let mut oy = (r0 / ow) % oh;
        let mut ox = r0 % ow;
        for d in dst.chunks_exact_mut(kp).take(rows) {
            // Kernel columns `lo..hi` land inside the input: `0 <= ox * sx + kx - px < w`.
            let start = ox * sx;
            let lo = px.saturating_sub(start).min(kw);
            let hi = (w + px).saturating_sub(start).min(kw);
            for (ky, seg) in d[..k].chunks_exact_mut(seg_len).enumerate() {
                let iy = (oy * sy + ky * dy).checked_sub(py).filter(|&iy| iy < h);
                match iy {
                    Some(iy) if hi > lo => {
                        if lo > 0 {
                            fill_small(&mut seg[..lo * c], zp);
                        }
                        if hi < kw {
                            fill_small(&mut seg[hi * c..], zp);
                        }
                        let p = ((b * h + iy) * w + start + lo - px) * c;
                        copy_small(&mut seg[lo * c..hi * c], &self.x[p..p + (hi - lo) * c]);
                    }
                    _ => fill_small(seg, zp),
                }
            }
            ox += 1;
            if ox == ow {
                ox = 0;
                oy += 1;
                if oy == oh {
                    oy = 0;
                    b += 1;
                }
            }
        }
    }

    /// A 1x1 kernel with unit stride and no padding over all channels: the im2col rows
    /// are the NHWC rows themselves.
    fn is_pointwise(&self) -> bool {
        let g = self.geom;
        g.kernel == (1, 1) && g.stride == (1, 1) && g.padding == (0, 0) && self.cig == g.c_in
    }
}

impl RowSource for Im2col<'_> {
    fn direct(&self, r0: usize, rows: usize, kp: usize) -> Option<&[u8]> {
        let c = self.geom.c_in;
        (self.is_pointwise() && kp == c)
            .then(|| self.x.get(r0 * c..(r0 + rows) * c))
            .flatten()
    }

    fn fill(&self, r0: usize, rows: usize, kp: usize, dst: &mut [u8]) {
        let g = self.geom;
        let (h, w) = g.in_hw;
        let (oh, ow) = self.out_hw;
        let (kh, kw) = g.kernel;
        let c = g.c_in;
        let cig = self.cig;
        let zp = self.a_zp;
        if self.is_pointwise() {
            let src = &self.x[r0 * c..(r0 + rows) * c];
            if kp == c {
                dst[..rows * c].copy_from_slice(src);
            } else {
                for (d, s) in dst.chunks_exact_mut(kp).zip(src.chunks_exact(c)) {
                    d[..c].copy_from_slice(s);
                }
            }
            return;
        }
        if let Some(xp) = self.padded {
            self.fill_padded(xp, r0, rows, kp, dst);
            return;
        }
        // With one group and no horizontal dilation, the valid taps of one kernel row are
        // one contiguous run of NHWC bytes.
        if cig == c && g.dilation.1 == 1 {
            self.fill_runs(r0, rows, kp, dst);
            return;
        }
        for i in 0..rows {
            let r = r0 + i;
            let b = r / (oh * ow);
            let oy = (r / ow) % oh;
            let ox = r % ow;
            let d = &mut dst[i * kp..i * kp + kh * kw * cig];
            for (ky, seg) in d.chunks_exact_mut(kw * cig).enumerate() {
                let Some(iy) = g.iy(oy, ky) else {
                    fill_small(seg, zp);
                    continue;
                };
                let row = (b * h + iy) * w;
                for (kx, dd) in seg.chunks_exact_mut(cig).enumerate() {
                    match g.ix(ox, kx) {
                        Some(ix) => {
                            let p = (row + ix) * c + self.c0;
                            copy_small(dd, &self.x[p..p + cig]);
                        }
                        None => fill_small(dd, zp),
                    }
                }
            }
        }
    }
}

/// Grouped convolution through im2col + packed GEMM: `packs[g]` and `rqs[g]` are group
/// `g`'s weights (`k` ordered `(ky, kx, c)`) and requantization; `x` is NHWC, `out` is
/// NHWC with `c_out` channels.
///
/// # Panics
/// On slices inconsistent with `geom` (the caller checked the shapes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_gemm(
    ks: KernelSet,
    x: &[u8],
    geom: &ConvGeom,
    (oh, ow): (usize, usize),
    a_zp: u8,
    packs: &[PackedWeights],
    rqs: &[RequantParams],
    out: &mut [u8],
) {
    let m = geom.batch * oh * ow;
    let oc = geom.c_out;
    if m == 0 || oc == 0 {
        return;
    }
    let g = geom.groups;
    let cog = oc / g;
    let cig = geom.c_in / g;
    // Few input channels: write the padding out once (a small copy of the input), so
    // that im2col copies whole kernel rows without bounds logic.
    let mut pad_buf = None;
    if g == 1 && geom.c_in <= PADDED_MAX_C && geom.dilation.1 == 1 {
        if geom.padding == (0, 0) {
            pad_buf = Some(Vec::new());
        } else if let Some(len) =
            padded_len(geom).filter(|&l| l <= x.len().max(1 << 16).saturating_mul(4))
        {
            let mut buf = PAD_BUF.with(|b| b.take());
            buf.clear();
            buf.resize(len, a_zp);
            write_padded(x, geom, &mut buf);
            pad_buf = Some(buf);
        }
    }
    let padded = pad_buf
        .as_deref()
        .map(|b| if geom.padding == (0, 0) { x } else { b });
    for (grp, (packed, rq)) in packs.iter().zip(rqs).enumerate() {
        let src = Im2col {
            x,
            geom,
            out_hw: (oh, ow),
            c0: grp * cig,
            cig,
            a_zp,
            padded,
        };
        gemm(
            ks.simd,
            &src,
            m,
            a_zp as i32,
            packed,
            rq,
            &mut out[grp * cog..],
            oc,
        );
    }
    if let Some(buf) = pad_buf {
        if buf.capacity() > 0 {
            PAD_BUF.with(|b| b.replace(buf));
        }
    }
}

/// Bytes of the padded copy of `g`'s input (`n * (h + 2 ph) * (w + 2 pw) * c`), or `None`
/// on overflow.
fn padded_len(g: &ConvGeom) -> Option<usize> {
    let hp = g.in_hw.0.checked_add(g.padding.0.checked_mul(2)?)?;
    let wp = g.in_hw.1.checked_add(g.padding.1.checked_mul(2)?)?;
    g.batch
        .checked_mul(hp)?
        .checked_mul(wp)?
        .checked_mul(g.c_in)
}

/// Copies the NHWC input `x` into the interior of `buf` (already filled with the zero
/// point, [`padded_len`] bytes).
fn write_padded(x: &[u8], g: &ConvGeom, buf: &mut [u8]) {
    let (h, w) = g.in_hw;
    let (ph, pw) = g.padding;
    let c = g.c_in;
    let (hp, wp) = (h + 2 * ph, w + 2 * pw);
    let row = w * c;
    if row == 0 {
        return;
    }
    for (r, src) in x.chunks_exact(row).take(g.batch * h).enumerate() {
        let (b, iy) = (r / h, r % h);
        let p = ((b * hp + iy + ph) * wp + pw) * c;
        buf[p..p + row].copy_from_slice(src);
    }
}

thread_local! {
    /// The calling thread's buffer for the padded input of a few-channel convolution.
    static PAD_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
