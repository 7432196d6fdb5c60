//! The int8 GEMM micro-kernel interface and its one generic driver.
//!
//! Modelled on `matrixmultiply`'s `GemmKernel`: a kernel declares its tile shape
//! ([`GemmKernel::MR`] rows x [`GemmKernel::NR`] columns) and computes one full tile of
//! `i32` dot products from packed operands in a single `unsafe fn`
//! ([`GemmKernel::kernel`]). Everything else is the driver's job, written once in
//! [`gemm_loop`]: row blocking and threads, reading the activation rows in place where
//! the source allows it ([`RowSource::segments`]) or packing them (rows at stride `kp`,
//! padded with zero rows to a multiple of [`MR`](super::MR)), row sums, the `a & 127` /
//! `a >> 7` split some kernels need, the zero-point corrections and requantization (fused
//! into the tile where the kernel can, [`GemmKernel::kernel_requant`]), and the edge
//! tiles. A SIMD kernel never sees a partial tile: rows or panels left over after
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

/// From this depth (packed `k`) on, AVX-512 VNNI GEMMs use twelve-row tiles.
const DEEP_K: usize = 256;

/// The largest tile (`MR * NR` `i32`) a kernel may declare.
pub(crate) const MAX_TILE: usize = 12 * 32;

/// An int8 GEMM micro-kernel: `acc = A_tile * B_panels` over packed weights.
///
/// Operands (the same for every kernel): each activation row is `nseg = deltas.len()`
/// segments of `seg` bytes (`seg % 4 == 0`, `nseg * seg == kp`), segment `s` of tile row
/// `r` starting at `a[r] + deltas[s]`: rows of a packed block (one segment of `kp`
/// bytes), or a convolution's input read in place (one segment per kernel row or tap, at
/// the same distances from every row's start). Weights are [`PackedWeights`] panels of
/// [`NR`] columns, each `k` group of 4 holding `NR x 4` bytes. A tile covers `MR` rows and
/// `NR / pack::NR` adjacent panels (`b` holds them contiguously, `kp * pack::NR` bytes
/// each).
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
    /// by the kernel's detecting constructor); `seg % 4 == 0`; `a.len() >= MR` and
    /// `a[r] + deltas[s]` readable for `seg` bytes (within one allocation) for every
    /// `r < MR`, `s < deltas.len()`; `b.len() >= NR * deltas.len() * seg` (the panels,
    /// contiguous); `acc.len() >= MR * NR`. The kernel does not re-check these.
    unsafe fn kernel(
        self,
        a: &[*const u8],
        deltas: &[usize],
        seg: usize,
        b: &[i8],
        acc: &mut [i32],
    );

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

    /// One tile computed and requantized: the top-left `rows x cols` of
    /// [`kernel`](Self::kernel)'s result (in `acc`, a scratch of at least `MR * NR`
    /// values) go through [`requant_tile`](Self::requant_tile) into `out[r * ldc + c]`
    /// (`ep` holds the columns' parameters from `ep.j0`). Kernels that can requantize
    /// straight from their registers override it and leave `acc` alone.
    ///
    /// # Safety
    /// As [`kernel`](Self::kernel); `rows <= MR`, `cols <= NR`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_requant(
        self,
        a: &[*const u8],
        deltas: &[usize],
        seg: usize,
        b: &[i8],
        ep: &Epilogue<'_>,
        rows: usize,
        cols: usize,
        out: &mut [u8],
        ldc: usize,
        acc: &mut [i32],
    ) {
        // SAFETY: forwarded from this function's contract (`acc` holds MR * NR values).
        unsafe { self.kernel(a, deltas, seg, b, acc) };
        self.requant_panels(acc, ep, rows, cols, out, ldc);
    }

    /// [`requant_tile`](Self::requant_tile) on each `NR`-column panel of a tile's sums
    /// (`acc`, panel-major: `MR * NR` values a panel) that has valid columns.
    fn requant_panels(
        self,
        acc: &[i32],
        ep: &Epilogue<'_>,
        rows: usize,
        cols: usize,
        out: &mut [u8],
        ldc: usize,
    ) {
        for (h, panel) in acc
            .chunks_exact(Self::MR * NR)
            .take(Self::NR / NR)
            .enumerate()
        {
            let c0 = h * NR;
            if c0 >= cols {
                break;
            }
            self.requant_tile(
                panel,
                rows,
                NR.min(cols - c0),
                ep.rowsum,
                ep.a_zp,
                ep.w,
                ep.rq,
                ep.j0 + c0,
                &mut out[c0..],
                ldc,
            );
        }
    }

    /// [`kernel_requant`](Self::kernel_requant) for a split block: `a` reads the low seven
    /// bits (`a & 127`) and `hi` the top bit (`a >> 7`) of the same rows, and the tile's
    /// sums are `A_lo * B + 128 * A_hi * B`. The default runs [`kernel`](Self::kernel) on
    /// both (into `acc` and `acc2`), combines them and requantizes each panel; kernels
    /// that can do it in one pass override it.
    ///
    /// # Safety
    /// As [`kernel_requant`](Self::kernel_requant), for `hi` as for `a`; `acc2` holds at
    /// least `MR * NR` values too.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_split_requant(
        self,
        a: &[*const u8],
        hi: &[*const u8],
        deltas: &[usize],
        seg: usize,
        b: &[i8],
        ep: &Epilogue<'_>,
        rows: usize,
        cols: usize,
        out: &mut [u8],
        ldc: usize,
        acc: &mut [i32],
        acc2: &mut [i32],
    ) {
        // SAFETY: forwarded from this function's contract (`acc` and `acc2` hold
        // MR * NR values, `hi` has the shape of `a`).
        unsafe {
            self.kernel(a, deltas, seg, b, acc);
            self.kernel(hi, deltas, seg, b, acc2);
        }
        for (x, y) in acc.iter_mut().zip(acc2.iter()).take(Self::MR * Self::NR) {
            *x = x.wrapping_add(y.wrapping_shl(7));
        }
        self.requant_panels(acc, ep, rows, cols, out, ldc);
    }
}

/// What a tile's requantization needs beside its accumulators.
pub(crate) struct Epilogue<'a> {
    /// The tile's activation row sums (at least its valid rows), or empty when every
    /// weight zero point is 0.
    pub(crate) rowsum: &'a [i32],
    /// Activation zero point.
    pub(crate) a_zp: i32,
    /// The packed weights (column offsets, zero points).
    pub(crate) w: &'a PackedWeights,
    /// Requantization parameters.
    pub(crate) rq: &'a RequantParams,
    /// The tile's first global column (a multiple of [`NR`]).
    pub(crate) j0: usize,
    /// Packed weights the driver reads next (a part of the next panels), which a kernel
    /// may prefetch into the L2 cache while it computes this tile: a layer whose weights
    /// exceed L2 (ResNet-18's `layer4` at batch 1: 2.4 MB) then streams them from L3
    /// during the row tiles instead of stalling on the first tile of each panel. Empty
    /// when there is nothing to prefetch; only a hint.
    pub(crate) prefetch: &'a [i8],
}

/// A source of activation rows for the GEMM driver: a plain matrix or a convolution's
/// input (im2col rows).
pub(crate) trait RowSource: Sync {
    /// Writes the first `k` bytes (the packed weights' `k`) of rows `r0..r0 + rows` at
    /// stride `kp` into `dst`; the driver zeroes the padding bytes `k..kp` itself.
    fn fill(&self, r0: usize, rows: usize, kp: usize, dst: &mut [u8]);

    /// The bytes rows are read from in place (see [`segments`](Self::segments)).
    fn bytes(&self) -> &[u8] {
        &[]
    }

    /// `Some((seg, real))` when every row of `kp` bytes is `deltas.len()` runs of `seg`
    /// bytes of [`bytes`](Self::bytes) (`seg % 4 == 0`, `deltas.len() * seg == kp`), run
    /// `s` at `deltas[s]` past the row's start given by
    /// [`row_offsets`](Self::row_offsets), of which the first `real` bytes are the row's
    /// (the rest meet zero weights and stay out of the row sums); `None` when rows must
    /// be packed through [`fill`](Self::fill). `deltas` arrives empty.
    fn segments(&self, _kp: usize, _deltas: &mut Vec<usize>) -> Option<(usize, usize)> {
        None
    }

    /// Where rows `r0..r0 + offs.len()` start in [`bytes`](Self::bytes). Only called
    /// when [`segments`](Self::segments) is `Some`.
    fn row_offsets(&self, _r0: usize, _offs: &mut [usize]) {}

    /// For a source read in place from bytes written per row block (a convolution's
    /// padded input: only the rows a block reads, into a buffer that stays in cache,
    /// instead of a padded copy of the whole input): writes into `buf` (any length on
    /// entry; exactly the window's on return) the bytes that rows `r0..r0 + rows` read,
    /// and returns where the window starts in the addresses
    /// [`row_offsets`](Self::row_offsets) gives. `None` (the default): rows are read from
    /// [`bytes`](Self::bytes).
    fn window(&self, _r0: usize, _rows: usize, _buf: &mut Vec<u8>) -> Option<usize> {
        None
    }

    /// An upper bound of every byte a row can hold (the split decision of kernels that
    /// saturate); called at most once per GEMM.
    fn max_byte(&self) -> u8 {
        255
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

    fn bytes(&self) -> &[u8] {
        self.data
    }

    fn segments(&self, kp: usize, deltas: &mut Vec<usize>) -> Option<(usize, usize)> {
        deltas.push(0);
        (kp == self.k && kp > 0).then_some((kp, kp))
    }

    fn row_offsets(&self, r0: usize, offs: &mut [usize]) {
        for (i, o) in offs.iter_mut().enumerate() {
            *o = (r0 + i) * self.k;
        }
    }

    fn max_byte(&self) -> u8 {
        self.data.iter().fold(0, |a, &v| a.max(v))
    }
}

/// Each thread's reusable buffers for packed activation blocks (no allocation or
/// zero-fill per call once they have grown).
#[derive(Default)]
struct Scratch {
    lo: Vec<u8>,
    hi: Vec<u8>,
    rowsum: Vec<i32>,
    offs: Vec<usize>,
    ptrs: Vec<*const u8>,
    hptrs: Vec<*const u8>,
    /// The block's window of bytes read in place ([`RowSource::window`]).
    win: Vec<u8>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    /// The calling thread's buffer for a GEMM's segment distances.
    static DELTAS: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
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
        // Twelve-row tiles where the products are deep enough for their fewer weight
        // loads to pay (ResNet-18's 3x3 convolutions); eight rows otherwise (a shallow
        // tile's time goes to requantization, and twelve rows' registers spill there).
        Some(s) if s.vnni() && w.kp >= DEEP_K => {
            let k = super::x86::Vnni12x32::new(s).expect("the set's token has AVX-512 VNNI");
            gemm_loop(k, src, m, a_zp, w, rq, out, ldc)
        }
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

/// One row block's activations, shared by the tiles of [`tiles`].
struct Block<'a> {
    /// Row starts for the block's rows padded to a multiple of [`MR`] (padding rows
    /// repeat the first row).
    a: &'a [*const u8],
    /// The same for `a >> 7` of every byte when the block is split (then `a` reads
    /// `a & 127`), else empty.
    hi: &'a [*const u8],
    /// Segment distances from a row's start.
    deltas: &'a [usize],
    seg: usize,
    /// Valid rows.
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
/// Rows are read in place where the source allows it ([`RowSource::segments`]), else
/// packed. Arguments are checked by the caller.
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
    if m == 0 || n == 0 {
        return kern.path(false);
    }
    let split_seen = AtomicBool::new(false);
    let panels = round_up(n.max(1), NR) / NR;
    let threads = rayon::current_num_threads().max(1);
    let macs = m.saturating_mul(n).saturating_mul(k.max(1));
    // Row blocks of at most 256 rows, whole tiles of the kernel.
    let mc_max = 256 / K::MR * K::MR;
    let mc = if threads == 1 || macs < PAR_MIN_MACS {
        round_up(m.max(1), MR).min(mc_max)
    } else {
        round_up(m.div_ceil(threads), MR).min(mc_max)
    };
    let needs_split = kern.needs_split(w);
    // Rows read in place unless a kernel that may saturate meets activations above 127
    // (splitting rewrites the bytes, so those blocks are packed).
    let mut deltas = DELTAS.with(|d| d.take());
    deltas.clear();
    let seg_in_place = src
        .segments(kp, &mut deltas)
        .filter(|&(seg, real)| {
            seg > 0 && seg.is_multiple_of(4) && real <= seg && deltas.len() * seg == kp
        })
        .filter(|_| !needs_split || src.max_byte() <= 127);
    if seg_in_place.is_none() {
        deltas.clear();
        deltas.push(0);
    }
    let deltas_ref = &deltas[..];
    let block = |bi: usize, out_blk: &mut [u8]| {
        let r0 = bi * mc;
        let rows_blk = mc.min(m - r0);
        let padded = round_up(rows_blk, MR);
        let mut scratch = SCRATCH.with(|b| b.take());
        let Scratch {
            lo,
            hi,
            rowsum,
            offs,
            ptrs,
            hptrs,
            win,
        } = &mut scratch;
        ptrs.clear();
        hptrs.clear();
        let (seg, split) = if let Some((seg, real)) = seg_in_place {
            grow(offs, rows_blk);
            let offs = &mut offs[..rows_blk];
            src.row_offsets(r0, offs);
            let base = match src.window(r0, rows_blk, win) {
                Some(start) => {
                    for o in offs.iter_mut() {
                        *o = o
                            .checked_sub(start)
                            .expect("a row starts before its window");
                    }
                    &win[..]
                }
                None => src.bytes(),
            };
            // Every row must have all its segments inside `base`: its start below
            // `base.len() - (max delta + seg)`, checked for the whole block at once; the
            // pointers are made only after.
            let span = deltas_ref.iter().max().map_or(0, |&d| d + seg);
            let end = (base.len() + 1).saturating_sub(span);
            assert!(
                offs.iter().fold(true, |ok, &o| ok & (o < end)),
                "a row lies outside its source"
            );
            let bp = base.as_ptr();
            ptrs.extend(offs.iter().map(|&o| bp.wrapping_add(o)));
            let first = ptrs[0];
            ptrs.resize(padded, first);
            if !w.zp_zero {
                grow(rowsum, padded);
                for (s, &o) in rowsum[..rows_blk].iter_mut().zip(offs.iter()) {
                    *s = deltas_ref.iter().fold(0i32, |acc, &d| {
                        acc.wrapping_add(row_sum(&base[o + d..o + d + real]))
                    });
                }
            }
            (seg, false)
        } else {
            grow(lo, padded * kp);
            src.fill(r0, rows_blk, kp, lo);
            if kp > k {
                for row in lo[..rows_blk * kp].chunks_exact_mut(kp) {
                    super::conv::fill_small(&mut row[k..], 0);
                }
            }
            lo[rows_blk * kp..padded * kp].fill(0);
            let lo = &mut lo[..padded * kp];
            // Row sums (of the unsplit bytes) only where a weight zero point needs them.
            if !w.zp_zero {
                grow(rowsum, padded);
                let sums = &mut rowsum[..padded];
                if kp == 0 {
                    sums.fill(0);
                } else {
                    for (s, row) in sums.iter_mut().zip(lo.chunks_exact(kp)) {
                        *s = row_sum(row);
                    }
                }
            }
            // Only a kernel that may saturate needs to know whether any activation
            // exceeds 127.
            let split = needs_split && lo.iter().fold(0u8, |a, &v| a | v) > 127;
            if split {
                split_seen.store(true, Ordering::Relaxed);
                grow(hi, padded * kp);
                for (h, v) in hi.iter_mut().zip(lo.iter_mut()) {
                    *h = *v >> 7;
                    *v &= 127;
                }
                hptrs.extend((0..padded).map(|i| hi[i * kp..].as_ptr()));
            }
            // With `kp == 0` every row is one empty segment (the kernels read nothing).
            ptrs.extend((0..padded).map(|i| lo[i * kp..].as_ptr()));
            (kp, split)
        };
        let b = Block {
            a: ptrs,
            hi: if split { hptrs } else { &[] },
            deltas: deltas_ref,
            seg,
            rows: rows_blk,
            n,
            rowsum: if w.zp_zero { &[] } else { &rowsum[..padded] },
            a_zp,
            w,
            rq,
            ldc,
        };
        tiles(kern, &b, out_blk, 0, padded, 0, panels);
        SCRATCH.with(|b| b.replace(scratch));
    };
    let blocks = m.div_ceil(mc);
    if blocks == 1 {
        block(0, out);
    } else {
        out.par_chunks_mut(mc * ldc)
            .take(blocks)
            .enumerate()
            .for_each(|(bi, o)| block(bi, o));
    }
    DELTAS.with(|d| d.replace(deltas));
    kern.path(split_seen.load(Ordering::Relaxed))
}

/// Rows `r0..r1` (packed rows, multiples of [`MR`]) times panels `p0..p1` of a block with
/// kernel `K`. Panels (groups of `K::NR / NR`) are the outer loop: each one's full row
/// tiles, then the rows left after them through the row edge kernel while the panel's
/// weights are still in cache; the panels left after the last full group go to the
/// column edge kernel. Each tile is handed a share of the next panels' weights to
/// prefetch ([`Epilogue::prefetch`]).
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
    let (deltas, seg) = (b.deltas, b.seg);
    assert!(seg.is_multiple_of(4) && b.a.len() >= r1);
    assert!(b.hi.is_empty() || b.hi.len() >= r1);
    let mut acc = [0i32; MAX_TILE];
    let mut acc2 = [0i32; MAX_TILE];
    let n_tiles = (r_full - r0) / K::MR;
    if n_tiles == 0 && r1 > r0 {
        // Fewer rows than one tile: the row edge kernel over all panels (with its
        // prefetches).
        assert!(
            K::RowEdge::MR < K::MR,
            "row edge kernel must have fewer rows"
        );
        tiles(kern.row_edge(), b, out, r0, r1, p0, p1);
        return;
    }
    for p in (p0..p_full).step_by(pn) {
        let panel = b.w.panels(p, pn);
        assert_eq!(panel.len(), K::NR * deltas.len() * seg);
        let j0 = p * NR;
        let cols = K::NR.min(b.n.saturating_sub(j0));
        if cols == 0 {
            continue;
        }
        // The next panels this loop reads, shared out over its row tiles in whole lines.
        let next = if p + pn < p1 {
            b.w.panels(p + pn, pn.min(p1 - p - pn))
        } else {
            &[]
        };
        let share = round_up(next.len().div_ceil(n_tiles.max(1)), 64);
        for (i, t) in (r0..r_full).step_by(K::MR).enumerate() {
            let rows = K::MR.min(b.rows.saturating_sub(t));
            if rows == 0 {
                continue;
            }
            let a = &b.a[t..t + K::MR];
            let rowsum = if b.rowsum.is_empty() {
                b.rowsum
            } else {
                &b.rowsum[t..t + rows]
            };
            let out_t = &mut out[t * b.ldc + j0..];
            let lo = (i * share).min(next.len());
            let ep = Epilogue {
                rowsum,
                a_zp: b.a_zp,
                w: b.w,
                rq: b.rq,
                j0,
                prefetch: &next[lo..(lo + share).min(next.len())],
            };
            if b.hi.is_empty() {
                // SAFETY: `kern` exists only once its CPU features were detected; `seg`
                // is a multiple of 4 (asserted); `a` holds MR row starts whose segments
                // (at `deltas`, `seg` bytes each) lie inside one buffer (checked by
                // `gemm_loop` before it made the pointers); `panel` holds the `pn` panels
                // (NR * kp bytes, asserted); rows <= MR and cols <= NR; `acc` holds
                // MAX_TILE >= MR * NR values.
                unsafe {
                    kern.kernel_requant(
                        a, deltas, seg, panel, &ep, rows, cols, out_t, b.ldc, &mut acc,
                    )
                };
            } else {
                let h = &b.hi[t..t + K::MR];
                // SAFETY: as above; `acc` and `acc2` hold MAX_TILE >= MR * NR values
                // (checked at compile time) and `h` has the shape of `a` (rows of the
                // same packed block, `a >> 7` where `a` holds `a & 127`).
                unsafe {
                    kern.kernel_split_requant(
                        a, h, deltas, seg, panel, &ep, rows, cols, out_t, b.ldc, &mut acc,
                        &mut acc2,
                    )
                };
            }
        }
        if r_full < r1 {
            assert!(
                K::RowEdge::MR < K::MR,
                "row edge kernel must have fewer rows"
            );
            tiles(kern.row_edge(), b, out, r_full, r1, p, p + pn);
        }
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
