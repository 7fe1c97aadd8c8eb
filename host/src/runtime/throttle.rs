//! Throttling of handler calls that run long. A batch takes microseconds to a few milliseconds; a call
//! still running after a quarter of its deadline is most likely looping, and on a small machine the
//! core it spins on is its neighbours'. From then on it runs in slices of [`SLICE`] with [`PAUSE`] of
//! sleep after each (a fifth of a core) until it returns or its deadline, which is wall-clock as
//! before, ends it. Calls that return within a quarter of their deadline never get here: the epoch
//! callback runs only when the first epoch deadline is reached.

use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

use super::EPOCH_TICK;

/// How long a throttled call runs between pauses.
const SLICE: Duration = Duration::from_millis(5);
/// How long it sleeps after each slice.
const PAUSE: Duration = Duration::from_millis(20);

/// The clock of the call in progress on a store.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallClock {
    started: Instant,
    deadline: Duration,
}

impl CallClock {
    /// A call starting now with `deadline`, and the epoch ticks it runs unthrottled.
    pub fn start(deadline: Duration) -> (Self, u64) {
        let clock = Self {
            started: Instant::now(),
            deadline,
        };
        (clock, ticks(deadline / 4))
    }

    /// At an epoch deadline: interrupts the call if its deadline has passed, else pauses it and lets it
    /// run one more slice (never past the deadline).
    pub fn on_epoch(&self) -> UpdateDeadline {
        let Some(left) = self.left() else {
            return UpdateDeadline::Interrupt;
        };
        std::thread::sleep(PAUSE.min(left));
        match self.left() {
            Some(left) => UpdateDeadline::Continue(ticks(SLICE.min(left))),
            None => UpdateDeadline::Interrupt,
        }
    }

    /// Time left before the deadline, if any.
    fn left(&self) -> Option<Duration> {
        self.deadline
            .checked_sub(self.started.elapsed())
            .filter(|left| !left.is_zero())
    }
}

/// Epoch ticks in `duration` (at least one).
pub(super) fn ticks(duration: Duration) -> u64 {
    (duration.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_runs_a_quarter_of_its_deadline_unthrottled() {
        let (_, unthrottled) = CallClock::start(Duration::from_millis(200));
        assert_eq!(unthrottled, 50);
        assert_eq!(CallClock::start(Duration::ZERO).1, 1, "at least one tick");
    }

    #[test]
    fn past_its_deadline_a_call_is_interrupted_and_before_it_pauses_then_continues() {
        let past = CallClock {
            started: Instant::now() - Duration::from_millis(300),
            deadline: Duration::from_millis(200),
        };
        assert!(matches!(past.on_epoch(), UpdateDeadline::Interrupt));
        let (running, _) = CallClock::start(Duration::from_secs(10));
        let before = Instant::now();
        let update = running.on_epoch();
        assert!(before.elapsed() >= PAUSE, "it paused");
        assert!(matches!(update, UpdateDeadline::Continue(n) if n == ticks(SLICE)));
    }
}
