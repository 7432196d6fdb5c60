//! [`QuantizedModel`]: the int8 model the [`Sequential`](crate::nn::Sequential) flow
//! ([`crate::workflow::convert`]) returns, a one-input, one-output
//! [`QuantizedGraph`] addressed by the layers' dotted paths.

use std::fmt;
use std::sync::Arc;

use ndarray::ArrayD;

use super::QTensor;
use crate::error::{QuantError, Result};
use crate::qparams::{ActQParams, QParams};
use crate::quant::{QuantizedGraph, Value};

/// Called after every node with its name and output (dequantized when int8).
pub type StepHook<'a> = dyn FnMut(&str, &ArrayD<f32>) + 'a;

/// An int8 model: float in, float out, int8 inside (with any float islands the
/// configuration asked for). Built by [`crate::workflow::convert`] or loaded with
/// [`QuantizedModel::load`].
///
/// It is a [`QuantizedGraph`] with one input and one output: the graph the `Sequential`
/// lowers into, converted by the graph flow. Nodes are named by the layers' dotted paths
/// (a residual block's add by the block's path); borders the conversion inserts are named
/// `<producer>.quantize` / `<producer>.dequantize`, and the input node
/// [`crate::workflow::INPUT`]. [`QuantizedModel::graph`] gives the graph itself, for
/// everything the graph offers (`profile`, per-node ops).
///
/// `forward` takes `&self` and the model is `Send + Sync`, so one model can serve many
/// threads at once; `clone` shares the graph.
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    graph: Arc<QuantizedGraph>,
}

impl QuantizedModel {
    /// Wraps an int8 graph with one input and one output.
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] for a graph with another number of inputs or
    /// outputs (use the [`QuantizedGraph`] itself).
    ///
    /// # Examples
    /// ```
    /// use ndarray::{Array2, ArrayD, IxDyn};
    /// use ptq::graph::{Dim, GraphBuilder};
    /// use ptq::nn::quantized::QuantizedModel;
    /// use ptq::nn::Linear;
    /// use ptq::{calibrate, convert, prepare, QConfig, QConfigMap};
    /// let mut g = GraphBuilder::new();
    /// let x = g.input("x", &[Dim::Batch, 3.into()])?;
    /// let q = g.quant_stub("quant", x)?;
    /// let y = g.linear("fc", q, Linear::new(Array2::eye(3), None)?)?;
    /// let out = g.dequant_stub("dequant", y)?;
    /// g.output(out)?;
    /// let mut p = prepare(g.build()?, &QConfigMap::new(QConfig::fbgemm()))?;
    /// calibrate(&mut p, [ArrayD::from_elem(IxDyn(&[2, 3]), 0.5f32)])?;
    /// let model = QuantizedModel::from_graph(convert(p)?)?;
    /// assert!(model.output_qparams("fc")?.is_some());
    /// # Ok::<(), ptq::QuantError>(())
    /// ```
    pub fn from_graph(graph: QuantizedGraph) -> Result<Self> {
        let (i, o) = (graph.input_nodes().len(), graph.output_nodes().len());
        if i != 1 || o != 1 {
            return Err(QuantError::UnsupportedConfig {
                context: "QuantizedModel".into(),
                reason: format!(
                    "a QuantizedModel has one input and one output; this {} graph has {i} \
                     input(s) and {o} output(s): use QuantizedGraph",
                    crate::quant::record::FORMAT
                ),
            });
        }
        Ok(QuantizedModel {
            graph: Arc::new(graph),
        })
    }

    /// The int8 graph.
    pub fn graph(&self) -> &QuantizedGraph {
        &self.graph
    }

    /// Runs the model: NCHW (or `[N, features]`) `f32` in, `f32` out.
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] for NaN or infinite input, and shape errors naming the
    /// layer and both shapes.
    pub fn forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        let mut y = self.graph.forward(std::slice::from_ref(x))?;
        Ok(y.remove(0))
    }

    /// Runs the model and returns its output as computed: int8 values (logical NCHW order)
    /// with their qparams when the model ends in int8 (no `DeQuantStub`), else
    /// `Err(float values)`. Compare it with other runtimes' int8 outputs.
    ///
    /// # Errors
    /// As [`QuantizedModel::forward`].
    pub fn forward_quantized(
        &self,
        x: &ArrayD<f32>,
    ) -> Result<std::result::Result<QTensor, ArrayD<f32>>> {
        let mut y = self.graph.forward_quantized(std::slice::from_ref(x))?;
        Ok(y.remove(0))
    }

    /// As [`QuantizedModel::forward`], calling `hook(name, output)` after every node but
    /// the input with the node's output as floats (int8 outputs dequantized): layers by
    /// their dotted path (a residual block's add by the block's path), borders by
    /// `<producer>.quantize` / `<producer>.dequantize`.
    ///
    /// # Errors
    /// As [`QuantizedModel::forward`].
    pub fn forward_with_hook(
        &self,
        x: &ArrayD<f32>,
        hook: &mut StepHook<'_>,
    ) -> Result<ArrayD<f32>> {
        crate::qparams::check_finite(x, crate::workflow::INPUT)?;
        let input = self.graph.input_nodes()[0];
        let input_name = self.graph.nodes()[input].name();
        let mut y = self
            .graph
            .forward_with(std::slice::from_ref(x), &mut |name, v: &Value| {
                if name != input_name {
                    hook(name, &v.to_f32());
                }
            })?;
        Ok(y.remove(0))
    }

    /// The int8 weight (PyTorch's layout) and its qparams of the layer at `path`
    /// (`Ok(None)` for layers without one, or kept in float).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] if the model has no node of this name.
    pub fn weight(&self, path: &str) -> Result<Option<(ArrayD<i8>, QParams)>> {
        self.graph.weight(path)
    }

    /// The output qparams of the layer at `path` (`Ok(None)` if its output is float).
    ///
    /// # Errors
    /// [`QuantError::UnsupportedConfig`] if the model has no node of this name.
    pub fn output_qparams(&self, path: &str) -> Result<Option<ActQParams>> {
        self.graph.output_qparams(path)
    }

    /// Bytes of the weights as stored in this model: packed int8 weights, their scales,
    /// zero-point corrections and float biases, plus the parameters of layers kept in float.
    pub fn weight_bytes(&self) -> usize {
        self.graph.weight_bytes()
    }

    /// Bytes of the float model's parameters (`f32`).
    pub fn float_weight_bytes(&self) -> usize {
        self.graph.float_weight_bytes()
    }
}

impl From<QuantizedModel> for Arc<QuantizedGraph> {
    fn from(m: QuantizedModel) -> Self {
        m.graph
    }
}

impl fmt::Display for QuantizedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.graph.fmt(f)
    }
}
