//! The power module: sysfs trees written by hand (a Linux laptop, an Android phone, missing,
//! unreadable and garbled files, odd units), the trace parser and its errors, the simulated
//! drain, each policy at and around its thresholds, the throttle's sleep arithmetic on a driven
//! clock, and `pockettune power --json` on a fake tree. Expected values are worked out by hand
//! in the comments.

use pockettune::power::{
    Decision, FakeClock, OnCritical, PowerFlags, PowerMonitor, PowerSource, Reading, SimParams,
    SimulatedSource, SourceSpec, SysfsSource, Throttle, TraceSource, TrainWhen,
};
use pockettune::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Write `files` (path relative to `root`, content) as a sysfs tree.
fn tree(root: &Path, files: &[(&str, &str)]) {
    for (rel, content) in files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("{content}\n")).unwrap();
    }
}

const PS: &str = "sys/class/power_supply";

/// A ThinkPad-like laptop on battery: BAT0 with power_now, AC offline, ACPI and package zones
/// and a Wi-Fi zone that runs hottest.
fn laptop(root: &Path) {
    tree(
        root,
        &[
            ("sys/class/power_supply/AC/type", "Mains"),
            ("sys/class/power_supply/AC/online", "0"),
            ("sys/class/power_supply/BAT0/type", "Battery"),
            ("sys/class/power_supply/BAT0/present", "1"),
            ("sys/class/power_supply/BAT0/status", "Discharging"),
            ("sys/class/power_supply/BAT0/capacity", "81"),
            ("sys/class/power_supply/BAT0/power_now", "8420000"),
            ("sys/class/power_supply/BAT0/energy_now", "40500000"),
            ("sys/class/power_supply/BAT0/energy_full", "50000000"),
            ("sys/class/power_supply/BAT0/voltage_now", "11900000"),
            ("sys/class/thermal/thermal_zone0/type", "acpitz"),
            ("sys/class/thermal/thermal_zone0/temp", "45000"),
            ("sys/class/thermal/thermal_zone1/type", "x86_pkg_temp"),
            ("sys/class/thermal/thermal_zone1/temp", "62000"),
            ("sys/class/thermal/thermal_zone2/type", "iwlwifi_1"),
            ("sys/class/thermal/thermal_zone2/temp", "70000"),
        ],
    );
}

/// An Android phone: `battery` with current, voltage, temperature and Android's counters; `usb`
/// and `ac` chargers offline; CPU and battery thermal zones.
fn android(root: &Path) {
    tree(
        root,
        &[
            ("sys/class/power_supply/ac/type", "Mains"),
            ("sys/class/power_supply/ac/online", "0"),
            ("sys/class/power_supply/battery/type", "Battery"),
            ("sys/class/power_supply/battery/present", "1"),
            ("sys/class/power_supply/battery/status", "Discharging"),
            ("sys/class/power_supply/battery/capacity", "73"),
            ("sys/class/power_supply/battery/current_now", "-412000"),
            ("sys/class/power_supply/battery/voltage_now", "3987000"),
            ("sys/class/power_supply/battery/temp", "312"),
            ("sys/class/power_supply/battery/charge_counter", "2950000"),
            ("sys/class/power_supply/battery/charge_full", "4000000"),
            ("sys/class/power_supply/usb/type", "USB"),
            ("sys/class/power_supply/usb/online", "0"),
            ("sys/class/thermal/thermal_zone0/type", "cpu-0-0-usr"),
            ("sys/class/thermal/thermal_zone0/temp", "65000"),
            ("sys/class/thermal/thermal_zone1/type", "battery"),
            ("sys/class/thermal/thermal_zone1/temp", "31000"),
        ],
    );
}

fn open(root: &Path) -> SysfsSource {
    SysfsSource::open(root).unwrap().expect("a battery")
}

fn read(root: &Path) -> Reading {
    open(root).read(1).unwrap()
}

fn path(root: &Path, rel: &str) -> String {
    root.join(rel).display().to_string()
}

fn close(a: Option<f32>, b: f32) -> bool {
    a.is_some_and(|a| (a - b).abs() <= 1e-5 * b.abs().max(1.0))
}

#[test]
fn laptop_layout_reads_capacity_status_power_now_and_the_hottest_cpu_zone() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    laptop(root);
    let r = read(root);
    assert_eq!(r.percent, Some(81.0));
    assert_eq!(r.charging, Some(false));
    assert!(close(r.power_w, 8.42), "power_now 8,420,000 µW: {:?}", r.power_w);
    // no battery temp: the hottest zone that is not a radio (iwlwifi at 70 is skipped)
    assert_eq!(r.temp_c, Some(62.0));
    assert_eq!(r.origin("percent"), Some(path(root, "sys/class/power_supply/BAT0/capacity").as_str()));
    assert_eq!(r.origin("power_w"), Some(path(root, "sys/class/power_supply/BAT0/power_now").as_str()));
    assert_eq!(r.origin("temp_c"), Some(path(root, "sys/class/thermal/thermal_zone1/temp").as_str()));
    assert!(r.origin("charging").unwrap().ends_with("status (Discharging)"));
}

#[test]
fn laptop_on_ac_not_charging_counts_as_charging_and_percent_falls_back_to_energy() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    laptop(root);
    tree(
        root,
        &[("sys/class/power_supply/AC/online", "1"), ("sys/class/power_supply/BAT0/status", "Not charging")],
    );
    std::fs::remove_file(root.join("sys/class/power_supply/BAT0/capacity")).unwrap();
    let r = read(root);
    assert_eq!(r.charging, Some(true), "held by the charger: on power");
    assert!(r.origin("charging").unwrap().contains("AC/online"));
    // 40.5 / 50 Wh = 81 %
    assert!(close(r.percent, 81.0), "{:?}", r.percent);
    assert!(r.origin("percent").unwrap().contains("energy_now"));
}

#[test]
fn android_layout_reads_current_times_voltage_and_the_battery_temperature() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    android(root);
    let r = read(root);
    assert_eq!(r.percent, Some(73.0));
    assert_eq!(r.charging, Some(false));
    // |-0.412 A x 3.987 V| = 1.642644 W
    assert!(close(r.power_w, 1.642644), "{:?}", r.power_w);
    // 312 tenths; the CPU zone at 65 and the battery zone are not used when the battery has a sensor
    assert!(close(r.temp_c, 31.2), "{:?}", r.temp_c);
    assert_eq!(r.origin("temp_c"), Some(path(root, "sys/class/power_supply/battery/temp").as_str()));
    assert!(r.origin("power_w").unwrap().contains("current_now"));
}

#[test]
fn android_charging_by_status_or_by_an_online_charger() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    android(root);
    for (status, usb, ac, want) in [
        ("Charging", "0", "0", Some(true)),
        ("Full", "0", "0", Some(true)),
        ("Discharging", "1", "0", Some(false)), // the battery drains: not on power, whatever is plugged
        ("Not charging", "1", "0", Some(true)),
        ("Not charging", "0", "1", Some(true)),
        ("Not charging", "0", "0", Some(false)),
        ("Unknown", "0", "0", Some(false)),
    ] {
        tree(
            root,
            &[
                ("sys/class/power_supply/battery/status", status),
                ("sys/class/power_supply/usb/online", usb),
                ("sys/class/power_supply/ac/online", ac),
            ],
        );
        assert_eq!(read(root).charging, want, "status {status}, usb {usb}, ac {ac}");
    }
    // no status and no charger with `online`: unknown
    std::fs::remove_file(root.join("sys/class/power_supply/battery/status")).unwrap();
    for c in ["usb", "ac"] {
        std::fs::remove_file(root.join(format!("{PS}/{c}/online"))).unwrap();
    }
    assert_eq!(read(root).charging, None);
}

#[test]
fn missing_files_leave_fields_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    tree(
        root,
        &[("sys/class/power_supply/BAT1/type", "Battery"), ("sys/class/power_supply/BAT1/capacity", "55")],
    );
    let r = read(root);
    assert_eq!(r, Reading { percent: Some(55.0), from: r.from.clone(), ..Reading::default() });
    assert_eq!(r.from.len(), 1);
}

#[test]
fn unreadable_optional_files_are_unknown_unreadable_capacity_or_status_is_an_error() {
    // a directory where a file should be cannot be read, even by root (tests may run as root)
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    android(root);
    for f in ["current_now", "temp"] {
        let p = root.join(format!("{PS}/battery/{f}"));
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
    }
    let r = read(root);
    assert_eq!(r.power_w, None, "current_now unreadable");
    // battery temp unreadable: the battery thermal zone (31 °C) rather than the CPU's 65
    assert_eq!(r.temp_c, Some(31.0));
    assert_eq!(r.percent, Some(73.0));

    for f in ["capacity", "status"] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        android(root);
        let p = root.join(format!("{PS}/battery/{f}"));
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        let err = SysfsSource::open(root).err().expect("an unreadable battery file is an error");
        let msg = err.to_string();
        assert!(msg.contains(&p.display().to_string()) && msg.contains("cannot be read"), "{msg}");
    }
}

#[test]
fn odd_units_milliamps_millivolts_whole_degrees_and_millidegrees() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    android(root);
    tree(
        root,
        &[
            ("sys/class/power_supply/battery/current_now", "-412"),
            ("sys/class/power_supply/battery/voltage_now", "3987"),
            ("sys/class/power_supply/battery/temp", "31"),
        ],
    );
    let r = read(root);
    assert!(close(r.power_w, 1.642644), "-412 mA x 3987 mV: {:?}", r.power_w);
    assert!(r.origin("power_w").unwrap().ends_with("(read as mA and mV)"));
    assert_eq!(r.temp_c, Some(31.0));
    assert!(r.origin("temp_c").unwrap().ends_with("(read as whole degrees)"));

    tree(
        root,
        &[
            ("sys/class/power_supply/battery/current_now", "1500"), // 1.5 A written in mA
            ("sys/class/power_supply/battery/voltage_now", "4200000"),
            ("sys/class/power_supply/battery/temp", "31200"),
        ],
    );
    let r = read(root);
    assert!(close(r.power_w, 6.3), "1.5 A x 4.2 V: {:?}", r.power_w);
    assert!(r.origin("power_w").unwrap().ends_with("(read as mA)"));
    assert!(close(r.temp_c, 31.2), "31200 millidegrees: {:?}", r.temp_c);

    // at the edges: 10,000 µA is 10 mA (micro), 9,999 is mA; 100 is tenths (10.0 °C), 99 whole
    tree(
        root,
        &[
            ("sys/class/power_supply/battery/current_now", "10000"),
            ("sys/class/power_supply/battery/voltage_now", "4000000"),
            ("sys/class/power_supply/battery/temp", "100"),
        ],
    );
    let r = read(root);
    assert!(close(r.power_w, 0.04), "{:?}", r.power_w);
    assert_eq!(r.temp_c, Some(10.0));
    tree(
        root,
        &[
            ("sys/class/power_supply/battery/current_now", "9999"),
            ("sys/class/power_supply/battery/temp", "99"),
        ],
    );
    let r = read(root);
    assert!(close(r.power_w, 39.996), "{:?}", r.power_w);
    assert_eq!(r.temp_c, Some(99.0));
}

#[test]
fn thermal_zone_rules_prefer_battery_and_skin_and_skip_non_temperatures() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    android(root);
    std::fs::remove_file(root.join(format!("{PS}/battery/temp"))).unwrap();
    tree(
        root,
        &[
            ("sys/class/thermal/thermal_zone2/type", "skin-therm"),
            ("sys/class/thermal/thermal_zone2/temp", "35500"),
            ("sys/class/thermal/thermal_zone3/type", "quiet-therm"),
            ("sys/class/thermal/thermal_zone3/temp", "36000"),
            ("sys/class/thermal/thermal_zone3/mode", "disabled"),
        ],
    );
    let r = read(root);
    assert_eq!(r.temp_c, Some(35.5), "the hottest battery/skin zone, not the CPU's 65 nor a disabled zone");
    assert_eq!(r.origin("temp_c"), Some(path(root, "sys/class/thermal/thermal_zone2/temp").as_str()));

    // no battery or skin zone: the hottest other one, never a zone that holds a charge or a current
    for z in [1, 2, 3] {
        std::fs::remove_dir_all(root.join(format!("sys/class/thermal/thermal_zone{z}"))).unwrap();
    }
    tree(
        root,
        &[
            ("sys/class/thermal/thermal_zone4/type", "soc"), // Qualcomm: battery state of charge, 95 %
            ("sys/class/thermal/thermal_zone4/temp", "95"),
            ("sys/class/thermal/thermal_zone5/type", "ibat-lvl0"),
            ("sys/class/thermal/thermal_zone5/temp", "4000"),
            ("sys/class/thermal/thermal_zone6/type", "gpuss-0-usr"),
            ("sys/class/thermal/thermal_zone6/temp", "garbled"), // skipped, not an error
            ("sys/class/thermal/thermal_zone7/type", "modem-0-usr"),
            ("sys/class/thermal/thermal_zone7/temp", "80000"),
        ],
    );
    assert_eq!(read(root).temp_c, Some(65.0));
}

#[test]
fn garbled_or_out_of_range_values_are_errors_naming_the_file() {
    for (file, value, says) in [
        ("capacity", "seventy", "not an integer"),
        ("capacity", "120", "not a percent"),
        ("current_now", "12x", "not an integer"),
        ("temp", "", "not an integer"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        android(root);
        tree(root, &[(&format!("{PS}/battery/{file}"), value)]);
        let msg = SysfsSource::open(root).err().expect("garbled").to_string();
        assert!(msg.contains(&path(root, &format!("{PS}/battery/{file}"))) && msg.contains(says), "{msg}");
    }
}

#[test]
fn peripheral_and_absent_batteries_are_not_the_battery() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    tree(
        root,
        &[
            ("sys/class/power_supply/hidpp_battery_0/type", "Battery"),
            ("sys/class/power_supply/hidpp_battery_0/scope", "Device"),
            ("sys/class/power_supply/hidpp_battery_0/capacity", "30"),
            ("sys/class/power_supply/BAT1/type", "Battery"),
            ("sys/class/power_supply/BAT1/present", "0"),
            ("sys/class/power_supply/ADP1/type", "Mains"),
            ("sys/class/power_supply/ADP1/online", "1"),
        ],
    );
    assert!(SysfsSource::open(root).unwrap().is_none());
    let spec = SourceSpec::parse(&format!("sysfs:{}", root.display())).unwrap();
    let msg = spec.open().err().expect("sysfs:ROOT without a battery").to_string();
    assert!(msg.contains("no battery supply"), "{msg}");
    // a second battery that is present is found
    tree(
        root,
        &[("sys/class/power_supply/BAT1/present", "1"), ("sys/class/power_supply/BAT1/capacity", "64")],
    );
    assert_eq!(read(root).percent, Some(64.0));
}

// ---------------------------------------------------------------- trace

fn trace(text: &str) -> Result<TraceSource, Error> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.csv");
    std::fs::write(&p, text).unwrap();
    TraceSource::open(&p)
}

#[test]
fn trace_rows_apply_from_their_step_and_repeated_steps_are_polls() {
    let mut t = trace(
        "# comment\nstep,percent,charging,temp_c\n\n3,80,false,31\n5,59.5,,\n7,14,0,40\n7,14,1,39\n9,20,true,\n",
    )
    .unwrap();
    let at = |t: &mut TraceSource, s| {
        let r = t.read(s).unwrap();
        (r.percent, r.charging, r.temp_c)
    };
    assert_eq!(at(&mut t, 1), (None, None, None), "before the first row nothing is known");
    assert_eq!(at(&mut t, 3), (Some(80.0), Some(false), Some(31.0)));
    assert_eq!(at(&mut t, 4), (Some(80.0), Some(false), Some(31.0)));
    assert_eq!(at(&mut t, 5), (Some(59.5), None, None), "empty fields are unknown");
    assert_eq!(at(&mut t, 7), (Some(14.0), Some(false), Some(40.0)));
    t.note_poll(1.0);
    assert_eq!(at(&mut t, 7), (Some(14.0), Some(true), Some(39.0)), "the first poll sees the next row");
    t.note_poll(1.0);
    assert_eq!(at(&mut t, 7), (Some(14.0), Some(true), Some(39.0)), "the last row of a step stays");
    assert_eq!(at(&mut t, 8), (Some(14.0), Some(true), Some(39.0)));
    assert_eq!(at(&mut t, 100), (Some(20.0), Some(true), None));
    let r = t.read(7).unwrap();
    assert!(r.origin("percent").unwrap().ends_with("t.csv line 7"), "{:?}", r.from);
}

#[test]
fn trace_mistakes_name_the_file_and_line() {
    for (body, line, says) in [
        (
            "step,percent,charging,temp_c\n1,80,false,30\n3,70,false,30\n2,60,false,30\n",
            4,
            "steps never go back",
        ),
        ("step,percent,charging,temp_c\n1,101,false,30\n", 2, "outside 0..=100"),
        ("step,percent,charging,temp_c\n1,-1,false,30\n", 2, "outside 0..=100"),
        ("step,percent,charging,temp_c\n1,80,yes,30\n", 2, "not true, false"),
        ("step,percent,charging,temp_c\n1,8o,false,30\n", 2, "percent \"8o\" is not a number"),
        ("step,percent,charging,temp_c\n1,80,false,3O\n", 2, "temp_c \"3O\" is not a number"),
        ("step,percent,charging,temp_c\n1,80,false,NaN\n", 2, "not a number"),
        ("step,percent,charging,temp_c\n-1,80,false,30\n", 2, "not a whole number"),
        ("step,percent,charging,temp_c\n1,80,false\n", 2, "3 fields"),
        ("step,percent,temp_c\n1,80,30\n", 1, "the header is"),
        ("step,percent,charging,temp_c\n", 1, "no rows"),
        ("", 1, "empty"),
    ] {
        let msg = trace(body).err().expect(body).to_string();
        assert!(
            msg.contains("t.csv") && msg.contains(&format!("line {line}:")) && msg.contains(says),
            "{body:?}: {msg}"
        );
    }
    let msg = TraceSource::open(Path::new("/nonexistent/trace.csv")).err().unwrap().to_string();
    assert!(msg.contains("/nonexistent/trace.csv") && msg.contains("cannot read"), "{msg}");
}

// ---------------------------------------------------------------- simulation

fn sim(params: &str) -> SimulatedSource {
    SimulatedSource::new(SimParams::parse(params).unwrap())
}

#[test]
fn simulated_battery_drains_per_token_and_charges_per_second() {
    let mut s = sim("start=80,drain=2");
    assert_eq!(s.read(1).unwrap().percent, Some(80.0));
    s.note_work(1000, 0.5);
    assert_eq!(s.read(2).unwrap().percent, Some(78.0));
    s.note_work(2500, 9.0); // 5 % more, whatever the time
    assert_eq!(s.read(3).unwrap().percent, Some(73.0));
    s.note_idle(100.0); // idle: no drain
    assert_eq!(s.read(4).unwrap().percent, Some(73.0));

    let mut s = sim("start=85,charging=true,charge=1,unplug=90,drain=2");
    s.note_work(1000, 3.0); // charging: no drain, +3 %
    assert_eq!((s.read(1).unwrap().percent, s.read(1).unwrap().charging), (Some(88.0), Some(true)));
    s.note_idle(3.0); // reaches 90: unplugged
    let r = s.read(2).unwrap();
    assert_eq!((r.percent, r.charging), (Some(90.0), Some(false)));
}

#[test]
fn simulated_temperature_follows_newtons_cooling() {
    // 10 s of work from 25 °C: 55 - 30 e^(-0.2) = 55 - 24.561923 = 30.438077 (settles at 25 + 0.6/0.02)
    let mut s = sim("heat=0.6,cool=0.02,ambient=25");
    s.note_work(0, 10.0);
    assert!(close(s.read(1).unwrap().temp_c, 30.438077));
    // 50 s idle: 25 + 5.438077 e^(-1) = 25 + 2.000557 = 27.000557
    s.note_idle(50.0);
    assert!(close(s.read(2).unwrap().temp_c, 27.000557));
    // no cooling: linear heating
    let mut s = sim("heat=0.5,cool=0,temp=30");
    s.note_work(0, 4.0);
    assert_eq!(s.read(1).unwrap().temp_c, Some(32.0));
    // power: 5 W for 3 s of work, 0.5 W for 1 s idle: (15 + 0.5) / 4 = 3.875 W
    let mut s = sim("watts=5,idle_watts=0.5");
    s.note_work(0, 3.0);
    s.note_idle(1.0);
    assert_eq!(s.read(1).unwrap().power_w, Some(3.875));
}

#[test]
fn simulated_user_plugs_the_charger_in_after_a_pause() {
    let mut s = sim("start=14,plug_after=60,charge=0.5");
    s.note_poll(30.0);
    assert_eq!(s.read(1).unwrap().charging, Some(false), "30 s of pause");
    s.note_poll(30.0);
    assert_eq!(s.read(1).unwrap().charging, Some(true), "60 s of pause");
    s.note_idle(10.0);
    assert_eq!(s.read(1).unwrap().percent, Some(19.0));
}

#[test]
fn simulate_parameters_are_checked() {
    for (spec, says) in [
        ("start=120", "out of range"),
        ("drain=-1", "out of range"),
        ("drain=lots", "not a number"),
        ("speed=3", "unknown parameter"),
        ("start", "not key=value"),
        ("charging=maybe", "use true or false"),
    ] {
        let msg = SimParams::parse(spec).expect_err(spec).to_string();
        assert!(msg.contains(says), "{spec}: {msg}");
    }
    let p = SimParams::parse("start=70, plug_after=inf ,temp=40").unwrap();
    assert_eq!((p.start, p.plug_after, p.temp), (70.0, f64::INFINITY, Some(40.0)));
}

// ---------------------------------------------------------------- configuration

#[test]
fn bad_configuration_is_an_error_before_training() {
    let base = PowerFlags { power_source: "none".into(), ..PowerFlags::default() };
    for (flags, name) in [
        (PowerFlags { power_threshold: 100.5, ..base.clone() }, "--power-threshold"),
        (PowerFlags { power_threshold: -1.0, ..base.clone() }, "--power-threshold"),
        (PowerFlags { power_critical: 101.0, ..base.clone() }, "--power-critical"),
        (PowerFlags { throttle_duty: 0.0, ..base.clone() }, "--throttle-duty"),
        (PowerFlags { throttle_duty: 1.01, ..base.clone() }, "--throttle-duty"),
        (PowerFlags { throttle_duty: f32::NAN, ..base.clone() }, "--throttle-duty"),
        (PowerFlags { power_poll: 0.0, ..base.clone() }, "--power-poll"),
        (PowerFlags { max_temp: f32::INFINITY, ..base.clone() }, "--max-temp"),
        (PowerFlags { power_source: "battery".into(), ..base.clone() }, "--power-source"),
        (PowerFlags { power_source: "trace:".into(), ..base.clone() }, "--power-source"),
        (PowerFlags { power_source: "sysfs:".into(), ..base.clone() }, "--power-source"),
        (PowerFlags { train_when: TrainWhen::Charging, ..base.clone() }, "--train-when"),
    ] {
        match PowerMonitor::new(&flags) {
            Err(Error::InvalidArgument { name: n, .. }) => assert!(n.starts_with(name), "{n} for {flags:?}"),
            Err(e) => panic!("{flags:?}: {e}"),
            Ok(_) => panic!("{flags:?} was accepted"),
        }
    }
    for ok in [0.0, 100.0] {
        assert!(PowerMonitor::new(&PowerFlags { power_threshold: ok, ..base.clone() }).is_ok());
    }
    assert!(PowerMonitor::new(&PowerFlags { throttle_duty: 1.0, ..base.clone() }).is_ok());
    // a trace with a mistake fails when the monitor is made, before the first step
    let msg = PowerMonitor::new(&PowerFlags { power_source: "trace:/nonexistent.csv".into(), ..base })
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("/nonexistent.csv"), "{msg}");
}

#[test]
fn source_specs_parse() {
    assert_eq!(SourceSpec::parse("auto").unwrap(), SourceSpec::Auto);
    assert_eq!(SourceSpec::parse("none").unwrap(), SourceSpec::None);
    assert_eq!(SourceSpec::parse("sysfs").unwrap(), SourceSpec::Sysfs(PathBuf::from("/")));
    assert_eq!(SourceSpec::parse("sysfs:/tmp/x").unwrap(), SourceSpec::Sysfs(PathBuf::from("/tmp/x")));
    assert_eq!(SourceSpec::parse("trace:a:b.csv").unwrap(), SourceSpec::Trace(PathBuf::from("a:b.csv")));
    assert_eq!(SourceSpec::parse("simulate").unwrap(), SourceSpec::Simulate(SimParams::default()));
    assert!(SourceSpec::parse("none:x").is_err());
}

// ---------------------------------------------------------------- policies

/// A monitor over `rows` (a trace body without its header) on a driven clock.
fn monitor_on(rows: &str, flags: PowerFlags) -> (PowerMonitor, Arc<FakeClock>) {
    let text = format!("step,percent,charging,temp_c\n{rows}");
    let rows = pockettune::power::TraceSource::from_rows(
        Path::new("t.csv"),
        pockettune::power::parse_trace(Path::new("t.csv"), &text).unwrap(),
    );
    let clock = Arc::new(FakeClock::new());
    let m = PowerMonitor::with_source(Box::new(rows), &flags, clock.clone()).unwrap();
    (m, clock)
}

fn duty(d: &Decision) -> f32 {
    match d {
        Decision::Run { duty, .. } => *duty,
        other => panic!("expected Run, got {other:?}"),
    }
}

#[test]
fn threshold_throttles_exactly_below_it_and_not_while_charging() {
    let (mut m, _) = monitor_on(
        "1,61,false,\n2,60,false,\n3,59.99,false,\n4,40,false,\n5,40,true,\n6,60,false,\n7,60.5,false,\n",
        PowerFlags::default(),
    );
    let got: Vec<f32> = (1..=7).map(|s| duty(&m.before_step(s))).collect();
    assert_eq!(got, vec![1.0, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0]);
    // a custom duty and threshold
    let flags = PowerFlags { power_threshold: 30.0, throttle_duty: 0.25, ..PowerFlags::default() };
    let (mut m, _) = monitor_on("1,30,false,\n2,29.9,false,\n", flags);
    assert_eq!((duty(&m.before_step(1)), duty(&m.before_step(2))), (1.0, 0.25));
}

#[test]
fn thermal_throttles_above_max_temp_until_two_degrees_below() {
    let (mut m, _) = monitor_on(
        "1,90,true,45\n2,90,true,45.1\n3,90,true,44\n4,90,true,43.1\n5,90,true,43\n6,90,true,44.9\n7,90,true,45.01\n8,90,true,\n",
        PowerFlags::default(),
    );
    let got: Vec<f32> = (1..=8).map(|s| duty(&m.before_step(s))).collect();
    assert_eq!(got, vec![1.0, 0.5, 0.5, 0.5, 1.0, 1.0, 0.5, 1.0]);
    assert_eq!(pockettune::power::THERMAL_HYSTERESIS_C, 2.0);
}

#[test]
fn critical_pause_waits_for_the_charger_or_the_threshold() {
    let flags = PowerFlags { power_poll: 30.0, ..PowerFlags::default() };
    let (mut m, clock) = monitor_on(
        "1,15,false,\n2,14.9,false,\n2,14.9,false,\n2,40,false,\n2,40,true,\n3,50,false,\n",
        flags.clone(),
    );
    assert_eq!(duty(&m.before_step(1)), 0.5, "at exactly --power-critical: throttled, not paused");
    let d = m.before_step(2);
    assert!(matches!(&d, Decision::Pause { reason } if reason.contains("14.9")), "{d:?}");
    let mut ticks = Vec::new();
    let d = m.wait_while_paused(2, |r, waited| ticks.push((r.percent, r.charging, waited)));
    // poll 1: 14.9 unplugged; poll 2: 40 % is above critical but below the threshold: still
    // paused; poll 3: charging
    assert_eq!(d, Decision::Run { duty: 1.0, reason: None });
    assert_eq!(
        ticks,
        vec![
            (Some(14.9), Some(false), Duration::from_secs(30)),
            (Some(40.0), Some(false), Duration::from_secs(60))
        ]
    );
    assert_eq!(clock.sleeps(), vec![Duration::from_secs(30); 3]);
    assert_eq!(m.reading().charging, Some(true));
    assert_eq!(duty(&m.before_step(3)), 0.5);
    let t = m.totals();
    assert_eq!((t.pauses, t.paused_s), (1, 90.0));

    // back at the threshold without a charger also ends the pause
    let (mut m, _) = monitor_on("1,10,false,\n1,59.9,false,\n1,60,false,\n", flags);
    assert!(matches!(m.before_step(1), Decision::Pause { .. }));
    assert_eq!(m.wait_while_paused(1, |_, _| {}), Decision::Run { duty: 1.0, reason: None });
    assert_eq!(m.totals().paused_s, 60.0);
}

#[test]
fn critical_stop_and_charging_only() {
    let flags = PowerFlags { on_critical: OnCritical::Stop, ..PowerFlags::default() };
    let (mut m, _) = monitor_on("1,14,false,\n2,14,true,\n", flags);
    assert!(matches!(m.before_step(1), Decision::Stop { reason } if reason.contains("--power-critical 15")));
    assert_eq!(duty(&m.before_step(2)), 1.0, "charging: not critical");

    let flags = PowerFlags { train_when: TrainWhen::Charging, power_poll: 5.0, ..PowerFlags::default() };
    let (mut m, clock) = monitor_on("1,90,true,\n2,90,false,\n2,89,false,\n2,89,true,\n", flags);
    assert_eq!(duty(&m.before_step(1)), 1.0);
    assert!(
        matches!(m.before_step(2), Decision::Pause { reason } if reason.contains("--train-when charging"))
    );
    assert_eq!(m.wait_while_paused(2, |_, _| {}), Decision::Run { duty: 1.0, reason: None });
    assert_eq!(clock.sleeps().len(), 2);
}

#[test]
fn notices_come_once_per_change() {
    let (mut m, _) = monitor_on("1,80,false,\n2,59,false,\n3,58,false,\n4,58,true,\n", PowerFlags::default());
    let mut notes = Vec::new();
    for s in 1..=4 {
        m.before_step(s);
        notes.push(m.take_notice());
    }
    assert_eq!(notes[0], None);
    assert!(notes[1].as_deref().unwrap().starts_with("power: throttled to duty 0.5: battery 59 %"));
    assert_eq!(notes[2], None);
    assert_eq!(notes[3].as_deref(), Some("power: full speed (duty 1)"));
}

/// A source that returns readings from a list and then fails.
struct Script(Vec<Reading>, usize);

impl PowerSource for Script {
    fn read(&mut self, _step: u64) -> pockettune::Result<Reading> {
        self.1 += 1;
        self.0
            .get(self.1 - 1)
            .cloned()
            .ok_or(Error::PowerSource { path: "script".into(), detail: "the battery vanished".into() })
    }
    fn describe(&self) -> String {
        "script".into()
    }
}

fn reading(percent: f32, charging: bool, power_w: Option<f32>) -> Reading {
    Reading { percent: Some(percent), charging: Some(charging), power_w, ..Reading::default() }
}

#[test]
fn energy_battery_and_time_totals() {
    let script = Script(
        vec![
            reading(80.0, false, Some(4.0)), // opening read
            reading(80.0, false, Some(4.0)), // step 1 before
            reading(79.0, false, Some(6.0)), // step 1 after: (4 + 6) / 2 W x 2 s = 10 J
            reading(79.0, true, None),       // step 2 before
            reading(81.0, true, None),       // step 2 after: no power known, 1 s
            reading(81.0, false, Some(2.0)), // step 3 before
            reading(78.0, false, None),      // step 3 after: 2 W x 3 s = 6 J
        ],
        0,
    );
    let clock = Arc::new(FakeClock::new());
    let mut m = PowerMonitor::with_source(Box::new(script), &PowerFlags::default(), clock).unwrap();
    m.before_step(1);
    let p1 = m.after_step(1, 2.0, 500);
    assert_eq!(
        (p1.battery_pct, p1.power_w, p1.energy_j, p1.throttle_ms),
        (Some(79.0), Some(5.0), Some(10.0), 0.0)
    );
    m.before_step(2);
    let p2 = m.after_step(2, 1.0, 500);
    assert_eq!((p2.power_w, p2.energy_j, p2.charging), (None, None, Some(true)));
    m.before_step(3);
    let p3 = m.after_step(3, 3.0, 300);
    assert_eq!(p3.energy_j, Some(6.0));
    let t = m.totals();
    assert_eq!(t.energy_j, Some(16.0));
    // 16 J over the 800 tokens whose energy is known: 20 J per 1,000
    assert_eq!(t.energy_j_per_1k_tokens, Some(20.0));
    // falls: 80 -> 79 (1), 81 -> 78 (3); the charge from 79 to 81 does not pay them back
    assert_eq!(
        (t.battery_pct_start, t.battery_pct_end, t.battery_pct_used),
        (Some(80.0), Some(78.0), Some(4.0))
    );
    assert_eq!(t.fell_back, None);
    // the script has run out: the source fails mid-run, training goes on without it
    assert_eq!(m.before_step(4), Decision::Run { duty: 1.0, reason: None });
    let p4 = m.after_step(4, 1.0, 100);
    assert_eq!((p4.battery_pct, p4.energy_j), (None, None));
    let t = m.totals();
    assert!(t.fell_back.as_deref().unwrap().contains("the battery vanished"));
    assert_eq!(t.source, "script (dropped mid-run)");
}

#[test]
fn sysfs_files_vanishing_mid_run_fall_back_to_none() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    android(root);
    let flags = PowerFlags { power_source: format!("sysfs:{}", root.display()), ..PowerFlags::default() };
    let mut m = PowerMonitor::new(&flags).unwrap();
    assert_eq!(duty(&m.before_step(1)), 1.0);
    tree(root, &[("sys/class/power_supply/battery/capacity", "50")]);
    assert_eq!(duty(&m.before_step(2)), 0.5);
    std::fs::remove_dir_all(root.join(format!("{PS}/battery"))).unwrap(); // the battery vanished
    assert_eq!(m.before_step(3), Decision::Run { duty: 1.0, reason: None }, "dropped: no policy acts");
    assert!(m.totals().fell_back.unwrap().contains("percent can no longer be read"));

    // a garbled value mid-run: the same
    android(root);
    let mut m = PowerMonitor::new(&flags).unwrap();
    tree(root, &[("sys/class/power_supply/battery/capacity", "5O")]);
    assert_eq!(m.before_step(1), Decision::Run { duty: 1.0, reason: None });
    assert!(m.totals().fell_back.unwrap().contains("not an integer"));
}

// ---------------------------------------------------------------- throttle

fn ms(x: f64) -> Duration {
    Duration::from_nanos((x * 1e6).round() as u64)
}

#[test]
fn gate_at_duty_one_reads_no_clock_and_never_sleeps() {
    use pockettune::gpu::SubmitGate;
    let clock = Arc::new(FakeClock::new());
    let t = Throttle::new(clock.clone());
    t.begin_step(1.0);
    for _ in 0..1000 {
        clock.advance(ms(5.0));
        t.before_submit(64);
    }
    assert_eq!(clock.reads(), 0);
    assert_eq!(t.settle(), Duration::ZERO);
    assert!(clock.sleeps().is_empty());
}

#[test]
fn gate_sleeps_hold_the_duty_cycle() {
    use pockettune::gpu::SubmitGate;
    let clock = Arc::new(FakeClock::new());
    let t = Throttle::new(clock.clone());
    t.begin_step(0.5);
    clock.advance(ms(10.0));
    t.before_submit(64); // 10 ms busy at duty 0.5: 10 ms asleep
    clock.advance(ms(1.0));
    t.before_submit(64); // 1 ms owed, under MIN_SLEEP (2 ms): carried
    clock.advance(ms(1.5));
    t.before_submit(64); // 2.5 ms owed: slept
    clock.advance(ms(3.0));
    assert_eq!(t.slept(), ms(12.5));
    let total = t.settle(); // the step's end owes 3 ms more
    let sleeps: Vec<u128> = clock.sleeps().iter().map(|d| d.as_micros()).collect();
    assert_eq!(sleeps, vec![10_000, 2_500, 3_000]);
    assert_eq!(total.as_micros(), 15_500);
    assert_eq!(t.busy().as_micros(), 15_500);
    assert_eq!(t.submissions(), 3);

    // duty 0.25: three seconds of sleep per second of work
    t.begin_step(0.25);
    clock.advance(ms(4.0));
    t.before_submit(1);
    assert_eq!(t.slept().as_micros(), 12_000);
    assert_eq!(t.settle().as_micros(), 12_000, "nothing more owed");
}

#[test]
fn gate_with_the_real_clock_sleeps_what_the_busy_time_owes() {
    use pockettune::gpu::SubmitGate;
    let t = Throttle::new(Arc::new(pockettune::power::SystemClock::new()));
    t.begin_step(0.5);
    for _ in 0..3 {
        let start = std::time::Instant::now();
        while start.elapsed() < ms(20.0) {
            std::hint::spin_loop();
        }
        t.before_submit(1);
    }
    let slept = t.settle();
    let busy = t.busy();
    // every sleep is at least what it owes, and an oversleep is paid back by the next debt, so
    // the step sleeps at least its busy time and more only by the last sleep's overshoot
    assert!(busy >= ms(60.0), "{busy:?}");
    assert!(slept + Duration::from_micros(1) >= busy, "slept {slept:?} for busy {busy:?}");
    assert!(slept <= busy + ms(50.0), "slept {slept:?} for busy {busy:?}");
}

#[test]
fn monitor_throttle_time_is_the_gate_plus_the_between_steps_sleep() {
    let (mut m, clock) = monitor_on("1,80,false,\n2,50,false,\n", PowerFlags::default());
    m.before_step(1);
    assert!(m.gate_for_step().is_none(), "full speed: no gate, the GPU batches as it likes");
    clock.advance(ms(40.0));
    assert_eq!(m.sleep_between_steps(), Duration::ZERO);
    assert_eq!(m.after_step(1, 0.04, 256).throttle_ms, 0.0);

    m.before_step(2);
    let gate = m.gate_for_step().expect("throttled");
    clock.advance(ms(20.0));
    gate.before_submit(64);
    clock.advance(ms(10.0));
    assert_eq!(m.sleep_between_steps(), ms(30.0));
    let p = m.after_step(2, 0.06, 256);
    assert_eq!((p.throttle_ms, p.duty), (30.0, 0.5));
    let t = m.totals();
    assert_eq!((t.throttled_s, t.steps_throttled), (0.03, 1));
}

/// On a real device: a throttled step's work reaches the GPU through the gate in batches, and
/// the step as a whole sleeps what its busy time owes at duty 0.5.
#[test]
fn a_throttled_gpu_step_goes_through_the_gate() {
    use pockettune::gpu::GATED_BATCH;
    use pockettune::{Gpu, GpuOptions, Profile, Tensor};
    let gpu = match Gpu::new(&GpuOptions { device: None, profile: Profile::Mobile }) {
        Ok(g) => g,
        Err(e) if std::env::var_os("CI").is_none() => return eprintln!("no GPU, skipped: {e}"),
        Err(e) => panic!("CI is set and no GPU adapter could be opened: {e}"),
    };
    let text = "step,percent,charging,temp_c\n1,50,false,\n";
    let source = TraceSource::from_rows(
        Path::new("t.csv"),
        pockettune::power::parse_trace(Path::new("t.csv"), text).unwrap(),
    );
    let clock = Arc::new(pockettune::power::SystemClock::new());
    let mut m = PowerMonitor::with_source(Box::new(source), &PowerFlags::default(), clock).unwrap();
    let x = Tensor::from_host(&gpu, &[1.0; 4096], &[4096], "x").unwrap();
    let y = Tensor::from_host(&gpu, &[0.0; 4096], &[4096], "y").unwrap();
    gpu.sync().unwrap();
    assert_eq!(duty(&m.before_step(1)), 0.5);
    gpu.set_submit_gate(m.gate_for_step());
    for _ in 0..3 * GATED_BATCH + 5 {
        pockettune::kernels::elementwise::axpby(&gpu, &y, &x, 2.0, 0.0).unwrap();
    }
    gpu.sync().unwrap();
    let slept = m.sleep_between_steps();
    let busy = m.throttle().busy();
    gpu.set_submit_gate(None);
    assert_eq!(m.throttle().submissions(), 4, "three full batches and the rest");
    assert!(busy > Duration::ZERO);
    assert!(slept + Duration::from_micros(1) >= busy, "slept {slept:?} for busy {busy:?}");
    assert!(slept <= busy + ms(50.0), "slept {slept:?} for busy {busy:?}");
    assert_eq!(y.to_host(&gpu).unwrap(), vec![2.0; 4096]);
}

// ---------------------------------------------------------------- the shipped example

/// `examples/battery-drain.csv` under the default policies over 40 steps: the figures the
/// README's worked example quotes.
#[test]
fn the_shipped_trace_drives_every_policy() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/battery-drain.csv");
    let flags = PowerFlags {
        power_source: format!("trace:{}", file.display()),
        power_poll: 1.0,
        ..PowerFlags::default()
    };
    let clock = Arc::new(FakeClock::new());
    let source = SourceSpec::parse(&flags.power_source).unwrap().open().unwrap();
    let mut m = PowerMonitor::with_source(source, &flags, clock.clone()).unwrap();
    let mut duties = Vec::new();
    let mut paused_at = Vec::new();
    for step in 1..=40u64 {
        let mut d = m.before_step(step);
        if let Decision::Pause { .. } = d {
            paused_at.push(step);
            d = m.wait_while_paused(step, |_, _| {});
        }
        duties.push(duty(&d));
        clock.advance(Duration::from_secs(1));
        m.sleep_between_steps();
        m.after_step(step, 1.0, 512);
    }
    let throttled: Vec<u64> = (1..=40).filter(|s| duties[*s as usize - 1] < 1.0).collect();
    let want: Vec<u64> = (12..=30).chain(37..=39).collect();
    assert_eq!(throttled, want, "battery below 60 % from step 12, hot 21..26 and 37..39");
    assert_eq!(paused_at, vec![31], "14 % at step 31");
    let t = m.totals();
    assert_eq!((t.pauses, t.paused_s), (1, 2.0), "two polls: unplugged, then plugged in");
    assert_eq!(
        (t.battery_pct_start, t.battery_pct_used, t.battery_pct_end),
        (Some(80.0), Some(66.0), Some(38.0))
    );
    assert_eq!(t.steps_throttled, 22);
    // each throttled step of 1 s busy sleeps 1 s at duty 0.5
    assert_eq!(t.throttled_s, 22.0);
}

// ---------------------------------------------------------------- the command

#[test]
fn power_command_prints_json_from_a_fake_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    android(root);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pockettune"))
        .args(["power", "--json", "--power-source", &format!("sysfs:{}", root.display())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["percent"], 73.0);
    assert_eq!(doc["charging"], false);
    assert!((doc["temp_c"].as_f64().unwrap() - 31.2).abs() < 1e-5);
    assert!((doc["power_w"].as_f64().unwrap() - 1.642644).abs() < 1e-5);
    assert_eq!(doc["from"]["percent"], path(root, "sys/class/power_supply/battery/capacity"));
    assert_eq!(doc["source"], format!("sysfs {}", path(root, "sys/class/power_supply/battery")));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("percent:  73 %") && text.contains("charging: no"), "{text}");

    // a broken trace: status 2 and the line
    let bad = root.join("bad.csv");
    std::fs::write(&bad, "step,percent,charging,temp_c\n1,80,false,30\n2,180,false,30\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pockettune"))
        .args(["power", "--power-source", &format!("trace:{}", bad.display())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("bad.csv: line 3: percent 180 is outside 0..=100"), "{text}");
}
