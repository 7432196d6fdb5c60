//! Writes the seed corpora of the `graph` and `qgraph` targets:
//!
//! ```text
//! cargo run --release --manifest-path fuzz/Cargo.toml --example seeds
//! ```
//!
//! `fuzz/corpus/graph/`: hand-written builder programs (a ResNet basic block with a
//! downsampling skip, a squeeze-excite block, a concat/shuffle block, a linear head) and,
//! from a deterministic random search, programs that convert and cover the other op kinds.
//! `fuzz/corpus/qgraph/`: each graph seed converted and saved as `ptq-qmodel/2`.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// `[rank_sel, dims.., flags]` then instructions `[sel, a, b, params..]` (see
/// `ptq_fuzz::build_graph`); ids are `[x, quant, n0, n1, ..]` for the accepted nodes.
const HAND: &[(&str, &[u8])] = &[
    (
        "resnet_block",
        &[
            3, 2, 5, 5,
            0, // [N, 3, 6, 6], quant stub, dequant, two outputs, minmax per channel
            1, 1, 1, 1, 1, 2, 2, 3, 1, 1, 1, 0, 0, 1, 1, 1, // conv-relu 3x3 s2 p1 -> 4
            0, 2, 2, 1, 1, 2, 2, 3, 1, 0, 0, 0, 0, 1, 1, 1, // conv 3x3 p1 -> 4
            0, 1, 1, 1, 1, 0, 0, 3, 1, 1, 1, 0, 0, 1, 0, 0, // skip conv 1x1 s2 -> 4
            12, 3, 4, // add_relu
            16, 5, 0, 1, 1, // adaptive avg pool 1x1
            18, 6, 0, 1, 2, // flatten 1..-1
            2, 7, 0, 1, 3, 1, // linear 4 -> 4
        ],
    ),
    (
        "squeeze_excite",
        &[
            3, 3, 4, 4, 2, // [N, 4, 5, 5], fbgemm
            0, 1, 1, 1, 1, 0, 0, 3, 1, 0, 0, 0, 0, 1, 0, 0, // conv 1x1 -> 4
            8, 2, 0, 0, // hardswish
            16, 3, 0, 1, 1, // adaptive avg pool 1x1
            1, 4, 4, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, // conv-relu 1x1 -> 2
            0, 5, 5, 1, 1, 0, 0, 3, 1, 0, 0, 0, 0, 1, 0, 0, // conv 1x1 -> 4
            8, 6, 0, 1, // hardsigmoid
            11, 3, 7, // mul (broadcast)
            14, 8, 0, 1, 1, 2, 1, 0, 0, 0, 0, 1, 1, 2, 0, // max pool 2x2 s2
        ],
    ),
    (
        "concat_shuffle",
        &[
            3, 3, 5, 5, 4, // [N, 4, 6, 6], qnnpack
            21, 1, 0, 1, 0, 2, // slice axis 1 [0, 2)
            21, 1, 0, 1, 2, 2, // slice axis 1 [2, 4)
            0, 3, 3, 1, 1, 2, 2, 1, 1, 0, 0, 0, 0, 1, 1, 1, // conv 3x3 p1 -> 2
            6, 4, 0, // relu
            13, 2, 5, 1, 1, // concat axis 1
            19, 6, 0, 4, 1, 2, 2, 6, // reshape [0, 2, 2, 6]? (shape bytes)
            20, 6, 0, 1, 2, // permute
            15, 6, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 2, // avg pool 2x2
            23, 9, 0, 1, // softmax axis 1
        ],
    ),
    (
        "linear_head",
        &[
            1, 5, 8, // [N, 6], onnxruntime
            2, 1, 0, 1, 4, 1, // linear 6 -> 5
            5, 2, 0, // batch norm 1d
            7, 3, 0, 100, 150, // clamp [0, 2]
            3, 4, 0, 1, 2, 1, // linear-relu 5 -> 3
            10, 5, 5, // add
            9, 6, 0, 1, // gelu
        ],
    ),
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn kinds(q: &ptq::QuantizedGraph) -> BTreeSet<&'static str> {
    q.nodes().iter().map(|n| n.op().kind()).collect()
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let (gdir, qdir) = (root.join("graph"), root.join("qgraph"));
    std::fs::create_dir_all(&gdir).unwrap();
    std::fs::create_dir_all(&qdir).unwrap();
    let mut covered = BTreeSet::new();
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, bytes) in HAND {
        let q = ptq_fuzz::graph_quantized(bytes)
            .unwrap_or_else(|| panic!("hand-written seed {name} does not convert"));
        println!("{name}: {} nodes {:?}", q.nodes().len(), kinds(&q));
        covered.extend(kinds(&q));
        seeds.push((name.to_string(), bytes.to_vec()));
    }
    // Random programs that add op kinds not yet covered.
    let mut rng = Rng(0x5eed_9a9f);
    let mut tries = 0;
    while tries < 200_000 && seeds.len() < 12 {
        tries += 1;
        let len = 20 + (rng.next() % 120) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        b[0] = 3; // rank 4
        for d in &mut b[1..4] {
            *d %= 7;
        }
        b[4] &= !1; // a quant stub
        let Some(q) = ptq_fuzz::graph_quantized(&b) else {
            continue;
        };
        let new: Vec<_> = kinds(&q).difference(&covered).copied().collect();
        if new.is_empty() {
            continue;
        }
        println!("random {tries}: {} nodes, adds {new:?}", q.nodes().len());
        covered.extend(new);
        seeds.push((format!("random_{tries}"), b));
    }
    println!("covered: {covered:?}");
    for (name, bytes) in &seeds {
        std::fs::write(gdir.join(format!("{name}.bin")), bytes).unwrap();
        let q = ptq_fuzz::graph_quantized(bytes).unwrap();
        std::fs::write(qdir.join(format!("{name}.qmodel")), q.to_bytes().unwrap()).unwrap();
    }
}
