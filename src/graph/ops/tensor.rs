//! Shape and reduction ops: broadcasting add/mul, concat, reshape family, mean, softmax,
//! layer and batch norm.

use ndarray::{ArrayD, Axis, IxDyn};

use crate::error::{QuantError, Result};
use crate::graph::op::{BatchNorm, LayerNorm};

fn mismatch(what: &str, expected: String, shapes: &[&[usize]]) -> QuantError {
    let s: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
    QuantError::ShapeMismatch {
        context: what.into(),
        expected,
        actual: if s.len() == 1 {
            format!("input of shape {}", s[0])
        } else {
            format!("inputs of shapes {}", s.join(", "))
        },
    }
}

fn broadcast_shape(a: &[usize], b: &[usize], what: &str) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = (i + a.len()).checked_sub(r).map_or(1, |j| a[j]);
            let db = (i + b.len()).checked_sub(r).map_or(1, |j| b[j]);
            match (da, db) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(mismatch(what, "shapes that broadcast".into(), &[a, b])),
            }
        })
        .collect()
}

fn binary(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    what: &str,
    f: impl Fn(f32, f32) -> f32,
) -> Result<ArrayD<f32>> {
    let shape = broadcast_shape(a.shape(), b.shape(), what)?;
    let av = a.broadcast(IxDyn(&shape)).expect("checked broadcast");
    let bv = b.broadcast(IxDyn(&shape)).expect("checked broadcast");
    let mut out = ArrayD::<f32>::zeros(IxDyn(&shape));
    ndarray::Zip::from(&mut out)
        .and(&av)
        .and(&bv)
        .for_each(|o, &x, &y| *o = f(x, y));
    Ok(out)
}

/// `a + b` with numpy broadcasting.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the shapes do not broadcast.
pub fn add(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    binary(a, b, "Add", |x, y| x + y)
}

/// `a * b` with numpy broadcasting.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the shapes do not broadcast.
pub fn mul(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    binary(a, b, "Mul", |x, y| x * y)
}

/// `torch.cat(xs, axis)`.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the shapes differ off the axis or the axis is out of range.
pub fn concat(xs: &[&ArrayD<f32>], axis: usize) -> Result<ArrayD<f32>> {
    let views: Vec<_> = xs.iter().map(|x| x.view()).collect();
    let ok = !xs.is_empty()
        && xs.iter().all(|x| {
            axis < x.ndim()
                && x.ndim() == xs[0].ndim()
                && (0..x.ndim()).all(|i| i == axis || x.shape()[i] == xs[0].shape()[i])
        });
    if !ok {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape()).collect();
        return Err(mismatch(
            "Concat",
            format!("shapes equal except along axis {axis}"),
            &shapes,
        ));
    }
    Ok(ndarray::concatenate(Axis(axis), &views).expect("checked shapes"))
}

fn to_shape(x: &ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    x.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .expect("same element count")
}

/// `torch.flatten(x, start_dim, end_dim)`.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the dimensions do not exist.
pub fn flatten(x: &ArrayD<f32>, start_dim: usize, end_dim: isize) -> Result<ArrayD<f32>> {
    let r = x.ndim() as isize;
    let end = if end_dim < 0 { r + end_dim } else { end_dim };
    if start_dim as isize >= r || end < start_dim as isize || end >= r {
        return Err(mismatch(
            "Flatten",
            format!("dimensions {start_dim}..={end_dim}"),
            &[x.shape()],
        ));
    }
    let end = end as usize;
    let mut shape = x.shape()[..start_dim].to_vec();
    shape.push(x.shape()[start_dim..=end].iter().product());
    shape.extend_from_slice(&x.shape()[end + 1..]);
    Ok(to_shape(x, &shape))
}

/// `x.reshape(target)`: `-1` inferred (at most one), `0` copies the input dimension.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the element counts differ or an entry is invalid.
pub fn reshape(x: &ArrayD<f32>, target: &[isize]) -> Result<ArrayD<f32>> {
    let bad = || {
        mismatch(
            "Reshape",
            format!("an input that reshapes to {target:?}"),
            &[x.shape()],
        )
    };
    let mut shape = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(i);
                shape.push(1);
            }
            0 => shape.push(*x.shape().get(i).ok_or_else(bad)?),
            t if t > 0 => shape.push(t as usize),
            _ => return Err(bad()),
        }
    }
    let known: usize = shape.iter().product();
    if let Some(i) = infer {
        if known == 0 || !x.len().is_multiple_of(known) {
            return Err(bad());
        }
        shape[i] = x.len() / known;
    } else if known != x.len() {
        return Err(bad());
    }
    Ok(to_shape(x, &shape))
}

/// `x.permute(dims)` (a contiguous copy).
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if `dims` is not a permutation of the axes.
pub fn permute(x: &ArrayD<f32>, dims: &[usize]) -> Result<ArrayD<f32>> {
    let mut seen = vec![false; x.ndim()];
    if dims.len() != x.ndim()
        || dims
            .iter()
            .any(|&d| d >= x.ndim() || std::mem::replace(&mut seen[d], true))
    {
        return Err(mismatch(
            "Permute",
            format!("{} dimensions", dims.len()),
            &[x.shape()],
        ));
    }
    Ok(x.view()
        .permuted_axes(IxDyn(dims))
        .as_standard_layout()
        .into_owned())
}

/// `x.narrow(axis, start, end - start)`.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the range is outside the axis.
pub fn slice(x: &ArrayD<f32>, axis: usize, start: usize, end: usize) -> Result<ArrayD<f32>> {
    if axis >= x.ndim() || start >= end || end > x.shape()[axis] {
        return Err(mismatch(
            "Slice",
            format!("a dimension {axis} holding {start}..{end}"),
            &[x.shape()],
        ));
    }
    Ok(x.slice_axis(Axis(axis), ndarray::Slice::from(start..end))
        .to_owned())
}

/// `torch.mean(x, dims, keepdim)` (summed in `f64`).
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if a dimension is out of range.
pub fn mean(x: &ArrayD<f32>, dims: &[usize], keepdim: bool) -> Result<ArrayD<f32>> {
    if dims.iter().any(|&d| d >= x.ndim()) || dims.windows(2).any(|w| w[0] >= w[1]) {
        return Err(mismatch(
            "Mean",
            format!("ascending dimensions {dims:?}"),
            &[x.shape()],
        ));
    }
    let mut acc = x.mapv(|v| v as f64);
    for &d in dims.iter().rev() {
        acc = acc.sum_axis(Axis(d));
        if keepdim {
            acc.insert_axis_inplace(Axis(d));
        }
    }
    let count: usize = dims.iter().map(|&d| x.shape()[d]).product();
    Ok(acc.mapv(|v| (v / count as f64) as f32))
}

/// `torch.softmax(x, axis)`: `exp(x - max) / sum`, NaN propagating.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the axis is out of range.
pub fn softmax(x: &ArrayD<f32>, axis: usize) -> Result<ArrayD<f32>> {
    if axis >= x.ndim() {
        return Err(mismatch(
            "Softmax",
            format!("a dimension {axis}"),
            &[x.shape()],
        ));
    }
    let mut y = x.clone();
    for mut lane in y.lanes_mut(Axis(axis)) {
        let m = lane.iter().fold(
            f32::NEG_INFINITY,
            |m, &v| if v > m || v.is_nan() { v } else { m },
        );
        lane.mapv_inplace(|v| (v - m).exp());
        let s: f32 = lane.sum();
        lane.mapv_inplace(|v| v / s);
    }
    Ok(y)
}

/// `torch.nn.functional.layer_norm` over the trailing `normalized_shape` (statistics in
/// `f64`, biased variance).
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the trailing dimensions differ from `normalized_shape`.
pub fn layer_norm(x: &ArrayD<f32>, ln: &LayerNorm) -> Result<ArrayD<f32>> {
    let k = ln.normalized_shape.len();
    if k == 0 || k > x.ndim() || x.shape()[x.ndim() - k..] != ln.normalized_shape[..] {
        return Err(mismatch(
            "LayerNorm",
            format!("[..., {:?}]", ln.normalized_shape),
            &[x.shape()],
        ));
    }
    let inner: usize = ln.normalized_shape.iter().product();
    let xs = x.as_standard_layout();
    let flat = xs.as_slice().expect("standard layout");
    let w = ln
        .weight
        .as_ref()
        .map(|w| w.as_standard_layout().into_owned());
    let b = ln
        .bias
        .as_ref()
        .map(|b| b.as_standard_layout().into_owned());
    let wv = w.as_ref().map(|w| w.as_slice().expect("standard"));
    let bv = b.as_ref().map(|b| b.as_slice().expect("standard"));
    let mut out = Vec::with_capacity(flat.len());
    for row in flat.chunks(inner.max(1)) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / inner as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / inner as f64;
        let rstd = 1.0 / (var + ln.eps as f64).sqrt();
        for (i, &v) in row.iter().enumerate() {
            let mut y = ((v as f64 - mean) * rstd) as f32;
            if let Some(w) = wv {
                y *= w[i];
            }
            if let Some(b) = bv {
                y += b[i];
            }
            out.push(y);
        }
    }
    Ok(ArrayD::from_shape_vec(IxDyn(x.shape()), out).expect("same element count"))
}

/// Eval-mode batch norm over axis 1 (`[N, C]`, `[N, C, L]` or `[N, C, H, W]`).
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if axis 1 does not have the norm's channels.
pub fn batch_norm(x: &ArrayD<f32>, bn: &BatchNorm) -> Result<ArrayD<f32>> {
    bn.forward(x)
}
