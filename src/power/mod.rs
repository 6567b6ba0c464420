//! Power: what the battery, the charger and the temperature say, and what training does about
//! it. A [`PowerSource`] (sysfs, a trace file, a simulated drain, or none) gives a [`Reading`];
//! a [`PowerMonitor`] holds the policies and acts at two points, as the design card's executor
//! "throttles dispatch by battery state":
//!
//! - between optimizer steps: [`PowerMonitor::before_step`] decides to run (at a duty cycle),
//!   pause (wait, polling the source, until charging) or stop; [`PowerMonitor::sleep_between_steps`]
//!   settles the step's duty cycle;
//! - inside a step: [`Throttle`], installed with `Gpu::set_submit_gate`, sleeps before each
//!   submission so that one long step on a slow phone GPU is slowed too.
//!
//! The policies come from MobileFineTuner (arXiv 2512.08211), whose scheduler sleeps when the
//! battery falls below a threshold (60 % by default): `--power-threshold` with `--throttle-duty`;
//! we add a thermal limit (`--max-temp`), a critical level (`--power-critical` with
//! `--on-critical pause|stop`) and charging-only training (`--train-when charging`).
//!
//! A duty cycle d means busy / (busy + sleep) = d: every second of work is followed by
//! (1 - d) / d seconds of sleep, so the GPU (and the battery) does the same work at d times the
//! power, and the phone has time to shed heat.

mod policy;
mod simulate;
mod sysfs;
mod throttle;
mod trace;

pub use policy::{Decision, PowerMonitor, PowerTotals, StepPower, THERMAL_HYSTERESIS_C};
pub use simulate::{SimParams, SimulatedSource};
pub use sysfs::SysfsSource;
pub use throttle::{Clock, FakeClock, SystemClock, Throttle};
pub use trace::{parse as parse_trace, TraceRow, TraceSource};

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a source reads at one moment. `None` where the source does not know; `from` names, for
/// each field it filled, the file (or other origin) the value came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Reading {
    /// Battery charge, 0..=100.
    pub percent: Option<f32>,
    /// On external power with the battery not draining (charging, full, or held by the charger).
    pub charging: Option<bool>,
    /// Degrees Celsius (see [`SysfsSource`] for which sensor).
    pub temp_c: Option<f32>,
    /// Watts flowing out of (or into) the battery.
    pub power_w: Option<f32>,
    /// (field, origin) for each field filled, e.g. ("percent", "/sys/class/power_supply/BAT0/capacity").
    #[serde(serialize_with = "origins_as_map")]
    pub from: Vec<(String, String)>,
}

fn origins_as_map<S: serde::Serializer>(from: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(from.len()))?;
    for (field, origin) in from {
        map.serialize_entry(field, origin)?;
    }
    map.end()
}

impl Reading {
    /// Where `field` came from, if it was filled.
    pub fn origin(&self, field: &str) -> Option<&str> {
        self.from.iter().find(|(f, _)| f == field).map(|(_, o)| o.as_str())
    }

    pub(crate) fn note(&mut self, field: &str, origin: impl Into<String>) {
        self.from.push((field.to_string(), origin.into()));
    }
}

/// Something that reads the battery, the charger and the temperature.
pub trait PowerSource: Send {
    /// The state when optimizer step `step` (1-based, the number its metrics line carries) is
    /// about to run or has just run. An error mid-run makes the monitor fall back to no source.
    fn read(&mut self, step: u64) -> Result<Reading>;
    /// `tokens` were trained on in `seconds` of work (the simulated source drains and heats).
    fn note_work(&mut self, _tokens: u64, _seconds: f64) {}
    /// `seconds` passed without GPU work (a throttle sleep or a pause; the simulation cools).
    fn note_idle(&mut self, _seconds: f64) {}
    /// A pause waited `seconds` and is about to read again (the simulation cools and may plug
    /// the charger in; a trace moves to the next row of the same step). Not also `note_idle`.
    fn note_poll(&mut self, _seconds: f64) {}
    /// One line for messages, e.g. `sysfs /sys/class/power_supply/BAT0`.
    fn describe(&self) -> String;
}

/// `--power-source none`, and what a failed source falls back to: knows nothing, so no policy
/// acts. The text says why there is none, if there is more to say.
#[derive(Default)]
pub struct NoSource(pub String);

impl PowerSource for NoSource {
    fn read(&mut self, _step: u64) -> Result<Reading> {
        Ok(Reading::default())
    }
    fn describe(&self) -> String {
        if self.0.is_empty() {
            "none".into()
        } else {
            format!("none ({})", self.0)
        }
    }
}

/// A parsed `--power-source` value.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    /// sysfs where a battery supply exists, else none.
    Auto,
    /// `/sys` under this prefix (`/` for the real one).
    Sysfs(PathBuf),
    Trace(PathBuf),
    Simulate(SimParams),
    None,
}

impl SourceSpec {
    /// `auto`, `sysfs`, `sysfs:ROOT`, `trace:FILE`, `simulate`, `simulate:k=v,...` or `none`.
    pub fn parse(spec: &str) -> Result<SourceSpec> {
        let (kind, arg) = match spec.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (spec, None),
        };
        match (kind, arg) {
            ("auto", None) => Ok(SourceSpec::Auto),
            ("none", None) => Ok(SourceSpec::None),
            ("sysfs", None) => Ok(SourceSpec::Sysfs(PathBuf::from("/"))),
            ("sysfs", Some(root)) if !root.is_empty() => Ok(SourceSpec::Sysfs(PathBuf::from(root))),
            ("trace", Some(file)) if !file.is_empty() => Ok(SourceSpec::Trace(PathBuf::from(file))),
            ("simulate", None) => Ok(SourceSpec::Simulate(SimParams::default())),
            ("simulate", Some(params)) => Ok(SourceSpec::Simulate(SimParams::parse(params)?)),
            _ => Err(Error::InvalidArgument {
                name: "--power-source".into(),
                detail: format!(
                    "{spec:?} is not a power source; use auto, sysfs, sysfs:ROOT, trace:FILE, \
                     simulate, simulate:PARAMS (e.g. simulate:start=80,drain=2) or none"
                ),
            }),
        }
    }

    /// Open the source (a trace is read and checked whole here, before training starts).
    pub fn open(&self) -> Result<Box<dyn PowerSource>> {
        Ok(match self {
            SourceSpec::Auto => match SysfsSource::open(Path::new("/")) {
                Ok(Some(s)) => Box::new(s),
                Ok(None) => Box::new(NoSource("auto: no battery under /sys/class/power_supply".into())),
                Err(e) => return Err(auto_error(e)),
            },
            SourceSpec::Sysfs(root) => match SysfsSource::open(root)? {
                Some(s) => Box::new(s),
                None => {
                    return Err(Error::PowerSource {
                        path: root.join(sysfs::SUPPLY_DIR),
                        detail: "no battery supply (a directory whose `type` is Battery); \
                                 use --power-source none on a machine without a battery"
                            .into(),
                    })
                }
            },
            SourceSpec::Trace(file) => Box::new(TraceSource::open(file)?),
            SourceSpec::Simulate(params) => Box::new(SimulatedSource::new(params.clone())),
            SourceSpec::None => Box::new(NoSource::default()),
        })
    }
}

fn auto_error(e: Error) -> Error {
    match e {
        Error::PowerSource { path, detail } => Error::PowerSource {
            path,
            detail: format!(
                "{detail} (--power-source auto found a battery but cannot read it; \
                 pass --power-source none to train without the power policies)"
            ),
        },
        other => other,
    }
}

/// What a critical battery does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnCritical {
    /// Write a checkpoint and wait, polling the source, until charging or above the threshold.
    Pause,
    /// Write a checkpoint and exit with status 3 (continue later with --resume).
    Stop,
}

/// When training may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainWhen {
    /// On battery or on power (the other policies still apply).
    Always,
    /// Only while charging: a pause whenever the charger is unplugged.
    Charging,
}

/// The power flags of `train` (each also a key of `--config run.toml`).
#[derive(clap::Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PowerFlags {
    /// Where battery, charging and temperature come from: auto (sysfs where a battery exists,
    /// else none), sysfs[:ROOT] (/sys/class/power_supply and /sys/class/thermal under ROOT),
    /// trace:FILE (CSV `step,percent,charging,temp_c`), simulate[:PARAMS] (a drain model, e.g.
    /// simulate:start=80,drain=2,heat=0.5) or none.
    #[arg(long, default_value = "auto")]
    pub power_source: String,
    /// Below this battery percent, when not charging, work runs at --throttle-duty (the
    /// paper's scheduler; 0 turns it off).
    #[arg(long, default_value_t = 60.0)]
    pub power_threshold: f32,
    /// Fraction of the time spent working while throttled, in (0, 1]: 0.5 sleeps as long as
    /// it works.
    #[arg(long, default_value_t = 0.5)]
    pub throttle_duty: f32,
    /// Below this battery percent, when not charging, write a checkpoint and --on-critical.
    #[arg(long, default_value_t = 15.0)]
    pub power_critical: f32,
    /// What a critical battery does: pause (wait for the charger) or stop (exit with status 3).
    #[arg(long, value_enum, default_value_t = OnCritical::Pause)]
    pub on_critical: OnCritical,
    /// Above this temperature (degrees Celsius) work runs at --throttle-duty until it is back
    /// 2 degrees below. On phones it is the battery's temperature; where the battery has no
    /// sensor (laptops), the hottest CPU or board zone: raise it there (e.g. 85).
    #[arg(long, default_value_t = 45.0)]
    pub max_temp: f32,
    /// `charging` trains only on external power (a pause while unplugged).
    #[arg(long, value_enum, default_value_t = TrainWhen::Always)]
    pub train_when: TrainWhen,
    /// Seconds between readings of the source while paused.
    #[arg(long, default_value_t = 30.0)]
    pub power_poll: f64,
}

impl Default for PowerFlags {
    fn default() -> Self {
        PowerFlags {
            power_source: "auto".into(),
            power_threshold: 60.0,
            throttle_duty: 0.5,
            power_critical: 15.0,
            on_critical: OnCritical::Pause,
            max_temp: 45.0,
            train_when: TrainWhen::Always,
            power_poll: 30.0,
        }
    }
}

impl PowerFlags {
    /// Every value in range and the source spelled right (files are checked when opened).
    pub fn validate(&self) -> Result<SourceSpec> {
        let bad = |name: &str, detail: String| Err(Error::InvalidArgument { name: name.into(), detail });
        for (name, v) in
            [("--power-threshold", self.power_threshold), ("--power-critical", self.power_critical)]
        {
            if !(0.0..=100.0).contains(&v) {
                return bad(name, format!("{v} is not a battery percent; use a value in 0..=100"));
            }
        }
        if !(self.throttle_duty > 0.0 && self.throttle_duty <= 1.0) {
            return bad(
                "--throttle-duty",
                format!("{} is outside (0, 1]; 0.5 works half the time, 1 never sleeps", self.throttle_duty),
            );
        }
        if !self.max_temp.is_finite() {
            return bad("--max-temp", format!("{} is not a temperature", self.max_temp));
        }
        if !(self.power_poll.is_finite() && self.power_poll > 0.0) {
            return bad("--power-poll", format!("{} is not a positive number of seconds", self.power_poll));
        }
        SourceSpec::parse(&self.power_source)
    }
}
