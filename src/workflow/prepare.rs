//! `prepare`: decide, layer by layer, what runs in int8 and where activations need
//! observers, and build those observers.

use std::collections::BTreeMap;

use crate::error::{QuantError, Result};
use crate::nn::{Layer, Sequential};
use crate::observer::Observer;
use crate::qconfig::{QConfig, QConfigMap};

/// The path under which the model's own input is observed (when the first int8 layer
/// receives the float input directly, without a `QuantStub`).
pub const INPUT: &str = "<input>";

/// Where an activation lives between two layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// Float, produced by the layer at this path (or [`INPUT`]).
    Float(String),
    /// Quantized with the parameters of the observer at this path.
    Quant(String),
}

/// One step of the plan `prepare` made: what each layer runs in, and in which domain its
/// input and output live. `convert` turns it into int8 operations.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanNode {
    /// A leaf layer.
    Leaf {
        /// Dotted path.
        path: String,
        /// The layer's config (`None`: float).
        qconfig: Option<QConfig>,
        /// Whether the layer runs on quantized tensors.
        int8: bool,
        /// The domain the layer reads (before any conversion step).
        input: Domain,
        /// The domain it writes.
        output: Domain,
    },
    /// A residual block `x + body(x)`.
    Residual {
        /// Dotted path.
        path: String,
        /// The add's config (`None`: float add).
        qconfig: Option<QConfig>,
        /// The block's input (the skip connection).
        input: Domain,
        /// The body.
        body: Vec<PlanNode>,
        /// The body's output domain.
        body_output: Domain,
        /// The add's output domain.
        output: Domain,
    },
}

/// A model ready for calibration: the float model, its plan, and its observers.
#[derive(Debug)]
pub struct Prepared {
    pub(crate) model: Sequential,
    pub(crate) plan: Vec<PlanNode>,
    pub(crate) observers: BTreeMap<String, Box<dyn Observer>>,
    pub(crate) qconfigs: BTreeMap<String, QConfig>,
}

impl Prepared {
    /// The float model being calibrated.
    pub fn model(&self) -> &Sequential {
        &self.model
    }

    /// The plan: per layer, int8 or float, and the domains between layers.
    pub fn plan(&self) -> &[PlanNode] {
        &self.plan
    }

    /// The activation observers, by the path whose output they watch.
    pub fn observers(&self) -> impl Iterator<Item = (&str, &dyn Observer)> {
        self.observers.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }

    /// The config of every layer that runs in int8 (and of every observed float border),
    /// by path.
    pub fn qconfigs(&self) -> &BTreeMap<String, QConfig> {
        &self.qconfigs
    }
}

/// What a leaf layer does with quantization parameters.
enum Role {
    /// Makes new parameters from its own output observer (QuantStub, Conv, Linear).
    Requantizes,
    /// Keeps its input's parameters (ReLU, pooling, Flatten, ...).
    Preserves,
    /// Turns int8 back to float (DeQuantStub).
    Dequantizes,
    /// Has no int8 version (BatchNorm2d not fused into a convolution, custom layers).
    FloatOnly,
}

fn role(layer: &Layer) -> Role {
    match layer {
        Layer::QuantStub
        | Layer::Conv2d(_)
        | Layer::ConvReLU2d(_)
        | Layer::Linear(_)
        | Layer::LinearReLU(_) => Role::Requantizes,
        Layer::ReLU
        | Layer::ReLU6
        | Layer::Pool2d(_)
        | Layer::AdaptiveAvgPool2d(_)
        | Layer::Flatten { .. }
        | Layer::Dropout
        | Layer::Identity => Role::Preserves,
        Layer::DeQuantStub => Role::Dequantizes,
        Layer::BatchNorm2d(_) | Layer::Custom(_) => Role::FloatOnly,
        // Containers are walked, never planned as leaves.
        Layer::Sequential(_) | Layer::Residual(_) => Role::FloatOnly,
    }
}

struct Walk<'m> {
    map: &'m QConfigMap,
    observers: BTreeMap<String, Box<dyn Observer>>,
    qconfigs: BTreeMap<String, QConfig>,
}

impl Walk<'_> {
    /// Adds an observer on the output of `path` built from `qc`'s activation spec.
    fn observe(&mut self, path: &str, qc: QConfig) -> Result<()> {
        if !self.observers.contains_key(path) {
            let obs = qc.activation.build().map_err(|e| e.in_context(path))?;
            self.observers.insert(path.to_string(), obs);
            self.qconfigs.entry(path.to_string()).or_insert(qc);
        }
        Ok(())
    }

    /// Makes `domain` quantized for a consumer with config `qc`: a float activation gets
    /// an observer on its producer's output.
    fn quantized(&mut self, domain: &Domain, qc: QConfig) -> Result<Domain> {
        match domain {
            Domain::Quant(_) => Ok(domain.clone()),
            Domain::Float(producer) => {
                self.observe(producer, qc)?;
                Ok(Domain::Quant(producer.clone()))
            }
        }
    }

    fn sequential(
        &mut self,
        seq: &Sequential,
        prefix: &str,
        mut cur: Domain,
    ) -> Result<(Vec<PlanNode>, Domain)> {
        let mut nodes = Vec::new();
        for (name, layer) in seq.children() {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let qc = self.map.qconfig_for(&path, layer.type_name());
            match layer {
                Layer::Sequential(s) => {
                    let (sub, out) = self.sequential(s, &path, cur)?;
                    nodes.extend(sub);
                    cur = out;
                }
                Layer::Residual(body) => {
                    let input = cur.clone();
                    let (sub, body_out) = self.sequential(body, &path, cur)?;
                    let (input, body_output, output) = match qc {
                        Some(q) => {
                            let i = self.quantized(&input, q)?;
                            let b = self.quantized(&body_out, q)?;
                            self.observe(&path, q)?;
                            (i, b, Domain::Quant(path.clone()))
                        }
                        None => (input, body_out, Domain::Float(path.clone())),
                    };
                    nodes.push(PlanNode::Residual {
                        path: path.clone(),
                        qconfig: qc,
                        input,
                        body: sub,
                        body_output,
                        output: output.clone(),
                    });
                    cur = output;
                }
                leaf => {
                    let (int8, input, output) = match (role(leaf), qc) {
                        (Role::Requantizes, Some(q)) => {
                            // A QuantStub quantizes float input itself; conv / linear need
                            // quantized input, observed at the float producer if needed.
                            let input = if matches!(leaf, Layer::QuantStub) {
                                cur.clone()
                            } else {
                                self.quantized(&cur, q)?
                            };
                            self.observe(&path, q)?;
                            self.qconfigs.insert(path.clone(), q);
                            (true, input, Domain::Quant(path.clone()))
                        }
                        (Role::Preserves, Some(_)) => match &cur {
                            Domain::Quant(_) => (true, cur.clone(), cur.clone()),
                            Domain::Float(_) => (false, cur.clone(), Domain::Float(path.clone())),
                        },
                        (Role::Dequantizes, _) => (false, cur.clone(), Domain::Float(path.clone())),
                        // QuantStub / conv / linear / preserving ops without a config, and
                        // float-only layers, run in float.
                        _ => (false, cur.clone(), Domain::Float(path.clone())),
                    };
                    nodes.push(PlanNode::Leaf {
                        path: path.clone(),
                        qconfig: qc,
                        int8,
                        input,
                        output: output.clone(),
                    });
                    cur = output;
                }
            }
        }
        Ok((nodes, cur))
    }
}

/// Prepares a float model for calibration: plans which layers run in int8 under `map`,
/// and builds one fresh activation observer for every activation that will need
/// quantization parameters. Weights are observed at `convert`, as PyTorch does.
///
/// Run [`crate::nn::fuse`] first to fold batch norms and fuse ReLUs; an unfused
/// `BatchNorm2d` stays in float.
///
/// # Errors
/// [`QuantError::NothingToQuantize`] if `map` puts no layer in int8, and the observer
/// specs' own errors (an invalid custom range, ...), named with the layer.
///
/// # Examples
/// ```
/// use ndarray::{Array1, Array2};
/// use ptq::nn::{Layer, Linear, Sequential};
/// use ptq::qconfig::{QConfig, QConfigMap};
/// use ptq::workflow::prepare;
/// let model = Sequential::new()
///     .push("quant", Layer::QuantStub)
///     .push("fc", Layer::Linear(Linear::new(Array2::eye(4), Some(Array1::zeros(4)))?))
///     .push("dequant", Layer::DeQuantStub);
/// let prepared = prepare(model, &QConfigMap::new(QConfig::fbgemm()))?;
/// let watched: Vec<&str> = prepared.observers().map(|(path, _)| path).collect();
/// assert_eq!(watched, vec!["fc", "quant"]);
/// assert!(prepare(Sequential::new(), &QConfigMap::empty()).is_err());
/// # Ok::<(), ptq::QuantError>(())
/// ```
pub fn prepare(model: Sequential, map: &QConfigMap) -> Result<Prepared> {
    if map.is_empty() {
        return Err(QuantError::NothingToQuantize {
            reason: "the QConfigMap has no global config and no entry with a config".into(),
        });
    }
    let mut walk = Walk {
        map,
        observers: BTreeMap::new(),
        qconfigs: BTreeMap::new(),
    };
    let (plan, _) = walk.sequential(&model, "", Domain::Float(INPUT.to_string()))?;
    if walk.observers.is_empty() {
        return Err(QuantError::NothingToQuantize {
            reason: "no layer of the model has a config that runs it in int8 (Conv2d, Linear, their ReLU fusions, QuantStub, residual adds)".into(),
        });
    }
    Ok(Prepared {
        model,
        plan,
        observers: walk.observers,
        qconfigs: walk.qconfigs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{BatchNorm2d, Conv2d, Linear};
    use ndarray::{Array1, Array2, Array4};

    fn conv() -> Layer {
        Layer::Conv2d(Conv2d::new(Array4::zeros((4, 4, 1, 1)), Some(Array1::zeros(4))).unwrap())
    }

    fn model() -> Sequential {
        Sequential::new()
            .push("conv1", conv())
            .push("relu1", Layer::ReLU)
            .push("bn", Layer::BatchNorm2d(BatchNorm2d::identity(4)))
            .push(
                "res",
                Layer::Residual(Sequential::new().push("conv", conv())),
            )
            .push("flatten", Layer::Flatten { start_dim: 1 })
            .push(
                "fc",
                Layer::Linear(Linear::new(Array2::zeros((2, 4)), None).unwrap()),
            )
    }

    fn observed(p: &Prepared) -> Vec<&str> {
        p.observers().map(|(k, _)| k).collect()
    }

    #[test]
    fn float_islands_get_observers_where_int8_resumes() {
        let p = prepare(model(), &QConfigMap::new(QConfig::minmax_per_channel())).unwrap();
        // conv1 reads the float model input: observed at <input>. The unfused batch norm
        // runs in float, so its output is observed for the residual that follows.
        assert_eq!(
            observed(&p),
            vec![INPUT, "bn", "conv1", "fc", "res", "res.conv"]
        );
        let leaf = |path: &str| {
            fn find<'a>(nodes: &'a [PlanNode], path: &str) -> Option<&'a PlanNode> {
                nodes.iter().find_map(|n| match n {
                    PlanNode::Leaf { path: p, .. } if p == path => Some(n),
                    PlanNode::Residual { body, .. } => find(body, path),
                    _ => None,
                })
            }
            find(p.plan(), path).cloned().unwrap()
        };
        assert!(
            matches!(leaf("relu1"), PlanNode::Leaf { int8: true, output: Domain::Quant(ref s), .. } if s == "conv1")
        );
        assert!(matches!(leaf("bn"), PlanNode::Leaf { int8: false, .. }));
        assert!(
            matches!(leaf("flatten"), PlanNode::Leaf { int8: true, output: Domain::Quant(ref s), .. } if s == "res")
        );
    }

    #[test]
    fn a_layer_kept_in_float_moves_the_borders() {
        let map = QConfigMap::new(QConfig::minmax_per_tensor()).set_name("res", None);
        let p = prepare(model(), &map).unwrap();
        // The residual (add and body) runs in float, so does the flatten after it (a
        // shape op follows its input's domain); fc needs that float output quantized, so
        // the flatten's output is observed with fc's config.
        assert_eq!(observed(&p), vec![INPUT, "conv1", "fc", "flatten"]);
        assert!(p.plan().iter().any(|n| matches!(
            n,
            PlanNode::Residual {
                qconfig: None,
                output: Domain::Float(_),
                ..
            }
        )));
    }

    #[test]
    fn nothing_to_quantize_is_an_error() {
        assert!(matches!(
            prepare(model(), &QConfigMap::empty()),
            Err(QuantError::NothingToQuantize { .. })
        ));
        let only_relu = QConfigMap::empty().set_type("ReLU", Some(QConfig::minmax_per_tensor()));
        assert!(matches!(
            prepare(model(), &only_relu),
            Err(QuantError::NothingToQuantize { .. })
        ));
    }
}
