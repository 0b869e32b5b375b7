//! `exec::program` and `exec::infer` make no heap allocation: a counting global allocator sees
//! none while they run (the model is packed, and the buffers allocated, before counting starts).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use nvcim_shared::exec::{Scratch, infer, program};
use nvcim_shared::format::Model;
use nvcim_shared::format::build::{InputSpec, Layer, ModelDesc, Node, PackConfig, pack};
use nvcim_shared::tile::{Adc, Path};
use nvcim_shared::variation::VariationConfig;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn program_and_infer_do_not_allocate() {
    let w1: Vec<f32> = (0..4 * 9)
        .map(|i| ((i * 7) % 11) as f32 / 11.0 - 0.45)
        .collect();
    let w2: Vec<f32> = (0..3 * 4 * 3 * 3)
        .map(|i| ((i * 5) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let nodes = [
        Node {
            act_max: 3.0,
            ..Node::new(Layer::Conv2d {
                weight: &w1,
                bias: None,
                out_channels: 4,
                kernel: [3, 3],
                stride: [1, 1],
                padding: [1; 4],
                groups: 1,
            })
        },
        Node::new(Layer::Relu),
        Node::new(Layer::MaxPool {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0; 4],
        }),
        Node::new(Layer::Flatten),
        Node {
            act_max: 5.0,
            ..Node::new(Layer::Linear {
                weight: &w2,
                bias: None,
                out_features: 3,
            })
        },
    ];
    let desc = ModelDesc {
        input: InputSpec {
            channels: 1,
            height: 6,
            width: 6,
            mean: &[0.5],
            std: &[0.5],
        },
        classes: 3,
        nodes: &nodes,
    };
    let blob = pack(
        &desc,
        &PackConfig::new(VariationConfig::paper(0.2).unwrap()),
        None,
    )
    .unwrap();
    let model = Model::parse(&blob).unwrap();
    let s = model.scratch();
    let image = [100u8; 36];
    for path in [
        Path::Collapsed,
        Path::Sliced(Adc::Quantized { bits: 6, step: 100 }),
    ] {
        let mut state = vec![0i16; model.state_len(path)];
        let (mut act, mut patch, mut logits) = (
            vec![0u8; s.act_bytes],
            vec![0i16; s.patch],
            vec![0i32; s.logits],
        );
        let before = ALLOCS.load(Ordering::SeqCst);
        let model = Model::parse(&blob).unwrap();
        program(&model, &model.variation(), 1, 0, path, &mut state).unwrap();
        let mut scratch = Scratch {
            act: &mut act,
            patch: &mut patch,
        };
        infer(&model, path, &state, &image, &mut scratch, &mut logits).unwrap();
        assert_eq!(ALLOCS.load(Ordering::SeqCst), before, "{path:?} allocated");
    }
}
