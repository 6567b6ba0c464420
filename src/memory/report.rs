//! What a run held: peak resident memory split into anonymous and file-backed pages, and the
//! GPU buffer pool's bytes held, live and live by category. Printed at the end of `train` and by
//! `bench step`, and carried in their `--json` output as `memory`.
//!
//! The kernel keeps the peak of the total resident set only (`VmHWM` in /proc/self/status; see
//! proc(5)); `RssAnon` (heap, and on lavapipe the "GPU" buffers), `RssFile` (memory-mapped
//! checkpoints, the binary) and `RssShmem` are current values. [`RssSampler`] polls them from a
//! background thread while a run goes on and keeps the largest value of each it saw, so those
//! peaks are lower bounds (a spike shorter than the period can fall between two samples);
//! `VmHWM` is exact. On systems without /proc every RSS figure is `None`.

use crate::gpu::{Category, Gpu};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often [`RssSampler`] reads /proc/self/status.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(15);

/// The memory fields of one read of /proc/self/status, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStatus {
    /// `VmRSS`: the resident set now (anon + file + shmem)
    pub rss: Option<u64>,
    /// `VmHWM`: the peak of `VmRSS` over the process's life
    pub hwm: Option<u64>,
    pub anon: Option<u64>,
    pub file: Option<u64>,
    pub shmem: Option<u64>,
}

impl ProcStatus {
    /// Parse the text of /proc/PID/status (lines such as `RssAnon:\t  123456 kB`).
    pub fn parse(text: &str) -> ProcStatus {
        let field = |key: &str| {
            text.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                let mut words = rest.split_whitespace();
                let n: u64 = words.next()?.parse().ok()?;
                // proc(5) writes these in kB (KiB); anything else would be a format we do not know
                (words.next() == Some("kB")).then_some(n * 1024)
            })
        };
        ProcStatus {
            rss: field("VmRSS"),
            hwm: field("VmHWM"),
            anon: field("RssAnon"),
            file: field("RssFile"),
            shmem: field("RssShmem"),
        }
    }

    /// This process's status now (`None` without /proc).
    pub fn read() -> Option<ProcStatus> {
        std::fs::read_to_string("/proc/self/status").ok().map(|t| ProcStatus::parse(&t))
    }
}

/// The largest values seen of each resident-set figure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssPeaks {
    pub anon: Option<u64>,
    pub file: Option<u64>,
    pub shmem: Option<u64>,
    /// the largest `VmRSS` sampled (the exact peak is `VmHWM`)
    pub rss: Option<u64>,
    pub samples: u64,
}

impl RssPeaks {
    fn add(&mut self, s: &ProcStatus) {
        let max = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.anon = max(self.anon, s.anon);
        self.file = max(self.file, s.file);
        self.shmem = max(self.shmem, s.shmem);
        self.rss = max(self.rss, s.rss);
        self.samples += 1;
    }
}

/// Polls /proc/self/status every [`SAMPLE_PERIOD`] on a background thread from
/// [`RssSampler::start`] until it is dropped or [`RssSampler::finish`]ed, keeping the peaks.
pub struct RssSampler {
    peaks: Arc<parking_lot::Mutex<RssPeaks>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start() -> RssSampler {
        Self::with_period(SAMPLE_PERIOD)
    }

    pub fn with_period(period: Duration) -> RssSampler {
        let peaks: Arc<parking_lot::Mutex<RssPeaks>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let first = ProcStatus::read();
        if let Some(s) = &first {
            peaks.lock().add(s);
        }
        // Without /proc there is nothing to poll.
        let thread = first.map(|_| {
            let (peaks, stop) = (peaks.clone(), stop.clone());
            std::thread::Builder::new()
                .name("rss sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(period);
                        match ProcStatus::read() {
                            Some(s) => peaks.lock().add(&s),
                            None => break,
                        }
                    }
                })
                .ok()
        });
        RssSampler { peaks, stop, thread: thread.flatten() }
    }

    /// The peaks so far, with one more sample taken now.
    pub fn peaks(&self) -> RssPeaks {
        if let Some(s) = ProcStatus::read() {
            self.peaks.lock().add(&s);
        }
        *self.peaks.lock()
    }

    /// Stop polling and return the peaks (one last sample included).
    pub fn finish(mut self) -> RssPeaks {
        self.halt();
        self.peaks()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Bytes per category of GPU buffer (see [`Category`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CategoryBytes {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer_state: u64,
    pub activations: u64,
    pub logits_and_loss: u64,
    pub staging: u64,
    pub other: u64,
}

impl CategoryBytes {
    pub fn get(&self, c: Category) -> u64 {
        match c {
            Category::Weights => self.weights,
            Category::Gradients => self.gradients,
            Category::OptimizerState => self.optimizer_state,
            Category::Activations => self.activations,
            Category::LogitsLoss => self.logits_and_loss,
            Category::Staging => self.staging,
            Category::Other => self.other,
        }
    }

    fn slot(&mut self, c: Category) -> &mut u64 {
        match c {
            Category::Weights => &mut self.weights,
            Category::Gradients => &mut self.gradients,
            Category::OptimizerState => &mut self.optimizer_state,
            Category::Activations => &mut self.activations,
            Category::LogitsLoss => &mut self.logits_and_loss,
            Category::Staging => &mut self.staging,
            Category::Other => &mut self.other,
        }
    }
}

/// The GPU buffer pool's figures (bytes; buffers are counted at their 256-byte rounded size).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GpuMemory {
    /// held from the driver, in use or pooled for reuse, now and at the peak since the device
    /// opened
    pub held_bytes: u64,
    pub peak_held_bytes: u64,
    /// in use by a tensor, now and at the peak since the last `reset_live_peak`
    pub live_bytes: u64,
    pub peak_live_bytes: u64,
    /// live bytes per category now
    pub live_by_category: CategoryBytes,
    /// each category's own peak since the last `reset_live_peak` (they need not coincide, so
    /// they may add up to more than `peak_live_bytes`)
    pub peak_live_by_category: CategoryBytes,
    /// the device memory allocator's own figures: the pool's buffers plus wgpu's staging
    /// copies of uploads, and the blocks reserved for them (None where the backend has none)
    pub driver: Option<crate::gpu::DriverBytes>,
}

impl GpuMemory {
    pub fn of(gpu: &Gpu) -> GpuMemory {
        let (held_bytes, peak_held_bytes) = gpu.bytes_allocated();
        let (live_bytes, peak_live_bytes) = gpu.bytes_live();
        let mut m = GpuMemory {
            held_bytes,
            peak_held_bytes,
            live_bytes,
            peak_live_bytes,
            driver: gpu.driver_bytes(),
            ..Default::default()
        };
        for (c, now, peak) in gpu.bytes_by_category() {
            *m.live_by_category.slot(c) = now;
            *m.peak_live_by_category.slot(c) = peak;
        }
        m
    }
}

/// Peak resident memory and GPU bytes of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    /// `VmHWM`: the exact peak of the resident set over the process's life
    pub peak_rss_bytes: Option<u64>,
    /// the largest anonymous, file-backed and shared-memory resident sets sampled
    pub peak_rss_anon_bytes: Option<u64>,
    pub peak_rss_file_bytes: Option<u64>,
    pub peak_rss_shmem_bytes: Option<u64>,
    /// reads of /proc/self/status behind those peaks
    pub rss_samples: u64,
    /// `None` on the CPU path
    pub gpu: Option<GpuMemory>,
}

impl MemoryReport {
    /// The report now: the sampler's peaks and, on a GPU, the pool's figures.
    pub fn collect(rss: &RssSampler, gpu: Option<&Gpu>) -> MemoryReport {
        let peaks = rss.peaks();
        Self::from_parts(ProcStatus::read().and_then(|s| s.hwm), &peaks, gpu.map(GpuMemory::of))
    }

    /// [`Self::collect`] for a graph device (no GPU figures on the CPU path).
    pub fn for_device(rss: &RssSampler, dev: &crate::graph::Device) -> MemoryReport {
        match dev {
            crate::graph::Device::Gpu(g) => Self::collect(rss, Some(g)),
            crate::graph::Device::Cpu(_) => Self::collect(rss, None),
        }
    }

    pub fn from_parts(hwm: Option<u64>, peaks: &RssPeaks, gpu: Option<GpuMemory>) -> MemoryReport {
        MemoryReport {
            peak_rss_bytes: hwm,
            peak_rss_anon_bytes: peaks.anon,
            peak_rss_file_bytes: peaks.file,
            peak_rss_shmem_bytes: peaks.shmem,
            rss_samples: peaks.samples,
            gpu,
        }
    }
}

fn mib(x: u64) -> String {
    format!("{:.1}", x as f64 / (1u64 << 20) as f64)
}

fn opt_mib(x: Option<u64>) -> String {
    x.map_or_else(|| "-".into(), mib)
}

/// A compact table in MiB, for stderr.
impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "peak RSS {} MiB (sampled peaks: anon {}, file {}, shmem {}; {} samples)",
            opt_mib(self.peak_rss_bytes),
            opt_mib(self.peak_rss_anon_bytes),
            opt_mib(self.peak_rss_file_bytes),
            opt_mib(self.peak_rss_shmem_bytes),
            self.rss_samples
        )?;
        let Some(g) = &self.gpu else {
            return write!(f, "GPU: none (CPU path)");
        };
        writeln!(f, "{:<18} {:>12} {:>12}", "GPU MiB", "now", "peak")?;
        writeln!(f, "{:<18} {:>12} {:>12}", "held", mib(g.held_bytes), mib(g.peak_held_bytes))?;
        write!(f, "{:<18} {:>12} {:>12}", "live", mib(g.live_bytes), mib(g.peak_live_bytes))?;
        for c in Category::ALL {
            let (now, peak) = (g.live_by_category.get(c), g.peak_live_by_category.get(c));
            write!(f, "\n  {:<16} {:>12} {:>12}", c.name(), mib(now), mib(peak))?;
        }
        if let Some(d) = &g.driver {
            let (now, peak) = (mib(d.allocated), mib(d.peak_allocated));
            write!(f, "\n{:<18} {:>12} {:>12}", "driver allocated", now, peak)?;
            write!(f, "\n{:<18} {:>12} {:>12}", "driver reserved", mib(d.reserved), mib(d.peak_reserved))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tpockettune\nUmask:\t0022\nState:\tR (running)\n\
        VmPeak:\t 4194304 kB\nVmSize:\t 4000000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n\
        RssAnon:\t   80000 kB\nRssFile:\t   19000 kB\nRssShmem:\t    1000 kB\nVmData:\t  900000 kB\n\
        Threads:\t3\n";

    #[test]
    fn status_fields_parse_in_bytes() {
        let s = ProcStatus::parse(STATUS);
        assert_eq!(s.hwm, Some(123_456 * 1024));
        assert_eq!(s.rss, Some(100_000 * 1024));
        assert_eq!(s.anon, Some(80_000 * 1024));
        assert_eq!(s.file, Some(19_000 * 1024));
        assert_eq!(s.shmem, Some(1_000 * 1024));
    }

    #[test]
    fn missing_or_odd_fields_are_none() {
        // A kernel before 4.5 has no RssAnon/RssFile; a prefix of another key must not match.
        let s = ProcStatus::parse("VmHWM:\t 10 kB\nVmRSSx:\t 5 kB\nRssAnon:\t 7 MB\nRssFile:\tlots kB\n");
        assert_eq!(s, ProcStatus { hwm: Some(10 * 1024), ..Default::default() });
        assert_eq!(ProcStatus::parse(""), ProcStatus::default());
    }

    #[test]
    fn peaks_keep_the_largest_of_each_field() {
        let mut p = RssPeaks::default();
        p.add(&ProcStatus { anon: Some(5), file: Some(9), rss: Some(14), ..Default::default() });
        p.add(&ProcStatus { anon: Some(8), file: Some(2), rss: Some(10), shmem: Some(1), hwm: None });
        p.add(&ProcStatus::default());
        assert_eq!(p, RssPeaks { anon: Some(8), file: Some(9), shmem: Some(1), rss: Some(14), samples: 3 });
    }

    #[test]
    fn sampler_sees_this_process() {
        if ProcStatus::read().is_none() {
            return; // no /proc: nothing to sample (the parsing tests above still ran)
        }
        let rss = RssSampler::with_period(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        let peaks = rss.finish();
        assert!(peaks.samples >= 2, "{peaks:?}");
        assert!(peaks.anon.unwrap_or(0) > 0 && peaks.rss.unwrap_or(0) > 0, "{peaks:?}");
    }

    #[test]
    fn report_table_names_every_category() {
        let mut g = GpuMemory { held_bytes: 3 << 20, peak_held_bytes: 4 << 20, ..Default::default() };
        g.peak_live_by_category.logits_and_loss = 1 << 20;
        let r = MemoryReport::from_parts(Some(10 << 20), &RssPeaks::default(), Some(g));
        let text = r.to_string();
        for c in Category::ALL {
            assert!(text.contains(c.name()), "{text}");
        }
        assert!(text.contains("peak RSS 10.0 MiB"), "{text}");
        assert!(text.lines().any(|l| l.contains("logits and loss") && l.ends_with("1.0")), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["gpu"]["peak_live_by_category"]["logits_and_loss"], 1 << 20);
    }
}
