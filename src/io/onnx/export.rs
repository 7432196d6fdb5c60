//! QDQ ONNX export of a calibrated [`PreparedGraph`], in the form ONNX Runtime recommends
//! for CPU: `QuantizeLinear` / `DequantizeLinear` pairs (uint8, per tensor) on the output of
//! every int8 node and on float values entering int8 nodes, int8 symmetric weights (per
//! channel where the weight observer is) behind a `DequantizeLinear`, int32 biases with zero
//! point 0 and scale `input_scale * weight_scale`, and the float ops in between, so that
//! ORT's graph optimizer fuses them into `QLinearConv`, `QGemm`, `QLinearAdd`, ... . Nodes
//! that the plan keeps in float stay float (no Q/DQ around them).

use std::collections::HashMap;

use ndarray::ArrayD;
use prost::Message;

use super::proto;
use crate::error::{QuantError, Result};
use crate::graph::{Dim, Node, NodeId, Op, UpsampleMode};
use crate::qparams::QParams;
use crate::quant::{Domain, PreparedGraph};

/// ONNX opset of the exported file.
pub const EXPORT_OPSET: i64 = 13;

fn unsupported(node: &Node, reason: impl Into<String>) -> QuantError {
    QuantError::UnsupportedConfig {
        context: node.name.clone(),
        reason: reason.into(),
    }
}

struct Writer {
    nodes: Vec<proto::NodeProto>,
    inits: Vec<proto::TensorProto>,
    count: usize,
    /// Weights-only form: int8 weights behind `DequantizeLinear`, float activations and
    /// biases.
    weights_only: bool,
}

fn attr_i(name: &str, v: i64) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}
fn attr_ints(name: &str, v: &[i64]) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn attr_f(name: &str, v: f32) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}
fn attr_s(name: &str, v: &str) -> proto::AttributeProto {
    proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(proto::attribute_proto::AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

impl Writer {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        attrs: Vec<proto::AttributeProto>,
    ) {
        self.count += 1;
        self.nodes.push(proto::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute: attrs,
            ..Default::default()
        });
    }
    fn init(
        &mut self,
        name: &str,
        dims: &[usize],
        dt: proto::tensor_proto::DataType,
        raw: Vec<u8>,
    ) {
        self.inits.push(proto::TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(dt as i32),
            name: Some(name.to_string()),
            raw_data: Some(raw),
            ..Default::default()
        });
    }
    fn f32s(&mut self, name: &str, dims: &[usize], v: &[f32]) {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.init(name, dims, proto::tensor_proto::DataType::Float, raw);
    }
    fn i64s(&mut self, name: &str, v: &[i64]) {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.init(name, &[v.len()], proto::tensor_proto::DataType::Int64, raw);
    }
    /// `QuantizeLinear` + `DequantizeLinear` (uint8, per tensor) of `x`; returns the DQ name.
    fn qdq(&mut self, x: &str, scale: f32, zp: i32) -> String {
        let (s, z, q, dq) = (
            format!("{x}_scale"),
            format!("{x}_zero_point"),
            format!("{x}_quantized"),
            format!("{x}_dequantized"),
        );
        self.f32s(&s, &[], &[scale]);
        self.init(
            &z,
            &[],
            proto::tensor_proto::DataType::Uint8,
            vec![zp as u8],
        );
        self.node(
            "QuantizeLinear",
            &format!("{x}_QuantizeLinear"),
            &[x, &s, &z],
            &q,
            vec![],
        );
        self.node(
            "DequantizeLinear",
            &format!("{x}_DequantizeLinear"),
            &[&q, &s, &z],
            &dq,
            vec![],
        );
        dq
    }
}

fn quantize_weight(w: &ArrayD<f32>, qp: &QParams) -> Result<Vec<u8>> {
    let q = crate::qparams::quantize(w, qp)?;
    Ok(q.iter().map(|&v| v as i8 as u8).collect())
}

impl PreparedGraph {
    /// Writes the calibrated graph as a QDQ ONNX model (opset 13): see the module docs of
    /// [`crate::io::onnx`]. Call it after calibration and before [`convert`]; the int8 model
    /// `convert` makes uses the same activation parameters.
    ///
    /// [`convert`]: crate::quant::convert
    ///
    /// # Errors
    /// [`QuantError::Uncalibrated`] if an observer saw nothing; [`QuantError::UnsupportedConfig`]
    /// naming a node whose op has no QDQ form here (custom modules, bilinear upsampling,
    /// layer norm, GELU, linear layers on inputs of rank other than 2 in int8).
    pub fn to_qdq_onnx(&self) -> Result<Vec<u8>> {
        self.export_onnx(false)
    }

    /// Writes the graph in the weights-only QDQ form: the weights of the int8 convolutions
    /// and linear layers as int8 (the weight observer's symmetric parameters, per channel
    /// where it is) behind a `DequantizeLinear`, everything else (activations, biases)
    /// float, with no `QuantizeLinear`. It is the compressed-weights form runtimes read
    /// (ONNX Runtime dequantizes the weights and runs its float kernels); only the weight
    /// observers matter, so the activation observers need not have seen data.
    ///
    /// # Errors
    /// As [`PreparedGraph::to_qdq_onnx`], except that uncalibrated activation observers
    /// are no error.
    pub fn to_qdq_onnx_weights_only(&self) -> Result<Vec<u8>> {
        self.export_onnx(true)
    }

    fn export_onnx(&self, weights_only: bool) -> Result<Vec<u8>> {
        let g = self.graph();
        let obs: HashMap<NodeId, _> = self.observers().collect();
        let act = |id: NodeId| -> Result<(f32, i32)> {
            let o = obs.get(&id).ok_or_else(|| QuantError::Uncalibrated {
                context: g.node(id).name.clone(),
            })?;
            let qp = o.qparams().map_err(|e| e.in_context(&g.node(id).name))?;
            Ok((qp.scale(), qp.zero_point()))
        };
        let mut w = Writer {
            nodes: Vec::new(),
            inits: Vec::new(),
            count: 0,
            weights_only,
        };
        // per node: its float output name and, when int8 consumers need one, its QDQ name
        let mut float_name: Vec<String> = Vec::with_capacity(g.nodes().len());
        let mut q_name: Vec<Option<String>> = Vec::with_capacity(g.nodes().len());
        let mut inputs = Vec::new();
        for node in g.nodes() {
            let plan = self.plan(node.id);
            let out = sanitize(&node.name);
            let ins: Vec<String> = node
                .inputs
                .iter()
                .map(|&i| {
                    // int8 producers are read dequantized by everyone (ptq's border
                    // dequantizes them); float producers only by int8 consumers
                    if !weights_only && (plan.int8 || self.plan(i).int8) {
                        q_name[i.index()]
                            .clone()
                            .unwrap_or_else(|| float_name[i.index()].clone())
                    } else {
                        float_name[i.index()].clone()
                    }
                })
                .collect();
            let in_scale = |k: usize| -> Result<f32> {
                let src = node.inputs[k];
                match self.plan(src).output {
                    Domain::Quant(s) => Ok(act(s)?.0),
                    Domain::Fixed(q) => Ok(q.scale()),
                    Domain::Float => Ok(act(src)?.0),
                }
            };
            let ins_ref: Vec<&str> = ins.iter().map(String::as_str).collect();
            self.emit(
                &mut w,
                node,
                &ins_ref,
                &out,
                plan.int8,
                &in_scale,
                &mut inputs,
            )?;
            float_name.push(out.clone());
            // a Q/DQ pair: after int8 nodes (their output parameters), and after float
            // producers that have an observer because an int8 node reads them
            let q = match plan.output {
                _ if weights_only => None,
                Domain::Quant(src) if plan.int8 => {
                    let (s, z) = act(src)?;
                    Some(w.qdq(&out, s, z))
                }
                Domain::Fixed(q) if plan.int8 => Some(w.qdq(&out, q.scale(), q.zero_point())),
                _ if obs.contains_key(&node.id) => {
                    let (s, z) = act(node.id)?;
                    Some(w.qdq(&out, s, z))
                }
                _ => None,
            };
            q_name.push(q);
        }
        let outputs = g
            .outputs()
            .iter()
            .map(|&o| {
                // the dequantized value when the output node is int8, as ptq returns it
                let n = g.node(o);
                let name = q_name[o.index()]
                    .as_ref()
                    .filter(|_| self.plan(o).int8)
                    .unwrap_or(&float_name[o.index()]);
                value_info(name, &n.shape.0)
            })
            .collect();
        let model = proto::ModelProto {
            ir_version: Some(8),
            producer_name: Some("ptq".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            opset_import: vec![proto::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(EXPORT_OPSET),
            }],
            graph: Some(proto::GraphProto {
                node: w.nodes,
                name: Some("ptq_qdq".into()),
                initializer: w.inits,
                input: inputs,
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(model.encode_to_vec())
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        w: &mut Writer,
        node: &Node,
        ins: &[&str],
        out: &str,
        int8: bool,
        in_scale: &dyn Fn(usize) -> Result<f32>,
        inputs: &mut Vec<proto::ValueInfoProto>,
    ) -> Result<()> {
        let name = node.name.as_str();
        let relu_after = |w: &mut Writer, pre: &str| {
            w.node("Relu", &format!("{name}.relu"), &[pre], out, vec![]);
        };
        match &node.op {
            Op::Input => {
                inputs.push(value_info(out, &node.shape.0));
            }
            Op::Conv2d(c) | Op::ConvReLU2d(c) => {
                let fused = matches!(node.op, Op::ConvReLU2d(_));
                let wname = format!("{out}.weight");
                let bname = format!("{out}.bias");
                let wt = c.weight.clone().into_dyn();
                let (wi, bi) = self.params(
                    w,
                    node,
                    &wname,
                    &bname,
                    &wt,
                    c.bias.as_ref(),
                    int8,
                    in_scale,
                )?;
                let (pe_h, pe_w) = c.padding_end.unwrap_or(c.padding);
                let attrs = vec![
                    attr_ints(
                        "kernel_shape",
                        &[c.weight.shape()[2] as i64, c.weight.shape()[3] as i64],
                    ),
                    attr_ints("strides", &[c.stride.0 as i64, c.stride.1 as i64]),
                    attr_ints(
                        "pads",
                        &[
                            c.padding.0 as i64,
                            c.padding.1 as i64,
                            pe_h as i64,
                            pe_w as i64,
                        ],
                    ),
                    attr_ints("dilations", &[c.dilation.0 as i64, c.dilation.1 as i64]),
                    attr_i("group", c.groups as i64),
                ];
                let mut cin = vec![ins[0], wi.as_str()];
                if let Some(b) = &bi {
                    cin.push(b);
                }
                if fused {
                    let pre = format!("{out}.pre_relu");
                    w.node("Conv", name, &cin, &pre, attrs);
                    relu_after(w, &pre);
                } else {
                    w.node("Conv", name, &cin, out, attrs);
                }
            }
            Op::Linear(l) | Op::LinearReLU(l) => {
                let fused = matches!(node.op, Op::LinearReLU(_));
                if node.shape.rank() != 2 {
                    return Err(unsupported(
                        node,
                        "QDQ export of a linear layer needs rank-2 input",
                    ));
                }
                let wname = format!("{out}.weight");
                let bname = format!("{out}.bias");
                let wt = l.weight.clone().into_dyn();
                let (wi, bi) = self.params(
                    w,
                    node,
                    &wname,
                    &bname,
                    &wt,
                    l.bias.as_ref(),
                    int8,
                    in_scale,
                )?;
                let mut gin = vec![ins[0], wi.as_str()];
                if let Some(b) = &bi {
                    gin.push(b);
                }
                let attrs = vec![attr_i("transB", 1)];
                if fused {
                    let pre = format!("{out}.pre_relu");
                    w.node("Gemm", name, &gin, &pre, attrs);
                    relu_after(w, &pre);
                } else {
                    w.node("Gemm", name, &gin, out, attrs);
                }
            }
            Op::BatchNorm1d(b) | Op::BatchNorm2d(b) => {
                let c = b.weight.len();
                for (suffix, v) in [
                    ("weight", &b.weight),
                    ("bias", &b.bias),
                    ("running_mean", &b.running_mean),
                    ("running_var", &b.running_var),
                ] {
                    w.f32s(
                        &format!("{out}.{suffix}"),
                        &[c],
                        v.as_slice().unwrap_or(&v.to_vec()),
                    );
                }
                let names: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
                    .iter()
                    .map(|s| format!("{out}.{s}"))
                    .collect();
                w.node(
                    "BatchNormalization",
                    name,
                    &[ins[0], &names[0], &names[1], &names[2], &names[3]],
                    out,
                    vec![attr_f("epsilon", b.eps)],
                );
            }
            Op::ReLU => w.node("Relu", name, ins, out, vec![]),
            Op::Clamp { min, max } => {
                let (a, b) = (format!("{out}.min"), format!("{out}.max"));
                w.f32s(&a, &[], &[*min]);
                w.f32s(&b, &[], &[*max]);
                w.node("Clip", name, &[ins[0], &a, &b], out, vec![]);
            }
            Op::Hardswish => {
                // opset 13 has no HardSwish: x * HardSigmoid(x), as the TorchScript exporter
                let hs = format!("{out}.hardsigmoid");
                w.node(
                    "HardSigmoid",
                    &format!("{name}.hardsigmoid"),
                    &[ins[0]],
                    &hs,
                    vec![attr_f("alpha", 1.0 / 6.0), attr_f("beta", 0.5)],
                );
                w.node("Mul", name, &[ins[0], &hs], out, vec![]);
            }
            Op::Hardsigmoid => w.node(
                "HardSigmoid",
                name,
                ins,
                out,
                vec![attr_f("alpha", 1.0 / 6.0), attr_f("beta", 0.5)],
            ),
            Op::Sigmoid => w.node("Sigmoid", name, ins, out, vec![]),
            Op::Add => w.node("Add", name, ins, out, vec![]),
            Op::AddReLU => {
                let pre = format!("{out}.pre_relu");
                w.node("Add", name, ins, &pre, vec![]);
                relu_after(w, &pre);
            }
            Op::Mul => w.node("Mul", name, ins, out, vec![]),
            Op::Concat { axis } => {
                w.node("Concat", name, ins, out, vec![attr_i("axis", *axis as i64)])
            }
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                let max = matches!(node.op, Op::MaxPool2d(_));
                let mut attrs = vec![
                    attr_ints("kernel_shape", &[p.kernel.0 as i64, p.kernel.1 as i64]),
                    attr_ints("strides", &[p.stride.0 as i64, p.stride.1 as i64]),
                    attr_ints(
                        "pads",
                        &[
                            p.padding.0 as i64,
                            p.padding.1 as i64,
                            p.padding.2 as i64,
                            p.padding.3 as i64,
                        ],
                    ),
                    attr_i("ceil_mode", p.ceil_mode as i64),
                ];
                if max {
                    attrs.push(attr_ints(
                        "dilations",
                        &[p.dilation.0 as i64, p.dilation.1 as i64],
                    ));
                } else {
                    if p.divisor_override.is_some() {
                        return Err(unsupported(node, "divisor_override has no ONNX form"));
                    }
                    attrs.push(attr_i("count_include_pad", p.count_include_pad as i64));
                }
                w.node(
                    if max { "MaxPool" } else { "AveragePool" },
                    name,
                    ins,
                    out,
                    attrs,
                );
            }
            Op::AdaptiveAvgPool2d((1, 1)) => w.node("GlobalAveragePool", name, ins, out, vec![]),
            Op::Flatten {
                start_dim: 1,
                end_dim: -1,
            } => w.node("Flatten", name, ins, out, vec![attr_i("axis", 1)]),
            Op::Reshape { shape } => {
                let s = format!("{out}.shape");
                w.i64s(&s, &shape.iter().map(|&d| d as i64).collect::<Vec<_>>());
                w.node("Reshape", name, &[ins[0], &s], out, vec![]);
            }
            Op::Permute { dims } => w.node(
                "Transpose",
                name,
                ins,
                out,
                vec![attr_ints(
                    "perm",
                    &dims.iter().map(|&d| d as i64).collect::<Vec<_>>(),
                )],
            ),
            Op::Softmax { axis } => w.node(
                "Softmax",
                name,
                ins,
                out,
                vec![attr_i("axis", *axis as i64)],
            ),
            Op::Upsample(u) => {
                let rule = match u.mode {
                    UpsampleMode::Nearest(crate::graph::NearestRule::Floor) => {
                        ("asymmetric", "floor")
                    }
                    _ => return Err(unsupported(node, "QDQ export of this upsampling mode")),
                };
                let (roi, sc) = (format!("{out}.roi"), format!("{out}.scales"));
                w.f32s(&roi, &[0], &[]);
                let mut resize_in = vec![ins[0].to_string(), roi.clone()];
                if let Some((h, ww)) = u.scale_factor.filter(|_| u.size.is_none()) {
                    w.f32s(&sc, &[4], &[1.0, 1.0, h, ww]);
                    resize_in.push(sc);
                } else if let Some((h, ww)) = u.size {
                    let sz = format!("{out}.sizes");
                    w.f32s(&sc, &[0], &[]);
                    let d = &node.shape.0;
                    let n = match d[0] {
                        Dim::Fixed(n) => n as i64,
                        Dim::Batch => {
                            return Err(unsupported(node, "size-based resize with a dynamic batch"))
                        }
                    };
                    let c = d[1].fixed().unwrap_or(0) as i64;
                    w.i64s(&sz, &[n, c, h as i64, ww as i64]);
                    resize_in.push(sc);
                    resize_in.push(sz);
                }
                let r: Vec<&str> = resize_in.iter().map(String::as_str).collect();
                w.node(
                    "Resize",
                    name,
                    &r,
                    out,
                    vec![
                        attr_s("mode", "nearest"),
                        attr_s("coordinate_transformation_mode", rule.0),
                        attr_s("nearest_mode", rule.1),
                    ],
                );
            }
            Op::Identity | Op::Dropout | Op::QuantStub | Op::DeQuantStub => {
                w.node("Identity", name, ins, out, vec![])
            }
            Op::Mean { dims, keepdim } => w.node(
                "ReduceMean",
                name,
                ins,
                out,
                vec![
                    attr_ints("axes", &dims.iter().map(|&d| d as i64).collect::<Vec<_>>()),
                    attr_i("keepdims", *keepdim as i64),
                ],
            ),
            other => {
                return Err(unsupported(
                    node,
                    format!("{} has no QDQ ONNX export", other.type_name()),
                ))
            }
        }
        Ok(())
    }

    /// Weight (int8 + DequantizeLinear when the node is int8, float otherwise) and bias
    /// (int32 with scale input_scale * weight_scale when int8) initializers.
    #[allow(clippy::too_many_arguments)]
    fn params(
        &self,
        w: &mut Writer,
        node: &Node,
        wname: &str,
        bname: &str,
        weight: &ArrayD<f32>,
        bias: Option<&ndarray::Array1<f32>>,
        int8: bool,
        in_scale: &dyn Fn(usize) -> Result<f32>,
    ) -> Result<(String, Option<String>)> {
        let dims = weight.shape().to_vec();
        if !int8 {
            w.f32s(wname, &dims, &weight.iter().copied().collect::<Vec<_>>());
            let b = bias.map(|b| {
                w.f32s(bname, &[b.len()], &b.to_vec());
                bname.to_string()
            });
            return Ok((wname.to_string(), b));
        }
        let qc = self
            .plan(node.id)
            .qconfig
            .ok_or_else(|| unsupported(node, "an int8 node without a qconfig"))?;
        let mut o = qc.weight.build()?;
        o.observe(weight.view())
            .map_err(|e| e.in_context(&node.name))?;
        let qp = o.qparams()?;
        let scales = qp.scales().to_vec();
        let zps = qp.zero_points().to_vec();
        if zps.iter().any(|&z| z != 0) {
            return Err(unsupported(
                node,
                "QDQ export needs symmetric weights (zero point 0)",
            ));
        }
        let per_channel = scales.len() > 1 || qp.scheme().is_per_channel();
        let qn = format!("{wname}_quantized");
        w.init(
            &qn,
            &dims,
            proto::tensor_proto::DataType::Int8,
            quantize_weight(weight, &qp)?,
        );
        let (sn, zn) = (format!("{wname}_scale"), format!("{wname}_zero_point"));
        let sdims: Vec<usize> = if per_channel {
            vec![scales.len()]
        } else {
            vec![]
        };
        w.f32s(&sn, &sdims, &scales);
        w.init(
            &zn,
            &sdims,
            proto::tensor_proto::DataType::Int8,
            vec![0u8; scales.len()],
        );
        let attrs = if per_channel {
            vec![attr_i("axis", 0)]
        } else {
            vec![]
        };
        w.node(
            "DequantizeLinear",
            &format!("{wname}_DequantizeLinear"),
            &[&qn, &sn, &zn],
            wname,
            attrs.clone(),
        );
        if w.weights_only {
            let b = bias.map(|b| {
                w.f32s(bname, &[b.len()], &b.to_vec());
                bname.to_string()
            });
            return Ok((wname.to_string(), b));
        }
        let b = match bias {
            None => None,
            Some(b) => {
                let s_in = in_scale(0)?;
                let c = b.len();
                let bs: Vec<f32> = (0..c)
                    .map(|k| s_in * scales[if per_channel { k } else { 0 }])
                    .collect();
                let mut q = Vec::with_capacity(c * 4);
                for k in 0..c {
                    // as quantize_bias_static: float32 division, round half to even
                    let v = (b[k] / bs[k]).round_ties_even() as i32;
                    q.extend_from_slice(&v.to_le_bytes());
                }
                let (qb, sb, zb) = (
                    format!("{bname}_quantized"),
                    format!("{bname}_scale"),
                    format!("{bname}_zero_point"),
                );
                w.init(&qb, &[c], proto::tensor_proto::DataType::Int32, q);
                w.f32s(
                    &sb,
                    &if per_channel { vec![c] } else { vec![] },
                    if per_channel { &bs } else { &bs[..1] },
                );
                w.init(
                    &zb,
                    &if per_channel { vec![c] } else { vec![] },
                    proto::tensor_proto::DataType::Int32,
                    vec![0u8; if per_channel { c * 4 } else { 4 }],
                );
                w.node(
                    "DequantizeLinear",
                    &format!("{bname}_DequantizeLinear"),
                    &[&qb, &sb, &zb],
                    bname,
                    attrs,
                );
                Some(bname.to_string())
            }
        };
        Ok((wname.to_string(), b))
    }
}

fn value_info(name: &str, dims: &[Dim]) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value as DV, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Batch => DV::DimParam("N".into()),
                Dim::Fixed(n) => DV::DimValue(*n as i64),
            }),
            ..Default::default()
        })
        .collect();
    proto::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(proto::tensor_proto::DataType::Float as i32),
                    shape: Some(proto::TensorShapeProto { dim }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn sanitize(s: &str) -> String {
    if s.is_empty() {
        "node".into()
    } else {
        s.to_string()
    }
}
