//! Direct depthwise convolution (one input channel per group, any channel multiplier) on
//! channels-last (`NHWC`) bytes: the driver, the weights as the kernels read them, and the
//! portable row kernel.
//!
//! # How a row is computed
//! The driver walks the output rows; for each it names the input rows its kernel rows
//! read (a row of the input zero point where a kernel row lies in the vertical padding)
//! and hands them to the kernel set's row kernel, which
//! 1. interleaves those input rows column by column into a small buffer, so that one
//!    SIMD lane holds the bytes of several kernel rows of one channel (4 rows for AVX-512
//!    VNNI's `vpdpbusd`, 2 rows widened to `i16` for AVX2's `vpmaddwd`); columns in the
//!    horizontal padding are written as the zero point, so the product loop has no
//!    bounds logic at all;
//! 2. for each block of channels (64 with VNNI, a last one of 32 or 16 where at most 32
//!    remain; 16 with AVX2) and each output pixel, accumulates every tap in registers
//!    from that buffer and the pre-packed weights (64-byte aligned, packed once per
//!    layer; the 3x3, 5x5 and 1x1 windows unrolled at compile time);
//! 3. requantizes in registers (the same `f32` arithmetic as every other kernel) and
//!    stores the `u8` output.
//!
//! The SIMD kernels multiply the raw `u8` input (padding included, as the zero point)
//! and add the per-channel constant `-a_zp * sum(w)` once: `sum (x - a_zp) * w` exactly,
//! in wrapping `i32` arithmetic, whose result is exact because the layer refused weights
//! whose worst case overflows `i32` (the true sum then fits, and wrapping partial sums
//! do not change a sum that fits). VNNI needs the weights (`w - w_zp`) in `i8`; layers whose
//! weights do not fit (affine weights) take the AVX2 kernel on every x86 set.
//!
//! A channel multiplier `m > 1` first repeats each input channel `m` times (an NHWC input
//! of `c_out` channels) and then runs the multiplier-1 kernels.

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::conv::ConvGeom;
use super::{KernelSet, RequantParams};

/// Channels per block of the AVX-512 VNNI kernel.
pub(crate) const VNNI_BLOCK: usize = 64;
/// Channels per block of the AVX2 kernel.
pub(crate) const AVX2_BLOCK: usize = 16;

/// 64 bytes aligned to 64 (a cache line, one AVX-512 register): the storage of the packed
/// weights and of the interleaving scratch, so that no SIMD load or store splits a line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Aligned64(pub(crate) [u8; 64]);

/// `n` bytes of zeros as [`Aligned64`] blocks.
fn aligned_zeros(n: usize) -> Vec<Aligned64> {
    vec![Aligned64([0; 64]); n.div_ceil(64)]
}

/// Sets byte `i` of an aligned buffer.
#[inline]
fn set_byte(p: &mut [Aligned64], i: usize, v: u8) {
    p[i / 64].0[i % 64] = v;
}

/// Depthwise weights `w - w_zp` (`[tap][channel]`, `i16`), with the packings the SIMD
/// kernels read, built on first use (once per layer).
#[derive(Debug, Clone)]
pub(crate) struct DwWeights {
    c: usize,
    kernel: (usize, usize),
    wv: Vec<i16>,
    /// `sum over taps of wv`, per channel.
    wsum: Vec<i32>,
    /// Whether every `wv` fits `i8` (the VNNI kernel's operand).
    fits_i8: bool,
    vnni: OnceLock<Vec<Aligned64>>,
    avx2: OnceLock<Vec<Aligned64>>,
}

impl DwWeights {
    /// `wv` holds `w - w_zp` as `[tap][channel]` for `c` channels and a `kernel` window.
    ///
    /// # Panics
    /// When `wv.len() != kh * kw * c`.
    pub(crate) fn new(wv: Vec<i16>, c: usize, kernel: (usize, usize)) -> Self {
        assert_eq!(wv.len(), kernel.0 * kernel.1 * c);
        let mut wsum = vec![0i32; c];
        if c > 0 {
            for row in wv.chunks_exact(c) {
                for (s, &w) in wsum.iter_mut().zip(row) {
                    *s = s.wrapping_add(w as i32);
                }
            }
        }
        let fits_i8 = wv.iter().all(|&w| i8::try_from(w).is_ok());
        DwWeights {
            c,
            kernel,
            wv,
            wsum,
            fits_i8,
            vnni: OnceLock::new(),
            avx2: OnceLock::new(),
        }
    }

    /// `w - w_zp` as `[tap][channel]`.
    pub(crate) fn values(&self) -> &[i16] {
        &self.wv
    }

    /// Bytes held (the values; the packings are built on first use).
    pub(crate) fn bytes(&self) -> usize {
        2 * self.wv.len() + 4 * self.wsum.len()
    }

    /// The VNNI packing: for row group `g` (kernel rows `4g..4g + 4`) and kernel column
    /// `kx`, one interleaved column of `vnni_layout(c).1` 32-bit lanes: lane `pos` holds
    /// the weights of kernel rows `4g..4g + 4` (0 past the kernel) of channel
    /// [`vnni_channel`]`(pos, c)`.
    pub(crate) fn vnni_packed(&self) -> &[Aligned64] {
        self.vnni.get_or_init(|| {
            let (kh, kw) = self.kernel;
            let (groups, cp) = (kh.div_ceil(4), vnni_layout(self.c).1);
            let mut p = aligned_zeros(groups * kw * cp * 4);
            for g in 0..groups {
                for kx in 0..kw {
                    for pos in 0..cp {
                        let ch = vnni_channel(pos, self.c);
                        for r in 0..4 {
                            let ky = 4 * g + r;
                            if ch < self.c && ky < kh {
                                let w = self.wv[(ky * kw + kx) * self.c + ch];
                                set_byte(&mut p, ((g * kw + kx) * cp + pos) * 4 + r, w as i8 as u8);
                            }
                        }
                    }
                }
            }
            p
        })
    }

    /// The AVX2 packing: for row group `g` (kernel rows `2g, 2g + 1`), kernel column `kx`
    /// and channel block `cb` (16 channels), two registers `h`, whose 32-bit lane `4k + i`
    /// holds the weights of kernel rows `2g, 2g + 1` (0 past the kernel) of channel
    /// `16 cb + 8 k + 4 h + i` (see [`avx2_channel`]).
    pub(crate) fn avx2_packed(&self) -> &[Aligned64] {
        self.avx2.get_or_init(|| {
            let (kh, kw) = self.kernel;
            let (groups, nb) = (kh.div_ceil(2), self.c.div_ceil(AVX2_BLOCK));
            let mut p = aligned_zeros(groups * kw * nb * AVX2_BLOCK * 2 * 2);
            for g in 0..groups {
                for kx in 0..kw {
                    for pos in 0..nb * AVX2_BLOCK {
                        let ch = avx2_channel(pos, self.c);
                        for r in 0..2 {
                            let ky = 2 * g + r;
                            if ch < self.c && ky < kh {
                                let w = self.wv[(ky * kw + kx) * self.c + ch];
                                let i = ((g * kw + kx) * nb * AVX2_BLOCK + pos) * 2 + r;
                                let [b0, b1] = w.to_le_bytes();
                                set_byte(&mut p, 2 * i, b0);
                                set_byte(&mut p, 2 * i + 1, b1);
                            }
                        }
                    }
                }
            }
            p
        })
    }
}

/// How the VNNI kernel splits `c` channels: `(full, cp)`, blocks of 64 (four registers,
/// interleaved in-lane) for channels `0..full` and one last block of `cp - full` (32: two
/// registers; 16: one) for `full..c`. A last block of more than 32 channels is a partial
/// block of 64 (its loads and stores masked): a block of 32 and one of 16 would cost more
/// shuffles and requantization steps than the lanes a partial block wastes.
#[inline]
pub(crate) fn vnni_layout(c: usize) -> (usize, usize) {
    let (n64, r) = (c / VNNI_BLOCK * VNNI_BLOCK, c % VNNI_BLOCK);
    match r {
        0 => (n64, n64),
        1..=16 => (n64, n64 + 16),
        17..=32 => (n64, n64 + 32),
        _ => (n64 + VNNI_BLOCK, n64 + VNNI_BLOCK),
    }
}

/// The channel a VNNI accumulator position holds among `c` channels (see
/// [`vnni_layout`]): in the blocks of 64, position `64 cb + 16 m + 4 k + i` (register `m`,
/// 32-bit lane `4k + i`) is channel `64 cb + 16 k + 4 m + i`, the order in which in-lane
/// byte and word interleaves leave four rows of 64 channels; in a last block of 32,
/// position `full + 16 m + 4 k + i` is channel `full + 16 (k % 2) + 8 (k / 2) + 4 m + i`
/// (the 256-bit interleaves' order, two results per register); a last block of 16 is in
/// order. Positions of channels past `c` are unused (zero weights).
#[inline]
pub(crate) fn vnni_channel(pos: usize, c: usize) -> usize {
    let (full, cp) = vnni_layout(c);
    if pos >= full {
        if cp - full != 32 {
            return pos;
        }
        let r = pos - full;
        let (m, k, i) = (r / 16, (r / 4) % 4, r % 4);
        return full + 16 * (k % 2) + 8 * (k / 2) + 4 * m + i;
    }
    let (cb, r) = (pos / 64, pos % 64);
    let (m, k, i) = (r / 16, (r / 4) % 4, r % 4);
    cb * 64 + 16 * k + 4 * m + i
}

/// The channel an AVX2 accumulator position holds: position `16 cb + 8 h + 4 k + i`
/// (register `h`, lane `4k + i`) is channel `16 cb + 8 k + 4 h + i`.
#[inline]
pub(crate) fn avx2_channel(pos: usize, _c: usize) -> usize {
    let (cb, r) = (pos / 16, pos % 16);
    let (h, k, i) = (r / 8, (r / 4) % 2, r % 4);
    cb * 16 + 8 * k + 4 * h + i
}

/// Per-call parameters of the SIMD kernels, in accumulator-position order: the
/// zero-point constant `-a_zp * sum(w)` and the requantization vectors (zero past the
/// channels).
#[derive(Debug, Default)]
pub(crate) struct DwParams {
    pub(crate) corr: Vec<i32>,
    pub(crate) bias_b: Vec<f32>,
    pub(crate) bias_s: Vec<f32>,
    pub(crate) mult: Vec<f32>,
    pub(crate) out_zp: i32,
    pub(crate) lo: i32,
}

impl DwParams {
    fn fill(
        &mut self,
        w: &DwWeights,
        a_zp: i32,
        rq: &RequantParams,
        len: usize,
        chan: fn(usize, usize) -> usize,
    ) {
        let c = w.c;
        self.corr.clear();
        self.bias_b.clear();
        self.bias_s.clear();
        self.mult.clear();
        for pos in 0..len {
            let ch = chan(pos, c);
            if ch < c {
                self.corr.push(w.wsum[ch].wrapping_mul(a_zp).wrapping_neg());
                self.bias_b.push(rq.bias_b[ch]);
                self.bias_s.push(rq.bias_s[ch]);
                self.mult.push(rq.mult[ch]);
            } else {
                self.corr.push(0);
                self.bias_b.push(0.0);
                self.bias_s.push(0.0);
                self.mult.push(0.0);
            }
        }
        self.out_zp = rq.out_zp;
        self.lo = rq.lo;
    }
}

/// One output row's geometry, as the row kernels see it: input width `w` and channels
/// `c`, left padding `pw`, `wn` padded columns read (`(ow - 1) * sx + (kw - 1) * dx + 1`),
/// `ow` outputs, stride `sx`, kernel width `kw`, dilation `dx`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowGeom {
    pub(crate) w: usize,
    pub(crate) c: usize,
    pub(crate) pw: usize,
    pub(crate) wn: usize,
    pub(crate) ow: usize,
    pub(crate) sx: usize,
    pub(crate) kw: usize,
    pub(crate) dx: usize,
    pub(crate) a_zp: u8,
}

/// Which row kernel a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl RowKernel {
    /// Kernel rows interleaved per lane.
    fn rows_per_group(self) -> usize {
        match self {
            RowKernel::Portable => 1,
            #[cfg(target_arch = "x86_64")]
            RowKernel::Avx2 => 2,
            #[cfg(target_arch = "x86_64")]
            RowKernel::Vnni => 4,
        }
    }
}

/// Each thread's reusable buffers: the interleaved rows (SIMD) or the accumulators
/// (portable).
#[derive(Default)]
struct Scratch {
    buf: Vec<Aligned64>,
    acc: Vec<i32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// The calling thread's per-call buffers: the expanded input of a multiplier > 1,
    /// a row of the zero point, and the parameters in accumulator order.
    static CALL: RefCell<(Vec<u8>, Vec<u8>, DwParams)> = RefCell::new(Default::default());
}

/// Direct depthwise convolution (one input channel per group, any channel multiplier),
/// NHWC, with `ks`'s row kernel, then the shared requantization; see the module
/// documentation. `x` holds `batch * h * w * c_in` bytes, `out` `batch * oh * ow * c_out`.
///
/// # Panics
/// On slices inconsistent with `g` (the caller checked the shapes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise(
    ks: KernelSet,
    x: &[u8],
    g: &ConvGeom,
    (oh, ow): (usize, usize),
    a_zp: i32,
    w: &DwWeights,
    rq: &RequantParams,
    out: &mut [u8],
) {
    let c = g.c_in;
    let oc = g.c_out;
    if oc == 0 || ow == 0 || oh == 0 || g.batch == 0 || c == 0 {
        return;
    }
    assert_eq!(w.c, oc);
    assert_eq!(w.kernel, g.kernel);
    let a_zp_u8 = u8::try_from(a_zp).expect("activation zero point in 0..=255");
    let mult = oc / c;
    let (h, wi) = g.in_hw;
    let pixels = g.batch * h * wi;
    assert!(x.len() >= pixels * c && out.len() >= g.batch * oh * ow * oc);
    let kernel = choose(ks, w);
    let (mut xe, mut zrow, mut params) = CALL.with(|b| b.take());
    // The zero-point row stands for kernel rows in the vertical padding (and for the
    // unused rows of a last row group).
    zrow.clear();
    zrow.resize(wi * oc, a_zp_u8);
    match kernel {
        RowKernel::Portable => {}
        #[cfg(target_arch = "x86_64")]
        RowKernel::Avx2 => params.fill(
            w,
            a_zp,
            rq,
            oc.div_ceil(AVX2_BLOCK) * AVX2_BLOCK,
            avx2_channel,
        ),
        #[cfg(target_arch = "x86_64")]
        RowKernel::Vnni => params.fill(w, a_zp, rq, vnni_layout(oc).1, vnni_channel),
    }
    let xin: &[u8] = if mult > 1 {
        // Each input channel repeated `mult` times (grown, never zero-filled: every byte
        // is written below).
        if xe.len() < pixels * oc {
            xe.resize(pixels * oc, 0);
        }
        let rows = xe[..pixels * oc]
            .chunks_exact_mut(oc)
            .zip(x.chunks_exact(c).take(pixels));
        match mult {
            2 => rows.for_each(|(d, s)| repeat_channels::<2>(d, s)),
            3 => rows.for_each(|(d, s)| repeat_channels::<3>(d, s)),
            4 => rows.for_each(|(d, s)| repeat_channels::<4>(d, s)),
            6 => rows.for_each(|(d, s)| repeat_channels::<6>(d, s)),
            _ => rows.for_each(|(d, s)| {
                for (dd, &v) in d.chunks_exact_mut(mult).zip(s) {
                    dd.fill(v);
                }
            }),
        }
        &xe[..pixels * oc]
    } else {
        &x[..pixels * c]
    };
    let (kh, kw) = g.kernel;
    let (sy, sx) = g.stride;
    let (dy, dx) = g.dilation;
    let (ph, pw) = g.padding;
    let rg = RowGeom {
        w: wi,
        c: oc,
        pw,
        wn: (ow - 1) * sx + (kw - 1) * dx + 1,
        ow,
        sx,
        kw,
        dx,
        a_zp: a_zp_u8,
    };
    let per = kernel.rows_per_group();
    let nrows = kh.div_ceil(per) * per;
    let row_len = wi * oc;
    let pr = &params;
    let zr = &zrow[..row_len];
    // The input row kernel row ky of output row r reads, if any.
    let in_row = |r: usize, ky: usize| {
        let (b, oy) = (r / oh, r % oh);
        (oy * sy + ky * dy)
            .checked_sub(ph)
            .filter(|&iy| iy < h)
            .map(|iy| (b * h + iy) * row_len)
    };
    let nout = g.batch * oh;
    let run = |(r, orow): (usize, &mut [u8])| {
        // Kernel row ky reads input row oy * sy + ky * dy - ph, or the zero-point row.
        let mut rows_buf: [&[u8]; 16] = [zr; 16];
        let mut rows_vec: Vec<&[u8]>;
        let rows: &mut [&[u8]] = if nrows <= 16 {
            &mut rows_buf[..nrows]
        } else {
            rows_vec = vec![zr; nrows];
            &mut rows_vec
        };
        for (ky, slot) in rows.iter_mut().enumerate().take(kh) {
            if let Some(s) = in_row(r, ky) {
                *slot = &xin[s..s + row_len];
            }
        }
        // The rows the next output row reads first (at most two), to prefetch.
        let mut next: [&[u8]; 2] = [zr; 2];
        let mut n_next = 0;
        if r + 1 < nout {
            for ky in (0..kh).rev() {
                let Some(s) = in_row(r + 1, ky) else {
                    continue;
                };
                if n_next == 2 || (0..kh).any(|k| in_row(r, k) == Some(s)) {
                    break;
                }
                next[n_next] = &xin[s..s + row_len];
                n_next += 1;
            }
        }
        SCRATCH.with(|cell| {
            let mut guard = cell.borrow_mut();
            let sc = &mut *guard;
            run_row(ks, kernel, rows, &next[..n_next], &rg, w, rq, pr, sc, orow);
        });
    };
    let work = nout
        .saturating_mul(ow)
        .saturating_mul(oc)
        .saturating_mul(kh * kw);
    let out = &mut out[..nout * ow * oc];
    if work >= 1 << 21 && rayon::current_num_threads() > 1 {
        out.par_chunks_mut(ow * oc).enumerate().for_each(run);
    } else {
        out.chunks_mut(ow * oc).enumerate().for_each(run);
    }
    CALL.with(|b| b.replace((xe, zrow, params)));
}

/// The row kernel `ks` runs for weights `w`.
fn choose(ks: KernelSet, w: &DwWeights) -> RowKernel {
    match ks.simd {
        #[cfg(target_arch = "x86_64")]
        Some(s) if s.vnni() && w.fits_i8 => RowKernel::Vnni,
        #[cfg(target_arch = "x86_64")]
        Some(_) => RowKernel::Avx2,
        _ => {
            let _ = w;
            RowKernel::Portable
        }
    }
}

/// One output row with the chosen kernel.
#[allow(clippy::too_many_arguments)]
fn run_row(
    ks: KernelSet,
    kernel: RowKernel,
    rows: &[&[u8]],
    next: &[&[u8]],
    rg: &RowGeom,
    w: &DwWeights,
    rq: &RequantParams,
    params: &DwParams,
    sc: &mut Scratch,
    out: &mut [u8],
) {
    match kernel {
        RowKernel::Portable => {
            let _ = (ks, params, next);
            row_portable(rows, rg, w, rq, &mut sc.acc, out)
        }
        #[cfg(target_arch = "x86_64")]
        RowKernel::Avx2 => {
            let s = ks.simd.expect("AVX2 kernel set");
            let need = rows.len() / 2 * rg.wn * rg.c.div_ceil(AVX2_BLOCK) * AVX2_BLOCK * 2;
            if sc.buf.len() * 64 < 2 * need {
                sc.buf = aligned_zeros(2 * need);
            }
            s.dw_row_avx2(rows, next, rg, w.avx2_packed(), params, &mut sc.buf, out);
        }
        #[cfg(target_arch = "x86_64")]
        RowKernel::Vnni => {
            let s = ks.simd.expect("VNNI kernel set");
            let need = rows.len() / 4 * rg.wn * vnni_layout(rg.c).1 * 4;
            if sc.buf.len() * 64 < need {
                sc.buf = aligned_zeros(need);
            }
            s.dw_row_vnni(rows, next, rg, w.vnni_packed(), params, &mut sc.buf, out);
        }
    }
}

/// The portable row kernel: for each output pixel, the valid taps' `(x - a_zp) * w`
/// summed per channel (no padding taps: they add 0), then the scalar requantization.
/// The partial sums cannot overflow (see the module documentation).
fn row_portable(
    rows: &[&[u8]],
    rg: &RowGeom,
    w: &DwWeights,
    rq: &RequantParams,
    acc: &mut Vec<i32>,
    out: &mut [u8],
) {
    let c = rg.c;
    let (kh, kw) = w.kernel;
    let a_zp = rg.a_zp as i32;
    acc.clear();
    acc.resize(c, 0);
    for (ox, o) in out.chunks_exact_mut(c).take(rg.ow).enumerate() {
        acc.fill(0);
        for (ky, row) in rows.iter().enumerate().take(kh) {
            for kx in 0..kw {
                let j = ox * rg.sx + kx * rg.dx;
                let Some(ix) = j.checked_sub(rg.pw).filter(|&ix| ix < rg.w) else {
                    continue;
                };
                let xs = &row[ix * c..(ix + 1) * c];
                let ws = &w.wv[(ky * kw + kx) * c..(ky * kw + kx + 1) * c];
                for ((a, &xv), &wv) in acc.iter_mut().zip(xs).zip(ws) {
                    *a += (xv as i32 - a_zp) * wv as i32;
                }
            }
        }
        for (j, (&a, q)) in acc.iter().zip(o.iter_mut()).enumerate() {
            *q = rq.requantize(a, j);
        }
    }
}

/// `d[i * M + j] = s[i]` for `j < M`: each input channel repeated `M` times.
#[inline(always)]
fn repeat_channels<const M: usize>(d: &mut [u8], s: &[u8]) {
    for (dd, &v) in d.chunks_exact_mut(M).zip(s) {
        dd.copy_from_slice(&[v; M]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference::qconv2d_naive;
    use crate::kernels::{Backend, BiasMode, OutputQuant};

    /// A deterministic byte stream (xorshift).
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    struct Case {
        g: ConvGeom,
        a_zp: i32,
        /// Weight zero points all 0 (`w - w_zp` fits `i8`: the VNNI kernel) or varied.
        symmetric: bool,
        relu: bool,
        bias: Option<BiasMode>,
        per_channel: bool,
        seed: u64,
    }

    impl Case {
        /// Runs the driver on every kernel set and compares with the oracle; returns the
        /// row kernels that ran.
        fn check(&self) -> Vec<RowKernel> {
            let g = &self.g;
            let (c, oc) = (g.c_in, g.c_out);
            let (kh, kw) = g.kernel;
            let taps = kh * kw;
            let (h, wd) = g.in_hw;
            let (oh, ow) = g.out_hw().unwrap();
            let mut x_nchw = bytes(g.batch * c * h * wd, self.seed);
            // Extremes of the input range.
            x_nchw.iter_mut().step_by(7).for_each(|v| *v = 255);
            x_nchw.iter_mut().step_by(11).for_each(|v| *v = 0);
            let mut w: Vec<i8> = bytes(oc * taps, self.seed ^ 0xabc)
                .into_iter()
                .map(|b| b as i8)
                .collect();
            w.iter_mut().step_by(5).for_each(|v| *v = -128);
            w.iter_mut().step_by(13).for_each(|v| *v = 127);
            let w_zp: Vec<i32> = if self.symmetric {
                vec![0; oc]
            } else {
                (0..oc).map(|j| j as i32 % 5 - 2).collect()
            };
            let mut wv = vec![0i16; taps * oc];
            for o in 0..oc {
                for t in 0..taps {
                    wv[t * oc + o] = (w[o * taps + t] as i32 - w_zp[o]) as i16;
                }
            }
            let dw = DwWeights::new(wv, oc, g.kernel);
            let scales: Vec<f32> = if self.per_channel {
                (0..oc).map(|j| 0.002 + j as f32 * 1.7e-5).collect()
            } else {
                vec![0.0031]
            };
            let bias: Vec<f32> = (0..oc).map(|j| (j as f32 - 20.0) * 0.013).collect();
            let out_q = OutputQuant {
                scale: 0.21,
                zero_point: 97,
                relu: self.relu,
            };
            let rq = RequantParams::with_bias_mode(
                oc,
                0.05,
                &scales,
                self.per_channel,
                self.bias.map(|_| &bias[..]),
                out_q,
                self.bias.unwrap_or_default(),
            )
            .unwrap();
            let want_nchw = qconv2d_naive(&x_nchw, g, self.a_zp, &w, &w_zp, &rq);
            let mut x = vec![0u8; x_nchw.len()];
            for b in 0..g.batch {
                for ch in 0..c {
                    for p in 0..h * wd {
                        x[(b * h * wd + p) * c + ch] = x_nchw[(b * c + ch) * h * wd + p];
                    }
                }
            }
            let mut ran = Vec::new();
            for ks in KernelSet::all_available() {
                let mut out = vec![0u8; g.batch * oh * ow * oc];
                depthwise(ks, &x, g, (oh, ow), self.a_zp, &dw, &rq, &mut out);
                for b in 0..g.batch {
                    for o in 0..oc {
                        for p in 0..oh * ow {
                            let got = out[(b * oh * ow + p) * oc + o];
                            let want = want_nchw[(b * oc + o) * oh * ow + p];
                            assert_eq!(
                                got,
                                want,
                                "{g:?} a_zp {} symmetric {} on {:?}: batch {b} channel {o} \
                                 pixel {p}",
                                self.a_zp,
                                self.symmetric,
                                ks.backend()
                            );
                        }
                    }
                }
                ran.push(choose(ks, &dw));
            }
            ran
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn geom(
        batch: usize,
        c: usize,
        mult: usize,
        hw: (usize, usize),
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
    ) -> ConvGeom {
        ConvGeom {
            batch,
            c_in: c,
            in_hw: hw,
            c_out: c * mult,
            kernel,
            stride,
            padding,
            dilation,
            groups: c,
        }
    }

    /// The MobileNet shapes (3x3 and 5x5, stride 1 and 2, padding, multipliers 1 and
    /// more) and channel counts around every block width (16, 64), symmetric weights (the
    /// VNNI kernel) and affine ones (AVX2 on every x86 set), every bias mode, ReLU, on
    /// every kernel set against the oracle.
    #[test]
    fn row_kernels_match_the_oracle_on_every_set() {
        let mut n = 0u64;
        let vnni = KernelSet::avx512_vnni().is_some();
        for c in [1usize, 15, 16, 17, 32, 40, 63, 64, 65, 96, 128, 144] {
            for (kernel, stride, padding, dilation) in [
                ((3, 3), (1, 1), (1, 1), (1, 1)),
                ((3, 3), (2, 2), (1, 1), (1, 1)),
                ((5, 5), (1, 1), (2, 2), (1, 1)),
                ((5, 5), (2, 2), (2, 2), (1, 1)),
                ((3, 3), (1, 2), (2, 0), (2, 1)),
                ((1, 1), (1, 1), (0, 0), (1, 1)),
            ] {
                for mult in [1usize, 2] {
                    if c * mult > 160 {
                        continue;
                    }
                    n += 1;
                    let case = Case {
                        g: geom(2, c, mult, (7, 9), kernel, stride, padding, dilation),
                        a_zp: [0, 128, 255, 3][n as usize % 4],
                        symmetric: !n.is_multiple_of(3),
                        relu: n.is_multiple_of(2),
                        bias: [None, Some(BiasMode::Float), Some(BiasMode::Int32)][n as usize % 3],
                        per_channel: n % 4 != 1,
                        seed: n,
                    };
                    let ran = case.check();
                    // The VNNI set runs the VNNI kernel exactly when the weights fit i8.
                    if vnni {
                        let last = *ran.last().unwrap();
                        assert_eq!(last == RowKernel::Vnni, case.symmetric, "{:?}", case.g);
                    }
                }
            }
        }
        assert!(n > 100, "{n}");
    }

    /// Kernels taller than the 16 row slots kept on the stack (a 17 x 1 window), taller
    /// than one VNNI row group (7 x 7: rows 0-3 and 4-6 plus an unused one), multipliers 3
    /// and 6, a window wider than the input with large padding, and the input range's
    /// zero points.
    #[test]
    fn tall_kernels_and_large_multipliers() {
        let cases = [
            geom(1, 5, 1, (20, 4), (17, 1), (1, 1), (3, 0), (1, 1)),
            geom(1, 70, 1, (9, 9), (7, 7), (1, 1), (3, 3), (1, 1)),
            geom(2, 11, 3, (6, 5), (3, 3), (2, 1), (1, 1), (1, 1)),
            geom(1, 8, 6, (5, 5), (3, 3), (1, 1), (1, 1), (1, 1)),
            geom(1, 33, 1, (2, 3), (3, 5), (1, 1), (3, 4), (1, 1)),
            geom(1, 64, 1, (4, 4), (9, 9), (1, 1), (4, 4), (1, 1)),
        ];
        for (i, g) in cases.into_iter().enumerate() {
            for (a_zp, symmetric) in [(0, true), (255, true), (131, false)] {
                Case {
                    g,
                    a_zp,
                    symmetric,
                    relu: i % 2 == 1,
                    bias: Some(BiasMode::Float),
                    per_channel: true,
                    seed: 100 + i as u64,
                }
                .check();
            }
        }
    }

    /// The weights whose worst case the layer accepts (`255 * sum |w| < 2^31`) at the
    /// extremes of the input: partial sums may wrap in the SIMD kernels (raw input times
    /// weights, then the zero-point constant) but the result is exact.
    #[test]
    fn extreme_sums_are_exact() {
        // 2 channels, a 64 x 64 window of -128 (sum |w| = 524288, 255 * that < 2^31).
        let g = geom(1, 2, 1, (64, 64), (64, 64), (1, 1), (0, 0), (1, 1));
        for a_zp in [0, 255] {
            Case {
                g,
                a_zp,
                symmetric: true,
                relu: false,
                bias: None,
                per_channel: true,
                seed: 7,
            }
            .check();
        }
    }

    /// The channel orders the SIMD kernels' registers hold are permutations of each block.
    #[test]
    fn accumulator_orders_are_permutations() {
        for c in [1usize, 16, 17, 64, 80, 81, 96, 144, 200] {
            for (f, cp) in [
                (vnni_channel as fn(usize, usize) -> usize, vnni_layout(c).1),
                (avx2_channel, c.div_ceil(16) * 16),
            ] {
                let mut seen: Vec<usize> = (0..cp).map(|p| f(p, c)).collect();
                seen.sort_unstable();
                assert_eq!(seen, (0..cp).collect::<Vec<_>>(), "{c}");
            }
        }
        assert_eq!(KernelSet::portable().backend(), Backend::Portable);
    }
}
