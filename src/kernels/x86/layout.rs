//! The borders of an int8 model with the layout change folded in, one pass each: `f32`
//! NCHW -> `u8` NHWC quantization and `u8` NHWC -> `f32` NCHW dequantization.
//!
//! Both work on one image plane in blocks of 16 channels x 16 pixels transposed in
//! registers. Quantize: each channel row rounded into `i32` lanes, packed with saturation
//! (the clamp to `0..=255`) and transposed by `pshufb` and 32-bit unpacks (see
//! [`quantize_plane_nhwc_512`]); the rows a block reads are prefetched a few lines ahead
//! (the hardware prefetcher does not follow many interleaved streams). Dequantize: a
//! 16x16 byte transpose, then sixteen floats a channel row, channel blocks outermost so
//! the sixteen rows written advance in order. A channel count that is not a multiple of
//! 16 ends in a partial block (its missing rows are zeros, its loads and stores cut
//! short); three channels (an RGB image) are interleaved / de-interleaved by `pshufb`
//! instead; the pixels past the last multiple of 16 are left to the caller. The arithmetic
//! per element is `elementwise::quantize_u8`'s and `dequantize_u8`'s, bit for bit.

use std::arch::x86_64::*;

/// How many pixels ahead of a block its rows are prefetched.
const AHEAD: usize = 64;

/// Transposes sixteen rows of sixteen bytes held in registers.
#[inline(always)]
fn transpose16(mut a: [__m128i; 16]) -> [__m128i; 16] {
    // SAFETY: SSE2 is part of x86-64; these intrinsics only move register bytes.
    unsafe {
        for _ in 0..4 {
            let mut b = [_mm_setzero_si128(); 16];
            for i in 0..8 {
                b[2 * i] = _mm_unpacklo_epi8(a[i], a[i + 8]);
                b[2 * i + 1] = _mm_unpackhi_epi8(a[i], a[i + 8]);
            }
            a = b;
        }
    }
    a
}

/// Stores the first `n <= 16` bytes of `v` at `dst`.
///
/// # Safety
/// `dst` writable for `n` bytes.
#[inline(always)]
unsafe fn store_bytes(v: __m128i, dst: *mut u8, n: usize) {
    let mut tmp = [0u8; 16];
    // SAFETY: `tmp` holds 16 bytes; the caller guarantees `dst` is writable for `n <= 16`
    // bytes, which do not overlap the local `tmp`.
    unsafe {
        _mm_storeu_si128(tmp.as_mut_ptr() as *mut __m128i, v);
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, n);
    }
}

/// The quantization constants, broadcast to sixteen lanes.
struct Q512 {
    inv: __m512,
    zp: __m512,
    lim_lo: __m512,
    lim_hi: __m512,
    magic: __m512,
    hi: __m512,
    exp: __m512i,
}

/// Quantizes sixteen floats to sixteen bytes; sets bits of `bad` for non-finite lanes.
///
/// # Safety
/// AVX-512F/BW must be available; `src` readable for 16 `f32`.
#[inline(always)]
unsafe fn quantize16_512(src: *const f32, k: &Q512, bad: &mut __mmask16) -> __m128i {
    // SAFETY: the caller upholds the contract (features, 16 readable floats).
    unsafe {
        let x = _mm512_loadu_ps(src);
        let e = _mm512_and_si512(_mm512_castps_si512(x), k.exp);
        *bad |= _mm512_cmpeq_epi32_mask(e, k.exp);
        let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, k.inv), k.lim_lo), k.lim_hi);
        let v = _mm512_add_ps(_mm512_sub_ps(_mm512_add_ps(t, k.magic), k.magic), k.zp);
        let v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), k.hi);
        _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v))
    }
}

/// The 4x4 byte transpose inside each 32-bit-lane quad of a 128-bit lane: byte `4j + i`
/// takes byte `4i + j`.
const T4X4: [u8; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// Sixteen floats times `inv`, clamped to `[-2^22, 2^22]` and rounded half to even
/// (`cvtps2dq` in the default rounding mode) into `i32` lanes; the largest absolute-value
/// bit pattern seen is kept in `maxbits` (a lane is NaN or infinite iff its pattern is at
/// least `0x7f80_0000`).
///
/// # Safety
/// AVX-512F must be available; `src` readable for 16 `f32`.
#[inline(always)]
unsafe fn round16_512(src: *const f32, k: &Q512, maxbits: &mut __m512i) -> __m512i {
    // SAFETY: the caller upholds the contract (features, 16 readable floats).
    unsafe {
        let x = _mm512_loadu_ps(src);
        let abs = _mm512_andnot_si512(_mm512_set1_epi32(i32::MIN), _mm512_castps_si512(x));
        *maxbits = _mm512_max_epu32(*maxbits, abs);
        let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, k.inv), k.lim_lo), k.lim_hi);
        _mm512_cvtps_epi32(t)
    }
}

/// Quantizes pixels `0..hw / 16 * 16` of one `[c][hw]` `f32` plane into the `[hw][c]`
/// byte plane `dst`; returns whether those inputs were all finite.
///
/// A block of 16 channels x 16 pixels: each channel row is rounded into sixteen `i32`
/// lanes, then packed with saturation to `i16` (two rows a register), the zero point added
/// with saturation, and packed with saturation to `u8` (four rows a register): register
/// `g`'s 128-bit lane `L` then holds rows `4g..4g + 4` x pixels `4L..4L + 4`, a 4x4 byte
/// block that one `pshufb` transposes; a 4x4 transpose of 32-bit lanes across the four
/// registers leaves pixel `4L + j`'s sixteen channels in lane `L` of register `j`. The
/// saturations are the clamp to `0..=255` (the rounded value lies in `[-2^22, 2^22]`), so
/// every byte is `quantize_u8`'s. 24 shuffles a block where a byte transpose takes 64.
///
/// # Safety
/// AVX-512F/BW must be available; `src` readable for `c * hw` `f32`, `dst` writable for
/// `hw * c` bytes.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_plane_nhwc_512(
    src: *const f32,
    c: usize,
    hw: usize,
    inv: f32,
    zpf: f32,
    dst: *mut u8,
) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract. Block (p0, c0) reads
    // rows c0 + i < c at pixels p0..p0 + 16 <= hw and writes pixel rows p0 + j < hw at
    // channels c0..c0 + min(16, c - c0) <= c.
    unsafe {
        let k = Q512 {
            inv: _mm512_set1_ps(inv),
            zp: _mm512_set1_ps(zpf),
            lim_lo: _mm512_set1_ps(-4_194_304.0),
            lim_hi: _mm512_set1_ps(4_194_304.0),
            magic: _mm512_set1_ps(12_582_912.0),
            hi: _mm512_set1_ps(255.0),
            exp: _mm512_set1_epi32(0x7f80_0000),
        };
        let zp16 = _mm512_set1_epi16(zpf as i16);
        let t4 = _mm512_broadcast_i32x4(_mm_loadu_si128(T4X4.as_ptr() as *const __m128i));
        let mut maxbits = _mm512_setzero_si512();
        let hw16 = hw / 16 * 16;
        let mut p0 = 0;
        while p0 < hw16 {
            let mut c0 = 0;
            while c0 < c {
                let rows = (c - c0).min(16);
                let mut v = [_mm512_setzero_si512(); 16];
                for (i, r) in v.iter_mut().enumerate().take(rows) {
                    let row = src.add((c0 + i) * hw + p0);
                    // the rows are read side by side: the hardware prefetcher does not
                    // follow them, so fetch each a few lines ahead
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(AHEAD) as *const i8);
                    *r = round16_512(row, &k, &mut maxbits);
                }
                let pk: [__m512i; 8] = std::array::from_fn(|h| {
                    _mm512_adds_epi16(_mm512_packs_epi32(v[2 * h], v[2 * h + 1]), zp16)
                });
                let t: [__m512i; 4] = std::array::from_fn(|g| {
                    _mm512_shuffle_epi8(_mm512_packus_epi16(pk[2 * g], pk[2 * g + 1]), t4)
                });
                let u0 = _mm512_unpacklo_epi32(t[0], t[1]);
                let u1 = _mm512_unpackhi_epi32(t[0], t[1]);
                let u2 = _mm512_unpacklo_epi32(t[2], t[3]);
                let u3 = _mm512_unpackhi_epi32(t[2], t[3]);
                let r = [
                    _mm512_unpacklo_epi64(u0, u2),
                    _mm512_unpackhi_epi64(u0, u2),
                    _mm512_unpacklo_epi64(u1, u3),
                    _mm512_unpackhi_epi64(u1, u3),
                ];
                for (j, rj) in r.iter().enumerate() {
                    let lanes = [
                        _mm512_castsi512_si128(*rj),
                        _mm512_extracti32x4_epi32::<1>(*rj),
                        _mm512_extracti32x4_epi32::<2>(*rj),
                        _mm512_extracti32x4_epi32::<3>(*rj),
                    ];
                    for (l, x) in lanes.iter().enumerate() {
                        let at = dst.add((p0 + 4 * l + j) * c + c0);
                        if rows == 16 {
                            _mm_storeu_si128(at as *mut __m128i, *x);
                        } else {
                            store_bytes(*x, at, rows);
                        }
                    }
                }
                c0 += 16;
            }
            p0 += 16;
        }
        _mm512_cmpge_epu32_mask(maxbits, k.exp) == 0
    }
}

/// The quantization constants, broadcast to eight lanes.
struct Q256 {
    inv: __m256,
    zp: __m256,
    lim_lo: __m256,
    lim_hi: __m256,
    magic: __m256,
    hi: __m256,
    exp: __m256i,
}

/// Quantizes eight floats to eight `i32` in `0..=255`; ors the non-finite lanes into `bad`.
///
/// # Safety
/// AVX2 must be available; `src` readable for 8 `f32`.
#[inline(always)]
unsafe fn quantize8_256(src: *const f32, k: &Q256, bad: &mut __m256i) -> __m256i {
    // SAFETY: the caller upholds the contract (features, 8 readable floats).
    unsafe {
        let x = _mm256_loadu_ps(src);
        let e = _mm256_and_si256(_mm256_castps_si256(x), k.exp);
        *bad = _mm256_or_si256(*bad, _mm256_cmpeq_epi32(e, k.exp));
        let t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, k.inv), k.lim_lo), k.lim_hi);
        let v = _mm256_add_ps(_mm256_sub_ps(_mm256_add_ps(t, k.magic), k.magic), k.zp);
        let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), k.hi);
        _mm256_cvttps_epi32(v)
    }
}

/// [`round16_512`] on eight floats with AVX2.
///
/// # Safety
/// AVX2 must be available; `src` readable for 8 `f32`.
#[inline(always)]
unsafe fn round8_256(src: *const f32, k: &Q256, maxbits: &mut __m256i) -> __m256i {
    // SAFETY: the caller upholds the contract (features, 8 readable floats).
    unsafe {
        let x = _mm256_loadu_ps(src);
        let abs = _mm256_andnot_si256(_mm256_set1_epi32(i32::MIN), _mm256_castps_si256(x));
        *maxbits = _mm256_max_epu32(*maxbits, abs);
        let t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x, k.inv), k.lim_lo), k.lim_hi);
        _mm256_cvtps_epi32(t)
    }
}

/// [`quantize_plane_nhwc_512`] with AVX2: the same saturating packs and shuffles on the
/// two eight-pixel halves of a block.
///
/// # Safety
/// AVX2 must be available; `src` readable for `c * hw` `f32`, `dst` writable for `hw * c`
/// bytes.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_plane_nhwc_256(
    src: *const f32,
    c: usize,
    hw: usize,
    inv: f32,
    zpf: f32,
    dst: *mut u8,
) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract; the ranges are those
    // of `quantize_plane_nhwc_512`.
    unsafe {
        let k = Q256 {
            inv: _mm256_set1_ps(inv),
            zp: _mm256_set1_ps(zpf),
            lim_lo: _mm256_set1_ps(-4_194_304.0),
            lim_hi: _mm256_set1_ps(4_194_304.0),
            magic: _mm256_set1_ps(12_582_912.0),
            hi: _mm256_set1_ps(255.0),
            exp: _mm256_set1_epi32(0x7f80_0000),
        };
        let zp16 = _mm256_set1_epi16(zpf as i16);
        let t4 = _mm256_broadcastsi128_si256(_mm_loadu_si128(T4X4.as_ptr() as *const __m128i));
        let mut maxbits = _mm256_setzero_si256();
        let hw16 = hw / 16 * 16;
        let mut p0 = 0;
        while p0 < hw16 {
            let mut c0 = 0;
            while c0 < c {
                let rows = (c - c0).min(16);
                for half in 0..2 {
                    let ph = p0 + 8 * half;
                    let mut v = [_mm256_setzero_si256(); 16];
                    for (i, r) in v.iter_mut().enumerate().take(rows) {
                        let row = src.add((c0 + i) * hw + ph);
                        if half == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(AHEAD) as *const i8);
                        }
                        *r = round8_256(row, &k, &mut maxbits);
                    }
                    let pk: [__m256i; 8] = std::array::from_fn(|h| {
                        _mm256_adds_epi16(_mm256_packs_epi32(v[2 * h], v[2 * h + 1]), zp16)
                    });
                    let t: [__m256i; 4] = std::array::from_fn(|g| {
                        _mm256_shuffle_epi8(_mm256_packus_epi16(pk[2 * g], pk[2 * g + 1]), t4)
                    });
                    let u0 = _mm256_unpacklo_epi32(t[0], t[1]);
                    let u1 = _mm256_unpackhi_epi32(t[0], t[1]);
                    let u2 = _mm256_unpacklo_epi32(t[2], t[3]);
                    let u3 = _mm256_unpackhi_epi32(t[2], t[3]);
                    let r = [
                        _mm256_unpacklo_epi64(u0, u2),
                        _mm256_unpackhi_epi64(u0, u2),
                        _mm256_unpacklo_epi64(u1, u3),
                        _mm256_unpackhi_epi64(u1, u3),
                    ];
                    for (j, rj) in r.iter().enumerate() {
                        let lanes = [
                            _mm256_castsi256_si128(*rj),
                            _mm256_extracti128_si256::<1>(*rj),
                        ];
                        for (l, x) in lanes.iter().enumerate() {
                            let at = dst.add((ph + 4 * l + j) * c + c0);
                            if rows == 16 {
                                _mm_storeu_si128(at as *mut __m128i, *x);
                            } else {
                                store_bytes(*x, at, rows);
                            }
                        }
                    }
                }
                c0 += 16;
            }
            p0 += 16;
        }
        let over = _mm256_cmpeq_epi32(_mm256_max_epu32(maxbits, k.exp), maxbits);
        _mm256_testz_si256(over, over) == 1
    }
}

/// Loads the first `n <= 16` bytes at `src` into the low lanes of a register (the rest
/// zero).
///
/// # Safety
/// `src` readable for `n` bytes.
#[inline(always)]
unsafe fn load_bytes(src: *const u8, n: usize) -> __m128i {
    let mut tmp = [0u8; 16];
    // SAFETY: the caller guarantees `src` is readable for `n <= 16` bytes; `tmp` holds 16.
    unsafe {
        std::ptr::copy_nonoverlapping(src, tmp.as_mut_ptr(), n);
        _mm_loadu_si128(tmp.as_ptr() as *const __m128i)
    }
}

/// The `pshufb` masks that interleave three registers of sixteen bytes (`r`, `g`, `b`:
/// pixels 0..16 of three channels) into 48 bytes of pixel triples: `MASK3[o][ch]` moves
/// channel `ch`'s bytes into output register `o` (byte `k` of the 48 is pixel `k / 3`,
/// channel `k % 3`; `0x80` writes zero).
const MASK3: [[[u8; 16]; 3]; 3] = {
    let mut m = [[[0x80u8; 16]; 3]; 3];
    let mut k = 0;
    while k < 48 {
        m[k / 16][k % 3][k % 16] = (k / 3) as u8;
        k += 1;
    }
    m
};

/// The inverse of [`MASK3`]: `UNMASK3[ch][o]` picks channel `ch`'s bytes out of input
/// register `o` of 48 interleaved bytes into their pixel lanes.
const UNMASK3: [[[u8; 16]; 3]; 3] = {
    let mut m = [[[0x80u8; 16]; 3]; 3];
    let mut k = 0;
    while k < 48 {
        m[k % 3][k / 16][k / 3] = (k % 16) as u8;
        k += 1;
    }
    m
};

/// Interleaves three channel registers of sixteen pixels into three registers of pixel
/// triples (see [`MASK3`]).
///
/// # Safety
/// SSSE3 must be available.
#[inline(always)]
unsafe fn interleave3(ch: [__m128i; 3]) -> [__m128i; 3] {
    // SAFETY: the caller guarantees SSSE3 (`pshufb`); the masks are 16 bytes each.
    unsafe {
        std::array::from_fn(|o| {
            let m = |c: usize| _mm_loadu_si128(MASK3[o][c].as_ptr() as *const __m128i);
            _mm_or_si128(
                _mm_or_si128(_mm_shuffle_epi8(ch[0], m(0)), _mm_shuffle_epi8(ch[1], m(1))),
                _mm_shuffle_epi8(ch[2], m(2)),
            )
        })
    }
}

/// The inverse of [`interleave3`].
///
/// # Safety
/// SSSE3 must be available.
#[inline(always)]
unsafe fn deinterleave3(px: [__m128i; 3]) -> [__m128i; 3] {
    // SAFETY: as in `interleave3`.
    unsafe {
        std::array::from_fn(|c| {
            let m = |o: usize| _mm_loadu_si128(UNMASK3[c][o].as_ptr() as *const __m128i);
            _mm_or_si128(
                _mm_or_si128(_mm_shuffle_epi8(px[0], m(0)), _mm_shuffle_epi8(px[1], m(1))),
                _mm_shuffle_epi8(px[2], m(2)),
            )
        })
    }
}

/// Quantizes pixels `0..hw / 16 * 16` of one three-channel `[3][hw]` `f32` plane (an RGB
/// image) into the `[hw][3]` byte plane `dst`: sixteen pixels of each channel into a
/// register, interleaved by `pshufb`. Returns whether those inputs were all finite.
///
/// # Safety
/// AVX-512F/BW must be available; `src` readable for `3 * hw` `f32`, `dst` writable for
/// `3 * hw` bytes.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_plane_c3_512(
    src: *const f32,
    hw: usize,
    inv: f32,
    zpf: f32,
    dst: *mut u8,
) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract; step p0 reads
    // pixels p0..p0 + 16 <= hw of the three channel rows and writes bytes
    // 3 * p0..3 * (p0 + 16) <= 3 * hw.
    unsafe {
        let k = Q512 {
            inv: _mm512_set1_ps(inv),
            zp: _mm512_set1_ps(zpf),
            lim_lo: _mm512_set1_ps(-4_194_304.0),
            lim_hi: _mm512_set1_ps(4_194_304.0),
            magic: _mm512_set1_ps(12_582_912.0),
            hi: _mm512_set1_ps(255.0),
            exp: _mm512_set1_epi32(0x7f80_0000),
        };
        let mut bad: __mmask16 = 0;
        let mut p0 = 0;
        while p0 + 16 <= hw {
            let ch: [__m128i; 3] =
                std::array::from_fn(|c| quantize16_512(src.add(c * hw + p0), &k, &mut bad));
            for (o, v) in interleave3(ch).iter().enumerate() {
                _mm_storeu_si128(dst.add(3 * p0 + 16 * o) as *mut __m128i, *v);
            }
            p0 += 16;
        }
        bad == 0
    }
}

/// Quantizes sixteen floats to sixteen bytes with AVX2 (two registers of eight lanes).
///
/// # Safety
/// AVX2 must be available; `src` readable for 16 `f32`.
#[inline(always)]
unsafe fn quantize16_256(src: *const f32, k: &Q256, bad: &mut __m256i) -> __m128i {
    // SAFETY: the caller upholds the contract (features, 16 readable floats).
    unsafe {
        let r0 = quantize8_256(src, k, bad);
        let r1 = quantize8_256(src.add(8), k, bad);
        let w0 = _mm_packs_epi32(
            _mm256_castsi256_si128(r0),
            _mm256_extracti128_si256::<1>(r0),
        );
        let w1 = _mm_packs_epi32(
            _mm256_castsi256_si128(r1),
            _mm256_extracti128_si256::<1>(r1),
        );
        _mm_packus_epi16(w0, w1)
    }
}

/// [`quantize_plane_c3_512`] with AVX2.
///
/// # Safety
/// AVX2 must be available; `src` readable for `3 * hw` `f32`, `dst` writable for
/// `3 * hw` bytes.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_plane_c3_256(
    src: *const f32,
    hw: usize,
    inv: f32,
    zpf: f32,
    dst: *mut u8,
) -> bool {
    // SAFETY: as in `quantize_plane_c3_512`.
    unsafe {
        let k = Q256 {
            inv: _mm256_set1_ps(inv),
            zp: _mm256_set1_ps(zpf),
            lim_lo: _mm256_set1_ps(-4_194_304.0),
            lim_hi: _mm256_set1_ps(4_194_304.0),
            magic: _mm256_set1_ps(12_582_912.0),
            hi: _mm256_set1_ps(255.0),
            exp: _mm256_set1_epi32(0x7f80_0000),
        };
        let mut bad = _mm256_setzero_si256();
        let mut p0 = 0;
        while p0 + 16 <= hw {
            let ch: [__m128i; 3] =
                std::array::from_fn(|c| quantize16_256(src.add(c * hw + p0), &k, &mut bad));
            for (o, v) in interleave3(ch).iter().enumerate() {
                _mm_storeu_si128(dst.add(3 * p0 + 16 * o) as *mut __m128i, *v);
            }
            p0 += 16;
        }
        _mm256_testz_si256(bad, bad) == 1
    }
}

/// Dequantizes sixteen bytes to sixteen floats (AVX-512): `(q - zp) as f32 * scale`.
///
/// # Safety
/// AVX-512F must be available.
#[inline(always)]
unsafe fn dequant16_512(v: __m128i, zp: __m512i, scale: __m512) -> __m512 {
    // SAFETY: the caller guarantees AVX-512F; register operations only.
    unsafe {
        let i = _mm512_sub_epi32(_mm512_cvtepu8_epi32(v), zp);
        _mm512_mul_ps(_mm512_cvtepi32_ps(i), scale)
    }
}

/// Dequantizes eight bytes (the low half of `v`) to eight floats (AVX2).
///
/// # Safety
/// AVX2 must be available.
#[inline(always)]
unsafe fn dequant8_256(v: __m128i, zp: __m256i, scale: __m256) -> __m256 {
    // SAFETY: the caller guarantees AVX2; register operations only.
    unsafe {
        let i = _mm256_sub_epi32(_mm256_cvtepu8_epi32(v), zp);
        _mm256_mul_ps(_mm256_cvtepi32_ps(i), scale)
    }
}

/// Dequantizes sixteen bytes into `d[0..16]` (AVX2).
///
/// # Safety
/// AVX2 must be available; `d` writable for 16 `f32`.
#[inline(always)]
unsafe fn dequant16_256(d: *mut f32, v: __m128i, zp: __m256i, scale: __m256) {
    // SAFETY: the caller upholds the contract (features, 16 writable floats).
    unsafe {
        _mm256_storeu_ps(d, dequant8_256(v, zp, scale));
        _mm256_storeu_ps(d.add(8), dequant8_256(_mm_srli_si128::<8>(v), zp, scale));
    }
}

/// Dequantizes pixels `0..hw / 16 * 16` of one `[hw][c]` byte plane into the `[c][hw]`
/// `f32` plane `dst`: blocks of 16 pixels x 16 channels transposed in registers, channel
/// blocks outermost so that the sixteen rows written advance in order (a partial last
/// channel block reads and writes only its rows). Three channels (an RGB output) are
/// de-interleaved by `pshufb` instead.
///
/// # Safety
/// AVX-512F/BW must be available; `src` readable for `hw * c` bytes, `dst` writable for
/// `c * hw` `f32`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn dequantize_plane_nchw_512(
    src: *const u8,
    c: usize,
    hw: usize,
    scale: f32,
    zp: u8,
    dst: *mut f32,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract. Block (c0, p0)
    // reads pixel rows p0 + j < hw at channels c0..c0 + rows <= c and writes channel rows
    // c0 + i < c at pixels p0..p0 + 16 <= hw.
    unsafe {
        let s = _mm512_set1_ps(scale);
        let z = _mm512_set1_epi32(zp as i32);
        let hw16 = hw / 16 * 16;
        if c == 3 {
            let mut p0 = 0;
            while p0 < hw16 {
                let px: [__m128i; 3] = std::array::from_fn(|o| {
                    _mm_loadu_si128(src.add(3 * p0 + 16 * o) as *const __m128i)
                });
                for (ch, v) in deinterleave3(px).iter().enumerate() {
                    _mm512_storeu_ps(dst.add(ch * hw + p0), dequant16_512(*v, z, s));
                }
                p0 += 16;
            }
            return;
        }
        let mut c0 = 0;
        while c0 < c {
            let rows = (c - c0).min(16);
            let mut p0 = 0;
            while p0 < hw16 {
                let mut a = [_mm_setzero_si128(); 16];
                for (j, v) in a.iter_mut().enumerate() {
                    let at = src.add((p0 + j) * c + c0);
                    *v = if rows == 16 {
                        _mm_loadu_si128(at as *const __m128i)
                    } else {
                        load_bytes(at, rows)
                    };
                }
                let t = transpose16(a);
                for (i, v) in t.iter().enumerate().take(rows) {
                    _mm512_storeu_ps(dst.add((c0 + i) * hw + p0), dequant16_512(*v, z, s));
                }
                p0 += 16;
            }
            c0 += 16;
        }
    }
}

/// [`dequantize_plane_nchw_512`] with AVX2.
///
/// # Safety
/// AVX2 must be available; `src` readable for `hw * c` bytes, `dst` writable for
/// `c * hw` `f32`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dequantize_plane_nchw_256(
    src: *const u8,
    c: usize,
    hw: usize,
    scale: f32,
    zp: u8,
    dst: *mut f32,
) {
    // SAFETY: as in `dequantize_plane_nchw_512`.
    unsafe {
        let s = _mm256_set1_ps(scale);
        let z = _mm256_set1_epi32(zp as i32);
        let hw16 = hw / 16 * 16;
        if c == 3 {
            let mut p0 = 0;
            while p0 < hw16 {
                let px: [__m128i; 3] = std::array::from_fn(|o| {
                    _mm_loadu_si128(src.add(3 * p0 + 16 * o) as *const __m128i)
                });
                for (ch, v) in deinterleave3(px).iter().enumerate() {
                    dequant16_256(dst.add(ch * hw + p0), *v, z, s);
                }
                p0 += 16;
            }
            return;
        }
        let mut c0 = 0;
        while c0 < c {
            let rows = (c - c0).min(16);
            let mut p0 = 0;
            while p0 < hw16 {
                let mut a = [_mm_setzero_si128(); 16];
                for (j, v) in a.iter_mut().enumerate() {
                    let at = src.add((p0 + j) * c + c0);
                    *v = if rows == 16 {
                        _mm_loadu_si128(at as *const __m128i)
                    } else {
                        load_bytes(at, rows)
                    };
                }
                let t = transpose16(a);
                for (i, v) in t.iter().enumerate().take(rows) {
                    dequant16_256(dst.add((c0 + i) * hw + p0), *v, z, s);
                }
                p0 += 16;
            }
            c0 += 16;
        }
    }
}

use std::mem::MaybeUninit;

use crate::kernels::elementwise::for_planes;

/// A vector of `n` values every one of which `fill` writes (`fill` returns its flag).
///
/// # Safety
/// `fill` must initialize every element of the slice it is given.
unsafe fn filled_vec<T>(
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>]) -> bool,
) -> (Vec<T>, bool) {
    let mut v: Vec<T> = Vec::with_capacity(n);
    let ok = fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller guarantees `fill` initialized all `n <= capacity` elements.
    unsafe { v.set_len(n) };
    (v, ok)
}

impl super::Avx2 {
    /// Quantizes one `[c][hw]` `f32` plane into the `[hw][c]` byte plane `dst` (every
    /// byte written); returns whether the inputs were all finite.
    fn quantize_plane_nhwc(
        self,
        src: &[f32],
        c: usize,
        hw: usize,
        inv: f32,
        zpf: f32,
        dst: &mut [MaybeUninit<u8>],
    ) -> bool {
        assert!(src.len() == c * hw && dst.len() == c * hw);
        let d = dst.as_mut_ptr() as *mut u8;
        let mut finite = if c == 3 {
            if self.vnni {
                // SAFETY: `vnni` is only set after detecting AVX-512F/BW; `src` holds
                // `3 * hw` floats and `dst` `3 * hw` bytes (asserted).
                unsafe { quantize_plane_c3_512(src.as_ptr(), hw, inv, zpf, d) }
            } else {
                // SAFETY: the token proves AVX2 (and so SSSE3); sizes as above.
                unsafe { quantize_plane_c3_256(src.as_ptr(), hw, inv, zpf, d) }
            }
        } else if self.vnni {
            // SAFETY: `vnni` is only set after detecting AVX-512F/BW; `src` holds `c * hw`
            // floats and `dst` `hw * c` bytes (asserted).
            unsafe { quantize_plane_nhwc_512(src.as_ptr(), c, hw, inv, zpf, d) }
        } else {
            // SAFETY: the token proves AVX2 + FMA; `src` holds `c * hw` floats and `dst`
            // `hw * c` bytes (asserted).
            unsafe { quantize_plane_nhwc_256(src.as_ptr(), c, hw, inv, zpf, d) }
        };
        for p in hw / 16 * 16..hw {
            for ch in 0..c {
                let x = src[ch * hw + p];
                finite &= x.is_finite();
                let q = crate::qparams::quantize_val_8bit(x, inv, zpf, 0.0, 255.0) as u8;
                dst[p * c + ch].write(q);
            }
        }
        finite
    }

    /// Dequantizes one `[hw][c]` byte plane into the `[c][hw]` `f32` plane `dst` (every
    /// value written).
    fn dequantize_plane_nchw(
        self,
        src: &[u8],
        c: usize,
        hw: usize,
        scale: f32,
        zp: u8,
        dst: &mut [MaybeUninit<f32>],
    ) -> bool {
        assert!(src.len() == c * hw && dst.len() == c * hw);
        let d = dst.as_mut_ptr() as *mut f32;
        if self.vnni {
            // SAFETY: `vnni` is only set after detecting AVX-512F/BW; `src` holds `hw * c`
            // bytes and `dst` `c * hw` floats (asserted).
            unsafe { dequantize_plane_nchw_512(src.as_ptr(), c, hw, scale, zp, d) }
        } else {
            // SAFETY: the token proves AVX2 + FMA; sizes as above.
            unsafe { dequantize_plane_nchw_256(src.as_ptr(), c, hw, scale, zp, d) }
        }
        let z = zp as i32;
        for p in hw / 16 * 16..hw {
            for ch in 0..c {
                dst[ch * hw + p].write((src[p * c + ch] as i32 - z) as f32 * scale);
            }
        }
        true
    }

    /// `elementwise::dequantize_nhwc_to_nchw` into `dst`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dequantize_nhwc_to_nchw(
        self,
        src: &[u8],
        b: usize,
        c: usize,
        hw: usize,
        scale: f32,
        zp: u8,
        dst: &mut [f32],
    ) {
        assert!(src.len() == b * c * hw && dst.len() == src.len());
        // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and only initialized values
        // are written through the view.
        let d = unsafe { &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>]) };
        for_planes(src, d, c * hw, 0, |s, d, _| {
            self.dequantize_plane_nchw(s, c, hw, scale, zp, d)
        });
    }

    /// `elementwise::dequantize_nhwc_to_nchw` into a new vector (not zero-filled first).
    pub(crate) fn dequantize_nhwc_to_nchw_vec(
        self,
        src: &[u8],
        b: usize,
        c: usize,
        hw: usize,
        scale: f32,
        zp: u8,
    ) -> Vec<f32> {
        let n = b * c * hw;
        assert_eq!(src.len(), n);
        // SAFETY: `for_planes` hands every plane of the `n` values to
        // `dequantize_plane_nchw`, which writes all of its values.
        let (v, _) = unsafe {
            filled_vec(n, |d| {
                for_planes(src, d, c * hw, 0, |s, d, _| {
                    self.dequantize_plane_nchw(s, c, hw, scale, zp, d)
                })
            })
        };
        v
    }

    /// `elementwise::quantize_nchw_to_nhwc` into `dst`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn quantize_nchw_to_nhwc(
        self,
        src: &[f32],
        b: usize,
        c: usize,
        hw: usize,
        inv: f32,
        zpf: f32,
        dst: &mut [u8],
    ) -> bool {
        assert!(src.len() == b * c * hw && dst.len() == src.len());
        // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and only initialized bytes
        // are written through the view.
        let d = unsafe { &mut *(dst as *mut [u8] as *mut [MaybeUninit<u8>]) };
        for_planes(src, d, c * hw, 0, |s, d, _| {
            self.quantize_plane_nhwc(s, c, hw, inv, zpf, d)
        })
    }

    /// `elementwise::quantize_nchw_to_nhwc` into a new vector (not zero-filled first);
    /// `None` when an input is not finite.
    pub(crate) fn quantize_nchw_to_nhwc_vec(
        self,
        src: &[f32],
        b: usize,
        c: usize,
        hw: usize,
        inv: f32,
        zpf: f32,
    ) -> Option<Vec<u8>> {
        let n = b * c * hw;
        assert_eq!(src.len(), n);
        // SAFETY: `for_planes` hands every plane of the `n` values to
        // `quantize_plane_nhwc`, which writes all of its bytes.
        let (v, ok) = unsafe {
            filled_vec(n, |d| {
                for_planes(src, d, c * hw, 0, |s, d, _| {
                    self.quantize_plane_nhwc(s, c, hw, inv, zpf, d)
                })
            })
        };
        ok.then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::KernelSet;

    /// The AVX-512 body runs here whenever the CPU has AVX-512F/BW, even without the
    /// VNNI that the kernel sets require to select them (so they are tested on such
    /// machines too), against the portable set; the AVX2 bodies likewise.
    #[test]
    fn plane_bodies_match_the_portable_set() {
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        for &(c, hw) in &[
            (1usize, 16usize),
            (3, 48),
            (16, 16),
            (17, 35),
            (40, 64),
            (128, 784),
        ] {
            let n = c * hw;
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 2003) as f32 * 0.37 - 350.0)
                .collect();
            let (scale, zp) = (0.7f32, 77u8);
            let mut want_q = vec![0u8; n];
            let p = KernelSet::portable();
            assert!(crate::kernels::elementwise::quantize_nchw_to_nhwc(
                p,
                &x,
                1,
                c,
                hw,
                scale,
                zp,
                &mut want_q
            ));
            let hw16 = hw / 16 * 16;
            let (inv, zpf) = (1.0 / scale, zp as f32);
            let mut bodies: Vec<(&str, bool)> = vec![("avx2", avx2)];
            bodies.push(("avx512", avx512));
            for (name, ok) in bodies {
                if !ok {
                    continue;
                }
                let mut got = vec![0u8; n];
                // SAFETY: the features were detected; the buffers hold `c * hw` values.
                let finite = unsafe {
                    if name == "avx512" {
                        quantize_plane_nhwc_512(x.as_ptr(), c, hw, inv, zpf, got.as_mut_ptr())
                    } else {
                        quantize_plane_nhwc_256(x.as_ptr(), c, hw, inv, zpf, got.as_mut_ptr())
                    }
                };
                assert!(finite);
                for p in 0..hw16 {
                    for ch in 0..c {
                        assert_eq!(got[p * c + ch], want_q[p * c + ch], "{name} {c}x{hw}");
                    }
                }
                let mut bad = x.clone();
                bad[(c - 1) * hw + hw16 - 1] = f32::NAN;
                // SAFETY: as above.
                let finite = unsafe {
                    if name == "avx512" {
                        quantize_plane_nhwc_512(bad.as_ptr(), c, hw, inv, zpf, got.as_mut_ptr())
                    } else {
                        quantize_plane_nhwc_256(bad.as_ptr(), c, hw, inv, zpf, got.as_mut_ptr())
                    }
                };
                assert!(!finite, "{name} {c}x{hw}");
            }
        }
    }

    /// The dequantize bodies (16-channel blocks, partial blocks, the RGB `pshufb` path)
    /// and the RGB quantize bodies, called directly so that the AVX-512 ones run on any
    /// CPU with AVX-512F/BW, against the index formula and the 8-bit formulas.
    #[test]
    fn dequantize_and_rgb_bodies_match_the_definition() {
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        for &(c, hw) in &[
            (1usize, 16usize),
            (3, 16),
            (3, 47),
            (3, 784),
            (15, 32),
            (16, 16),
            (17, 35),
            (40, 64),
            (128, 784),
        ] {
            let n = c * hw;
            let hw16 = hw / 16 * 16;
            let q: Vec<u8> = (0..n).map(|i| (i * 7919 % 256) as u8).collect();
            let (scale, zp) = (0.0371f32, 131u8);
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 2003) as f32 * 0.0137 - 13.5)
                .collect();
            let inv = 1.0f32 / scale;
            for (name, ok) in [("avx2", avx2), ("avx512", avx512)] {
                if !ok {
                    continue;
                }
                let mut got = vec![f32::NAN; n];
                // SAFETY: the features were detected; the buffers hold `c * hw` values.
                unsafe {
                    if name == "avx512" {
                        dequantize_plane_nchw_512(q.as_ptr(), c, hw, scale, zp, got.as_mut_ptr())
                    } else {
                        dequantize_plane_nchw_256(q.as_ptr(), c, hw, scale, zp, got.as_mut_ptr())
                    }
                }
                for ch in 0..c {
                    for p in 0..hw16 {
                        let want = (q[p * c + ch] as i32 - zp as i32) as f32 * scale;
                        let g = got[ch * hw + p];
                        assert_eq!(g.to_bits(), want.to_bits(), "{name} {c}x{hw} {ch} {p}");
                    }
                }
                if c != 3 {
                    continue;
                }
                let mut got = vec![0u8; n];
                // SAFETY: as above.
                let finite = unsafe {
                    if name == "avx512" {
                        quantize_plane_c3_512(x.as_ptr(), hw, inv, zp as f32, got.as_mut_ptr())
                    } else {
                        quantize_plane_c3_256(x.as_ptr(), hw, inv, zp as f32, got.as_mut_ptr())
                    }
                };
                assert!(finite);
                for ch in 0..3 {
                    for p in 0..hw16 {
                        let want = crate::qparams::quantize_val_8bit(
                            x[ch * hw + p],
                            inv,
                            zp as f32,
                            0.0,
                            255.0,
                        ) as u8;
                        assert_eq!(got[p * 3 + ch], want, "{name} rgb {hw} {ch} {p}");
                    }
                }
            }
        }
    }
}
