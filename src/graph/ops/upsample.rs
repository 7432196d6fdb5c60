//! Nearest and bilinear upsampling on `[N, C, H, W]` with PyTorch's index rules.

use ndarray::{Array4, ArrayD, Ix4};

use crate::error::{QuantError, Result};
use crate::graph::op::{NearestRule, UpsampleMode, UpsampleSpec};
use crate::graph::shape::upsample_out;

/// PyTorch's `area_pixel_compute_scale` for `align_corners = false` / nearest: `1 /
/// scale_factor` when a factor was given, else `in / out`.
fn src_scale(inp: usize, out: usize, factor: Option<f32>) -> f32 {
    match factor {
        Some(f) if f > 0.0 => 1.0 / f,
        _ => inp as f32 / out as f32,
    }
}

fn nearest_index(rule: NearestRule, dst: usize, inp: usize, out: usize, scale: f32) -> usize {
    let last = inp - 1;
    match rule {
        NearestRule::Floor => {
            if out == inp {
                dst
            } else if out == 2 * inp {
                dst >> 1
            } else {
                ((dst as f32 * scale).floor() as usize).min(last)
            }
        }
        NearestRule::Exact => (((dst as f32 + 0.5) * scale).floor() as usize).min(last),
        NearestRule::HalfPixelRoundPreferFloor => {
            let s = ((dst as f32 + 0.5) * scale - 1.0).ceil();
            (s.max(0.0) as usize).min(last)
        }
    }
}

/// Source coordinate and weights along one axis for bilinear interpolation
/// (`area_pixel_compute_source_index` and `compute_source_index_and_lambda`).
fn linear_taps(
    dst: usize,
    inp: usize,
    out: usize,
    align: bool,
    factor: Option<f32>,
) -> (usize, usize, f32, f32) {
    if inp == out {
        return (dst, dst, 1.0, 0.0);
    }
    let src = if align {
        let scale = if out > 1 {
            (inp as f32 - 1.0) / (out as f32 - 1.0)
        } else {
            0.0
        };
        scale * dst as f32
    } else {
        let scale = src_scale(inp, out, factor);
        (scale * (dst as f32 + 0.5) - 0.5).max(0.0)
    };
    let i0 = (src as usize).min(inp - 1);
    let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
    let l1 = (src - i0 as f32).min(1.0);
    (i0, i1, 1.0 - l1, l1)
}

/// `torch.nn.functional.interpolate` (`nearest`, `nearest-exact`, ONNX's default nearest
/// rule, or `bilinear` with either `align_corners`).
///
/// # Errors
/// [`QuantError::ShapeMismatch`] for a non-4-D input; [`QuantError::UnsupportedConfig`]
/// for a missing or invalid size / scale.
pub fn upsample(x: &ArrayD<f32>, spec: &UpsampleSpec) -> Result<ArrayD<f32>> {
    let x4 = x
        .view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| QuantError::ShapeMismatch {
            context: "Upsample".into(),
            expected: "[N, C, H, W]".into(),
            actual: format!("input of shape {:?}", x.shape()),
        })?;
    let (n, c, h, w) = x4.dim();
    let (oh, ow) = upsample_out(spec, h, w).map_err(|e| e.in_context("Upsample"))?;
    // A given size overrides the scale factor (PyTorch passes no scale then).
    let (fh, fw) = match (spec.size, spec.scale_factor) {
        (None, Some((a, b))) => (Some(a), Some(b)),
        _ => (None, None),
    };
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    match spec.mode {
        UpsampleMode::Nearest(rule) => {
            let (sh, sw) = (src_scale(h, oh, fh), src_scale(w, ow, fw));
            let ys: Vec<usize> = (0..oh).map(|d| nearest_index(rule, d, h, oh, sh)).collect();
            let xs: Vec<usize> = (0..ow).map(|d| nearest_index(rule, d, w, ow, sw)).collect();
            for ((b, ci, oy, ox), v) in out.indexed_iter_mut() {
                *v = x4[[b, ci, ys[oy], xs[ox]]];
            }
        }
        UpsampleMode::Bilinear { align_corners } => {
            let ys: Vec<_> = (0..oh)
                .map(|d| linear_taps(d, h, oh, align_corners, fh))
                .collect();
            let xs: Vec<_> = (0..ow)
                .map(|d| linear_taps(d, w, ow, align_corners, fw))
                .collect();
            for ((b, ci, oy, ox), v) in out.indexed_iter_mut() {
                let (y0, y1, hl0, hl1) = ys[oy];
                let (x0, x1, wl0, wl1) = xs[ox];
                let p = |yy: usize, xx: usize| x4[[b, ci, yy, xx]];
                *v = hl0 * (wl0 * p(y0, x0) + wl1 * p(y0, x1))
                    + hl1 * (wl0 * p(y1, x0) + wl1 * p(y1, x1));
            }
        }
    }
    Ok(out.into_dyn())
}
