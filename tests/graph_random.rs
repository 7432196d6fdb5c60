//! Random graphs: a random program of builder calls with random (often invalid) parameters
//! never panics; whatever the builder accepts runs, and every node's output has exactly
//! the statically inferred shape, for several batch sizes. Fixed seed, no persistence.

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use ptq::graph::{
    BatchNorm, Dim, GraphBuilder, LayerNorm, NearestRule, Node, NodeId, Op, Pool2dSpec,
    UpsampleMode, UpsampleSpec,
};
use ptq::nn::{Conv2d, Linear};

/// One builder call: an op selector, two input picks, parameter bytes.
type Instr = (u8, u8, u8, [u8; 6]);

fn op_for(sel: u8, p: [u8; 6], x: &[Dim]) -> Op {
    let d = |i: usize| x.get(i).and_then(|d| d.fixed()).unwrap_or(1).max(1);
    let small = |b: u8, m: u8| (b % m) as usize;
    let last = x.len().saturating_sub(1);
    match sel % 24 {
        0 => {
            let groups = if p[1].is_multiple_of(3) { d(1) } else { 1 };
            let cin = if p[5].is_multiple_of(7) {
                d(1) + 1
            } else {
                d(1)
            }; // sometimes wrong
            let k = 1 + small(p[2], 3);
            let cout = groups * (1 + small(p[0], 3));
            let w = Array4::from_shape_fn((cout, (cin / groups).max(1), k, k), |(a, b, c, e)| {
                ((a + b + c + e) as f32 * 0.3).sin()
            });
            Op::Conv2d(
                Conv2d::new(w, Some(Array1::zeros(cout)))
                    .unwrap()
                    .with_groups(groups)
                    .with_stride(1 + small(p[3], 2), 1 + small(p[4], 2))
                    .with_padding_tlbr(
                        small(p[3], 2),
                        small(p[4], 2),
                        small(p[5], 3),
                        small(p[0], 2),
                    ),
            )
        }
        1 => {
            let inf = if p[5].is_multiple_of(7) {
                d(last) + 1
            } else {
                d(last)
            };
            let out = 1 + small(p[0], 4);
            Op::Linear(
                Linear::new(Array2::from_elem((out, inf), 0.1), Some(Array1::zeros(out))).unwrap(),
            )
        }
        2 => Op::BatchNorm2d(BatchNorm::identity(d(1))),
        3 => Op::BatchNorm1d(BatchNorm::identity(d(1))),
        4 => Op::ReLU,
        5 => Op::Clamp {
            min: -(p[0] as f32) / 50.0,
            max: p[1] as f32 / 50.0 - 1.0,
        },
        6 => [Op::Hardswish, Op::Hardsigmoid, Op::Sigmoid, Op::SiLU][small(p[0], 4)].clone(),
        7 => Op::Gelu {
            tanh: p[0].is_multiple_of(2),
        },
        8 => Op::Add,
        9 => Op::Mul,
        10 => Op::AddReLU,
        11 => Op::Concat {
            axis: small(p[0], 5),
        },
        12 | 13 => {
            let (kh, kw) = (1 + small(p[0], 3), 1 + small(p[1], 3));
            let spec = Pool2dSpec::new(kh, kw)
                .with_stride(1 + small(p[2], 3), 1 + small(p[3], 2))
                .with_padding(small(p[4], 2), small(p[5], 2))
                .with_ceil_mode(p[2].is_multiple_of(2))
                .with_count_include_pad(p[3].is_multiple_of(2));
            if sel % 24 == 12 {
                Op::MaxPool2d(spec.with_dilation(1 + small(p[5], 2), 1))
            } else {
                Op::AvgPool2d(spec.with_divisor_override((p[0].is_multiple_of(5)).then_some(3)))
            }
        }
        14 => Op::AdaptiveAvgPool2d((1 + small(p[0], 5), small(p[1], 5))),
        15 => Op::Mean {
            dims: vec![1 + small(p[0], 3)],
            keepdim: p[1].is_multiple_of(2),
        },
        16 => Op::Flatten {
            start_dim: small(p[0], 4),
            end_dim: -1 - small(p[1], 2) as isize,
        },
        17 => Op::Reshape {
            shape: vec![0, -1, 1 + small(p[0], 3) as isize],
        },
        18 => {
            let mut dims: Vec<usize> = (0..x.len()).collect();
            if dims.len() > 2 {
                let (i, j) = (
                    1 + small(p[0], (dims.len() - 1) as u8),
                    1 + small(p[1], (dims.len() - 1) as u8),
                );
                dims.swap(i, j);
            }
            Op::Permute { dims }
        }
        19 => {
            let axis = small(p[0], 4);
            let start = small(p[1], 3);
            Op::Slice {
                axis,
                start,
                end: start + 1 + small(p[2], 3),
            }
        }
        20 => {
            let mode = match p[0] % 4 {
                0 => UpsampleMode::Nearest(NearestRule::Floor),
                1 => UpsampleMode::Nearest(NearestRule::Exact),
                2 => UpsampleMode::Nearest(NearestRule::HalfPixelRoundPreferFloor),
                _ => UpsampleMode::Bilinear {
                    align_corners: p[1].is_multiple_of(2),
                },
            };
            if p[2].is_multiple_of(2) {
                UpsampleSpec::size(1 + small(p[3], 7), 1 + small(p[4], 7), mode)
            } else {
                UpsampleSpec::scale(0.5 + p[3] as f32 / 100.0, 0.5 + p[4] as f32 / 100.0, mode)
            }
            .into_op()
        }
        21 => Op::Softmax {
            axis: small(p[0], 4),
        },
        22 => Op::LayerNorm(LayerNorm::new(&[d(last)])),
        _ => [Op::Identity, Op::Dropout, Op::QuantStub, Op::DeQuantStub][small(p[0], 4)].clone(),
    }
}

trait IntoOp {
    fn into_op(self) -> Op;
}
impl IntoOp for UpsampleSpec {
    fn into_op(self) -> Op {
        Op::Upsample(self)
    }
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5eed_0004),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn random_programs_never_panic_and_run_with_their_inferred_shapes(
        c in 1usize..4, h in 1usize..8, w in 1usize..8,
        prog in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), any::<[u8; 6]>()), 1..16),
        batch in 1usize..4,
    ) {
        let mut g = GraphBuilder::new();
        let x = g.input("x", &[Dim::Batch, c.into(), h.into(), w.into()]).unwrap();
        let mut ids: Vec<NodeId> = vec![x];
        let mut accepted = 0;
        for (k, instr) in prog.into_iter().enumerate() {
            let (sel, a, b, p): Instr = instr;
            let ia = ids[a as usize % ids.len()];
            let ib = ids[b as usize % ids.len()];
            let shape = g.shape(ia).unwrap().0.clone();
            let op = op_for(sel, p, &shape);
            let inputs = match op.arity() {
                Some(2) => vec![ia, ib],
                None => vec![ia, ib, ia],
                _ => vec![ia],
            };
            if let Ok(id) = g.node(&format!("n{k}"), op, &inputs) {
                ids.push(id);
                accepted += 1;
            }
        }
        let last = *ids.last().unwrap();
        g.output(last).unwrap();
        if ids.len() > 2 {
            g.output(ids[1]).unwrap();
        }
        let graph = g.build().unwrap();
        let n: usize = batch * c * h * w;
        let data = ArrayD::from_shape_vec(IxDyn(&[batch, c, h, w]), (0..n).map(|i| ((i as f32) * 0.37).sin()).collect()).unwrap();
        let mut seen = 0;
        let out = graph.forward_with(&[data], &mut |node: &Node, y: &ArrayD<f32>| {
            assert_eq!(y.shape(), node.shape.to_concrete(batch).as_slice(), "{} {:?}", node.name, node.op.kind());
            seen += 1;
            Ok(())
        });
        prop_assert!(out.is_ok(), "{:?}\n{}", out.err(), graph);
        prop_assert_eq!(seen, 1 + accepted);
    }
}
