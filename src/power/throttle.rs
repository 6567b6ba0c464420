//! Throttling: sleeps that hold work to a duty cycle d, so that busy / (busy + sleep) = d.
//!
//! Inside a step, [`Throttle`] is the GPU's submission hook (`Gpu::set_submit_gate`): before
//! each submission it measures the busy time since it last let work through (recording and
//! waiting on the GPU both count) and owes (1 − d) / d of it as sleep. Sleeps shorter than
//! [`MIN_SLEEP`] are carried over to the next submission instead of taken (an OS sleep that
//! short overshoots), and an oversleep is paid back from the next debt, so the sum of sleeps
//! tracks the sum of busy times. At the end of the step [`Throttle::settle`] sleeps what is
//! still owed, so each step as a whole holds the duty cycle however its work was submitted (one
//! submission, thousands, or none on the CPU path).
//!
//! At duty 1 the hook is one atomic load: no lock, no clock.

use crate::gpu::SubmitGate;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Owed sleep below this is carried to the next submission.
pub const MIN_SLEEP: Duration = Duration::from_millis(2);

/// Time as the throttle and the monitor see it: real, or driven by a test.
pub trait Clock: Send + Sync {
    /// Time since some fixed origin.
    fn now(&self) -> Duration;
    fn sleep(&self, d: Duration);
}

/// The real clock.
pub struct SystemClock(Instant);

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock(Instant::now())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A clock that only moves when told ([`FakeClock::advance`], standing for work) or when slept
/// on (instantly), and counts how often it is asked the time: for tests and dry runs.
#[derive(Default)]
pub struct FakeClock {
    t: Mutex<Duration>,
    reads: AtomicU32,
    sleeps: Mutex<Vec<Duration>>,
}

impl FakeClock {
    pub fn new() -> FakeClock {
        FakeClock::default()
    }
    pub fn advance(&self, d: Duration) {
        *self.t.lock() += d;
    }
    /// How many times `now` was called.
    pub fn reads(&self) -> u32 {
        self.reads.load(Ordering::Relaxed)
    }
    /// Every sleep taken, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.sleeps.lock().clone()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        self.reads.fetch_add(1, Ordering::Relaxed);
        *self.t.lock()
    }
    fn sleep(&self, d: Duration) {
        self.sleeps.lock().push(d);
        *self.t.lock() += d;
    }
}

impl State {
    fn new(mark: Duration) -> State {
        State { mark, owed: 0.0, slept: Duration::ZERO, busy: Duration::ZERO, submissions: 0 }
    }
}

struct State {
    /// When work was last let through (or the step began).
    mark: Duration,
    /// Sleep owed, in nanoseconds; negative after an oversleep.
    owed: f64,
    /// Slept since the step began.
    slept: Duration,
    /// Busy time counted since the step began.
    busy: Duration,
    /// Submissions let through (while throttled) since the step began.
    submissions: u64,
}

/// The duty-cycle throttle: the GPU's submit gate, and the step-end settlement.
pub struct Throttle {
    clock: Arc<dyn Clock>,
    /// The duty cycle's f32 bits; 1.0 means no throttling.
    duty: AtomicU32,
    state: Mutex<State>,
}

impl Throttle {
    pub fn new(clock: Arc<dyn Clock>) -> Throttle {
        Throttle {
            clock,
            duty: AtomicU32::new(1f32.to_bits()),
            state: Mutex::new(State::new(Duration::ZERO)),
        }
    }

    pub fn duty(&self) -> f32 {
        f32::from_bits(self.duty.load(Ordering::Relaxed))
    }

    /// A step starts at duty `duty` (in (0, 1]): busy time counts from now, nothing is owed.
    pub fn begin_step(&self, duty: f32) {
        let duty = if duty > 0.0 && duty < 1.0 { duty } else { 1.0 };
        let mut s = self.state.lock();
        *s = State::new(if duty < 1.0 { self.clock.now() } else { Duration::ZERO });
        self.duty.store(duty.to_bits(), Ordering::Relaxed);
    }

    /// Count the busy time since the mark and sleep the debt if it is at least `min`.
    fn pay(&self, min: Duration) {
        let d = self.duty() as f64;
        let mut s = self.state.lock();
        let now = self.clock.now();
        let busy = now.saturating_sub(s.mark);
        s.busy += busy;
        s.owed += busy.as_nanos() as f64 * (1.0 - d) / d;
        s.mark = now;
        if s.owed > 0.0 && s.owed >= min.as_nanos() as f64 {
            self.clock.sleep(Duration::from_nanos(s.owed.round() as u64));
            let after = self.clock.now();
            let slept = after.saturating_sub(now);
            s.owed -= slept.as_nanos() as f64;
            s.slept += slept;
            s.mark = after;
        }
    }

    /// End of a step: sleep whatever the step still owes (the between-steps sleep). Returns the
    /// step's whole throttle time, the gate's sleeps included.
    pub fn settle(&self) -> Duration {
        if self.duty() < 1.0 {
            self.pay(Duration::ZERO);
        }
        let mut s = self.state.lock();
        s.owed = 0.0;
        s.slept
    }

    /// Slept so far in this step.
    pub fn slept(&self) -> Duration {
        self.state.lock().slept
    }

    /// Busy time counted so far in this step (while throttled).
    pub fn busy(&self) -> Duration {
        self.state.lock().busy
    }

    /// Submissions the gate let through in this step while throttled.
    pub fn submissions(&self) -> u64 {
        self.state.lock().submissions
    }
}

impl SubmitGate for Throttle {
    fn before_submit(&self, _dispatches: usize) {
        if self.duty.load(Ordering::Relaxed) == 1f32.to_bits() {
            return;
        }
        self.pay(MIN_SLEEP);
        self.state.lock().submissions += 1;
    }
}
