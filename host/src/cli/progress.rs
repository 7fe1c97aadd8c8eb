//! Progress feedback for long CLI operations (deploying, building, producing a big file), drawn on
//! stderr and only when stderr is a terminal, so scripts and logs see nothing but results.
//!
//! Hand-drawn (a `\r`-redrawn line) rather than a progress-bar crate: procd needs a spinner and a
//! counter, nothing more, and every dependency is one more thing to build and audit.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// How long an operation runs before its spinner appears: most finish sooner and print just their
/// result.
const SPINNER_DELAY: Duration = Duration::from_millis(300);
/// Spinner frame period, and the fastest a progress line is redrawn.
const TICK: Duration = Duration::from_millis(100);
const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// Awaits `work`, drawing a spinner with `label` on stderr after [`SPINNER_DELAY`] if stderr is a
/// terminal.
pub(crate) async fn with_spinner<T>(label: &str, work: impl std::future::Future<Output = T>) -> T {
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return done,
        () = tokio::time::sleep(SPINNER_DELAY) => {}
    }
    let mut tick = tokio::time::interval(TICK);
    let mut frame = 0usize;
    let done = loop {
        tokio::select! {
            done = &mut work => break done,
            _ = tick.tick() => {
                draw(&format!("{} {label}", FRAMES[frame % FRAMES.len()]));
                frame += 1;
            }
        }
    };
    erase();
    done
}

/// A counter line (`⠋ producing orders: 12000 events, 3.1 MiB of 9.0 MiB (34%)`) redrawn at most every
/// [`TICK`]; invisible when stderr is not a terminal. Erased on [`Counter::finish`] or drop.
pub(crate) struct Counter {
    label: String,
    total_bytes: Option<u64>,
    last_draw: Option<Instant>,
    frame: usize,
    visible: bool,
}

impl Counter {
    /// A counter for `label`; `total_bytes` (e.g. a file's size) turns on the percentage.
    pub(crate) fn new(label: impl Into<String>, total_bytes: Option<u64>) -> Self {
        Self {
            label: label.into(),
            total_bytes,
            last_draw: None,
            frame: 0,
            visible: std::io::stderr().is_terminal(),
        }
    }

    /// Hides the counter unless `cond` holds (e.g. when results stream to the same terminal).
    pub(crate) fn visible_if(mut self, cond: bool) -> Self {
        self.visible &= cond;
        self
    }

    /// Reports `events` done and `bytes` of the input consumed.
    pub(crate) fn update(&mut self, events: u64, bytes: u64) {
        if !self.visible || self.last_draw.is_some_and(|t| t.elapsed() < TICK) {
            return;
        }
        self.last_draw = Some(Instant::now());
        let line = counter_line(&self.label, events, bytes, self.total_bytes);
        draw(&format!("{} {line}", FRAMES[self.frame % FRAMES.len()]));
        self.frame += 1;
    }

    /// Erases the line.
    pub(crate) fn finish(&mut self) {
        if self.visible && self.last_draw.is_some() {
            erase();
        }
        self.last_draw = None;
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.finish();
    }
}

fn counter_line(label: &str, events: u64, bytes: u64, total_bytes: Option<u64>) -> String {
    match total_bytes {
        Some(total) if total > 0 => format!(
            "{label}: {events} events, {} of {} ({}%)",
            human_bytes(bytes),
            human_bytes(total),
            (bytes.min(total) * 100) / total
        ),
        _ => format!("{label}: {events} events, {}", human_bytes(bytes)),
    }
}

fn draw(line: &str) {
    let mut err = std::io::stderr().lock();
    // Feedback that cannot be drawn is not worth failing the operation over.
    let _ = write!(err, "\r\x1b[2K{line}");
    let _ = err.flush();
}

/// Erases the progress line so the result (or an error) starts on a clean line.
fn erase() {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\r\x1b[2K");
    let _ = err.flush();
}

/// `512 B`, `1.5 KiB`, `3.0 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let n = n as f64;
    if n < KIB {
        format!("{n} B")
    } else if n < KIB * KIB {
        format!("{:.1} KiB", n / KIB)
    } else {
        format!("{:.1} MiB", n / (KIB * KIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_a_person_wrote_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn counter_lines_show_a_percentage_when_the_total_is_known() {
        assert_eq!(
            counter_line("producing t", 10, 512, Some(2048)),
            "producing t: 10 events, 512 B of 2.0 KiB (25%)"
        );
        assert_eq!(
            counter_line("producing t", 10, 512, None),
            "producing t: 10 events, 512 B"
        );
    }
}
