//! Which memory-report category (`crate::gpu::Category`) the buffers of each node's forward and
//! backward steps are counted in. Parameters, their gradients and moments are labelled where
//! the store makes them (`params.rs`); the executor labels the rest:
//!
//! - **logits and loss**: the loss node (a cross-entropy, the fused LM head + cross-entropy of
//!   `--fused-loss` with its per-chunk logits, or any scalar last node) and the logits, found
//!   structurally rather than by width: the cross-entropy's input and, back from it through
//!   soft-capping, scaling and additions (a LoRA on the LM head), the nodes that make it, down
//!   to and including the LM head's product. A backward step is counted here when it is the
//!   loss's or when its first input is a logits node, i.e. when it makes the gradient of the
//!   logits (vocabulary-wide); the LM head's own backward makes the hidden state's gradient and
//!   is counted as activations (the fused node's backward makes both, and counts both here).
//! - **activations**: everything else, the saved state of the backward pass and the
//!   activations' gradients included.

use super::{Graph, Op};
use crate::gpu::Category;

/// The category of node `i`'s forward step.
pub(super) fn forward(g: &Graph, i: usize) -> Category {
    if is_loss(g, i) || logits_nodes(g).contains(&i) {
        Category::LogitsLoss
    } else {
        Category::Activations
    }
}

/// The category of node `i`'s backward step (which makes its inputs' gradients).
pub(super) fn backward(g: &Graph, i: usize) -> Category {
    let first_input = g.nodes[i].inputs.first().map(|v| v.0);
    if is_loss(g, i) || first_input.is_some_and(|x| logits_nodes(g).contains(&x)) {
        Category::LogitsLoss
    } else {
        Category::Activations
    }
}

fn is_loss(g: &Graph, i: usize) -> bool {
    matches!(g.nodes[i].op, Op::CrossEntropy { .. } | Op::LinearCrossEntropy { .. })
        || (i + 1 == g.nodes.len() && g.shapes[i] == [1])
}

/// The logits nodes of the graph's last cross-entropy (the loss is recorded last, so the
/// search from the end is short). A graph of few nodes each step: not worth caching.
fn logits_nodes(g: &Graph) -> Vec<usize> {
    let Some(ce) = g.nodes.iter().rposition(|n| matches!(n.op, Op::CrossEntropy { .. })) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut stack = vec![g.nodes[ce].inputs[0].0];
    while let Some(j) = stack.pop() {
        if found.contains(&j) || matches!(g.nodes[j].op, Op::Param(_)) {
            continue;
        }
        found.push(j);
        // elementwise steps on the way from the LM head's product to the loss
        if matches!(g.nodes[j].op, Op::Act { .. } | Op::Scale { .. } | Op::Add) {
            stack.extend(g.nodes[j].inputs.iter().map(|v| v.0));
        }
    }
    found
}
