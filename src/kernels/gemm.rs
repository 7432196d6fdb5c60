//! The int8 GEMM micro-kernel interface and its one generic driver.
//!
//! Modelled on `matrixmultiply`'s `GemmKernel`: a kernel declares its tile shape
//! ([`GemmKernel::MR`] rows x [`GemmKernel::NR`] columns) and computes one full tile of
//! `i32` dot products from packed operands in a single `unsafe fn`
//! ([`GemmKernel::kernel`]). Everything else is the driver's job, written once in
//! [`gemm_loop`]: row blocking and threads, packing the activations (rows at stride `kp`,
//! padded with zero rows to a multiple of [`MR`](super::MR)), row sums, the `a & 127` /
//! `a >> 7` split some kernels need, the zero-point corrections and requantization, and
//! the edge tiles. A SIMD kernel never sees a partial tile: rows or panels left over after
//! the last full tile go to the kernel's [`RowEdge`](GemmKernel::RowEdge) and
//! [`ColEdge`](GemmKernel::ColEdge) kernels (smaller tiles over the same packed data), and
//! only the valid part of each tile is requantized and stored.
//!
//! The kernels: `portable` (any CPU), `x86::avx2` and `x86::avx512_vnni`; the
//! [`KernelSet`](super::KernelSet) value picks which one [`gemm`] runs.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::pack::{PackedWeights, NR};
use super::requant::{round_up, RequantParams};
use super::{debug_report, KernelPath, Simd, MR};

/// Below this many multiply-accumulates a GEMM runs on the calling thread only.
const PAR_MIN_MACS: usize = 1 << 21;

/// The largest tile (`MR * NR` `i32`) a kernel may declare.
pub(crate) const MAX_TILE: usize = 8 * 32;

/// An int8 GEMM micro-kernel: `acc = A_tile * B_panels` over packed operands.
///
/// Operands (the same for every kernel): activations are `u8` rows at stride `kp` (`k`
/// padded with zeros to a multiple of 4); weights are [`PackedWeights`] panels of [`NR`]
/// columns, each `k` group of 4 holding `NR x 4` bytes. A tile covers `MR` rows and
/// `NR / pack::NR` adjacent panels. The result is stored panel-major: `acc` is
/// `[panel][row][pack::NR]` (for one panel simply `[row][NR]`).
pub(crate) trait GemmKernel: Copy + Send + Sync {
    /// Rows per tile: a multiple of [`MR`] (the packing granularity).
    const MR: usize;
    /// Columns per tile: a multiple of [`NR`] (adjacent packed panels).
    const NR: usize;
    /// The kernel for rows left after the last full tile (same `NR`, smaller `MR`;
    /// `Self` when `MR` is the packing granularity and no rows can be left).
    type RowEdge: GemmKernel;
    /// The kernel for panels left after the last full tile (same `MR`, smaller `NR`;
    /// `Self` when `NR` is one panel and no panels can be left).
    type ColEdge: GemmKernel;

    /// This kernel's [`RowEdge`](Self::RowEdge).
    fn row_edge(self) -> Self::RowEdge;

    /// This kernel's [`ColEdge`](Self::ColEdge).
    fn col_edge(self) -> Self::ColEdge;

    /// Whether activations above 127 must be split (`a & 127`, `a >> 7`) and the two
    /// products combined to stay exact with these weights.
    fn needs_split(self, _w: &PackedWeights) -> bool {
        false
    }

    /// The [`KernelPath`] a GEMM on this kernel reports (`split`: whether any block was
    /// split).
    fn path(self, split: bool) -> KernelPath;

    /// `acc = A * B`: `MR` activation rows times `NR / pack::NR` adjacent packed panels,
    /// exact `i32` sums (wrapping), stored `[panel][row][pack::NR]`.
    ///
    /// # Safety
    /// The CPU must support the kernel's instruction set (guaranteed when `self` was made
    /// by the kernel's detecting constructor); `kp % 4 == 0`; `a.len() >= MR * kp` (rows
    /// at stride `kp`), `b.len() >= NR * kp` (the panels, contiguous),
    /// `acc.len() >= MR * NR`. The kernel does not re-check these lengths.
    unsafe fn kernel(self, a: &[u8], kp: usize, b: &[i8], acc: &mut [i32]);

    /// Requantizes the top-left `rows x cols` of one panel's slice of a tile (`acc` holds
    /// at least `rows` rows of [`NR`] `i32`, `[row][NR]`; global columns `j0..j0 + cols`,
    /// `j0` a multiple of [`NR`]) into `out[r * ldc + c]`. `rowsum` holds the `rows`
    /// activation row sums, or is empty when every weight zero point is 0 (no row
    /// correction).
    #[allow(clippy::too_many_arguments)]
    fn requant_tile(
        self,
        acc: &[i32],
        rows: usize,
        cols: usize,
        rowsum: &[i32],
        a_zp: i32,
        w: &PackedWeights,
        rq: &RequantParams,
        j0: usize,
        out: &mut [u8],
        ldc: usize,
    );
}

/// A source of activation rows for the GEMM driver: a plain matrix or an on-the-fly
/// im2col of a convolution input.
pub(crate) trait RowSource: Sync {
    /// Writes the first `k` bytes (the packed weights' `k`) of rows `r0..r0 + rows` at
    /// stride `kp` into `dst`; the driver zeroes the padding bytes `k..kp` itself.
    fn fill(&self, r0: usize, rows: usize, kp: usize, dst: &mut [u8]);

    /// Rows `r0..r0 + rows` already laid out at stride `kp` in memory (`rows * kp` bytes),
    /// which the kernels can then read in place without a packing copy; `None` when the
    /// source must be packed through [`fill`](Self::fill).
    fn direct(&self, _r0: usize, _rows: usize, _kp: usize) -> Option<&[u8]> {
        None
    }
}

/// A row-major `rows x k` activation matrix as a [`RowSource`].
pub(crate) struct MatrixRows<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) k: usize,
}

impl RowSource for MatrixRows<'_> {
    fn fill(&self, r0: usize, rows: usize, kp: usize, dst: &mut [u8]) {
        for i in 0..rows {
            let src = &self.data[(r0 + i) * self.k..(r0 + i + 1) * self.k];
            dst[i * kp..i * kp + self.k].copy_from_slice(src);
        }
    }

    fn direct(&self, r0: usize, rows: usize, kp: usize) -> Option<&[u8]> {
        (kp == self.k)
            .then(|| self.data.get(r0 * kp..(r0 + rows) * kp))
            .flatten()
    }
}

/// Each thread's reusable buffers for packed activation blocks (no allocation or
/// zero-fill per call once they have grown).
#[derive(Default)]
struct Scratch {
    lo: Vec<u8>,
    hi: Vec<u8>,
    rowsum: Vec<i32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Grows `v` to at least `len` elements (new ones zero) without touching existing ones.
fn grow<T: Copy + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Runs the GEMM on the kernel of `simd`'s set (see [`gemm_loop`]). Arguments are checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    simd: Simd,
    src: &dyn RowSource,
    m: usize,
    a_zp: i32,
    w: &PackedWeights,
    rq: &RequantParams,
    out: &mut [u8],
    ldc: usize,
) -> KernelPath {
    let path = match simd {
        #[cfg(target_arch = "x86_64")]
        Some(s) if s.vnni() => {
            let k = super::x86::Vnni8x32::new(s).expect("the set's token has AVX-512 VNNI");
            gemm_loop(k, src, m, a_zp, w, rq, out, ldc)
        }
        #[cfg(target_arch = "x86_64")]
        Some(s) => gemm_loop(
            super::x86::Avx2Kernel::new(s),
            src,
            m,
            a_zp,
            w,
            rq,
            out,
            ldc,
        ),
        _ => gemm_loop(super::portable::Portable, src, m, a_zp, w, rq, out, ldc),
    };
    debug_report(path);
    path
}

/// One packed row block, shared by the tiles of [`tiles`].
struct Block<'a> {
    lo: &'a [u8],
    /// `a >> 7` of every byte when the block is split (then `lo` holds `a & 127`), else
    /// empty.
    hi: &'a [u8],
    kp: usize,
    /// Valid rows (the packed block has `lo.len() / kp` rows, a multiple of [`MR`]).
    rows: usize,
    n: usize,
    /// The rows' activation sums; empty when every weight zero point is 0.
    rowsum: &'a [i32],
    a_zp: i32,
    w: &'a PackedWeights,
    rq: &'a RequantParams,
    ldc: usize,
}

/// The GEMM driver, generic over the micro-kernel:
/// `out[i * ldc + j] = requant(sum_k (a[i][k] - a_zp) * (w[j][k] - w_zp[j]), j)` for the
/// `m` rows of `src`, over row blocks of at most 256 rows (on rayon's pool when large).
/// Arguments are checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_loop<K: GemmKernel>(
    kern: K,
    src: &dyn RowSource,
    m: usize,
    a_zp: i32,
    w: &PackedWeights,
    rq: &RequantParams,
    out: &mut [u8],
    ldc: usize,
) -> KernelPath {
    let (n, k, kp) = (w.n, w.k, w.kp);
    let split_seen = AtomicBool::new(false);
    let panels = round_up(n.max(1), NR) / NR;
    let threads = rayon::current_num_threads().max(1);
    let macs = m.saturating_mul(n).saturating_mul(k.max(1));
    let mc = if threads == 1 || macs < PAR_MIN_MACS {
        round_up(m.max(1), MR).min(256)
    } else {
        round_up(m.div_ceil(threads), MR).min(256)
    };
    let needs_split = kern.needs_split(w);
    let block = |bi: usize, out_blk: &mut [u8]| {
        let r0 = bi * mc;
        let rows_blk = mc.min(m - r0);
        let padded = round_up(rows_blk, MR);
        let mut scratch = SCRATCH.with(|b| b.take());
        // Rows the kernels can read in place (a plain matrix, a 1x1 convolution), unless
        // the block may have to be split (that rewrites the bytes).
        let direct = if needs_split || r0 + padded > m {
            None
        } else {
            src.direct(r0, padded, kp)
        };
        if direct.is_none() {
            let buf = &mut scratch.lo;
            grow(buf, padded * kp);
            src.fill(r0, rows_blk, kp, buf);
            if kp > k {
                for row in buf[..rows_blk * kp].chunks_exact_mut(kp) {
                    super::conv::fill_small(&mut row[k..], 0);
                }
            }
            buf[rows_blk * kp..padded * kp].fill(0);
        }
        let split = {
            let lo = direct.unwrap_or_else(|| &scratch.lo[..padded * kp]);
            // Row sums (of the unsplit bytes) only where a weight zero point needs them.
            if !w.zp_zero {
                grow(&mut scratch.rowsum, padded);
                let sums = &mut scratch.rowsum[..padded];
                if kp == 0 {
                    sums.fill(0);
                } else {
                    for (s, row) in sums.iter_mut().zip(lo.chunks_exact(kp)) {
                        *s = row_sum(row);
                    }
                }
            }
            // Only a kernel that may saturate needs to know whether any activation
            // exceeds 127 (then `lo` is the packed buffer: `direct` is off for it).
            needs_split && lo.iter().fold(0u8, |a, &v| a | v) > 127
        };
        if split {
            split_seen.store(true, Ordering::Relaxed);
            grow(&mut scratch.hi, padded * kp);
            let lo = &mut scratch.lo[..padded * kp];
            for (h, v) in scratch.hi.iter_mut().zip(lo.iter_mut()) {
                *h = *v >> 7;
                *v &= 127;
            }
        }
        let b = Block {
            lo: direct.unwrap_or_else(|| &scratch.lo[..padded * kp]),
            hi: if split {
                &scratch.hi[..padded * kp]
            } else {
                &[]
            },
            kp,
            rows: rows_blk,
            n,
            rowsum: if w.zp_zero {
                &[]
            } else {
                &scratch.rowsum[..padded]
            },
            a_zp,
            w,
            rq,
            ldc,
        };
        tiles(kern, &b, out_blk, 0, padded, 0, panels);
        SCRATCH.with(|b| b.replace(scratch));
    };
    if m > 0 && n > 0 {
        let blocks = m.div_ceil(mc);
        if blocks == 1 {
            block(0, out);
        } else {
            out.par_chunks_mut(mc * ldc)
                .take(blocks)
                .enumerate()
                .for_each(|(bi, o)| block(bi, o));
        }
    }
    kern.path(split_seen.load(Ordering::Relaxed))
}

/// Rows `r0..r1` (packed rows, multiples of [`MR`]) times panels `p0..p1` of a block with
/// kernel `K`; what is left after its last full tile goes to its edge kernels.
#[allow(clippy::too_many_arguments)]
fn tiles<K: GemmKernel>(
    kern: K,
    b: &Block<'_>,
    out: &mut [u8],
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
) {
    const {
        assert!(K::MR > 0 && K::MR.is_multiple_of(MR));
        assert!(K::NR > 0 && K::NR.is_multiple_of(NR));
        assert!(K::MR * K::NR <= MAX_TILE);
    }
    let pn = K::NR / NR;
    let r_full = r0 + (r1 - r0) / K::MR * K::MR;
    let p_full = p0 + (p1 - p0) / pn * pn;
    let kp = b.kp;
    let mut acc = [0i32; MAX_TILE];
    let mut acc2 = [0i32; MAX_TILE];
    for p in (p0..p_full).step_by(pn) {
        let panel = b.w.panels(p, pn);
        for t in (r0..r_full).step_by(K::MR) {
            let a = &b.lo[t * kp..(t + K::MR) * kp];
            // SAFETY: `kern` exists only once its CPU features were detected; `kp` is a
            // multiple of 4 (packing); `a` holds MR rows of `kp` bytes and `panel` the
            // `pn` panels (NR * kp bytes) by the slicing above; `acc` holds
            // MAX_TILE >= MR * NR values (checked at compile time).
            unsafe { kern.kernel(a, kp, panel, &mut acc) };
            if !b.hi.is_empty() {
                let h = &b.hi[t * kp..(t + K::MR) * kp];
                // SAFETY: as above, `h` has the shape of `a`.
                unsafe { kern.kernel(h, kp, panel, &mut acc2) };
                for (x, y) in acc.iter_mut().zip(&acc2).take(K::MR * K::NR) {
                    *x = x.wrapping_add(y.wrapping_shl(7));
                }
            }
            // Requantize the valid rows of each panel.
            let rows = K::MR.min(b.rows.saturating_sub(t));
            if rows == 0 {
                continue;
            }
            let rowsum = if b.rowsum.is_empty() {
                b.rowsum
            } else {
                &b.rowsum[t..t + rows]
            };
            for h in 0..pn {
                let j0 = (p + h) * NR;
                if j0 >= b.n {
                    break;
                }
                let cols = NR.min(b.n - j0);
                kern.requant_tile(
                    &acc[h * K::MR * NR..(h + 1) * K::MR * NR],
                    rows,
                    cols,
                    rowsum,
                    b.a_zp,
                    b.w,
                    b.rq,
                    j0,
                    &mut out[t * b.ldc + j0..],
                    b.ldc,
                );
            }
        }
    }
    if r_full < r1 {
        assert!(
            K::RowEdge::MR < K::MR,
            "row edge kernel must have fewer rows"
        );
        tiles(kern.row_edge(), b, out, r_full, r1, p0, p_full);
    }
    if p_full < p1 {
        assert!(
            K::ColEdge::NR < K::NR,
            "column edge kernel must have fewer columns"
        );
        tiles(kern.col_edge(), b, out, r0, r1, p_full, p1);
    }
}

/// Sum of a packed row's bytes (SSE2 `psadbw` on x86-64; elsewhere 16 partial sums that
/// vectorize).
#[inline]
fn row_sum(row: &[u8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    return super::x86::row_sum_u8(row);
    #[cfg(not(target_arch = "x86_64"))]
    row_sum_portable(row)
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn row_sum_portable(row: &[u8]) -> i32 {
    let mut acc = [0u32; 16];
    let chunks = row.chunks_exact(16);
    let rest: u32 = chunks.remainder().iter().map(|&v| v as u32).sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i] as u32;
        }
    }
    (acc.iter().sum::<u32>() + rest) as i32
}
