//! Layer fusion, like `torch.ao.quantization.fuse_modules`: Conv2d + BatchNorm2d folded
//! into the convolution, Conv/Linear + ReLU marked as one fused layer. The first named
//! layer of a group becomes the fused layer, the others become `Identity`, so names and
//! `state_dict` keys of the rest of the model do not move.

use ndarray::{Array1, Axis};

use super::{BatchNorm2d, Conv2d, Layer, Sequential};
use crate::error::{QuantError, Result};

/// The layer sequences that can be fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusionPattern {
    /// Conv2d, BatchNorm2d -> Conv2d with folded weights.
    ConvBn,
    /// Conv2d, BatchNorm2d, ReLU -> ConvReLU2d with folded weights.
    ConvBnReLU,
    /// Conv2d, ReLU -> ConvReLU2d.
    ConvReLU,
    /// Linear, ReLU -> LinearReLU.
    LinearReLU,
}

impl FusionPattern {
    fn of(types: &[&str]) -> Option<Self> {
        match types {
            ["Conv2d", "BatchNorm2d"] => Some(Self::ConvBn),
            ["Conv2d", "BatchNorm2d", "ReLU"] => Some(Self::ConvBnReLU),
            ["Conv2d", "ReLU"] => Some(Self::ConvReLU),
            ["Linear", "ReLU"] => Some(Self::LinearReLU),
            _ => None,
        }
    }
}

/// Folds an eval-mode batch norm into the preceding convolution, with the operation order
/// of PyTorch's `fuse_conv_bn_weights` in `f32`: `w' = w * (gamma * rsqrt(var + eps))`,
/// `b' = (b - mean) * rsqrt(var + eps) * gamma + beta`.
///
/// # Errors
/// [`QuantError::ShapeMismatch`] if the batch norm's channels differ from the
/// convolution's output channels.
pub fn fold_batch_norm(conv: &Conv2d, bn: &BatchNorm2d) -> Result<Conv2d> {
    let o = conv.out_channels();
    if bn.channels() != o {
        return Err(QuantError::ShapeMismatch {
            context: "fuse Conv2d + BatchNorm2d".into(),
            expected: format!("BatchNorm2d over {o} channels (the convolution's outputs)"),
            actual: format!("{} channels", bn.channels()),
        });
    }
    let rsqrt = bn.running_var.mapv(|v| 1.0 / (v + bn.eps).sqrt());
    let factor = &bn.weight * &rsqrt;
    let mut weight = conv.weight.clone();
    for (mut w, &f) in weight.axis_iter_mut(Axis(0)).zip(factor.iter()) {
        w.mapv_inplace(|v| v * f);
    }
    let b = conv.bias.clone().unwrap_or_else(|| Array1::zeros(o));
    let bias = ((&b - &bn.running_mean) * &rsqrt) * &bn.weight + &bn.bias;
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        ..conv.clone()
    })
}

/// Fuses groups of sibling layers named by dotted paths, e.g.
/// `&[&["features.0", "features.1", "features.2"], &["fc1", "relu1"]]`.
///
/// # Errors
/// [`QuantError::UnsupportedConfig`] naming the group when a name does not exist, the
/// names are not consecutive siblings, or their types form no [`FusionPattern`];
/// [`QuantError::ShapeMismatch`] when a batch norm does not fit its convolution.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array4};
/// use ptq::nn::{fuse, BatchNorm2d, Conv2d, Layer, Sequential};
/// let model = Sequential::new()
///     .push("conv", Layer::Conv2d(Conv2d::new(Array4::ones((4, 3, 3, 3)), None)?))
///     .push("bn", Layer::BatchNorm2d(BatchNorm2d::identity(4)))
///     .push("relu", Layer::ReLU);
/// let fused = fuse(model, &[&["conv", "bn", "relu"]])?;
/// assert_eq!(fused.get("conv").unwrap().type_name(), "ConvReLU2d");
/// assert_eq!(fused.get("bn").unwrap().type_name(), "Identity");
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn fuse(mut model: Sequential, groups: &[&[&str]]) -> Result<Sequential> {
    for group in groups {
        fuse_group(&mut model, group)?;
    }
    Ok(model)
}

fn group_error(group: &[&str], reason: impl Into<String>) -> QuantError {
    QuantError::UnsupportedConfig {
        context: format!("fuse {group:?}"),
        reason: reason.into(),
    }
}

fn fuse_group(model: &mut Sequential, group: &[&str]) -> Result<()> {
    let Some(first) = group.first() else {
        return Err(group_error(group, "an empty group"));
    };
    // All names must share a parent path.
    let parent = first.rsplit_once('.').map_or("", |(p, _)| p);
    let leaves: Vec<&str> = group
        .iter()
        .map(|n| match n.rsplit_once('.') {
            Some((p, leaf)) if p == parent => Ok(leaf),
            None if parent.is_empty() => Ok(*n),
            _ => Err(group_error(
                group,
                "the layers must be siblings in one Sequential",
            )),
        })
        .collect::<Result<_>>()?;
    let seq = parent_mut(model, parent)
        .ok_or_else(|| group_error(group, format!("no Sequential named {parent:?}")))?;
    let start = seq
        .children
        .iter()
        .position(|(n, _)| n == leaves[0])
        .ok_or_else(|| group_error(group, format!("no layer named {first:?}")))?;
    let run = seq.children.get(start..start + leaves.len()).unwrap_or(&[]);
    if run.len() != leaves.len() || run.iter().zip(&leaves).any(|((n, _), l)| n != l) {
        return Err(group_error(
            group,
            "the layers must be consecutive, in this order",
        ));
    }
    let types: Vec<&str> = run.iter().map(|(_, l)| l.type_name()).collect();
    let pattern = FusionPattern::of(&types)
        .ok_or_else(|| group_error(group, format!("{types:?} is not a fusable pattern (Conv2d+BatchNorm2d[+ReLU], Conv2d+ReLU, Linear+ReLU)")))?;
    let fused = match (pattern, &run[0].1, run.get(1).map(|r| &r.1)) {
        (FusionPattern::ConvBn, Layer::Conv2d(c), Some(Layer::BatchNorm2d(b))) => {
            Layer::Conv2d(fold_batch_norm(c, b)?)
        }
        (FusionPattern::ConvBnReLU, Layer::Conv2d(c), Some(Layer::BatchNorm2d(b))) => {
            Layer::ConvReLU2d(fold_batch_norm(c, b)?)
        }
        (FusionPattern::ConvReLU, Layer::Conv2d(c), _) => Layer::ConvReLU2d(c.clone()),
        (FusionPattern::LinearReLU, Layer::Linear(l), _) => Layer::LinearReLU(l.clone()),
        _ => return Err(group_error(group, "unexpected layer kinds")),
    };
    seq.children[start].1 = fused;
    for slot in &mut seq.children[start + 1..start + leaves.len()] {
        slot.1 = Layer::Identity;
    }
    Ok(())
}

fn parent_mut<'a>(model: &'a mut Sequential, path: &str) -> Option<&'a mut Sequential> {
    if path.is_empty() {
        return Some(model);
    }
    let (head, rest) = path.split_once('.').map_or((path, ""), |(h, r)| (h, r));
    let child = model.children.iter_mut().find(|(n, _)| n == head)?;
    match &mut child.1 {
        Layer::Sequential(s) | Layer::Residual(s) => parent_mut(s, rest),
        _ => None,
    }
}

/// Every run of sibling layers that matches a [`FusionPattern`], longest first at each
/// position, as groups of dotted names ready for [`fuse`].
///
/// # Examples
/// ```
/// use ndarray::{Array2, Array4};
/// use ptq::nn::{find_fusable, BatchNorm2d, Conv2d, Layer, Linear, Sequential};
/// let model = Sequential::new()
///     .push("conv", Layer::Conv2d(Conv2d::new(Array4::ones((4, 3, 3, 3)), None)?))
///     .push("bn", Layer::BatchNorm2d(BatchNorm2d::identity(4)))
///     .push("relu", Layer::ReLU)
///     .push("fc", Layer::Linear(Linear::new(Array2::ones((2, 4)), None)?))
///     .push("relu2", Layer::ReLU);
/// assert_eq!(find_fusable(&model), vec![vec!["conv", "bn", "relu"], vec!["fc", "relu2"]]);
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn find_fusable(model: &Sequential) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    collect_fusable(model, "", &mut out);
    out
}

fn collect_fusable(seq: &Sequential, prefix: &str, out: &mut Vec<Vec<String>>) {
    let path = |n: &str| {
        if prefix.is_empty() {
            n.to_string()
        } else {
            format!("{prefix}.{n}")
        }
    };
    let mut i = 0;
    while i < seq.children.len() {
        if let Layer::Sequential(s) | Layer::Residual(s) = &seq.children[i].1 {
            collect_fusable(s, &path(&seq.children[i].0), out);
        }
        let found = [3usize, 2].into_iter().find(|&len| {
            let run = seq.children.get(i..i + len).unwrap_or(&[]);
            run.len() == len
                && FusionPattern::of(&run.iter().map(|(_, l)| l.type_name()).collect::<Vec<_>>())
                    .is_some()
        });
        match found {
            Some(len) => {
                out.push(
                    seq.children[i..i + len]
                        .iter()
                        .map(|(n, _)| path(n))
                        .collect(),
                );
                i += len;
            }
            None => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;

    fn conv_bn_relu() -> Sequential {
        let w = Array::from_shape_fn((4, 3, 3, 3), |(a, b, c, d)| {
            ((a * 27 + b * 9 + c * 3 + d) as f32 * 0.13).sin()
        });
        let bn = BatchNorm2d {
            weight: Array1::from(vec![0.5, 1.5, -2.0, 1.0]),
            bias: Array1::from(vec![0.1, -0.2, 0.3, 0.0]),
            running_mean: Array1::from(vec![0.2, -1.0, 0.5, 3.0]),
            running_var: Array1::from(vec![0.5, 2.0, 0.01, 9.0]),
            eps: 1e-5,
        };
        let conv = Conv2d::new(w, Some(Array1::from(vec![0.0, 1.0, -1.0, 0.5])))
            .unwrap()
            .with_padding(1, 1);
        Sequential::new()
            .push("conv", Layer::Conv2d(conv))
            .push("bn", Layer::BatchNorm2d(bn))
            .push("relu", Layer::ReLU)
    }

    #[test]
    fn batch_norm_folding_keeps_the_float_function() {
        let x = Array::from_shape_fn((2, 3, 6, 5), |(a, b, c, d)| {
            ((a + 2 * b + 3 * c + 5 * d) as f32 * 0.21).cos()
        })
        .into_dyn();
        for group in [&["conv", "bn", "relu"][..], &["conv", "bn"][..]] {
            let model = conv_bn_relu();
            let want = model.forward(&x).unwrap();
            let fused = fuse(model, &[group]).unwrap();
            let got = fused.forward(&x).unwrap();
            let max_err = want
                .iter()
                .zip(got.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let max_abs = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            assert!(
                max_err <= 1e-5 * max_abs.max(1.0),
                "max error {max_err} of {max_abs}"
            );
        }
    }

    #[test]
    fn bad_groups_are_errors_naming_the_group() {
        let err = fuse(conv_bn_relu(), &[&["conv", "relu"]]).unwrap_err();
        assert!(err.to_string().contains("consecutive"), "{err}");
        let err = fuse(conv_bn_relu(), &[&["bn", "relu"]]).unwrap_err();
        assert!(err.to_string().contains("not a fusable pattern"), "{err}");
        let err = fuse(conv_bn_relu(), &[&["nope", "bn"]]).unwrap_err();
        assert!(err.to_string().contains("no layer named"), "{err}");
        let mut m = conv_bn_relu();
        if let Layer::BatchNorm2d(b) = &mut m.children_mut()[1].1 {
            *b = BatchNorm2d::identity(5);
        }
        assert!(matches!(
            fuse(m, &[&["conv", "bn"]]),
            Err(QuantError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn fusable_runs_are_found_in_nested_models() {
        let model = Sequential::new().push("features", Layer::Sequential(conv_bn_relu()));
        assert_eq!(
            find_fusable(&model),
            vec![vec!["features.conv", "features.bn", "features.relu"]]
        );
    }
}
