//! The portable int8 GEMM micro-kernel: plain Rust over the same packed layouts as the
//! SIMD kernels, exact `i32` sums (wrapping), any CPU.

use super::gemm::GemmKernel;
use super::pack::{PackedWeights, NR};
use super::requant::{self, RequantParams};
use super::{KernelPath, MR};

/// The portable kernel: [`MR`] rows x one panel ([`NR`] columns).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Portable;

impl GemmKernel for Portable {
    const MR: usize = MR;
    const NR: usize = NR;
    type RowEdge = Self;
    type ColEdge = Self;

    fn row_edge(self) -> Self {
        self
    }

    fn col_edge(self) -> Self {
        self
    }

    fn path(self, _split: bool) -> KernelPath {
        KernelPath::Portable
    }

    /// # Safety
    /// As [`GemmKernel::kernel`]: every `a[r] + deltas[s]` readable for `seg` bytes (the
    /// rest is plain Rust; too-short slices panic).
    unsafe fn kernel(
        self,
        a: &[*const u8],
        deltas: &[usize],
        seg: usize,
        b: &[i8],
        acc: &mut [i32],
    ) {
        let acc = &mut acc[..MR * NR];
        acc.fill(0);
        let mut bq = b;
        for &d in deltas {
            let rows: [&[u8]; MR] = std::array::from_fn(|r| {
                // SAFETY: the caller guarantees that `a[r] + d` (r < MR) is readable for
                // `seg` bytes inside one allocation; nothing writes them during the call.
                unsafe { std::slice::from_raw_parts(a[r].add(d), seg) }
            });
            for q in (0..seg).step_by(4) {
                for (r, ar) in rows.iter().enumerate() {
                    let ar = &ar[q..q + 4];
                    for c in 0..NR {
                        let bc = &bq[4 * c..4 * c + 4];
                        let s: i32 = (0..4).map(|t| ar[t] as i32 * bc[t] as i32).sum();
                        acc[r * NR + c] = acc[r * NR + c].wrapping_add(s);
                    }
                }
                bq = &bq[4 * NR..];
            }
        }
    }

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
    ) {
        for r in 0..rows {
            for c in 0..cols {
                let j = j0 + c;
                let mut raw = acc[r * NR + c].wrapping_sub(a_zp.wrapping_mul(w.col_offsets[j]));
                if !rowsum.is_empty() {
                    raw = raw.wrapping_sub(w.w_zp[j].wrapping_mul(rowsum[r]));
                }
                out[r * ldc + c] = requant::requant_one(
                    raw,
                    rq.bias_b[j],
                    rq.bias_s[j],
                    rq.mult[j],
                    rq.out_zp,
                    rq.lo,
                );
            }
        }
    }
}
