//! `prepare` for a [`Sequential`]: lowered into a [`Graph`] (names preserved) and prepared by
//! the graph flow ([`crate::quant::prepare`]).

use crate::error::{QuantError, Result};
use crate::graph::{Dim, Graph};
use crate::nn::{Layer, Sequential};
use crate::observer::Observer;
use crate::qconfig::{QConfig, QConfigMap};
use crate::quant::PreparedGraph;

/// The name of the lowered graph's input node: the path under which the model's own input
/// is observed (when the first int8 layer receives the float input directly, without a
/// `QuantStub`). No layer path can have it.
pub const INPUT: &str = "<input>";

/// A model ready for calibration: the float [`Sequential`] and, once its input shape is
/// known, the graph it lowers into, prepared by [`crate::quant::prepare`] (the plan of
/// which node runs in int8 and the activation observers).
///
/// Graphs have static shapes and a `Sequential` does not say its input shape, so the graph
/// is built by [`prepare`] when the model starts with a `Linear` layer (its input is then
/// `[batch, in_features]`), else from the first calibration batch's shape (dimension 0 is
/// the batch).
#[derive(Debug)]
pub struct Prepared {
    pub(crate) model: Sequential,
    pub(crate) map: QConfigMap,
    pub(crate) graph: Option<PreparedGraph>,
}

impl Prepared {
    /// The float model being calibrated.
    pub fn model(&self) -> &Sequential {
        &self.model
    }

    /// The prepared graph (`None` until the input shape is known: see [`Prepared`]). Its
    /// nodes carry the layers' dotted paths; its input node is named [`INPUT`].
    pub fn graph(&self) -> Option<&PreparedGraph> {
        self.graph.as_ref()
    }

    /// The activation observers, by the path whose output they watch, sorted by path
    /// (none before the graph is built).
    pub fn observers(&self) -> impl Iterator<Item = (&str, &dyn Observer)> {
        let mut v: Vec<(&str, &dyn Observer)> = match &self.graph {
            Some(p) => p
                .observers()
                .map(|(id, o)| (p.graph().node(id).name.as_str(), o))
                .collect(),
            None => Vec::new(),
        };
        v.sort_by_key(|(path, _)| *path);
        v.into_iter()
    }

    /// The config of every node that runs in int8, by path (empty before the graph is
    /// built).
    pub fn qconfigs(&self) -> std::collections::BTreeMap<String, QConfig> {
        let Some(p) = &self.graph else {
            return Default::default();
        };
        p.graph()
            .nodes()
            .iter()
            .filter_map(|n| {
                let plan = p.plan(n.id);
                match (plan.int8, plan.qconfig) {
                    (true, Some(q)) => Some((n.name.clone(), q)),
                    _ => None,
                }
            })
            .collect()
    }

    /// Builds the graph for inputs shaped like `x` (dimension 0: the batch) if it is not
    /// built yet.
    pub(crate) fn ensure_graph(&mut self, x_shape: &[usize]) -> Result<&mut PreparedGraph> {
        if self.graph.is_none() {
            if x_shape.is_empty() {
                return Err(QuantError::ShapeMismatch {
                    context: "calibration batch".into(),
                    expected: "a batch dimension first".into(),
                    actual: "a scalar".into(),
                });
            }
            self.graph = Some(lower_and_prepare(
                &self.model,
                &self.map,
                &batch_dims(x_shape),
            )?);
        }
        let p = self
            .graph
            .as_mut()
            .unwrap_or_else(|| unreachable!("built above"));
        let g = p.graph();
        let input = &g.node(g.inputs()[0]).shape;
        if !input.admits(x_shape) {
            // Name the layer that cannot take this shape, if one cannot.
            Graph::from_sequential_named(&self.model, INPUT, &batch_dims(x_shape))?;
            return Err(QuantError::ShapeMismatch {
                context: INPUT.into(),
                expected: format!(
                    "{input} (the shape the model was prepared for: calibrate with one input \
                     shape, any batch size)"
                ),
                actual: format!("a batch of shape {x_shape:?}"),
            });
        }
        Ok(p)
    }
}

/// `[batch, rest of x's shape]`.
fn batch_dims(x_shape: &[usize]) -> Vec<Dim> {
    let mut dims = vec![Dim::Batch];
    dims.extend(x_shape[1..].iter().map(|&d| Dim::Fixed(d)));
    dims
}

fn lower_and_prepare(model: &Sequential, map: &QConfigMap, dims: &[Dim]) -> Result<PreparedGraph> {
    let graph = Graph::from_sequential_named(model, INPUT, dims)?;
    crate::quant::prepare(graph, &graph_map(map))
}

/// `map` with its layer-type entries also set for the graph ops the layers lower into: a
/// `Residual` block's add is an `Add` node, `ReLU6` a `Clamp`, a `BatchNorm2d` on vectors
/// a `BatchNorm1d`.
fn graph_map(map: &QConfigMap) -> QConfigMap {
    map.clone()
        .with_type_alias("Residual", "Add")
        .with_type_alias("ReLU6", "Clamp")
        .with_type_alias("BatchNorm2d", "BatchNorm1d")
}

/// The input shape a model fixes by itself: `[batch, in_features]` when the first layer
/// that reads a specific shape is a `Linear` (shape-keeping layers before it allowed).
fn known_input(seq: &Sequential) -> Option<Vec<Dim>> {
    fn first(seq: &Sequential) -> Option<Option<Vec<Dim>>> {
        for (_, layer) in seq.children() {
            match layer {
                Layer::Linear(l) | Layer::LinearReLU(l) => {
                    return Some(Some(vec![Dim::Batch, Dim::Fixed(l.weight.ncols())]))
                }
                Layer::Sequential(s) | Layer::Residual(s) => {
                    if let Some(found) = first(s) {
                        return Some(found);
                    }
                }
                Layer::QuantStub
                | Layer::DeQuantStub
                | Layer::ReLU
                | Layer::ReLU6
                | Layer::Dropout
                | Layer::Identity => {}
                _ => return Some(None),
            }
        }
        None
    }
    first(seq).flatten()
}

/// Checks what can be checked before the input shape is known: some layer gets a config
/// that can run in int8, and every config that would run a layer in int8 is one the
/// kernels take (the graph's `prepare` checks it again, naming the node).
fn check_configs(seq: &Sequential, prefix: &str, map: &QConfigMap, any: &mut bool) -> Result<()> {
    for (name, layer) in seq.children() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match layer {
            Layer::Sequential(s) => check_configs(s, &path, map, any)?,
            Layer::Residual(s) => {
                check_configs(s, &path, map, any)?;
                if let Some(q) = map.qconfig_for(&path, "Residual") {
                    q.check_int8(&path)?;
                    *any = true;
                }
            }
            Layer::QuantStub
            | Layer::Conv2d(_)
            | Layer::ConvReLU2d(_)
            | Layer::Linear(_)
            | Layer::LinearReLU(_)
            | Layer::BatchNorm2d(_) => {
                if let Some(q) = map.qconfig_for(&path, layer.type_name()) {
                    q.check_int8(&path)?;
                    *any = true;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Prepares a float model for calibration: lowers it into a [`Graph`] (every leaf keeps its
/// dotted path as node name, a residual block becomes its body and an `Add` node named by
/// the block's path) and runs the graph flow's [`crate::quant::prepare`], which plans which
/// nodes run in int8 under `map` and builds one fresh activation observer for every
/// activation that will need quantization parameters. Weights are observed at `convert`, as
/// PyTorch does.
///
/// The graph is built here when the model's input shape is known (a model starting with a
/// `Linear` layer), else by the first calibration batch (see [`Prepared`]).
///
/// Run [`crate::nn::fuse`] first to fold batch norms and fuse ReLUs; an unfused
/// `BatchNorm2d` on images runs as a separate int8 batch norm (PyTorch's
/// `nnq.BatchNorm2d`), one on vectors in float.
///
/// # Errors
/// [`QuantError::NothingToQuantize`] if `map` puts no layer in int8;
/// [`QuantError::UnsupportedConfig`] naming the layer if a config that would run it in int8
/// has activations that are not `quint8` per-tensor or weights that are not `qint8`, or an
/// observer spec PyTorch rejects; shape errors naming the layer when the graph is built.
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
    let mut any = false;
    check_configs(&model, "", map, &mut any)?;
    if !any {
        return Err(QuantError::NothingToQuantize {
            reason: "no layer of the model has a config that runs it in int8 (Conv2d, Linear, their ReLU fusions, QuantStub, residual adds)".into(),
        });
    }
    let graph = match known_input(&model) {
        Some(dims) => Some(lower_and_prepare(&model, map, &dims)?),
        None => None,
    };
    Ok(Prepared {
        model,
        map: map.clone(),
        graph,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{BatchNorm2d, Conv2d, Linear};
    use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};

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

    fn built(map: &QConfigMap) -> Prepared {
        let mut p = prepare(model(), map).unwrap();
        // A convolution comes first: the graph waits for the input shape.
        assert!(p.graph().is_none() && observed(&p).is_empty());
        p.ensure_graph(&[2, 4, 1, 1]).unwrap();
        p
    }

    #[test]
    fn float_inputs_get_observers_where_int8_starts() {
        let p = built(&QConfigMap::new(QConfig::minmax_per_channel()));
        // conv1 reads the float model input: observed at <input>. The unfused batch norm
        // runs as an int8 batch norm with its own observer, as PyTorch's does.
        assert_eq!(
            observed(&p),
            vec![INPUT, "bn", "conv1", "fc", "res", "res.conv"]
        );
        let q = p.qconfigs();
        assert!(q.contains_key("relu1") && q.contains_key("flatten"));
    }

    #[test]
    fn a_layer_kept_in_float_moves_the_borders() {
        let map = QConfigMap::new(QConfig::minmax_per_tensor()).set_name("res", None);
        let p = built(&map);
        // The residual (add and body) runs in float, so does the flatten after it (a
        // shape op follows its input's domain); fc needs that float output quantized, so
        // the flatten's output is observed.
        assert_eq!(observed(&p), vec![INPUT, "bn", "conv1", "fc", "flatten"]);
        assert!(!p.qconfigs().contains_key("res"));
    }

    #[test]
    fn layer_type_entries_reach_the_ops_the_layers_lower_into() {
        // "Residual" (the layer type) keeps the block's add in float as before: the add
        // is an `Add` node of the graph.
        let map = QConfigMap::new(QConfig::minmax_per_tensor()).set_type("Residual", None);
        let p = built(&map);
        assert!(!observed(&p).contains(&"res"));
        assert!(!p.qconfigs().contains_key("res"));
        // an entry for the op kind itself wins
        let map = map.set_type("Add", Some(QConfig::minmax_per_tensor()));
        assert!(observed(&built(&map)).contains(&"res"));
    }

    #[test]
    fn a_model_starting_with_a_linear_layer_is_lowered_at_prepare() {
        let m = Sequential::new().push("quant", Layer::QuantStub).push(
            "fc",
            Layer::Linear(Linear::new(Array2::zeros((2, 3)), None).unwrap()),
        );
        let mut p = prepare(m, &QConfigMap::new(QConfig::fbgemm())).unwrap();
        assert_eq!(observed(&p), vec!["fc", "quant"]);
        let g = p.graph().unwrap().graph();
        assert_eq!(g.node(g.inputs()[0]).shape.to_string(), "[N, 3]");
        // the shape is fixed: a batch of another width is refused
        let x = ArrayD::zeros(IxDyn(&[2, 5]));
        let err = super::super::calibrate(&mut p, [x], |_| {}).unwrap_err();
        assert!(matches!(err, QuantError::ShapeMismatch { .. }), "{err}");
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
