//! The matmul autotune: at first use on a device, time every matrix-product kernel the device
//! offers ([`Gpu::matmul_kernels`], the staged tiles included) on products shaped like a
//! transformer layer's forward and backward (on a slow device, the fastest two again at a real
//! layer's size: `SMALL`), keep the fastest, and remember the choice in a JSON file under the
//! user's cache directory, keyed by adapter, driver, limits profile, pockettune version and the
//! autotune's own version, so later runs on the same device start at once.
//!
//! When it runs: `pockettune train` and `bench` switch it on for the process ([`set_default`]),
//! `eval` and `generate` use a cached choice but do not measure; the library alone (tests,
//! other programs) does not tune unless `POCKETTUNE_MATMUL_AUTOTUNE=on` asks. `POCKETTUNE_MATMUL_AUTOTUNE=off` switches it off,
//! `=fresh` measures again and rewrites the entry; `POCKETTUNE_MATMUL` forces a kernel and skips
//! it; a planning step (no kernel runs) never tunes. The cache is `matmul.json` in
//! `$POCKETTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/pockettune`, else `$HOME/.cache/pockettune`;
//! a cache that cannot be read or parsed is ignored with a warning and written anew.

use super::matmul;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, MatmulKernel, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

/// Environment variable: `on`, `off` or `fresh` (see the module comment).
pub const AUTOTUNE_ENV: &str = "POCKETTUNE_MATMUL_AUTOTUNE";

/// What to do about the kernel choice when a device opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Keep the device's default kernel.
    Off,
    /// Use the cached choice if there is one, else the default; never measure.
    Cached,
    /// Use the cached choice, or measure and cache one.
    On,
    /// Measure even if a choice is cached, and replace it.
    Fresh,
}

/// The process default as a number (0 off, 1 cached, 2 on), for an atomic.
static DEFAULT: AtomicU8 = AtomicU8::new(0);

/// The mode when the environment does not set one (the CLI: `On` for `train` and `bench`,
/// `Cached` for `eval` and `generate`; `Off` otherwise).
pub fn set_default(mode: Mode) {
    DEFAULT.store(
        match mode {
            Mode::Off | Mode::Fresh => 0,
            Mode::Cached => 1,
            Mode::On => 2,
        },
        Ordering::Relaxed,
    );
}

impl Mode {
    /// [`AUTOTUNE_ENV`]'s mode, else the process default.
    pub fn from_env() -> Result<Mode> {
        match std::env::var(AUTOTUNE_ENV).ok().as_deref().map(str::trim) {
            None | Some("") => Ok(match DEFAULT.load(Ordering::Relaxed) {
                2 => Mode::On,
                1 => Mode::Cached,
                _ => Mode::Off,
            }),
            Some("on" | "1") => Ok(Mode::On),
            Some("off" | "0") => Ok(Mode::Off),
            Some("fresh") => Ok(Mode::Fresh),
            Some(other) => Err(Error::InvalidArgument {
                name: AUTOTUNE_ENV.into(),
                detail: format!("{other:?}: expected on, off or fresh"),
            }),
        }
    }
}

/// Where the choice came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// `POCKETTUNE_MATMUL` forced it.
    Forced,
    /// The autotune is off (or a planning step): the device's default.
    Default,
    /// Nothing cached for this device and measuring not asked for: the device's default.
    NotTuned,
    /// Read from the cache file.
    Cached(PathBuf),
    /// Measured now ([`measure`]); written to the cache file when there is one.
    Measured { timings: Timings, cache: Option<PathBuf> },
}

/// Environment variable: the directory of the cache file (before the XDG default).
pub const CACHE_DIR_ENV: &str = "POCKETTUNE_CACHE_DIR";

/// The cache file: in `$POCKETTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/pockettune`, else
/// `$HOME/.cache/pockettune`; None if none of them is set.
pub fn default_cache_path() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = match (var(CACHE_DIR_ENV), var("XDG_CACHE_HOME"), var("HOME")) {
        (Some(dir), _, _) => dir,
        (None, Some(xdg), _) => xdg.join("pockettune"),
        (None, None, Some(home)) => home.join(".cache").join("pockettune"),
        (None, None, None) => return None,
    };
    Some(dir.join("matmul.json"))
}

/// The cache key of this device: adapter, backend, driver and its version, limits profile,
/// pockettune version and the way the autotune measures (`TUNE_VERSION`; a new driver or a
/// new build may change which kernel wins).
pub fn cache_key(gpu: &Gpu) -> String {
    let s = gpu.summary();
    format!(
        "{} | {} | {} {} | {} limits | pockettune {} | tune {TUNE_VERSION}",
        s.name,
        s.backend,
        s.driver,
        s.driver_info,
        gpu.profile(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Raised when the autotune's products or rules change, so that choices made the old way are
/// measured again. 2: slow devices decide on step-sized products ([`STEP`]).
const TUNE_VERSION: u32 = 2;

/// One cached choice.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub kernel: String,
    /// milliseconds per round of the tuning products, by kernel name
    pub ms: BTreeMap<String, f64>,
}

/// The cache file: one entry per device key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Cache {
    pub entries: BTreeMap<String, Entry>,
}

impl Cache {
    /// Read `path`; a missing file is an empty cache, and so (with a warning on stderr) is a
    /// file that cannot be read or parsed: the cache only saves time, it must not stop a run.
    pub fn load(path: &Path) -> Cache {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Cache::default(),
            Err(e) => {
                eprintln!("warning: ignoring the matmul autotune cache {}: {e}", path.display());
                return Cache::default();
            }
        };
        serde_json::from_str(&text).unwrap_or_else(|e| {
            eprintln!(
                "warning: ignoring the matmul autotune cache {} ({e}); it will be written anew",
                path.display()
            );
            Cache::default()
        })
    }

    /// Write to `path` (directories created; written to a temporary file and renamed, so a
    /// reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| Error::Io { path: path.to_path_buf(), cause: e };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let text = serde_json::to_string_pretty(self).expect("a cache serializes");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// The products timed: forward `X W`, `dX = dY W^T` and `dW = X^T dY` of one layer, as (M, N,
/// K, A transposed, B transposed).
fn products((rows, inputs, outputs): Layer) -> [(usize, usize, usize, bool, bool); 3] {
    [
        (rows, outputs, inputs, false, false),
        (rows, inputs, outputs, false, true),
        (inputs, outputs, rows, true, false),
    ]
}

/// A layer's products: (rows, input width, output width).
type Layer = (usize, usize, usize);

/// The small set (64 rows of a 384-wide layer, 57 MFLOP a round) is cheap on any device; a
/// device that runs it in under [`FAST_ROUND_MS`] times every kernel on the large set (512
/// rows, 1536 wide), where tile shapes that only pay off on large products show it. A slower
/// device (lavapipe) times every kernel on the small set and then its [`FINALISTS`] fastest on
/// the step-sized set (GPT-2's MLP up-projection, 768 -> 3072, at 512 rows: batch 4 x 128),
/// which decides: on the small set alone lavapipe chose `subgroup`, whose GPT-2 LoRA step
/// measured 18.8-19.3 s against `subgroup-uniform`'s 15.5-16.8 (its packing only pays on
/// products of that size; on a square 768-wide layer the two were within the noise), and
/// timing every kernel at that size would take many seconds.
const SMALL: Layer = (64, 384, 384);
const LARGE: Layer = (512, 1536, 1536);
const STEP: Layer = (512, 768, 3072);
const FAST_ROUND_MS: f64 = 1.0;
const FINALISTS: usize = 2;

type Operands = Vec<(Tensor, Tensor, Tensor, bool, bool)>;

fn operands(gpu: &Gpu, layer: Layer) -> Result<Operands> {
    let mut ops = Vec::new();
    for (i, (m, n, k, ta, tb)) in products(layer).into_iter().enumerate() {
        let a: Vec<f32> = (0..m * k).map(|j| ((j * 7 + i) % 13) as f32 / 13.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|j| ((j * 5 + i) % 11) as f32 / 11.0 - 0.5).collect();
        let sa = if ta { [k, m] } else { [m, k] };
        let sb = if tb { [n, k] } else { [k, n] };
        ops.push((
            Tensor::from_host(gpu, &a, &sa, "autotune A")?,
            Tensor::from_host(gpu, &b, &sb, "autotune B")?,
            Tensor::empty(gpu, &[m, n], "autotune C")?,
            ta,
            tb,
        ));
    }
    Ok(ops)
}

fn round(gpu: &Gpu, ops: &Operands) -> Result<()> {
    for (a, b, c, ta, tb) in ops {
        matmul::matmul(gpu, c, a, b, None, *ta, *tb, false)?;
    }
    Ok(())
}

/// Milliseconds per round of `ops` with the current kernel: the best of `runs`, each of as
/// many rounds as make it long enough to time on a fast GPU.
fn time_rounds(gpu: &Gpu, ops: &Operands, runs: usize) -> Result<f64> {
    let mut reps = 1;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let start = Instant::now();
        for _ in 0..reps {
            round(gpu, ops)?;
        }
        gpu.sync()?;
        let secs = start.elapsed().as_secs_f64();
        best = best.min(secs * 1e3 / reps as f64);
        if secs < 2e-3 && reps < 64 {
            reps *= 8;
        }
    }
    Ok(best)
}

/// The autotune's measurements: milliseconds per round of the tuning products for each kernel
/// (best of two runs), and on a slow device the finalists' on the step-sized set (best of
/// two), empty on a fast one.
#[derive(Clone, Debug, PartialEq)]
pub struct Timings {
    pub all: Vec<(MatmulKernel, f64)>,
    pub finals: Vec<(MatmulKernel, f64)>,
}

impl Timings {
    /// The winner: the fastest finalist, else the fastest of all.
    pub fn best(&self) -> MatmulKernel {
        let set = if self.finals.is_empty() { &self.all } else { &self.finals };
        set.iter().min_by(|x, y| x.1.total_cmp(&y.1)).expect("at least one kernel").0
    }
}

/// Time `kernels` on the tuning products (see `SMALL` for which sets and when).
pub fn measure(gpu: &Gpu, kernels: &[MatmulKernel]) -> Result<Timings> {
    // Pipelines are compiled on a tiny round first, so that compiling is not timed.
    let tiny = operands(gpu, (4, 4, 4))?;
    for &kernel in kernels {
        matmul::with_kernel(kernel, || round(gpu, &tiny))?;
    }
    gpu.sync()?;
    let small = operands(gpu, SMALL)?;
    let probe = time_rounds(gpu, &small, 1)?;
    let fast = probe < FAST_ROUND_MS;
    let ops = if fast { operands(gpu, LARGE)? } else { small };
    let mut all = Vec::new();
    for &kernel in kernels {
        let ms = matmul::with_kernel(kernel, || time_rounds(gpu, &ops, 2))?;
        all.push((kernel, ms));
    }
    let mut finals = Vec::new();
    if !fast && kernels.len() > 1 {
        let mut ranked = all.clone();
        ranked.sort_by(|x, y| x.1.total_cmp(&y.1));
        let step = operands(gpu, STEP)?;
        for &(kernel, _) in ranked.iter().take(FINALISTS) {
            let ms = matmul::with_kernel(kernel, || time_rounds(gpu, &step, 2))?;
            finals.push((kernel, ms));
        }
    }
    Ok(Timings { all, finals })
}

/// Pick the kernel for `gpu` as `mode` says, with the cache at `cache` (None: no cache), and
/// switch the device to it.
pub fn tune(gpu: &Gpu, mode: Mode, cache: Option<&Path>) -> Result<(MatmulKernel, Source)> {
    if gpu.matmul_forced() {
        return Ok((gpu.matmul_kernel(), Source::Forced));
    }
    if mode == Mode::Off || gpu.planning() || gpu.matmul_kernels().len() < 2 {
        return Ok((gpu.matmul_kernel(), Source::Default));
    }
    let key = cache_key(gpu);
    let mut stored = cache.map(Cache::load).unwrap_or_default();
    if matches!(mode, Mode::On | Mode::Cached) {
        let usable = stored
            .entries
            .get(&key)
            .and_then(|e| MatmulKernel::parse(&e.kernel).ok())
            .filter(|k| gpu.set_matmul_kernel(*k).is_ok());
        if let (Some(kernel), Some(path)) = (usable, cache) {
            return Ok((kernel, Source::Cached(path.to_path_buf())));
        }
    }
    if mode == Mode::Cached {
        return Ok((gpu.matmul_kernel(), Source::NotTuned));
    }
    let timings = measure(gpu, gpu.matmul_kernels())?;
    let best = timings.best();
    gpu.set_matmul_kernel(best)?;
    let entry =
        Entry { kernel: best.name(), ms: timings.all.iter().map(|(k, ms)| (k.name(), *ms)).collect() };
    stored.entries.insert(key, entry);
    let written = match cache {
        Some(path) => match stored.save(path) {
            Ok(()) => Some(path.to_path_buf()),
            Err(e) => {
                eprintln!("warning: could not write the matmul autotune cache: {e}");
                None
            }
        },
        None => None,
    };
    Ok((best, Source::Measured { timings, cache: written }))
}

/// [`tune`] with the mode from the environment and the default cache, printing the choice once
/// on stderr (which kernel, and whether forced, cached or measured).
pub fn tune_and_report(gpu: &Gpu) -> Result<MatmulKernel> {
    let mode = Mode::from_env()?;
    let path = default_cache_path();
    let (kernel, source) = tune(gpu, mode, path.as_deref())?;
    eprintln!("matmul kernel: {} ({})", kernel.name(), describe(&source));
    Ok(kernel)
}

/// A few words on where a choice came from.
pub fn describe(source: &Source) -> String {
    match source {
        Source::Forced => format!("forced by {}", crate::gpu::MATMUL_ENV),
        Source::Default => format!("device default; autotune off ({AUTOTUNE_ENV})"),
        Source::NotTuned => "device default; not autotuned on this device yet (train and bench do)".into(),
        Source::Cached(path) => format!("autotuned earlier, cached in {}", path.display()),
        Source::Measured { timings: Timings { all, finals }, cache } => {
            let list = |t: &[(MatmulKernel, f64)]| {
                t.iter().map(|(k, ms)| format!("{} {ms:.1} ms", k.name())).collect::<Vec<_>>().join(", ")
            };
            let saved = cache.as_ref().map_or(String::new(), |p| format!("; cached in {}", p.display()));
            if finals.is_empty() {
                format!("autotuned now: {}{saved}", list(all))
            } else {
                let (m, i, o) = STEP;
                format!(
                    "autotuned now: {}; the fastest {} on a {i} -> {o} layer at {m} rows: {}{saved}",
                    list(all),
                    finals.len(),
                    list(finals)
                )
            }
        }
    }
}
