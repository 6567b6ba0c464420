//! The one error type of the library. Every variant carries the facts a user needs to act:
//! which adapter, kernel, tensor or file, what was expected and what was found, and what to do.
//! The CLI wraps it in `anyhow` at the edge; nothing in the library panics on user input.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no GPU adapter found (backends tried: {backends}). Install a Vulkan driver \
         (on Debian/Ubuntu `apt-get install mesa-vulkan-drivers` gives the lavapipe software device), \
         or use the CPU path where the command offers `--device cpu`"
    )]
    NoAdapter { backends: String },

    #[error("--device {spec:?} matches no adapter (`train`, `eval`, `generate` and `bench step` also take `cpu`, the fast CPU path, and `cpu-ref`, the CPU reference); adapters found:\n{found}")]
    DeviceNotFound { spec: String, found: String },

    #[error(
        "adapter {adapter:?} refused the {profile} limits profile: {message}. \
         Try `--limits adapter`, or pick another adapter with --device"
    )]
    RequestDevice { adapter: String, profile: String, message: String },

    #[error("GPU validation error in {context}: {message}")]
    Validation { context: String, message: String },

    #[error(
        "GPU out of memory in {context}. Lower the batch size or sequence length, \
         or set a smaller --memory-budget so that tensors stream from disk"
    )]
    OutOfMemory { context: String },

    #[error("--memory-budget {budget_mib}: {detail}. {hint}")]
    MemoryBudget { budget_mib: String, needed_mib: String, detail: String, hint: String },

    #[error(
        "GPU device lost ({reason}): {message}. Checkpoints already written are kept; \
         restart with --resume. On phones this often means a buffer above the driver's \
         binding limit: run `pockettune gradcheck` to check the kernels on this device"
    )]
    DeviceLost { reason: String, message: String },

    #[error("internal GPU error in {context}: {message}")]
    Internal { context: String, message: String },

    #[error("shape error in {op}: {detail}")]
    Shape { op: String, detail: String },

    #[error(
        "tensor {what} needs {bytes} bytes in one buffer, more than this device allows \
         ({limit} bytes); it must be chunked"
    )]
    TooLarge { what: String, bytes: u64, limit: u64 },

    // the cause is in the message, not a `#[source]` (which `{:#}` would print a second time)
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },

    #[error("{path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },

    #[error("invalid argument {name}: {detail}")]
    InvalidArgument { name: String, detail: String },

    #[error(
        "the model's logits are not finite ({detail}): its weights hold NaN or infinite values, \
         or overflow. Check the model with `pockettune eval`; a fine-tuning run that diverged \
         needs a lower --lr"
    )]
    NonFiniteLogits { detail: String },

    #[error(
        "training stopped at step {step}: the {what} is {value}, not a finite number, {detail}. \
         Lower --lr, clip gradients with --max-grad-norm, check the data, or pass --on-nan skip \
         to skip such steps"
    )]
    NonFinite { step: usize, what: String, value: f32, detail: String },

    /// `pockettune report`: a metrics file that cannot be read or drawn.
    #[error("{path}: {detail}")]
    Report { path: PathBuf, detail: String },

    /// A power source that cannot be read, or a trace file with a mistake (`detail` names the line).
    #[error("power source {path}: {detail}")]
    PowerSource { path: PathBuf, detail: String },

    /// `--on-critical stop`: the run stopped on a critical battery after writing a checkpoint
    /// (the command line exits with status 3).
    #[error(
        "training stopped before step {step}: {reason} (--on-critical stop). The checkpoint {} \
         holds every step so far: charge the device, then run the same command with --resume",
        checkpoint.display()
    )]
    PowerStop { step: u64, reason: String, checkpoint: PathBuf },
}

impl Error {
    pub(crate) fn shape(op: &str, detail: impl Into<String>) -> Self {
        Error::Shape { op: op.to_string(), detail: detail.into() }
    }
}
