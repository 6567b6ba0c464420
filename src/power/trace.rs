//! A power trace: a CSV file that says what the battery does at each optimizer step, for tests
//! and demos that must behave the same on every machine and at every speed.
//!
//! ```text
//! step,percent,charging,temp_c
//! 1,80,false,31.0
//! 10,59,false,36
//! 24,14,false,43
//! 24,14,true,43
//! ```
//!
//! Each row applies from its step (1-based, as the metrics lines count) until the next row's;
//! before the first row nothing is known. Steps never go back. Rows that repeat a step are what
//! the polls of a pause at that step see, one row per poll (the last one stays): above, step 24
//! finds the battery critical, and the first poll of the pause finds the charger plugged in.
//! An empty field is unknown; `charging` is `true`/`false` (or `1`/`0`); `#` starts a comment
//! line. Every mistake is an error naming the file and the line, raised when the file is opened.

use super::{PowerSource, Reading};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// One row of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceRow {
    pub step: u64,
    pub percent: Option<f32>,
    pub charging: Option<bool>,
    pub temp_c: Option<f32>,
    /// 1-based line of the file, for messages.
    pub line: usize,
}

pub struct TraceSource {
    path: PathBuf,
    rows: Vec<TraceRow>,
    /// The step polled last and how many polls it has seen.
    polls: (u64, usize),
    last_step: u64,
}

const HEADER: &str = "step,percent,charging,temp_c";

/// Parse a whole trace (`path` is only used in messages).
pub fn parse(path: &Path, text: &str) -> Result<Vec<TraceRow>> {
    let err = |line: usize, detail: String| Error::PowerSource {
        path: path.to_path_buf(),
        detail: format!("line {line}: {detail}"),
    };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    match lines.next() {
        Some((_, h)) if h.split(',').map(str::trim).eq(HEADER.split(',')) => {}
        Some((n, h)) => return Err(err(n, format!("the header is {h:?}; a trace starts with {HEADER:?}"))),
        None => return Err(err(1, format!("the file is empty; a trace starts with {HEADER:?}"))),
    }
    let mut rows: Vec<TraceRow> = Vec::new();
    for (n, l) in lines {
        let fields: Vec<&str> = l.split(',').map(str::trim).collect();
        if fields.len() != 4 {
            return Err(err(n, format!("{} fields in {l:?}; a row is {HEADER}", fields.len())));
        }
        let number = |what: &str, s: &str| -> Result<Option<f32>> {
            if s.is_empty() {
                return Ok(None);
            }
            match s.parse::<f32>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(err(n, format!("{what} {s:?} is not a number"))),
            }
        };
        let step = fields[0]
            .parse::<u64>()
            .map_err(|_| err(n, format!("step {:?} is not a whole number", fields[0])))?;
        let percent = number("percent", fields[1])?;
        if let Some(p) = percent {
            if !(0.0..=100.0).contains(&p) {
                return Err(err(n, format!("percent {p} is outside 0..=100")));
            }
        }
        let charging = match fields[2].to_ascii_lowercase().as_str() {
            "" => None,
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            other => return Err(err(n, format!("charging {other:?} is not true, false, 1 or 0"))),
        };
        let temp_c = number("temp_c", fields[3])?;
        if let Some(prev) = rows.last() {
            if step < prev.step {
                return Err(err(
                    n,
                    format!(
                        "step {step} comes after step {} (line {}); steps never go back",
                        prev.step, prev.line
                    ),
                ));
            }
        }
        rows.push(TraceRow { step, percent, charging, temp_c, line: n });
    }
    if rows.is_empty() {
        return Err(err(1, "no rows after the header".into()));
    }
    Ok(rows)
}

impl TraceSource {
    /// Read and check `path` whole.
    pub fn open(path: &Path) -> Result<TraceSource> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::PowerSource {
            path: path.to_path_buf(),
            detail: format!("cannot read the trace: {e}"),
        })?;
        Ok(TraceSource::from_rows(path, parse(path, &text)?))
    }

    pub fn from_rows(path: &Path, rows: Vec<TraceRow>) -> TraceSource {
        TraceSource { path: path.to_path_buf(), rows, polls: (0, 0), last_step: 0 }
    }

    pub fn rows(&self) -> &[TraceRow] {
        &self.rows
    }

    /// The row that applies at `step` after `polls` polls of a pause there: the last row of an
    /// earlier step, or the row of this step that `polls` polls have reached.
    fn row_at(&self, step: u64, polls: usize) -> Option<&TraceRow> {
        let end = self.rows.partition_point(|r| r.step <= step);
        let last = self.rows[..end].last()?;
        if last.step < step {
            return Some(last);
        }
        let start = self.rows[..end].partition_point(|r| r.step < step);
        Some(&self.rows[(start + polls).min(end - 1)])
    }
}

impl PowerSource for TraceSource {
    fn read(&mut self, step: u64) -> Result<Reading> {
        self.last_step = step;
        let polls = if self.polls.0 == step { self.polls.1 } else { 0 };
        let mut r = Reading::default();
        if let Some(row) = self.row_at(step, polls) {
            let origin = format!("{} line {}", self.path.display(), row.line);
            r.percent = row.percent;
            r.charging = row.charging;
            r.temp_c = row.temp_c;
            for (field, known) in [
                ("percent", row.percent.is_some()),
                ("charging", row.charging.is_some()),
                ("temp_c", row.temp_c.is_some()),
            ] {
                if known {
                    r.note(field, origin.clone());
                }
            }
        }
        Ok(r)
    }

    fn note_poll(&mut self, _seconds: f64) {
        let step = self.last_step;
        self.polls = if self.polls.0 == step { (step, self.polls.1 + 1) } else { (step, 1) };
    }

    fn describe(&self) -> String {
        format!("trace {}", self.path.display())
    }
}
