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
    /// Bytes per kernel row in an im2col row ([`packed_row_bytes`]): `kw * c_in` rounded
    /// up to whole 4-byte groups for one group without horizontal dilation (the padding
    /// bytes meet zero weights), `kw * cig` otherwise (then only `kh * kw * cig` matters).
    rstride: usize,
    /// The input itself where it needs no padding (nor slack bytes), so that every
    /// kernel row or tap is one in-bounds run of bytes: the GEMM then reads rows in place
    /// ([`RowSource::segments`]), or copies whole kernel rows for few channels.
    padded: Option<&'a [u8]>,
    /// Rows are read in place from the padded input (`[n, h + 2 * ph, w + 2 * pw, c]`,
    /// border bytes the zero point, then `slack` bytes of it) written per row block:
    /// only the padded rows a block reads ([`RowSource::window`]).
    windowed: bool,
    /// Bytes after the padded input's end that the last kernel row's rounding reads.
    slack: usize,
}

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
        let rs = self.rstride;
        let ky_step = g.dilation.0 * wp * c;
        if rows == 0 || oh == 0 || ow == 0 || kp == 0 || seg_len == 0 {
            return;
        }
        let mut b = r0 / (oh * ow);
        let mut oy = (r0 / ow) % oh;
        let mut ox = r0 % ow;
        for d in dst.chunks_exact_mut(kp).take(rows) {
            let base = ((b * hp + oy * sy) * wp + ox * sx) * c;
            for (ky, chunk) in d[..kh * rs].chunks_exact_mut(rs).enumerate() {
                let p = base + ky * ky_step;
                let (seg, pad) = chunk.split_at_mut(seg_len);
                copy_small(seg, &xp[p..p + seg_len]);
                fill_small(pad, 0);
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
        let rs = self.rstride;
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
            for (ky, chunk) in d[..kh * rs].chunks_exact_mut(rs).enumerate() {
                let (seg, pad) = chunk.split_at_mut(seg_len);
                fill_small(pad, 0);
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
        g.kernel == (1, 1)
            && g.stride == (1, 1)
            && g.padding == (0, 0)
            && self.cig == g.c_in
            && self.rstride == g.c_in
    }
}

impl Im2col<'_> {
    /// One group without horizontal dilation: a kernel row's `kw * c_in` bytes are
    /// contiguous in NHWC (else each tap's `cig` channels are).
    fn merged(&self) -> bool {
        self.cig == self.geom.c_in && self.geom.dilation.1 == 1
    }
}

impl RowSource for Im2col<'_> {
    fn bytes(&self) -> &[u8] {
        self.padded.unwrap_or(&[])
    }

    fn segments(&self, kp: usize, deltas: &mut Vec<usize>) -> Option<(usize, usize)> {
        if self.padded.is_none() && !self.windowed {
            return None;
        }
        let g = self.geom;
        let (kh, kw) = g.kernel;
        let (dy, dx) = g.dilation;
        let row = (g.in_hw.1 + 2 * g.padding.1) * g.c_in;
        let (seg, real) = if self.merged() {
            // Whole kernel rows; `padded` has room for the few bytes read past the last.
            deltas.extend((0..kh).map(|ky| ky * dy * row));
            (self.rstride, kw * g.c_in)
        } else {
            deltas.extend((0..kh * kw).map(|t| (t / kw) * dy * row + (t % kw) * dx * g.c_in));
            (self.cig, self.cig)
        };
        (seg > 0 && seg.is_multiple_of(4) && deltas.len() * seg == kp).then_some((seg, real))
    }

    fn row_offsets(&self, r0: usize, offs: &mut [usize]) {
        let g = self.geom;
        let (oh, ow) = self.out_hw;
        let c = g.c_in;
        let (sy, sx) = g.stride;
        let hp = g.in_hw.0 + 2 * g.padding.0;
        let wp = g.in_hw.1 + 2 * g.padding.1;
        if offs.is_empty() || oh == 0 || ow == 0 {
            return;
        }
        let mut b = r0 / (oh * ow);
        let mut oy = (r0 / ow) % oh;
        let mut ox = r0 % ow;
        let mut done = 0;
        // One output row of the image at a time: its starts are evenly spaced.
        while done < offs.len() {
            let run = (ow - ox).min(offs.len() - done);
            let base = ((b * hp + oy * sy) * wp + ox * sx) * c + self.c0;
            for (i, o) in offs[done..done + run].iter_mut().enumerate() {
                *o = base + i * sx * c;
            }
            done += run;
            ox = 0;
            oy += 1;
            if oy == oh {
                oy = 0;
                b += 1;
            }
        }
    }

    fn window(&self, r0: usize, rows: usize, buf: &mut Vec<u8>) -> Option<usize> {
        if !self.windowed || rows == 0 {
            return None;
        }
        let g = self.geom;
        let (oh, ow) = self.out_hw;
        let hp = g.in_hw.0 + 2 * g.padding.0;
        let row_bytes = (g.in_hw.1 + 2 * g.padding.1) * g.c_in;
        // The padded row of output row `r`'s first kernel row.
        let first_row = |r: usize| (r / (oh * ow)) * hp + ((r / ow) % oh) * g.stride.0;
        let first = first_row(r0);
        let end = first_row(r0 + rows - 1) + (g.kernel.0 - 1) * g.dilation.0 + 1;
        let len = (end - first) * row_bytes + self.slack;
        if buf.len() < len {
            buf.resize(len, 0);
        } else {
            buf.truncate(len);
        }
        let (rows_part, slack) = buf.split_at_mut(len - self.slack);
        write_padded_rows(self.x, g, self.a_zp, first, rows_part);
        slack.fill(self.a_zp);
        Some(first * row_bytes)
    }

    fn max_byte(&self) -> u8 {
        let m = self.x.iter().fold(0u8, |a, &v| a.max(v));
        if self.geom.padding == (0, 0) {
            m
        } else {
            m.max(self.a_zp)
        }
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
        if let Some(xp) = self.padded.filter(|_| self.merged()) {
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

/// Bytes per kernel row in a row of `g`'s im2col matrix (and in its packed weights,
/// whose `k` is `kh` of them): with one group and no horizontal dilation a kernel row is
/// `kw * c_in` contiguous NHWC bytes, rounded up to a multiple of 4 so that the GEMM can
/// read it in place (the extra bytes meet zero weights); otherwise `kw * cig`, the taps
/// in `(kx, c)` order.
pub(crate) fn packed_row_bytes(g: &ConvGeom) -> usize {
    let cig = g.c_in / g.groups.max(1);
    if g.groups == 1 && g.dilation.1 == 1 {
        (g.kernel.1 * cig).div_ceil(4) * 4
    } else {
        g.kernel.1 * cig
    }
}

/// Packs `[c_out, cig, kh, kw]` int8 weights (`w`, PyTorch's layout) for
/// [`conv_gemm`]: one matrix per group, `k` ordered `(ky, kx, c)` with each kernel row
/// taking [`packed_row_bytes`] (zero weights in the rounding). `w_zp` holds one zero point
/// or `c_out`.
///
/// # Errors
/// As [`PackedWeights::new`].
pub(crate) fn pack_conv_weights(
    g: &ConvGeom,
    w: &[i8],
    w_zp: &[i32],
) -> crate::error::Result<Vec<PackedWeights>> {
    let (kh, kw) = g.kernel;
    let groups = g.groups.max(1);
    let (cig, cog) = (g.c_in / groups, g.c_out / groups);
    let rs = packed_row_bytes(g);
    let k = kh * rs;
    let mut packs = Vec::with_capacity(groups);
    for grp in 0..groups {
        let mut wg = vec![0i8; cog * k];
        for o in 0..cog {
            let oc = grp * cog + o;
            for ci in 0..cig {
                for ky in 0..kh {
                    for kx in 0..kw {
                        wg[o * k + ky * rs + kx * cig + ci] =
                            w[((oc * cig + ci) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        let zps = if w_zp.len() == 1 {
            w_zp
        } else {
            &w_zp[grp * cog..(grp + 1) * cog]
        };
        packs.push(PackedWeights::with_real_depth(
            &wg,
            cog,
            k,
            zps,
            kh * kw * cig,
        )?);
    }
    Ok(packs)
}

/// The `[c_out, cig, kh, kw]` weights back from [`pack_conv_weights`]'s matrices, and
/// their zero points (`c_out`).
pub(crate) fn unpack_conv_weights(g: &ConvGeom, packs: &[PackedWeights]) -> (Vec<i8>, Vec<i32>) {
    let (kh, kw) = g.kernel;
    let groups = g.groups.max(1);
    let (cig, cog) = (g.c_in / groups, g.c_out / groups);
    let rs = packed_row_bytes(g);
    let k = kh * rs;
    let mut w = vec![0i8; g.c_out * cig * kh * kw];
    let mut zps = Vec::with_capacity(g.c_out);
    for (grp, packed) in packs.iter().enumerate() {
        let wg = packed.unpack();
        for o in 0..cog {
            let oc = grp * cog + o;
            for ci in 0..cig {
                for ky in 0..kh {
                    for kx in 0..kw {
                        w[((oc * cig + ci) * kh + ky) * kw + kx] =
                            wg[o * k + ky * rs + kx * cig + ci];
                    }
                }
            }
        }
        zps.extend_from_slice(packed.zero_points());
    }
    (w, zps)
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
    let merged = g == 1 && geom.dilation.1 == 1;
    let rstride = packed_row_bytes(geom);
    // Where the GEMM can read rows in place (whole kernel rows, rounded up to 4-byte
    // groups: then `slack` bytes past the padded input's end are read; or taps of whole
    // 4-byte groups), the padded rows each row block reads are written out per block
    // (in cache) unless the input needs no padding; not when the padding would dwarf
    // the input (then rows are packed from the input).
    let slack = if merged {
        rstride - geom.kernel.1 * cig
    } else {
        0
    };
    let in_place = merged || cig.is_multiple_of(4);
    let unpadded = in_place && geom.padding == (0, 0) && slack == 0;
    let windowed = in_place
        && !unpadded
        && padded_len(geom)
            .and_then(|l| l.checked_add(slack))
            .is_some_and(|l| l <= x.len().max(1 << 16).saturating_mul(4));
    let padded = unpadded.then_some(x);
    for (grp, (packed, rq)) in packs.iter().zip(rqs).enumerate() {
        let src = Im2col {
            x,
            geom,
            out_hw: (oh, ow),
            c0: grp * cig,
            cig,
            a_zp,
            rstride,
            padded,
            windowed,
            slack,
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

/// Writes padded rows `first..` of the NHWC input `x` (rows of the padded input
/// `[n, h + 2 ph, w + 2 pw, c]`, image after image) into `buf`, as many as it holds: each
/// row's left padding, the input row, its right padding (the zero point around), and
/// whole rows of the zero point above and below each image.
fn write_padded_rows(x: &[u8], g: &ConvGeom, a_zp: u8, first: usize, buf: &mut [u8]) {
    let (h, w) = g.in_hw;
    let (ph, pw) = g.padding;
    let c = g.c_in;
    let (hp, wp) = (h + 2 * ph, w + 2 * pw);
    let (row, prow, side) = (w * c, wp * c, pw * c);
    if prow == 0 {
        return;
    }
    for (r, dst) in (first..).zip(buf.chunks_exact_mut(prow)) {
        let (b, iy) = (r / hp, r % hp);
        if iy < ph || iy >= ph + h {
            dst.fill(a_zp);
            continue;
        }
        let s = (b * h + iy - ph) * row;
        dst[..side].fill(a_zp);
        dst[side..side + row].copy_from_slice(&x[s..s + row]);
        dst[side + row..].fill(a_zp);
    }
}

#[cfg(test)]
mod tests {
    //! The im2col + GEMM convolution driver on every kernel set against the direct oracle
    //! (`reference::qconv2d_naive`): rows read in place from the input or its padded copy
    //! (whole kernel rows, one tap's channels), the packed im2col fallback (kernel rows
    //! copied from the padded copy, or gathered tap by tap), several row blocks and
    //! threads.
    use super::{conv_gemm, ConvGeom};
    use crate::kernels::reference::qconv2d_naive;
    use crate::kernels::{KernelSet, OutputQuant, RequantParams};

    fn lcg(s: &mut u64) -> u32 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*s >> 33) as u32
    }

    /// Runs `g` through `conv_gemm` on every set (activations below `a_lim`, weight zero
    /// points zero or not) and compares with the oracle, byte for byte.
    fn check(g: ConvGeom, a_lim: u32, a_zp: u8, zp_zero: bool, seed: u64) {
        let mut s = seed;
        let (h, w) = g.in_hw;
        let (kh, kw) = g.kernel;
        let cig = g.c_in / g.groups;
        let cog = g.c_out / g.groups;
        let k = kh * kw * cig;
        let x: Vec<u8> = (0..g.batch * g.c_in * h * w)
            .map(|_| (lcg(&mut s) % a_lim) as u8)
            .collect();
        let wt: Vec<i8> = (0..g.c_out * k).map(|_| lcg(&mut s) as u8 as i8).collect();
        let w_zp: Vec<i32> = (0..g.c_out)
            .map(|j| if zp_zero { 0 } else { j as i32 % 5 - 2 })
            .collect();
        let scales: Vec<f32> = (0..g.c_out).map(|j| 0.002 + j as f32 * 1e-4).collect();
        let bias: Vec<f32> = (0..g.c_out).map(|j| j as f32 * 0.3 - 4.0).collect();
        let oq = OutputQuant {
            scale: 0.2,
            zero_point: 110,
            relu: seed % 2 == 1,
        };
        let rq = RequantParams::new(g.c_out, 0.03, &scales, true, Some(&bias), oq).unwrap();
        let want_nchw = qconv2d_naive(&x, &g, a_zp as i32, &wt, &w_zp, &rq);
        let (oh, ow) = g.out_hw().unwrap();
        // NHWC input; weights per group with `k` ordered (ky, kx, c).
        let mut x_nhwc = vec![0u8; x.len()];
        for b in 0..g.batch {
            for c in 0..g.c_in {
                for p in 0..h * w {
                    x_nhwc[(b * h * w + p) * g.c_in + c] = x[(b * g.c_in + c) * h * w + p];
                }
            }
        }
        let packs = super::pack_conv_weights(&g, &wt, &w_zp).unwrap();
        let (w_back, zp_back) = super::unpack_conv_weights(&g, &packs);
        assert_eq!((&w_back, &zp_back), (&wt, &w_zp));
        let rqs: Vec<RequantParams> = (0..g.groups)
            .map(|grp| {
                let cols = grp * cog..(grp + 1) * cog;
                RequantParams::new(
                    cog,
                    0.03,
                    &scales[cols.clone()],
                    true,
                    Some(&bias[cols]),
                    oq,
                )
                .unwrap()
            })
            .collect();
        let m = g.batch * oh * ow;
        for ks in KernelSet::all_available() {
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut out = vec![0xA5u8; m * g.c_out];
                pool.install(|| conv_gemm(ks, &x_nhwc, &g, (oh, ow), a_zp, &packs, &rqs, &mut out));
                for (i, &v) in out.iter().enumerate() {
                    let (r, oc) = (i / g.c_out, i % g.c_out);
                    let (b, p) = (r / (oh * ow), r % (oh * ow));
                    let want = want_nchw[(b * g.c_out + oc) * oh * ow + p];
                    assert_eq!(
                        v,
                        want,
                        "{g:?} on {:?}, {threads} threads, a < {a_lim}, zp_zero {zp_zero}: row {r} channel {oc}",
                        ks.backend()
                    );
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn geom(
        batch: usize,
        c_in: usize,
        in_hw: (usize, usize),
        c_out: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
    ) -> ConvGeom {
        ConvGeom {
            batch,
            c_in,
            in_hw,
            c_out,
            kernel,
            stride,
            padding,
            dilation,
            groups,
        }
    }

    #[test]
    fn conv_gemm_matches_the_oracle_on_every_set() {
        let d = (1, 1);
        let cases = [
            // Whole kernel rows in place (in the padded copy).
            geom(2, 16, (7, 9), 20, (3, 3), (1, 1), (1, 1), d, 1),
            geom(1, 16, (6, 5), 33, (3, 3), (2, 2), (1, 1), d, 1),
            geom(1, 32, (4, 4), 64, (3, 3), (1, 1), (1, 1), d, 1),
            geom(1, 12, (5, 6), 16, (1, 3), (1, 2), (0, 2), d, 1),
            // Padding wider than the kernel's reach: kernel rows wholly in the padding.
            geom(1, 4, (2, 2), 8, (3, 3), (1, 1), (3, 3), d, 1),
            geom(1, 12, (2, 3), 8, (3, 3), (1, 1), (3, 2), d, 1),
            // Few channels (4, 8): read in place too.
            geom(2, 8, (5, 6), 16, (3, 3), (1, 1), (1, 1), d, 1),
            geom(2, 4, (5, 6), 17, (5, 3), (1, 2), (2, 0), d, 1),
            // One tap's channels in place: dilation, groups.
            geom(1, 8, (7, 7), 16, (3, 3), (1, 1), (2, 2), (2, 2), 1),
            geom(2, 8, (5, 5), 12, (3, 3), (1, 1), (1, 1), d, 2),
            geom(1, 16, (6, 6), 8, (3, 3), (2, 1), (1, 1), (1, 2), 4),
            // Kernel rows rounded up to 4-byte groups (stems, odd channel counts), read in
            // place from the padded copy (which then always exists).
            geom(1, 3, (6, 6), 16, (3, 3), (2, 2), (1, 1), d, 1),
            geom(2, 1, (7, 5), 16, (3, 3), (1, 1), (1, 1), d, 1),
            geom(1, 5, (6, 7), 9, (3, 3), (2, 1), (0, 0), (2, 1), 1),
            geom(1, 3, (4, 5), 16, (1, 1), (1, 1), (0, 0), d, 1),
            geom(1, 3, (9, 9), 32, (7, 7), (2, 2), (3, 3), d, 1),
            // Packed im2col: taps not a multiple of 4 bytes; a padded copy too large to
            // write (kernel rows gathered from the input, rounded up as above).
            geom(1, 6, (5, 5), 8, (3, 3), (1, 1), (1, 1), d, 2),
            geom(1, 3, (2, 3), 8, (3, 3), (1, 1), (150, 150), d, 1),
            // 1x1: NHWC rows are the GEMM's rows.
            geom(1, 12, (3, 3), 16, (1, 1), (1, 1), (0, 0), d, 1),
            geom(1, 12, (5, 5), 16, (1, 1), (2, 2), (0, 0), d, 1),
            // Several row blocks of 256 rows (and threads).
            geom(3, 16, (12, 11), 40, (3, 3), (1, 1), (1, 1), d, 1),
            geom(2, 64, (20, 20), 16, (1, 1), (1, 1), (0, 0), d, 1),
        ];
        for (i, g) in cases.into_iter().enumerate() {
            let seed = i as u64 + 1;
            // Any activations (AVX2 splits those above 127 in packed blocks), and
            // reduce_range ones with a zero point below 128 (AVX2 reads them in place).
            check(g, 256, 77, i % 3 == 0, seed);
            check(g, 128, 100, i % 3 != 0, seed + 100);
        }
    }
}
