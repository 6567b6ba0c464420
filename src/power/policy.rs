//! The power policies and their bookkeeping: [`PowerMonitor`] reads the source around each
//! optimizer step, decides whether and how fast the step runs, waits out pauses, and sums the
//! energy, battery and time the run cost.
//!
//! The rules, checked in this order before each step (`charging` unknown counts as not
//! charging; a percent or temperature unknown switches its rules off):
//! 1. `--train-when charging` and not charging: pause until charging.
//! 2. critical: percent < `--power-critical` and not charging: `--on-critical pause` (wait until
//!    charging or back at `--power-threshold`, or at `--power-critical` if that is higher, so a
//!    battery that recovers a point at rest does not restart a run that stops again at once) or
//!    `--on-critical stop`.
//! 3. threshold: percent < `--power-threshold` and not charging: run at `--throttle-duty`. At
//!    exactly the threshold the run is not throttled.
//! 4. thermal: temperature > `--max-temp`: run at `--throttle-duty` until it is back at
//!    `--max-temp` − [`THERMAL_HYSTERESIS_C`] or below (without that margin a sensor that reads
//!    in whole degrees would switch the throttle at every step).
//!
//! Otherwise the step runs at duty 1. A source that fails mid-run is logged once on stderr and
//! replaced by none: the policies stop acting and training goes on.

use super::throttle::{Clock, SystemClock, Throttle};
use super::{NoSource, OnCritical, PowerFlags, PowerSource, Reading, TrainWhen};
use crate::error::{Error, Result};
use crate::gpu::SubmitGate;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

/// Degrees below `--max-temp` the temperature must fall to end a thermal throttle.
pub const THERMAL_HYSTERESIS_C: f32 = 2.0;

/// What the next step does.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Decision {
    /// Run at this duty cycle (1: full speed); `reason` says why it is below 1.
    Run { duty: f32, reason: Option<String> },
    /// Write a checkpoint, then [`PowerMonitor::wait_while_paused`].
    Pause { reason: String },
    /// Write a checkpoint and exit (status 3; `Error::PowerStop`).
    Stop { reason: String },
}

/// The power columns of one step's metrics line.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepPower {
    pub battery_pct: Option<f32>,
    pub charging: Option<bool>,
    pub temp_c: Option<f32>,
    pub power_w: Option<f32>,
    /// power_w × the step's seconds (the mean of the readings before and after the step).
    pub energy_j: Option<f64>,
    /// Slept in and after the step to hold its duty cycle.
    pub throttle_ms: f64,
    /// The duty cycle the step ran at.
    pub duty: f32,
}

/// What the run cost, for the end of `train`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PowerTotals {
    pub source: String,
    /// Summed over the steps whose power was known.
    pub energy_j: Option<f64>,
    /// energy_j per 1,000 tokens of those steps.
    pub energy_j_per_1k_tokens: Option<f64>,
    pub battery_pct_start: Option<f32>,
    pub battery_pct_end: Option<f32>,
    /// The sum of the falls between successive readings (charging does not pay it back).
    pub battery_pct_used: Option<f32>,
    pub throttled_s: f64,
    pub paused_s: f64,
    pub steps_throttled: u64,
    pub pauses: u64,
    /// Why the source was dropped mid-run, if it was.
    pub fell_back: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pause {
    Charging,
    Critical,
}

pub struct PowerMonitor {
    flags: PowerFlags,
    source: Box<dyn PowerSource>,
    clock: Arc<dyn Clock>,
    throttle: Arc<Throttle>,
    /// The reading the current step was decided on.
    last: Reading,
    hot: bool,
    paused: Option<Pause>,
    mode: &'static str,
    /// Why the last `Run` was throttled: full, battery, heat or battery+heat.
    run_kind: &'static str,
    notice: Option<String>,
    duty: f32,
    /// Throttle time of the current step once settled.
    settled: Option<Duration>,
    totals: PowerTotals,
    prev_pct: Option<f32>,
    energy_tokens: u64,
}

impl PowerMonitor {
    /// Check the flags, open the source and read it once: every configuration mistake and an
    /// unreadable source is an error here, before training starts.
    pub fn new(flags: &PowerFlags) -> Result<PowerMonitor> {
        let source = flags.validate()?.open()?;
        PowerMonitor::with_source(source, flags, Arc::new(SystemClock::new()))
    }

    /// A monitor over a given source and clock (tests, simulations). The source is read once
    /// here, as at step 1.
    pub fn with_source(
        mut source: Box<dyn PowerSource>,
        flags: &PowerFlags,
        clock: Arc<dyn Clock>,
    ) -> Result<PowerMonitor> {
        flags.validate()?;
        let first = source.read(1)?;
        if flags.train_when == TrainWhen::Charging && first.charging.is_none() {
            return Err(Error::InvalidArgument {
                name: "--train-when charging".into(),
                detail: format!(
                    "the power source ({}) does not say whether the device is charging; \
                     pass --power-source with a battery (sysfs, trace:FILE, simulate)",
                    source.describe()
                ),
            });
        }
        let totals = PowerTotals { source: source.describe(), ..PowerTotals::default() };
        Ok(PowerMonitor {
            flags: flags.clone(),
            throttle: Arc::new(Throttle::new(clock.clone())),
            source,
            clock,
            last: first,
            hot: false,
            paused: None,
            mode: "full",
            run_kind: "full",
            notice: None,
            duty: 1.0,
            settled: None,
            totals,
            prev_pct: None,
            energy_tokens: 0,
        })
    }

    /// The source in words, e.g. `sysfs /sys/class/power_supply/battery` or `none`.
    pub fn source_name(&self) -> String {
        self.source.describe()
    }

    /// The submission hook to install with `Gpu::set_submit_gate` (free while not throttled).
    pub fn gate(&self) -> Arc<dyn SubmitGate> {
        self.throttle.clone()
    }

    /// The hook for the step just decided: `Some` only while it is throttled, so that an
    /// unthrottled step keeps the GPU's unbatched submissions. Per step:
    /// `gpu.set_submit_gate(power.gate_for_step())`.
    pub fn gate_for_step(&self) -> Option<Arc<dyn SubmitGate>> {
        (self.duty < 1.0).then(|| self.gate())
    }

    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// The latest reading.
    pub fn reading(&self) -> &Reading {
        &self.last
    }

    /// A line to print when the policy changed what it does (throttle on or off, pause, stop),
    /// once per change.
    pub fn take_notice(&mut self) -> Option<String> {
        self.notice.take()
    }

    /// Read the source; a failure drops it for good (logged once) and reads nothing.
    fn read(&mut self, step: u64) -> Reading {
        match self.source.read(step) {
            Ok(r) => {
                if let Some(p) = r.percent {
                    if let Some(prev) = self.prev_pct {
                        if p < prev {
                            *self.totals.battery_pct_used.get_or_insert(0.0) += prev - p;
                        }
                    }
                    self.totals.battery_pct_start.get_or_insert(p);
                    self.totals.battery_pct_used.get_or_insert(0.0);
                    self.totals.battery_pct_end = Some(p);
                    self.prev_pct = Some(p);
                }
                r
            }
            Err(e) => {
                eprintln!(
                    "power: {e}; the power source ({}) is dropped and training goes on without the \
                     power policies",
                    self.source.describe()
                );
                self.totals.fell_back = Some(e.to_string());
                self.source = Box::new(NoSource("dropped after an error".into()));
                Reading::default()
            }
        }
    }

    /// The rules of the module doc, applied to `r`.
    fn decide(&mut self, r: &Reading) -> Decision {
        let f = &self.flags;
        let charging = r.charging == Some(true);
        let pct = |p: f32| format!("battery {p} %");
        if f.train_when == TrainWhen::Charging && !charging {
            self.paused = Some(Pause::Charging);
            return Decision::Pause { reason: "not charging (--train-when charging)".into() };
        }
        if let (Some(p), false) = (r.percent, charging) {
            let back = f.power_threshold.max(f.power_critical);
            if p < f.power_critical || (self.paused == Some(Pause::Critical) && p < back) {
                let reason =
                    format!("{} below --power-critical {} and not charging", pct(p), f.power_critical);
                return match f.on_critical {
                    OnCritical::Pause => {
                        self.paused = Some(Pause::Critical);
                        Decision::Pause { reason }
                    }
                    OnCritical::Stop => {
                        self.paused = None;
                        Decision::Stop { reason }
                    }
                };
            }
        }
        self.paused = None;
        self.hot = match r.temp_c {
            Some(t) if t > f.max_temp => true,
            Some(t) if t <= f.max_temp - THERMAL_HYSTERESIS_C => false,
            Some(_) => self.hot,
            None => false,
        };
        let mut why = Vec::new();
        let low = matches!((r.percent, charging), (Some(p), false) if p < f.power_threshold);
        if let (Some(p), true) = (r.percent, low) {
            why.push(format!("{} below --power-threshold {} and not charging", pct(p), f.power_threshold));
        }
        self.run_kind = match (low, self.hot) {
            (true, true) => "battery+heat",
            (true, false) => "battery",
            (false, true) => "heat",
            (false, false) => "full",
        };
        if self.hot {
            let t = r.temp_c.unwrap_or(f32::NAN);
            why.push(format!(
                "{t} °C, above --max-temp {} (until {} °C)",
                f.max_temp,
                f.max_temp - THERMAL_HYSTERESIS_C
            ));
        }
        if why.is_empty() || f.throttle_duty >= 1.0 {
            Decision::Run { duty: 1.0, reason: None }
        } else {
            Decision::Run { duty: f.throttle_duty, reason: Some(why.join("; ")) }
        }
    }

    /// Note a decision: start the step's throttle, count pauses, and leave a notice on a change.
    fn apply(&mut self, d: &Decision) {
        let (mode, line) = match d {
            Decision::Run { duty, reason: None } => ("full", format!("power: full speed (duty {duty})")),
            Decision::Run { duty, reason: Some(r) } => {
                (self.run_kind, format!("power: throttled to duty {duty}: {r}"))
            }
            Decision::Pause { reason } => ("pause", format!("power: pausing: {reason}")),
            Decision::Stop { reason } => ("stop", format!("power: stopping: {reason}")),
        };
        if mode == "pause" && self.mode != "pause" {
            self.totals.pauses += 1;
        }
        if mode != self.mode {
            self.notice = Some(line);
            self.mode = mode;
        }
        if let Decision::Run { duty, .. } = d {
            self.duty = *duty;
            self.throttle.begin_step(*duty);
            self.settled = None;
        }
    }

    /// Decide step `step` (1-based, the number its metrics line will carry). On `Run` the
    /// throttle starts counting the step's busy time.
    pub fn before_step(&mut self, step: u64) -> Decision {
        let r = self.read(step);
        let d = self.decide(&r);
        self.last = r;
        self.apply(&d);
        d
    }

    /// After a `Pause` (and its checkpoint): sleep `--power-poll` seconds at a time, reading the
    /// source after each, until the step may run or must stop; `on_tick` sees each reading and
    /// the time waited so far. Returns that `Run` or `Stop` (never `Pause`).
    pub fn wait_while_paused(&mut self, step: u64, mut on_tick: impl FnMut(&Reading, Duration)) -> Decision {
        if self.paused.is_none() {
            return self.before_step(step);
        }
        let poll = Duration::from_secs_f64(self.flags.power_poll);
        let t0 = self.clock.now();
        loop {
            self.clock.sleep(poll);
            self.source.note_poll(poll.as_secs_f64());
            let r = self.read(step);
            let d = self.decide(&r);
            self.last = r;
            let waited = self.clock.now().saturating_sub(t0);
            if !matches!(d, Decision::Pause { .. }) {
                self.totals.paused_s += waited.as_secs_f64();
                self.apply(&d);
                return d;
            }
            on_tick(&self.last, waited);
        }
    }

    /// End of the step's work: sleep what its duty cycle still owes (the between-steps sleep)
    /// and return the step's whole throttle time. Call it before taking the step's time, so that
    /// ms_step and tokens/s include the throttle.
    pub fn sleep_between_steps(&mut self) -> Duration {
        let t = self.throttle.settle();
        self.settled = Some(t);
        t
    }

    /// The step's power columns, after it ran `seconds` (throttle included) on `tokens`.
    pub fn after_step(&mut self, step: u64, seconds: f64, tokens: u64) -> StepPower {
        let throttle = match self.settled.take() {
            Some(t) => t,
            None => self.throttle.settle(),
        };
        let throttle_s = throttle.as_secs_f64();
        self.source.note_work(tokens, (seconds - throttle_s).max(0.0));
        self.source.note_idle(throttle_s);
        let before = self.last.power_w;
        let r = self.read(step);
        let power_w = match (before, r.power_w) {
            (Some(a), Some(b)) => Some((a + b) / 2.0),
            (a, b) => a.or(b),
        };
        let energy_j = power_w.map(|w| w as f64 * seconds.max(0.0));
        if let Some(e) = energy_j {
            *self.totals.energy_j.get_or_insert(0.0) += e;
            self.energy_tokens += tokens;
            if self.energy_tokens > 0 {
                self.totals.energy_j_per_1k_tokens =
                    self.totals.energy_j.map(|e| e * 1000.0 / self.energy_tokens as f64);
            }
        }
        self.totals.throttled_s += throttle_s;
        if self.duty < 1.0 {
            self.totals.steps_throttled += 1;
        }
        let out = StepPower {
            battery_pct: r.percent,
            charging: r.charging,
            temp_c: r.temp_c,
            power_w,
            energy_j,
            throttle_ms: throttle.as_nanos() as f64 / 1e6,
            duty: self.duty,
        };
        self.last = r;
        out
    }

    /// What the run cost so far.
    pub fn totals(&self) -> PowerTotals {
        let mut t = self.totals.clone();
        t.source = match &t.fell_back {
            Some(_) => format!("{} (dropped mid-run)", t.source),
            None => t.source,
        };
        t
    }
}
