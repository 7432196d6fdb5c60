//! One to four activation rows times the packed weights (a GEMV) with AVX-512 VNNI: the
//! int8 `Linear` at batch 1..=4. The GEMM's smallest tile has four rows, so a single row
//! pays for four there; here each 64-byte group of a panel (`NR` columns x 4 `k`) meets
//! one broadcast dword per row in one `vpdpbusd` each, with sixteen accumulators (one
//! row: eight panels and two `k` groups in flight; `R` rows: `16 / R` panels), which
//! leaves the weight stream from cache as the limit. Sums are exact (`i32`, wrapping like
//! the GEMM's); the requantization is the GEMM's (`Avx2::requant_tile`).

use std::arch::x86_64::*;

use crate::kernels::pack::{PackedWeights, NR};
use crate::kernels::requant::RequantParams;

/// `acc[(p * R + r) * NR + c] = sum_k a_r[k] * w[p * NR + c][k]` over `kp` (a multiple
/// of 4) for the `R` rows at `a` (row stride `kp`) and the `np` panels at `b` (each
/// `NR * kp` bytes, the `pack` layout). One row runs eight panels with two `k` groups in
/// flight, more rows `16 / R` panels (sixteen or twelve accumulators either way).
///
/// # Safety
/// AVX-512F/BW/VNNI must be available; `kp % 4 == 0`; `a` readable for `R * kp` bytes,
/// `b` for `np * NR * kp` bytes, `acc` writable for `np * R * NR` `i32`.
// (indexed loops over the accumulator registers read clearer than zipped iterators)
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn gemv_acc<const R: usize>(
    a: *const u8,
    kp: usize,
    b: *const i8,
    np: usize,
    acc: *mut i32,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract. Step (p, kg) reads
    // the dwords a[r * kp + 4kg..][..4] (4kg + 4 <= kp, r < R) and the 64 bytes of k group
    // kg of panels p..p + g (< np), and writes acc[((p..p + g) * R + r) * NR..][..NR].
    unsafe {
        let gp = if R == 1 { 8 } else { 16 / R };
        let groups = kp / 4;
        let panel = NR * kp;
        let mut p = 0;
        while p < np {
            let g = (np - p).min(gp);
            let base = b.add(p * panel);
            let mut c0 = [[_mm512_setzero_si512(); 8]; R];
            let mut c1 = [_mm512_setzero_si512(); 8];
            macro_rules! ld {
                ($h:expr, $kg:expr) => {
                    _mm512_loadu_si512(base.add($h * panel + $kg * 64) as *const __m512i)
                };
            }
            macro_rules! bc {
                ($r:expr, $kg:expr) => {
                    _mm512_set1_epi32((a.add($r * kp + 4 * $kg) as *const i32).read_unaligned())
                };
            }
            if R == 1 && g == 8 {
                let mut kg = 0;
                while kg + 2 <= groups {
                    let (a0, a1) = (bc!(0, kg), bc!(0, kg + 1));
                    for h in 0..8 {
                        c0[0][h] = _mm512_dpbusd_epi32(c0[0][h], a0, ld!(h, kg));
                        c1[h] = _mm512_dpbusd_epi32(c1[h], a1, ld!(h, kg + 1));
                    }
                    kg += 2;
                }
                if kg < groups {
                    let a0 = bc!(0, kg);
                    for h in 0..8 {
                        c0[0][h] = _mm512_dpbusd_epi32(c0[0][h], a0, ld!(h, kg));
                    }
                }
            } else if g == gp {
                for kg in 0..groups {
                    let av: [__m512i; R] = std::array::from_fn(|r| bc!(r, kg));
                    for h in 0..gp {
                        let wv = ld!(h, kg);
                        for r in 0..R {
                            c0[r][h] = _mm512_dpbusd_epi32(c0[r][h], av[r], wv);
                        }
                    }
                }
            } else {
                for kg in 0..groups {
                    for h in 0..g {
                        let wv = ld!(h, kg);
                        for r in 0..R {
                            c0[r][h] = _mm512_dpbusd_epi32(c0[r][h], bc!(r, kg), wv);
                        }
                    }
                }
            }
            for h in 0..g {
                for r in 0..R {
                    let s = if r == 0 {
                        _mm512_add_epi32(c0[0][h], c1[h])
                    } else {
                        c0[r][h]
                    };
                    _mm512_storeu_si512(acc.add(((p + h) * R + r) * NR) as *mut __m512i, s);
                }
            }
            p += g;
        }
    }
}

impl super::Avx2 {
    /// `out[i * ldc + j] = requant(sum_k (a[i][k] - a_zp) * (w[j][k] - w_zp[j]), j)` for the
    /// `m = a.len() / w.k` activation rows of `a` (`1..=4` rows of `w.k` bytes) into
    /// `out` (row stride `ldc >= w.n`), as `gemm` computes it; `false` (nothing written) unless the token
    /// enables AVX-512 VNNI and `m` is `1..=4`.
    pub(crate) fn gemv_rows(
        self,
        a: &[u8],
        a_zp: i32,
        w: &PackedWeights,
        rq: &RequantParams,
        out: &mut [u8],
        ldc: usize,
    ) -> bool {
        let (n, k, kp) = (w.n, w.k, w.kp);
        let m = a.len().checked_div(k).unwrap_or(0);
        if !self.vnni || k == 0 || !(1..=4).contains(&m) {
            return false;
        }
        assert!(a.len() == m * k && ldc >= n && out.len() >= (m - 1) * ldc + n);
        assert!(kp.is_multiple_of(4) && kp >= k);
        let np = n.div_ceil(NR);
        assert!(w.data.len() >= np * NR * kp);
        // The rows padded to `kp` (the weights there are zero).
        let mut rows = vec![0u8; m * kp];
        for (d, s) in rows.chunks_exact_mut(kp).zip(a.chunks_exact(k)) {
            d[..k].copy_from_slice(s);
        }
        let mut acc = vec![0i32; np * m * NR];
        let (ap, bp, cp) = (rows.as_ptr(), w.data.as_ptr(), acc.as_mut_ptr());
        // SAFETY: `vnni` is only set after detecting AVX-512F/BW/VNNI; `rows` holds `m`
        // rows of `kp` bytes (a multiple of 4, asserted), the packed data `np * NR * kp`
        // (asserted), `acc` `np * m * NR` values.
        unsafe {
            match m {
                1 => gemv_acc::<1>(ap, kp, bp, np, cp),
                2 => gemv_acc::<2>(ap, kp, bp, np, cp),
                3 => gemv_acc::<3>(ap, kp, bp, np, cp),
                _ => gemv_acc::<4>(ap, kp, bp, np, cp),
            }
        }
        let rowsum: Vec<i32> = if w.zp_zero {
            Vec::new()
        } else {
            a.chunks_exact(k).map(super::row_sum_u8).collect()
        };
        for p in 0..np {
            let j0 = p * NR;
            let cols = NR.min(n - j0);
            self.requant_tile(
                &acc[p * m * NR..(p + 1) * m * NR],
                m,
                cols,
                &rowsum,
                a_zp,
                w,
                rq,
                j0,
                &mut out[j0..],
                ldc,
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::{qgemm_on, Activations, Backend, OutputQuant, PackedWeights};
    use crate::kernels::{KernelSet, RequantParams};

    /// The GEMV (1..=4 rows) against the portable GEMM, bit for bit: column counts around
    /// the panels and the eight-panel steps, depths around the 4-byte groups (padding),
    /// symmetric and asymmetric per-channel weights (row sums), activation zero points at
    /// both ends, ReLU, a row stride wider than the output; five rows leave it to the GEMM.
    #[test]
    fn gemv_matches_the_portable_gemm() {
        let Some(s) = KernelSet::avx512_vnni().and_then(|ks| ks.simd) else {
            return;
        };
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for &(n, k) in &[
            (1usize, 1usize),
            (15, 3),
            (16, 4),
            (17, 5),
            (100, 64),
            (130, 67),
            (257, 130),
            (1024, 256),
        ] {
            for zp_kind in 0..2 {
                let w: Vec<i8> = (0..n * k).map(|_| next() as i8).collect();
                let zps: Vec<i32> = if zp_kind == 0 {
                    vec![0]
                } else {
                    (0..n).map(|_| (next() % 21) as i32 - 10).collect()
                };
                let packed = PackedWeights::new(&w, n, k, &zps).unwrap();
                let scales: Vec<f32> = (0..n).map(|j| 0.001 + j as f32 * 1e-5).collect();
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.37 - 20.0).collect();
                for (m, a_zp, relu, ldc) in [
                    (1usize, 0i32, false, n),
                    (1, 255, true, n + 3),
                    (2, 128, false, n),
                    (3, 17, true, n),
                    (4, 200, false, n + 16),
                    (5, 3, false, n),
                ] {
                    let rq = RequantParams::new(
                        n,
                        0.02,
                        &scales,
                        true,
                        Some(&bias),
                        OutputQuant {
                            scale: 0.3,
                            zero_point: 100,
                            relu,
                        },
                    )
                    .unwrap();
                    let a: Vec<u8> = (0..m * k).map(|_| next() as u8).collect();
                    let len = (m - 1) * ldc + n;
                    let run = |b: Backend| {
                        let mut out = vec![7u8; len];
                        let act = Activations {
                            data: &a,
                            rows: m,
                            zero_point: a_zp,
                        };
                        qgemm_on(b, act, &packed, &rq, &mut out, ldc).unwrap();
                        out
                    };
                    let want = run(Backend::Portable);
                    let what = format!("m {m} n {n} k {k} zp {zp_kind} ldc {ldc}");
                    assert_eq!(run(Backend::Avx512Vnni), want, "{what}");
                    let mut got = vec![7u8; len];
                    assert_eq!(s.gemv_rows(&a, a_zp, &packed, &rq, &mut got, ldc), m <= 4);
                    if m <= 4 {
                        assert_eq!(got, want, "{what} direct");
                    }
                }
            }
        }
    }
}
