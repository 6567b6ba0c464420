//! The matmul autotune and its cache (`kernels::matmul_tune`): a choice is measured once, written,
//! read back for the same adapter and driver only, and a cache that is corrupt or names a kernel
//! the device cannot run is ignored, not fatal. Every cache here lives in a temporary directory;
//! the user's cache is never read or written.

mod common;

use pockettune::kernels::matmul_tune::{
    cache_key, tune, Cache, Entry, Mode, Source, Timings, AUTOTUNE_ENV, CACHE_DIR_ENV,
};
use pockettune::MatmulKernel;
use std::collections::BTreeMap;
use std::process::Command;

fn entry(kernel: &str) -> Entry {
    Entry { kernel: kernel.into(), ms: BTreeMap::new() }
}

/// One test, in order: the device's kernel is switched by each step.
#[test]
fn choice_is_measured_cached_and_keyed_by_device() {
    let Some(gpu) = common::gpu() else { return };
    let before = gpu.matmul_kernel();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("matmul.json");
    if gpu.matmul_forced() {
        let (kernel, source) = tune(gpu, Mode::On, Some(&path)).unwrap();
        assert_eq!((kernel, source), (before, Source::Forced));
        assert!(!path.exists(), "a forced kernel writes no cache");
        return;
    }

    // off, or cached-only with nothing cached (eval, generate): the default kernel, nothing
    // written
    let (kernel, source) = tune(gpu, Mode::Off, Some(&path)).unwrap();
    assert_eq!((kernel, source), (before, Source::Default));
    let (kernel, source) = tune(gpu, Mode::Cached, Some(&path)).unwrap();
    assert_eq!((kernel, source), (before, Source::NotTuned));
    assert!(!path.exists());

    // first use: every kernel timed, the fastest chosen and written under this device's key
    let (best, source) = tune(gpu, Mode::On, Some(&path)).unwrap();
    let Source::Measured { timings: Timings { all: timings, finals }, cache } = source else {
        panic!("expected a measurement, got {source:?}")
    };
    assert_eq!(cache.as_deref(), Some(path.as_path()));
    let timed: Vec<MatmulKernel> = timings.iter().map(|t| t.0).collect();
    assert_eq!(timed, gpu.matmul_kernels(), "every offered kernel is timed");
    assert!(timings.iter().all(|t| t.1.is_finite() && t.1 > 0.0), "{timings:?}");
    // a slow device (lavapipe) decides between the fastest two on step-sized products
    assert!(finals.len() <= 2, "{finals:?}");
    assert!(finals.iter().all(|f| f.1.is_finite() && f.1 > 0.0), "{finals:?}");
    let mut ranked = timings.clone();
    ranked.sort_by(|x, y| x.1.total_cmp(&y.1));
    let finalists: Vec<MatmulKernel> = finals.iter().map(|f| f.0).collect();
    assert!(
        finalists.iter().all(|k| ranked[..finals.len()].iter().any(|r| r.0 == *k)),
        "{ranked:?} {finals:?}"
    );
    let decided_by = if finals.is_empty() { &timings } else { &finals };
    let fastest = decided_by.iter().min_by(|x, y| x.1.total_cmp(&y.1)).unwrap().0;
    assert_eq!(best, fastest);
    assert_eq!(gpu.matmul_kernel(), best);
    let written = Cache::load(&path);
    assert_eq!(written.entries.len(), 1);
    assert_eq!(written.entries[&cache_key(gpu)].kernel, best.name());
    assert_eq!(written.entries[&cache_key(gpu)].ms.len(), timings.len());

    // read back: a planted choice (the tiled kernel, whatever won) is used as it is
    let mut planted = Cache::default();
    planted.entries.insert(cache_key(gpu), entry("tiled"));
    planted
        .entries
        .insert(cache_key(gpu).replace("pockettune", "other build of pockettune"), entry("subgroup"));
    planted.save(&path).unwrap();
    let (kernel, source) = tune(gpu, Mode::On, Some(&path)).unwrap();
    assert_eq!((kernel, source), (MatmulKernel::Tiled, Source::Cached(path.clone())));
    assert_eq!(gpu.matmul_kernel(), MatmulKernel::Tiled);
    gpu.set_matmul_kernel(before).unwrap();
    let (kernel, source) = tune(gpu, Mode::Cached, Some(&path)).unwrap();
    assert_eq!((kernel, source), (MatmulKernel::Tiled, Source::Cached(path.clone())));

    // `fresh` measures again and replaces this device's entry, keeping the other's
    let (kernel, source) = tune(gpu, Mode::Fresh, Some(&path)).unwrap();
    assert!(matches!(source, Source::Measured { .. }), "{source:?}");
    let written = Cache::load(&path);
    assert_eq!(written.entries.len(), 2);
    assert_eq!(written.entries[&cache_key(gpu)].kernel, kernel.name());

    // another adapter's or driver's entry is not this device's
    let mut other = Cache::default();
    let key = cache_key(gpu);
    let summary = gpu.summary();
    other.entries.insert(key.replace(&summary.driver_info, "an older driver"), entry("tiled"));
    other.save(&path).unwrap();
    let (_, source) = tune(gpu, Mode::On, Some(&path)).unwrap();
    assert!(matches!(source, Source::Measured { .. }), "another driver's entry was used: {source:?}");

    // a corrupt file and a kernel this device cannot run are ignored and written anew
    for bad in ["{\"entries\": {\"half", "not json at all"] {
        std::fs::write(&path, bad).unwrap();
        assert!(Cache::load(&path).entries.is_empty());
        let (_, source) = tune(gpu, Mode::On, Some(&path)).unwrap();
        assert!(matches!(source, Source::Measured { .. }), "{source:?}");
        assert!(Cache::load(&path).entries.contains_key(&key), "the cache was not rewritten");
    }
    let mut unrunnable = Cache::default();
    // 256 x 256 blocks at a K step of 32: 64 KiB of workgroup memory, past every phone
    unrunnable.entries.insert(key.clone(), entry("staged-256x256x32-8x8"));
    unrunnable.save(&path).unwrap();
    let (kernel, source) = tune(gpu, Mode::On, Some(&path)).unwrap();
    assert!(matches!(source, Source::Measured { .. }), "{source:?}");
    assert!(gpu.matmul_kernels().contains(&kernel));

    gpu.set_matmul_kernel(before).unwrap();
}

/// The binary: `bench kernels` tunes at first use and says so, the second run reads the cache,
/// and a corrupt cache brings a warning, not a failure. The cache directory is a temporary
/// `XDG_CACHE_HOME`.
#[test]
fn bench_kernels_reports_measured_then_cached_choice() {
    if common::gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_pockettune"))
            .args(["bench", "kernels", "--layer", "attn.c_proj", "--rows", "8", "--budget-ms", "1"])
            .env(CACHE_DIR_ENV, dir.path())
            .env_remove(AUTOTUNE_ENV)
            .env_remove(pockettune::gpu::MATMUL_ENV)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "bench kernels failed:\n{stderr}");
        stderr
    };
    let cache = dir.path().join("matmul.json");
    let first = run();
    assert!(first.contains("matmul kernel: ") && first.contains("autotuned now"), "{first}");
    assert!(cache.exists(), "no cache written at {}", cache.display());
    let second = run();
    assert!(second.contains("autotuned earlier, cached in"), "{second}");
    std::fs::write(&cache, "{ truncated").unwrap();
    let third = run();
    assert!(third.contains("warning: ignoring the matmul autotune cache"), "{third}");
    assert!(third.contains("autotuned now"), "{third}");
}
