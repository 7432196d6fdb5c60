//! What PyTorch's elementwise quantized kernels share: which elements take the vectorized
//! path and which the scalar one, and the arithmetic of each path.
//!
//! The quantized elementwise kernels of torch 2.15.0 (`aten/src/ATen/native/quantized/cpu/
//! kernels/QuantizedOpKernels.cpp`: `qmul_kernel`, `qhardswish_kernel`, `qsigmoid_kernel`,
//! ...) are registered with `REGISTER_DISPATCH`, so on an AVX-512 machine they still run
//! their AVX2 build. They go through `cpu_kernel_vec` (`aten/src/ATen/native/cpu/Loops.h`):
//! `TensorIterator` sorts the dimensions by the output's strides, merges the ones that are
//! contiguous for every operand, and hands each innermost row to `vectorized_loop`, which
//! runs the vector lambda over blocks of `2 * Vectorized<quint8>::size() = 64` elements
//! and the scalar lambda over the remaining `row % 64`, when the row is contiguous for
//! every operand (or one input is a broadcast scalar); any other row runs the scalar lambda
//! throughout. The two lambdas round differently, so the result depends on where an element
//! sits in memory. [`vector_mask`] reproduces that decision for one thread (PyTorch splits
//! tensors of 32768 elements or more between threads, which moves the tails).

use super::TorchLayout;
use crate::kernels::requant::cvt_round;

/// Elements per vectorized block: `2 * Vectorized<quint8>::size()` on AVX2.
pub(crate) const BLOCK: usize = 64;

/// Strides (in elements) of a tensor of `shape` held in `layout` (channels-last only
/// applies to rank 4).
pub(crate) fn strides_of(shape: &[usize], layout: TorchLayout) -> Vec<usize> {
    let r = shape.len();
    let mut st = vec![0usize; r];
    if r == 4 && layout == TorchLayout::ChannelsLast {
        let (c, h, w) = (shape[1], shape[2], shape[3]);
        st[1] = 1;
        st[3] = c;
        st[2] = w * c;
        st[0] = h * w * c;
    } else {
        let mut acc = 1;
        for d in (0..r).rev() {
            st[d] = acc;
            acc *= shape[d];
        }
    }
    st
}

/// For each element of the output (in logical row-major order), whether PyTorch computes
/// it with the vectorized lambda. `out` is the output's shape and layout; each input is its
/// shape (numpy-broadcast to the output's rank and shape) and layout.
#[cfg(test)]
pub(crate) fn vector_mask(
    out: (&[usize], TorchLayout),
    inputs: &[(&[usize], TorchLayout)],
) -> Vec<bool> {
    vector_mask_in(out, inputs, false)
}

/// As [`vector_mask`], with the output's elements enumerated in NHWC order when
/// `nhwc_order` (a rank-4 output whose values are held `[n, h, w, c]`), in logical
/// row-major order otherwise. Shapes and layouts are the logical (NCHW) ones, as for
/// [`vector_mask`].
pub(crate) fn vector_mask_in(
    out: (&[usize], TorchLayout),
    inputs: &[(&[usize], TorchLayout)],
    nhwc_order: bool,
) -> Vec<bool> {
    let shape = out.0;
    let r = shape.len();
    let nhwc_order = nhwc_order && r == 4;
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return Vec::new();
    }
    if r == 0 {
        return vec![false];
    }
    // Every operand of the output's shape and layout: the tensor is one dense row in
    // memory order, its first `numel / BLOCK * BLOCK` elements vectorized. When the
    // enumeration is the memory order, that is a prefix.
    let memory_is_nhwc = r == 4 && out.1 == TorchLayout::ChannelsLast;
    if memory_is_nhwc == nhwc_order && inputs.iter().all(|&(s, l)| s == shape && l == out.1) {
        let limit = numel / BLOCK * BLOCK;
        let mut mask = vec![false; numel];
        mask[..limit].iter_mut().for_each(|m| *m = true);
        return mask;
    }
    // Operand strides in elements, broadcast dims as 0; operand 0 is the output.
    let mut strides: Vec<Vec<usize>> = vec![strides_of(shape, out.1)];
    for &(s, layout) in inputs {
        let own = strides_of(s, layout);
        let off = r - s.len();
        let mut st = vec![0usize; r];
        for d in 0..s.len() {
            st[off + d] = if s[d] == 1 && shape[off + d] != 1 {
                0
            } else {
                own[d]
            };
        }
        strides.push(st);
    }
    // TensorIterator::reorder_dimensions: perm[0] is the innermost dimension.
    let mut perm: Vec<usize> = (0..r).rev().collect();
    let should_swap = |d0: usize, d1: usize| -> i32 {
        for st in &strides {
            let (s0, s1) = (st[d0], st[d1]);
            if s0 == 0 || s1 == 0 {
                continue;
            }
            if s0 < s1 {
                return -1;
            }
            if s0 > s1 {
                return 1;
            }
            if shape[d0] > shape[d1] {
                return 1;
            }
        }
        0
    };
    for i in 1..r {
        let mut dim1 = i;
        for dim0 in (0..i).rev() {
            let c = should_swap(perm[dim0], perm[dim1]);
            if c > 0 {
                perm.swap(dim0, dim1);
                dim1 = dim0;
            } else if c < 0 {
                break;
            }
        }
    }
    // TensorIterator::coalesce_dimensions, tracking which original dims form the row.
    let mut cshape: Vec<usize> = perm.iter().map(|&d| shape[d]).collect();
    let mut cstr: Vec<Vec<usize>> = strides
        .iter()
        .map(|st| perm.iter().map(|&d| st[d]).collect())
        .collect();
    let mut row_dims = 1; // how many leading perm dims coalesced into dim 0
    let mut prev = 0;
    for dim in 1..r {
        let (s0, s1) = (cshape[prev], cshape[dim]);
        let can = s0 == 1 || s1 == 1 || cstr.iter().all(|st| s0 * st[prev] == st[dim]);
        if can {
            if cshape[prev] == 1 {
                for st in cstr.iter_mut() {
                    st[prev] = st[dim];
                }
            }
            cshape[prev] *= cshape[dim];
            if prev == 0 {
                row_dims = dim + 1;
            }
        } else {
            prev += 1;
            if prev != dim {
                for st in cstr.iter_mut() {
                    st[prev] = st[dim];
                }
                cshape[prev] = cshape[dim];
            }
        }
    }
    let row = cshape[0];
    let inner: Vec<usize> = cstr.iter().map(|st| st[0]).collect();
    // VectorizedLoop2d: all contiguous, or exactly one input a broadcast scalar.
    let contiguous = inner.iter().all(|&s| s == 1);
    let one_scalar = inner[0] == 1
        && (1..inner.len())
            .any(|s| inner[s] == 0 && (1..inner.len()).all(|o| o == s || inner[o] == 1));
    let vectorized = contiguous || one_scalar;
    let limit = row / BLOCK * BLOCK;
    let mut mask = vec![false; numel];
    if !vectorized || limit == 0 {
        return mask;
    }
    // Position of each element within its row: the row's dims in perm order, innermost first.
    // The enumeration: logical dims from outermost to innermost, with their strides in
    // the enumeration order.
    let order: Vec<usize> = if nhwc_order {
        vec![0, 2, 3, 1]
    } else {
        (0..r).collect()
    };
    let mut enum_strides = vec![0usize; r];
    let mut acc = 1;
    for &d in order.iter().rev() {
        enum_strides[d] = acc;
        acc *= shape[d];
    }
    let row_perm = &perm[..row_dims];
    let mut idx = vec![0usize; r];
    for (flat, m) in mask.iter_mut().enumerate() {
        let mut rem = flat;
        for &d in &order {
            idx[d] = rem / enum_strides[d];
            rem %= enum_strides[d];
        }
        let mut pos = 0;
        let mut mul = 1;
        for &d in row_perm {
            pos += idx[d] * mul;
            mul *= shape[d];
        }
        *m = pos < limit;
    }
    mask
}

/// `Vectorized<quint8>::quantize` on AVX2 (`QuantizeAvx2`): `x * inverse_scale`, clipped
/// above at the largest `f32` below 2^31 (NaN becomes that bound too), `cvtps2dq`, the zero
/// point added in wrapping `i32`, saturated to `0..=255`.
#[inline]
pub(crate) fn vec_quantize(x: f32, inverse_scale: f32, zero_point: i32) -> u8 {
    let t = x * inverse_scale;
    // _mm256_min_ps(t, c) returns c when t is NaN.
    let t = if t.is_nan() || t > 2147483520.0 {
        2147483520.0
    } else {
        t
    };
    cvt_round(t).wrapping_add(zero_point).clamp(0, 255) as u8
}

/// `at::native::quantize_val<quint8>`: `zero_point + nearbyint(x * (1 / scale))` in `f32`,
/// clamped to `0..=255`.
#[inline]
pub(crate) fn scalar_quantize(x: f32, scale: f32, zero_point: i32) -> u8 {
    crate::qparams::quantize_val(x, scale, zero_point, 0, 255) as u8
}

/// `Vectorized<quint8>::dequantize(scale, zp, scale_zp_premul)`: `fma(scale, q, premul)`
/// with `premul = scale * -zp` rounded to `f32`.
#[inline]
pub(crate) fn dequant_fma(q: u8, scale: f32, premul: f32) -> f32 {
    scale.mul_add(q as f32, premul)
}

/// `at::native::dequantize_val` (and the two-argument vector form): `(q - zp) * scale`.
#[inline]
pub(crate) fn dequant_sub(q: u8, scale: f32, zero_point: i32) -> f32 {
    (q as i32 - zero_point) as f32 * scale
}

/// `Vectorized<quint8>::requantize_from_int` on AVX2 (`RequantizeAvx2`):
/// `cvtps2dq(c * multiplier) + zp` in wrapping `i32`, saturated to `0..=255`.
#[inline]
pub(crate) fn vec_requantize(c: i32, multiplier: f32, zero_point: i32) -> u8 {
    cvt_round(c as f32 * multiplier)
        .wrapping_add(zero_point)
        .clamp(0, 255) as u8
}

/// `at::native::requantize_from_int<quint8>`: `zp + lrintf(c * multiplier)` in `i64`,
/// clamped (`lrintf` of a value outside `i64` gives `i64::MIN`).
#[inline]
pub(crate) fn scalar_requantize(c: i32, multiplier: f32, zero_point: i32) -> u8 {
    let x = c as f32 * multiplier;
    let r = if x.is_nan() || !(-9.223372e18f32..9.223372e18f32).contains(&x) {
        i64::MIN
    } else {
        x.round_ties_even() as i64
    };
    r.saturating_add(zero_point as i64).clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_unary_rows_are_the_whole_tensor_in_memory_order() {
        let shape = [1usize, 3, 7, 9];
        // channels-last: memory order is NHWC, so the tail is the last pixels' channels
        let m = vector_mask(
            (&shape, TorchLayout::ChannelsLast),
            &[(&shape, TorchLayout::ChannelsLast)],
        );
        let n = 189;
        assert_eq!(m.len(), n);
        assert_eq!(m.iter().filter(|&&v| v).count(), 128);
        // element (c=2, h=0, w=0) sits at memory position 2: vector
        assert!(m[2 * 63]);
        // element (c=0, h=6, w=8) sits at memory position 186: scalar
        assert!(!m[6 * 9 + 8]);
        let m = vector_mask(
            (&shape, TorchLayout::Contiguous),
            &[(&shape, TorchLayout::Contiguous)],
        );
        assert!(m[..128].iter().all(|&v| v) && m[128..].iter().all(|&v| !v));
    }

    #[test]
    fn squeeze_excite_rows() {
        let a = [2usize, 80, 4, 4];
        let b = [2usize, 80, 1, 1];
        // NCHW: rows of H*W = 16 < 64 with b a scalar: all scalar
        let m = vector_mask(
            (&a, TorchLayout::Contiguous),
            &[(&a, TorchLayout::Contiguous), (&b, TorchLayout::Contiguous)],
        );
        assert!(m.iter().all(|&v| !v));
        // NHWC: rows of C = 80: channels 0..64 vector, 64..80 scalar
        let m = vector_mask(
            (&a, TorchLayout::ChannelsLast),
            &[
                (&a, TorchLayout::ChannelsLast),
                (&b, TorchLayout::ChannelsLast),
            ],
        );
        assert!(m[63 * 16]);
        assert!(!m[64 * 16]);
        assert_eq!(m.iter().filter(|&&v| v).count(), 2 * 16 * 64);
    }

    /// The dense fast path (a prefix in memory order) agrees with the general walk, and
    /// the NHWC enumeration is the logical mask permuted.
    #[test]
    fn nhwc_enumeration_and_the_dense_prefix_agree_with_the_general_walk() {
        let shapes: [[usize; 4]; 6] = [
            [1, 3, 7, 9],
            [2, 70, 1, 1],
            [1, 1, 13, 11],
            [2, 33, 4, 5],
            [3, 64, 1, 2],
            [1, 5, 2, 2],
        ];
        for s in shapes {
            let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
            let nhwc_pos = |i: usize| {
                let (bi, ci, yi, xi) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
                ((bi * h + yi) * w + xi) * c + ci
            };
            for l in [TorchLayout::ChannelsLast, TorchLayout::Contiguous] {
                let ops = [(&s[..], l), (&s[..], l)];
                // general walk in logical order vs NHWC order (one of the two takes the
                // dense prefix path)
                let logical = vector_mask_in((&s, l), &ops, false);
                let held = vector_mask_in((&s, l), &ops, true);
                for i in 0..logical.len() {
                    assert_eq!(logical[i], held[nhwc_pos(i)], "{s:?} {l:?} {i}");
                }
                // a broadcast operand takes the general walk in both orders
                let g = [b, c, 1, 1];
                let ops = [(&s[..], l), (&g[..], l)];
                let logical = vector_mask_in((&s, l), &ops, false);
                let held = vector_mask_in((&s, l), &ops, true);
                for i in 0..logical.len() {
                    assert_eq!(logical[i], held[nhwc_pos(i)], "{s:?} {l:?} gate {i}");
                }
            }
        }
    }

    #[test]
    fn quantizers_match_their_definitions() {
        assert_eq!(vec_quantize(2.5, 1.0, 0), 2);
        assert_eq!(vec_quantize(3.5, 1.0, 0), 4);
        assert_eq!(vec_quantize(f32::NAN, 1.0, 100), 255);
        assert_eq!(vec_quantize(f32::NAN, 1.0, 200), 0); // the i32 add wraps
        assert_eq!(scalar_quantize(f32::NAN, 1.0, 200), 0);
        assert_eq!(scalar_quantize(1e30, 1.0, 200), 255);
        assert_eq!(vec_requantize(60000, 1e5, 3), 0); // cvtps2dq overflow
        assert_eq!(scalar_requantize(60000, 1e5, 3), 255);
        assert_eq!(dequant_sub(10, 0.5, 4), 3.0);
        assert_eq!(dequant_fma(10, 0.5, -2.0), 3.0);
    }
}
