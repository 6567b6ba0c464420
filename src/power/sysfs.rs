//! The Linux and Android power-supply and thermal classes in sysfs, read as the kernel's ABI
//! (Documentation/ABI/testing/sysfs-class-power and sysfs-class-thermal) describes them.
//!
//! The battery is the supply under `/sys/class/power_supply/` whose `type` is `Battery`, whose
//! `scope` is not `Device` (a wireless mouse's battery) and whose `present` is not 0; the first
//! such in name order. From it:
//! - percent: `capacity`; where it is missing, `energy_now / energy_full`, `charge_now /
//!   charge_full` or Android's `charge_counter / charge_full`;
//! - charging: `status` `Charging` or `Full` is on power, `Discharging` is not; `Not charging`
//!   and `Unknown` (or no status) ask whether another supply (`Mains`, `USB`, `Wireless`, ...)
//!   is `online`: a charger that holds the battery without charging it is on power too;
//! - power_w: `power_now` (µW), else |`current_now` (µA) × `voltage_now` (µV)|;
//! - temp_c: the battery's `temp` (tenths of a degree). Without one, the hottest thermal zone
//!   (`/sys/class/thermal/thermal_zone*/temp`, millidegrees) that names the battery or the skin
//!   (`batt`, `skin`, `case`, `shell`, `quiet`); without those, the hottest zone of any other
//!   kind except zones that are disabled, that do not hold temperatures (Qualcomm's `ibat*`,
//!   `vbat*`, `vph*`, `bcl*`, `soc`, `socd` hold currents, voltages or charge) or that belong
//!   to radios (`wifi`, `wlan`, `modem`, `mdm`, `pa-therm`/`pa_therm`), which heat on their own.
//!   So on phones `--max-temp` is compared with the battery (Android stops charging above
//!   45 °C), while a laptop without a battery sensor compares it with its CPU package.
//!
//! Odd units. Some Android kernels write milli- where the ABI says micro-units, or whole
//! degrees where it says tenths; the value's size tells: a battery never runs below 0.1 V, so a
//! `voltage_now` under 100,000 is in mV; a `current_now` or `power_now` whose magnitude is
//! under 10,000 (10 mA, 10 mW: less than a phone draws while it computes) is taken as mA or mW;
//! a battery `temp` whose magnitude is under 100 is whole degrees (this reads a battery below
//! 10 °C as too hot, the safe side), over 1,000 millidegrees. A zone `temp` under 1,000 in
//! magnitude is whole degrees. `from` says `(read as mA)` and the like where a rule applied.
//!
//! Missing files leave their field unknown; an unreadable optional file (power, current,
//! voltage, temperature: Android's SELinux hides some) does too. An unreadable `capacity` or
//! `status`, or a value that is not a number, is an error naming the file.

use super::{PowerSource, Reading};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub(crate) const SUPPLY_DIR: &str = "sys/class/power_supply";
const THERMAL_DIR: &str = "sys/class/thermal";

pub struct SysfsSource {
    root: PathBuf,
    battery: PathBuf,
    /// Fields the first reading found: their loss later is a failure, not an unknown.
    had: Vec<&'static str>,
}

/// One sysfs attribute: absent, present but not readable, or its trimmed text.
enum Attr {
    Missing,
    Unreadable(String),
    Text(String),
}

fn attr(path: &Path) -> Attr {
    match std::fs::read_to_string(path) {
        Ok(s) => Attr::Text(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Attr::Missing,
        Err(e) => Attr::Unreadable(e.to_string()),
    }
}

/// The text of an attribute, `None` if missing or unreadable.
fn text(path: &Path) -> Option<String> {
    match attr(path) {
        Attr::Text(s) => Some(s),
        _ => None,
    }
}

/// An integer attribute; unknown if missing or unreadable, an error if not a number.
fn int(path: &Path) -> Result<Option<i64>> {
    match attr(path) {
        Attr::Text(s) => s.parse::<i64>().map(Some).map_err(|_| Error::PowerSource {
            path: path.to_path_buf(),
            detail: format!("{s:?} is not an integer (a garbled sysfs value)"),
        }),
        Attr::Missing | Attr::Unreadable(_) => Ok(None),
    }
}

/// An integer attribute that must be readable when it exists.
fn required_int(path: &Path) -> Result<Option<i64>> {
    if let Attr::Unreadable(e) = attr(path) {
        return Err(Error::PowerSource { path: path.to_path_buf(), detail: format!("cannot be read: {e}") });
    }
    int(path)
}

fn is_battery(dir: &Path) -> bool {
    text(&dir.join("type")).as_deref() == Some("Battery")
        && text(&dir.join("scope")).as_deref() != Some("Device")
        && text(&dir.join("present")).as_deref() != Some("0")
}

/// The entries of `dir` whose names start with `prefix`, in name order (empty if none).
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// A micro-unit value that may be written in milli-units (see the module's odd-units rules).
fn micro(raw: i64, milli_below: i64) -> (f64, bool) {
    if raw != 0 && raw.abs() < milli_below {
        (raw as f64 * 1e-3, true)
    } else {
        (raw as f64 * 1e-6, false)
    }
}

/// A battery `temp` in degrees: tenths by the ABI, whole degrees or millidegrees by size.
pub(crate) fn battery_temp(raw: i64) -> (f32, &'static str) {
    match raw.abs() {
        0..=99 => (raw as f32, " (read as whole degrees)"),
        100..=999 => (raw as f32 / 10.0, ""),
        _ => (raw as f32 / 1000.0, " (read as millidegrees)"),
    }
}

/// A thermal zone `temp` in degrees: millidegrees by the ABI, whole degrees when small.
pub(crate) fn zone_temp(raw: i64) -> f32 {
    if raw.abs() < 1000 {
        raw as f32
    } else {
        raw as f32 / 1000.0
    }
}

/// Zones that never say how hot the SoC or the battery is.
fn ignored_zone(kind: &str) -> bool {
    let k = kind.to_ascii_lowercase();
    ["ibat", "vbat", "vph", "bcl"].iter().any(|p| k.starts_with(p))
        || k == "soc"
        || k == "socd"
        || ["wifi", "wlan", "modem", "mdm", "pa-therm", "pa_therm"].iter().any(|p| k.contains(p))
}

fn body_zone(kind: &str) -> bool {
    let k = kind.to_ascii_lowercase();
    ["batt", "skin", "case", "shell", "quiet"].iter().any(|p| k.contains(p))
}

impl SysfsSource {
    /// The battery under `root` (`/` for the real sysfs), `Ok(None)` if there is none, an error
    /// if it cannot be read (read once here, so that bad files are found before training).
    pub fn open(root: &Path) -> Result<Option<SysfsSource>> {
        let Some(battery) = entries(&root.join(SUPPLY_DIR), "").into_iter().find(|d| is_battery(d)) else {
            return Ok(None);
        };
        let mut s = SysfsSource { root: root.to_path_buf(), battery, had: Vec::new() };
        let first = s.read_now()?;
        s.had = ["percent", "charging"].into_iter().filter(|f| first.origin(f).is_some()).collect();
        Ok(Some(s))
    }

    /// The battery supply's directory.
    pub fn battery(&self) -> &Path {
        &self.battery
    }

    fn read_now(&self) -> Result<Reading> {
        let b = &self.battery;
        let mut r = Reading::default();
        let name = |f: &str| b.join(f).display().to_string();

        if let Some(c) = required_int(&b.join("capacity"))? {
            if !(0..=100).contains(&c) {
                return Err(Error::PowerSource {
                    path: b.join("capacity"),
                    detail: format!("{c} is not a percent (0..=100)"),
                });
            }
            r.percent = Some(c as f32);
            r.note("percent", name("capacity"));
        } else {
            for (now, full) in [
                ("energy_now", "energy_full"),
                ("charge_now", "charge_full"),
                ("charge_counter", "charge_full"),
            ] {
                if let (Some(n), Some(f)) = (int(&b.join(now))?, int(&b.join(full))?) {
                    if f > 0 {
                        r.percent = Some((100.0 * n as f64 / f as f64).clamp(0.0, 100.0) as f32);
                        r.note("percent", format!("{} / {}", name(now), name(full)));
                        break;
                    }
                }
            }
        }

        let status = match attr(&b.join("status")) {
            Attr::Text(s) => Some(s),
            Attr::Missing => None,
            Attr::Unreadable(e) => {
                return Err(Error::PowerSource {
                    path: b.join("status"),
                    detail: format!("cannot be read: {e}"),
                })
            }
        };
        match status.as_deref() {
            Some("Charging") | Some("Full") => {
                r.charging = Some(true);
                r.note("charging", format!("{} ({})", name("status"), status.as_deref().unwrap_or("")));
            }
            Some("Discharging") => {
                r.charging = Some(false);
                r.note("charging", format!("{} (Discharging)", name("status")));
            }
            other => {
                let (online, from) = self.charger_online();
                if let Some(on) = online {
                    r.charging = Some(on);
                    let st = other.map(|s| format!("{} ({s}) and ", name("status"))).unwrap_or_default();
                    r.note("charging", format!("{st}{from}"));
                }
            }
        }

        if let Some(p) = int(&b.join("power_now"))? {
            let (w, milli) = micro(p, 10_000);
            r.power_w = Some(w.abs() as f32);
            r.note("power_w", format!("{}{}", name("power_now"), if milli { " (read as mW)" } else { "" }));
        } else if let (Some(i), Some(v)) = (int(&b.join("current_now"))?, int(&b.join("voltage_now"))?) {
            let (amps, ma) = micro(i, 10_000);
            let (volts, mv) = micro(v, 100_000);
            r.power_w = Some((amps * volts).abs() as f32);
            let notes = match (ma, mv) {
                (true, true) => " (read as mA and mV)",
                (true, false) => " (read as mA)",
                (false, true) => " (read as mV)",
                (false, false) => "",
            };
            r.note("power_w", format!("{} x {}{notes}", name("current_now"), name("voltage_now")));
        }

        if let Some(t) = int(&b.join("temp"))? {
            let (c, how) = battery_temp(t);
            r.temp_c = Some(c);
            r.note("temp_c", format!("{}{how}", name("temp")));
        } else if let Some((c, path)) = self.hottest_zone() {
            r.temp_c = Some(c);
            r.note("temp_c", path.display().to_string());
        }
        Ok(r)
    }

    /// Whether any other supply (a charger) is online, and which were asked.
    fn charger_online(&self) -> (Option<bool>, String) {
        let mut any = None;
        let mut asked = Vec::new();
        for dir in entries(&self.root.join(SUPPLY_DIR), "") {
            if dir == self.battery
                || matches!(text(&dir.join("type")).as_deref(), Some("Battery") | Some("BMS"))
            {
                continue;
            }
            let Some(online) = text(&dir.join("online")) else { continue };
            let on = online.parse::<i64>().is_ok_and(|v| v > 0);
            asked.push(dir.join("online").display().to_string());
            any = Some(any.unwrap_or(false) || on);
        }
        (any, asked.join(", "))
    }

    /// The hottest relevant thermal zone (see the module's rules) and its `temp` file.
    fn hottest_zone(&self) -> Option<(f32, PathBuf)> {
        let mut body: Option<(f32, PathBuf)> = None;
        let mut other: Option<(f32, PathBuf)> = None;
        for zone in entries(&self.root.join(THERMAL_DIR), "thermal_zone") {
            let kind = text(&zone.join("type")).unwrap_or_default();
            if ignored_zone(&kind) || text(&zone.join("mode")).as_deref() == Some("disabled") {
                continue;
            }
            // a zone that is unreadable or garbled is skipped: one odd sensor must not block training
            let Some(raw) = text(&zone.join("temp")).and_then(|s| s.parse::<i64>().ok()) else { continue };
            let c = zone_temp(raw);
            if !(-40.0..=150.0).contains(&c) {
                continue; // a sensor that is off reads 0 K or a sentinel
            }
            let slot = if body_zone(&kind) { &mut body } else { &mut other };
            if slot.as_ref().is_none_or(|(best, _)| c > *best) {
                *slot = Some((c, zone.join("temp")));
            }
        }
        body.or(other)
    }
}

impl PowerSource for SysfsSource {
    fn read(&mut self, _step: u64) -> Result<Reading> {
        let r = self.read_now()?;
        if let Some(lost) = self.had.iter().find(|f| r.origin(f).is_none()) {
            return Err(Error::PowerSource {
                path: self.battery.clone(),
                detail: format!("the battery's {lost} can no longer be read (files vanished?)"),
            });
        }
        Ok(r)
    }

    fn describe(&self) -> String {
        format!("sysfs {}", self.battery.display())
    }
}
