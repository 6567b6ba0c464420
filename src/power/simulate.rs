//! A simulated battery, so that a machine without one (a desktop, CI) shows the policies acting:
//! `--power-source simulate:start=80,drain=2,heat=0.5,...`.
//!
//! The model, advanced by what the training loop reports (work: tokens and seconds; idle:
//! throttle sleeps and pauses), never by the wall clock, so a run is as repeatable as its step
//! times:
//! - charge falls by `drain` percent per 1,000 tokens trained while on battery, and rises by
//!   `charge` percent per second (working or idle) while charging, within 0..=100;
//! - temperature follows Newton's law of cooling with a heat source while working:
//!   dT/dt = `heat` × working − `cool` × (T − `ambient`), solved exactly over each interval, so a
//!   run at full duty settles at `ambient + heat / cool` and one at duty d near
//!   `ambient + d × heat / cool` (with the defaults, 55 °C and, at d = 0.5, 40 °C: the thermal
//!   policy at 45 °C switches on and off);
//! - the simulated user plugs the charger in once the run has been paused `plug_after` seconds
//!   since the charger was last unplugged (`inf`: never), and unplugs it when the charge reaches
//!   `unplug` percent;
//! - power is `watts` while working and `idle_watts` while idle, averaged since the last reading.
//!
//! | parameter  | default | meaning                                              |
//! |------------|---------|------------------------------------------------------|
//! | start      | 80      | charge at the start, percent                         |
//! | drain      | 2       | percent per 1,000 tokens on battery                  |
//! | charging   | false   | the charger is plugged in at the start               |
//! | charge     | 1       | percent per second while charging                    |
//! | plug_after | 60      | seconds of pause after which the charger is plugged  |
//! | unplug     | 100     | percent at which the charger is unplugged            |
//! | temp       | ambient | temperature at the start, °C                         |
//! | ambient    | 25      | °C                                                   |
//! | heat       | 0.6     | °C per second of work                                |
//! | cool       | 0.02    | per second: the fraction of (T − ambient) shed       |
//! | watts      | 5       | power while working                                  |
//! | idle_watts | 0.5     | power while idle                                     |

use super::{PowerSource, Reading};
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SimParams {
    pub start: f64,
    pub drain: f64,
    pub charging: bool,
    pub charge: f64,
    pub plug_after: f64,
    pub unplug: f64,
    pub temp: Option<f64>,
    pub ambient: f64,
    pub heat: f64,
    pub cool: f64,
    pub watts: f64,
    pub idle_watts: f64,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            start: 80.0,
            drain: 2.0,
            charging: false,
            charge: 1.0,
            plug_after: 60.0,
            unplug: 100.0,
            temp: None,
            ambient: 25.0,
            heat: 0.6,
            cool: 0.02,
            watts: 5.0,
            idle_watts: 0.5,
        }
    }
}

impl SimParams {
    /// `key=value` pairs separated by commas (see the module's table).
    pub fn parse(s: &str) -> Result<SimParams> {
        let bad = |detail: String| Error::InvalidArgument { name: "--power-source simulate".into(), detail };
        let mut p = SimParams::default();
        for pair in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (key, value) =
                pair.split_once('=').ok_or_else(|| bad(format!("{pair:?} is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            if key == "charging" {
                p.charging = match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad(format!("charging={value:?}: use true or false"))),
                };
                continue;
            }
            let x: f64 = value.parse().map_err(|_| bad(format!("{key}={value:?} is not a number")))?;
            let ok = match key {
                "start" | "unplug" => (0.0..=100.0).contains(&x),
                "plug_after" => x >= 0.0, // inf: never
                "temp" | "ambient" => x.is_finite(),
                _ => x.is_finite() && x >= 0.0,
            };
            if !ok {
                return Err(bad(format!("{key}={value} is out of range")));
            }
            if key == "temp" {
                p.temp = Some(x);
                continue;
            }
            *match key {
                "start" => &mut p.start,
                "drain" => &mut p.drain,
                "charge" => &mut p.charge,
                "plug_after" => &mut p.plug_after,
                "unplug" => &mut p.unplug,
                "ambient" => &mut p.ambient,
                "heat" => &mut p.heat,
                "cool" => &mut p.cool,
                "watts" => &mut p.watts,
                "idle_watts" => &mut p.idle_watts,
                _ => {
                    return Err(bad(format!(
                        "unknown parameter {key:?}; known: start, drain, charging, charge, plug_after, \
                         unplug, temp, ambient, heat, cool, watts, idle_watts"
                    )))
                }
            } = x;
        }
        Ok(p)
    }
}

pub struct SimulatedSource {
    p: SimParams,
    percent: f64,
    charging: bool,
    temp: f64,
    paused_s: f64,
    /// Work and idle seconds since the last reading, for the average power.
    work_s: f64,
    idle_s: f64,
}

impl SimulatedSource {
    pub fn new(p: SimParams) -> SimulatedSource {
        let temp = p.temp.unwrap_or(p.ambient);
        SimulatedSource {
            percent: p.start,
            charging: p.charging,
            temp,
            paused_s: 0.0,
            work_s: 0.0,
            idle_s: 0.0,
            p,
        }
    }

    /// Advance the temperature over `s` seconds with heat input `q` (°C per second).
    fn heat_for(&mut self, s: f64, q: f64) {
        let (amb, k) = (self.p.ambient, self.p.cool);
        self.temp = if k > 0.0 {
            let settle = amb + q / k;
            settle + (self.temp - settle) * (-k * s).exp()
        } else {
            self.temp + q * s
        };
    }

    fn charge_for(&mut self, s: f64) {
        if self.charging {
            let next = self.percent + self.p.charge * s;
            if next >= self.p.unplug {
                // unplugged the moment it reaches `unplug`
                self.percent = self.percent.max(self.p.unplug).min(100.0);
                self.charging = false;
            } else {
                self.percent = next.min(100.0);
            }
        }
    }
}

impl PowerSource for SimulatedSource {
    fn read(&mut self, _step: u64) -> Result<Reading> {
        let mut r = Reading {
            percent: Some(self.percent as f32),
            charging: Some(self.charging),
            temp_c: Some(self.temp as f32),
            ..Reading::default()
        };
        let total = self.work_s + self.idle_s;
        let watts = if total > 0.0 {
            (self.p.watts * self.work_s + self.p.idle_watts * self.idle_s) / total
        } else {
            self.p.watts
        };
        r.power_w = Some(watts as f32);
        (self.work_s, self.idle_s) = (0.0, 0.0);
        for field in ["percent", "charging", "temp_c", "power_w"] {
            r.note(field, "simulated");
        }
        Ok(r)
    }

    fn note_work(&mut self, tokens: u64, seconds: f64) {
        let s = seconds.max(0.0);
        if !self.charging {
            self.percent = (self.percent - self.p.drain * tokens as f64 / 1000.0).max(0.0);
        }
        self.charge_for(s);
        self.heat_for(s, self.p.heat);
        self.work_s += s;
    }

    fn note_idle(&mut self, seconds: f64) {
        let s = seconds.max(0.0);
        self.charge_for(s);
        self.heat_for(s, 0.0);
        self.idle_s += s;
    }

    fn note_poll(&mut self, seconds: f64) {
        self.note_idle(seconds);
        if !self.charging {
            self.paused_s += seconds.max(0.0);
            if self.paused_s >= self.p.plug_after {
                self.charging = true;
                self.paused_s = 0.0;
            }
        }
    }

    fn describe(&self) -> String {
        let p = &self.p;
        format!(
            "simulate start={} drain={} charging={} charge={} plug_after={} unplug={} ambient={} heat={} cool={}",
            p.start, p.drain, p.charging, p.charge, p.plug_after, p.unplug, p.ambient, p.heat, p.cool
        )
    }
}
