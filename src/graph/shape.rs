//! Static shape inference: the output shape of each op from its inputs' shapes, with the
//! errors the float forward would raise, found when the graph is built.

use super::op::{Op, Pool2dSpec, UpsampleSpec};
use super::{Dim, Shape};
use crate::error::{QuantError, Result};

fn mismatch(expected: impl Into<String>, inputs: &[&Shape]) -> QuantError {
    let actual = match inputs {
        [one] => format!("input of shape {one}"),
        many => {
            let s: Vec<String> = many.iter().map(|s| s.to_string()).collect();
            format!("inputs of shapes {}", s.join(", "))
        }
    };
    QuantError::ShapeMismatch {
        context: String::new(),
        expected: expected.into(),
        actual,
    }
}

fn unsupported(reason: impl Into<String>) -> QuantError {
    QuantError::UnsupportedConfig {
        context: String::new(),
        reason: reason.into(),
    }
}

/// `[N, C, H, W]` with fixed `C, H, W`: returns `(n, c, h, w)`.
fn nchw(s: &Shape, expected: &str) -> Result<(Dim, usize, usize, usize)> {
    match s.dims() {
        [n, Dim::Fixed(c), Dim::Fixed(h), Dim::Fixed(w)] => Ok((*n, *c, *h, *w)),
        _ => Err(mismatch(expected, &[s])),
    }
}

/// PyTorch's pooling output size along one axis (`pooling_output_shape_pad_lr`).
pub(crate) fn pool_out(
    n: usize,
    k: usize,
    s: usize,
    pad_l: usize,
    pad_r: usize,
    d: usize,
    ceil: bool,
) -> Option<usize> {
    let reach = d * (k.checked_sub(1)?) + 1;
    let padded = n + pad_l + pad_r;
    if padded < reach || s == 0 {
        return None;
    }
    let num = padded - reach;
    let mut out = if ceil { num.div_ceil(s) } else { num / s } + 1;
    if ceil && (out - 1) * s >= n + pad_l {
        out -= 1;
    }
    Some(out)
}

/// Output `(h, w)` of a pool; also validates the spec.
pub(crate) fn pool2d_out(
    spec: &Pool2dSpec,
    h: usize,
    w: usize,
    max: bool,
) -> Result<(usize, usize)> {
    let (kh, kw) = spec.kernel;
    let (sh, sw) = spec.stride;
    let (pt, pl, pb, pr) = spec.padding;
    let (dh, dw) = spec.dilation;
    if kh == 0 || kw == 0 || sh == 0 || sw == 0 || dh == 0 || dw == 0 {
        return Err(unsupported(format!(
            "kernel {:?}, stride {:?} and dilation {:?} must be positive",
            spec.kernel, spec.stride, spec.dilation
        )));
    }
    if !max && spec.dilation != (1, 1) {
        return Err(unsupported("average pooling has no dilation"));
    }
    if 2 * pt.max(pb) > kh || 2 * pl.max(pr) > kw {
        return Err(unsupported(format!(
            "padding {:?} must be at most half the kernel {:?} (PyTorch refuses more)",
            spec.padding, spec.kernel
        )));
    }
    if spec.divisor_override == Some(0) {
        return Err(unsupported("divisor_override must be positive"));
    }
    let oh = pool_out(h, kh, sh, pt, pb, dh, spec.ceil_mode);
    let ow = pool_out(w, kw, sw, pl, pr, dw, spec.ceil_mode);
    match (oh, ow) {
        (Some(a), Some(b)) if a > 0 && b > 0 => Ok((a, b)),
        _ => Err(QuantError::ShapeMismatch {
            context: String::new(),
            expected: format!(
                "a spatial size that fits the {kh}x{kw} window (dilation {:?}, padding {:?})",
                spec.dilation, spec.padding
            ),
            actual: format!("{h}x{w}"),
        }),
    }
}

/// Output `(h, w)` of an upsample.
pub(crate) fn upsample_out(spec: &UpsampleSpec, h: usize, w: usize) -> Result<(usize, usize)> {
    let (oh, ow) = match (spec.size, spec.scale_factor) {
        (Some(s), _) => s,
        (None, Some((fh, fw))) => {
            if !(fh.is_finite() && fw.is_finite() && fh > 0.0 && fw > 0.0) {
                return Err(unsupported(format!(
                    "scale factors ({fh}, {fw}) must be finite and positive"
                )));
            }
            (
                (h as f64 * fh as f64).floor() as usize,
                (w as f64 * fw as f64).floor() as usize,
            )
        }
        (None, None) => return Err(unsupported("give an output size or a scale factor")),
    };
    if oh.saturating_mul(ow) > 1 << 28 {
        return Err(unsupported(format!(
            "output {oh}x{ow} is larger than 2^28 elements per channel"
        )));
    }
    if oh == 0 || ow == 0 || h == 0 || w == 0 {
        return Err(unsupported(format!(
            "input {h}x{w} and output {oh}x{ow} must be non-empty"
        )));
    }
    Ok((oh, ow))
}

/// Numpy broadcasting of two shapes.
fn broadcast(a: &Shape, b: &Shape) -> Result<Shape> {
    let r = a.rank().max(b.rank());
    let mut out = Vec::with_capacity(r);
    for i in 0..r {
        let da = (i + a.rank()).checked_sub(r).map(|j| a.0[j]);
        let db = (i + b.rank()).checked_sub(r).map(|j| b.0[j]);
        let d = match (da, db) {
            (Some(x), None) | (None, Some(x)) => x,
            (Some(x), Some(y)) if x == y => x,
            (Some(Dim::Fixed(1)), Some(y)) => y,
            (Some(x), Some(Dim::Fixed(1))) => x,
            _ => {
                return Err(mismatch(
                    "shapes that broadcast (numpy rules: equal dims or one of them 1)",
                    &[a, b],
                ))
            }
        };
        out.push(d);
    }
    if out.iter().skip(1).any(|d| *d == Dim::Batch) {
        return Err(mismatch(
            "the dynamic batch to stay in dimension 0 after broadcasting",
            &[a, b],
        ));
    }
    Ok(Shape(out))
}

fn axis_check(axis: usize, s: &Shape, what: &str) -> Result<()> {
    if axis >= s.rank() {
        return Err(mismatch(format!("a dimension {axis} for {what}"), &[s]));
    }
    Ok(())
}

/// Checks that an op's parameter arrays agree with each other (their fields are public, so
/// a hand-made value may not), so forward passes never index out of range.
fn check_params(op: &Op) -> Result<()> {
    let bad = |what: String| Err(unsupported(what));
    match op {
        Op::Conv2d(c) | Op::ConvReLU2d(c) => {
            if c.weight.is_empty() {
                return bad(format!("empty convolution weight {:?}", c.weight.shape()));
            }
            if let Some(b) = &c.bias {
                if b.len() != c.out_channels() {
                    return bad(format!(
                        "bias of {} elements for {} output channels",
                        b.len(),
                        c.out_channels()
                    ));
                }
            }
        }
        Op::Linear(l) | Op::LinearReLU(l) => {
            if l.weight.is_empty() {
                return bad(format!("empty linear weight {:?}", l.weight.shape()));
            }
            if let Some(b) = &l.bias {
                if b.len() != l.weight.nrows() {
                    return bad(format!(
                        "bias of {} elements for {} output features",
                        b.len(),
                        l.weight.nrows()
                    ));
                }
            }
        }
        Op::BatchNorm1d(b) | Op::BatchNorm2d(b) => {
            let c = b.channels();
            if [b.bias.len(), b.running_mean.len(), b.running_var.len()] != [c, c, c] {
                return bad(format!(
                    "weight, bias, running_mean, running_var must have one length, got {}, {}, {}, {}",
                    c,
                    b.bias.len(),
                    b.running_mean.len(),
                    b.running_var.len()
                ));
            }
            if !(b.eps.is_finite() && b.eps >= 0.0) {
                return bad(format!("eps {} must be finite and non-negative", b.eps));
            }
        }
        Op::LayerNorm(l) if !(l.eps.is_finite() && l.eps >= 0.0) => {
            return bad(format!("eps {} must be finite and non-negative", l.eps));
        }
        _ => {}
    }
    Ok(())
}

/// Infers the output shape of `op` applied to `inputs`. Errors carry an empty context; the
/// builder labels them with the node name.
/// Every node's shape holds at most `isize::MAX` elements per batch item (ndarray's own
/// limit), so that no shape arithmetic downstream overflows.
pub(crate) fn check_numel(shape: &Shape) -> Result<()> {
    let fits = shape
        .0
        .iter()
        .filter_map(|d| d.fixed())
        .try_fold(1usize, |a, d| a.checked_mul(d))
        .is_some_and(|n| n <= isize::MAX as usize);
    if fits {
        Ok(())
    } else {
        Err(QuantError::ShapeMismatch {
            context: String::new(),
            expected: format!("at most {} elements per batch item", isize::MAX),
            actual: format!("shape {shape}"),
        })
    }
}

pub(crate) fn infer(op: &Op, inputs: &[&Shape]) -> Result<Shape> {
    if let Some(n) = op.arity() {
        if inputs.len() != n {
            return Err(unsupported(format!(
                "{} takes {n} input(s), got {}",
                op.type_name(),
                inputs.len()
            )));
        }
    } else if inputs.is_empty() {
        return Err(unsupported(format!(
            "{} needs at least one input",
            op.type_name()
        )));
    }
    check_params(op)?;
    let x = inputs.first().copied();
    match op {
        Op::Input => Err(unsupported("inputs are made by GraphBuilder::input")),
        Op::Conv2d(c) | Op::ConvReLU2d(c) => {
            let x = x.expect("arity 1");
            let cin = c.in_channels();
            let (n, ch, h, w) = nchw(x, &format!("[N, {cin}, H, W]"))?;
            if c.groups == 0 || c.out_channels() % c.groups != 0 {
                return Err(unsupported(format!(
                    "groups {} must divide out_channels {}",
                    c.groups,
                    c.out_channels()
                )));
            }
            if c.stride.0 == 0 || c.stride.1 == 0 || c.dilation.0 == 0 || c.dilation.1 == 0 {
                return Err(unsupported("stride and dilation must be positive"));
            }
            if ch != cin {
                return Err(mismatch(format!("[N, {cin}, H, W]"), &[x]));
            }
            let (ho, wo) = c.output_size(h, w).ok_or_else(|| {
                mismatch(
                    format!(
                        "a spatial size of at least the dilated {}x{} kernel",
                        c.weight.shape()[2],
                        c.weight.shape()[3]
                    ),
                    &[x],
                )
            })?;
            if ho == 0 || wo == 0 {
                return Err(mismatch("a non-empty output", &[x]));
            }
            Ok(Shape(vec![
                n,
                c.out_channels().into(),
                ho.into(),
                wo.into(),
            ]))
        }
        Op::Linear(l) | Op::LinearReLU(l) => {
            let x = x.expect("arity 1");
            let (out_f, in_f) = l.weight.dim();
            match x.dims().last() {
                Some(Dim::Fixed(k)) if *k == in_f && x.rank() >= 1 => {
                    let mut d = x.0.clone();
                    *d.last_mut().expect("rank >= 1") = out_f.into();
                    Ok(Shape(d))
                }
                _ => Err(mismatch(format!("[..., {in_f}]"), &[x])),
            }
        }
        Op::BatchNorm1d(b) => {
            let x = x.expect("arity 1");
            let c = b.channels();
            if !(x.rank() == 2 || x.rank() == 3) || x.0[1] != Dim::Fixed(c) {
                return Err(mismatch(format!("[N, {c}] or [N, {c}, L]"), &[x]));
            }
            Ok(x.clone())
        }
        Op::BatchNorm2d(b) => {
            let x = x.expect("arity 1");
            let c = b.channels();
            if x.rank() != 4 || x.0[1] != Dim::Fixed(c) {
                return Err(mismatch(format!("[N, {c}, H, W]"), &[x]));
            }
            Ok(x.clone())
        }
        Op::Clamp { min, max } => {
            if min.is_nan() || max.is_nan() || min > max {
                return Err(unsupported(format!(
                    "clamp bounds [{min}, {max}] must be ordered and not NaN"
                )));
            }
            Ok(x.expect("arity 1").clone())
        }
        Op::ReLU
        | Op::Hardswish
        | Op::Hardsigmoid
        | Op::Sigmoid
        | Op::SiLU
        | Op::Gelu { .. }
        | Op::Dropout
        | Op::Identity
        | Op::QuantStub
        | Op::DeQuantStub => Ok(x.expect("arity 1").clone()),
        Op::Add | Op::AddReLU | Op::Mul => broadcast(inputs[0], inputs[1]),
        Op::Concat { axis } => {
            let first = inputs[0];
            axis_check(*axis, first, "Concat")?;
            if *axis == 0 && first.has_batch() {
                return Err(mismatch(
                    "concatenation along a dimension other than the dynamic batch",
                    inputs,
                ));
            }
            let mut total = 0;
            for s in inputs {
                let ok = s.rank() == first.rank()
                    && s.0
                        .iter()
                        .zip(&first.0)
                        .enumerate()
                        .all(|(i, (a, b))| i == *axis || a == b);
                match (ok, s.0.get(*axis)) {
                    (true, Some(Dim::Fixed(k))) => {
                        total = usize::checked_add(total, *k).ok_or_else(|| {
                            mismatch(
                                format!("a concatenated axis {axis} that fits in usize"),
                                inputs,
                            )
                        })?
                    }
                    _ => {
                        return Err(mismatch(
                            format!("shapes equal except along axis {axis}"),
                            inputs,
                        ))
                    }
                }
            }
            let mut d = first.0.clone();
            d[*axis] = total.into();
            Ok(Shape(d))
        }
        Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
            let x = x.expect("arity 1");
            let (n, c, h, w) = nchw(x, "[N, C, H, W]")?;
            let (oh, ow) = pool2d_out(p, h, w, matches!(op, Op::MaxPool2d(_)))?;
            Ok(Shape(vec![n, c.into(), oh.into(), ow.into()]))
        }
        Op::AdaptiveAvgPool2d((oh, ow)) => {
            let x = x.expect("arity 1");
            let (n, c, _, _) = nchw(x, "[N, C, H, W]")?;
            if *oh == 0 || *ow == 0 {
                return Err(unsupported(format!(
                    "output size ({oh}, {ow}) must be positive"
                )));
            }
            Ok(Shape(vec![n, c.into(), (*oh).into(), (*ow).into()]))
        }
        Op::Mean { dims, keepdim } => {
            let x = x.expect("arity 1");
            if dims.is_empty() || dims.windows(2).any(|w| w[0] >= w[1]) {
                return Err(unsupported(format!(
                    "mean dims {dims:?} must be non-empty and strictly ascending"
                )));
            }
            for &d in dims {
                axis_check(d, x, "Mean")?;
                if x.0[d] == Dim::Batch {
                    return Err(mismatch("a mean over fixed dimensions only", &[x]));
                }
            }
            let mut out = Vec::new();
            for (i, d) in x.0.iter().enumerate() {
                if dims.contains(&i) {
                    if *keepdim {
                        out.push(Dim::Fixed(1));
                    }
                } else {
                    out.push(*d);
                }
            }
            Ok(Shape(out))
        }
        Op::Flatten { start_dim, end_dim } => {
            let x = x.expect("arity 1");
            let r = x.rank() as isize;
            let end = if *end_dim < 0 { r + end_dim } else { *end_dim };
            if r == 0 || *start_dim as isize >= r || end < *start_dim as isize || end >= r {
                return Err(mismatch(
                    format!("dimensions {start_dim}..={end_dim} to flatten"),
                    &[x],
                ));
            }
            let end = end as usize;
            let merged = &x.0[*start_dim..=end];
            let d = if merged.len() == 1 {
                merged[0]
            } else if merged.contains(&Dim::Batch) {
                return Err(mismatch(
                    "flattened dimensions that exclude the dynamic batch",
                    &[x],
                ));
            } else {
                Dim::Fixed(merged.iter().filter_map(|d| d.fixed()).product())
            };
            let mut out = x.0[..*start_dim].to_vec();
            out.push(d);
            out.extend_from_slice(&x.0[end + 1..]);
            Ok(Shape(out))
        }
        Op::Reshape { shape } => {
            let x = x.expect("arity 1");
            reshape_shape(x, shape)
        }
        Op::Permute { dims } => {
            let x = x.expect("arity 1");
            let mut seen = vec![false; x.rank()];
            if dims.len() != x.rank()
                || dims
                    .iter()
                    .any(|&d| d >= x.rank() || std::mem::replace(&mut seen[d], true))
            {
                return Err(mismatch(
                    format!("{} dimensions to permute by {dims:?}", dims.len()),
                    &[x],
                ));
            }
            if x.has_batch() && dims[0] != 0 {
                return Err(mismatch(
                    "a permutation that keeps the dynamic batch first",
                    &[x],
                ));
            }
            Ok(Shape(dims.iter().map(|&d| x.0[d]).collect()))
        }
        Op::Slice { axis, start, end } => {
            let x = x.expect("arity 1");
            axis_check(*axis, x, "Slice")?;
            match x.0[*axis] {
                Dim::Fixed(n) if start < end && *end <= n => {
                    let mut d = x.0.clone();
                    d[*axis] = (end - start).into();
                    Ok(Shape(d))
                }
                _ => Err(mismatch(
                    format!("a fixed dimension {axis} holding indices {start}..{end}"),
                    &[x],
                )),
            }
        }
        Op::Upsample(u) => {
            let x = x.expect("arity 1");
            let (n, c, h, w) = nchw(x, "[N, C, H, W]")?;
            let (oh, ow) = upsample_out(u, h, w)?;
            Ok(Shape(vec![n, c.into(), oh.into(), ow.into()]))
        }
        Op::Softmax { axis } => {
            let x = x.expect("arity 1");
            axis_check(*axis, x, "Softmax")?;
            Ok(x.clone())
        }
        Op::LayerNorm(l) => {
            let x = x.expect("arity 1");
            let k = l.normalized_shape.len();
            let ok = k >= 1
                && k <= x.rank()
                && x.0[x.rank() - k..]
                    .iter()
                    .zip(&l.normalized_shape)
                    .all(|(d, &n)| *d == Dim::Fixed(n))
                && l.weight
                    .as_ref()
                    .is_none_or(|w| w.shape() == l.normalized_shape.as_slice())
                && l.bias
                    .as_ref()
                    .is_none_or(|b| b.shape() == l.normalized_shape.as_slice());
            if !ok {
                return Err(mismatch(
                    format!(
                        "[..., {}] (and weight/bias of that shape)",
                        l.normalized_shape
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    &[x],
                ));
            }
            Ok(x.clone())
        }
        Op::Custom(_) => Err(unsupported(
            "custom modules declare their output shape: use GraphBuilder::custom",
        )),
    }
}

/// Output shape of a reshape (`-1` inferred, `0` copies).
pub(crate) fn reshape_shape(x: &Shape, target: &[isize]) -> Result<Shape> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if infer_at.is_none() => {
                infer_at = Some(i);
                out.push(Dim::Fixed(1));
            }
            0 => match x.0.get(i) {
                Some(d) => out.push(*d),
                None => {
                    return Err(mismatch(
                        format!("a dimension {i} to copy (0 in {target:?})"),
                        &[x],
                    ))
                }
            },
            t if t > 0 => out.push(Dim::Fixed(t as usize)),
            _ => {
                return Err(unsupported(format!(
                    "reshape target {target:?}: entries must be positive, 0 (copy) or one -1"
                )))
            }
        }
    }
    let in_batch = x.has_batch();
    let out_batch = out.first() == Some(&Dim::Batch);
    if out.iter().skip(1).any(|d| *d == Dim::Batch) || in_batch != out_batch {
        return Err(mismatch(
            format!("a reshape to {target:?} that keeps the dynamic batch as dimension 0 (use 0 to copy it)"),
            &[x],
        ));
    }
    let total = x.fixed_numel();
    let known = out
        .iter()
        .filter_map(|d| d.fixed())
        .try_fold(1usize, |a, d| a.checked_mul(d))
        .ok_or_else(|| {
            mismatch(
                format!("a reshape target {target:?} whose size fits in usize"),
                &[x],
            )
        })?;
    if let Some(i) = infer_at {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(mismatch(
                format!("a size divisible for the reshape to {target:?}"),
                &[x],
            ));
        }
        out[i] = Dim::Fixed(total / known);
    } else if known != total {
        return Err(mismatch(
            format!("{known} elements per batch item for the reshape to {target:?}"),
            &[x],
        ));
    }
    Ok(Shape(out))
}
