//! Throttling of handler calls that run long. A batch takes microseconds to a few milliseconds; a call
//! still running after [`GRACE`] (or a quarter of its deadline, if that is shorter) may be looping, and on
//! a small machine the core it spins on is its neighbours'. From then on, after every [`SLICE`] of running
//! it looks whether threads are waiting for a CPU (the kernel's count of runnable threads against its
//! online CPUs); if so it sleeps [`PAUSE`] before the next slice. A long call thus gets the CPU nobody
//! else wants, and about a tenth of a core while others wait; its deadline, wall-clock as before, ends
//! it. Calls that return within the grace never get here: the epoch callback runs only once the first
//! epoch deadline is reached.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;

use super::EPOCH_TICK;

/// How long a call runs before it is throttled (at most a quarter of its deadline).
const GRACE: Duration = Duration::from_millis(10);
/// How long a throttled call runs between looks at the CPUs.
const SLICE: Duration = Duration::from_millis(2);
/// How long it sleeps after a slice when threads are waiting for a CPU.
const PAUSE: Duration = Duration::from_millis(18);

/// The clock of the call in progress on a store.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallClock {
    started: Instant,
    deadline: Duration,
}

impl CallClock {
    /// A call starting now with `deadline`, and the epoch ticks it runs before it is throttled.
    pub fn start(deadline: Duration) -> (Self, u64) {
        let clock = Self {
            started: Instant::now(),
            deadline,
        };
        (clock, ticks(GRACE.min(deadline / 4)))
    }

    /// At an epoch deadline: interrupts the call if its deadline has passed; else, if other threads are
    /// waiting for a CPU, pauses it; then lets it run one more slice (never past the deadline).
    pub fn on_epoch(&self) -> UpdateDeadline {
        self.on_epoch_with(cpus_contended)
    }

    fn on_epoch_with(&self, contended: impl Fn() -> bool) -> UpdateDeadline {
        let Some(left) = self.left() else {
            return UpdateDeadline::Interrupt;
        };
        if contended() {
            std::thread::sleep(PAUSE.min(left));
        }
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

/// Whether more threads are runnable than the machine has online CPUs, i.e. someone is waiting for one.
/// Both counts are the kernel's (`/proc/loadavg`, `/proc/stat`), so they agree inside a container too;
/// where they cannot be read, a long call is assumed to be in the way.
fn cpus_contended() -> bool {
    static CPUS: OnceLock<Option<usize>> = OnceLock::new();
    let cpus = *CPUS.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let online = online_cpus(&stat);
        (online > 0).then_some(online)
    });
    let runnable = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|loadavg| runnable_threads(&loadavg));
    match (runnable, cpus) {
        (Some(runnable), Some(cpus)) => runnable > cpus,
        _ => true,
    }
}

/// The runnable threads in `/proc/loadavg` (its fourth field is `runnable/total`; the reader counts).
fn runnable_threads(loadavg: &str) -> Option<usize> {
    let field = loadavg.split_whitespace().nth(3)?;
    field.split_once('/')?.0.parse().ok()
}

/// The online CPUs in `/proc/stat`: one `cpuN` line each, after the `cpu` total.
fn online_cpus(stat: &str) -> usize {
    stat.lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_runs_its_grace_or_a_quarter_of_its_deadline_unthrottled() {
        assert_eq!(CallClock::start(Duration::from_secs(1)).1, ticks(GRACE));
        assert_eq!(CallClock::start(Duration::from_millis(20)).1, 5);
        assert_eq!(CallClock::start(Duration::ZERO).1, 1, "at least one tick");
    }

    #[test]
    fn past_its_deadline_a_call_is_interrupted() {
        let past = CallClock {
            started: Instant::now() - Duration::from_millis(300),
            deadline: Duration::from_millis(200),
        };
        assert!(matches!(
            past.on_epoch_with(|| false),
            UpdateDeadline::Interrupt
        ));
    }

    #[test]
    fn a_long_call_pauses_only_while_threads_wait_for_a_cpu() {
        let (running, _) = CallClock::start(Duration::from_secs(10));
        let before = Instant::now();
        let update = running.on_epoch_with(|| false);
        assert!(before.elapsed() < PAUSE, "nobody waits: no pause");
        assert!(matches!(update, UpdateDeadline::Continue(n) if n == ticks(SLICE)));
        let before = Instant::now();
        let update = running.on_epoch_with(|| true);
        assert!(before.elapsed() >= PAUSE, "others wait: it paused");
        assert!(matches!(update, UpdateDeadline::Continue(n) if n == ticks(SLICE)));
    }

    #[test]
    fn reads_the_kernels_counts() {
        assert_eq!(runnable_threads("0.21 1.13 1.59 3/80 18092\n"), Some(3));
        assert_eq!(runnable_threads("0.21 1.13"), None);
        assert_eq!(runnable_threads("a b c x/80 1"), None);
        let stat = "cpu  10 0 5 100\ncpu0 5 0 2 50\ncpu1 5 0 3 50\nintr 1 2\nctxt 3\n";
        assert_eq!(online_cpus(stat), 2);
        assert!(online_cpus(&std::fs::read_to_string("/proc/stat").unwrap_or_default()) > 0);
    }
}
