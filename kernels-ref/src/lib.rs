//! Plain CPU reference of every pockettune kernel, forward and backward.
//!
//! Each module is one kernel family written as free functions in the llm.c style: `x_forward` /
//! `x_backward`, outputs first, then inputs, then sizes, shapes in comments as `// (B,T,C)`.
//! Storage is `f32` everywhere; every dot product and reduction is accumulated in `f64`, so these
//! functions are the yardstick the WGSL kernels are measured against. Backward functions
//! overwrite their outputs; they never accumulate into them. Mismatched slice lengths panic with
//! a message: this crate is a reference, not a library surface for user input.
//!
//! The one fast path here is [`sgemm`], the threaded f32 GEMM the CPU training path uses.

pub mod activation;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod half_store;
pub mod linear_cross_entropy;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod quant;
pub mod rope;
pub mod softmax;

#[cfg(test)]
pub(crate) mod testutil;

pub use activation::*;
pub use attention::*;
pub use cross_entropy::*;
pub use elementwise::*;
pub use embedding::*;
pub use half_store::*;
pub use linear_cross_entropy::*;
pub use matmul::*;
pub use norm::*;
pub use optim::*;
pub use rope::*;
pub use softmax::*;
