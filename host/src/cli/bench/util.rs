//! What `procd bench handler` and `procd bench e2e` share: generated events, CPU clocks, percentiles,
//! scratch directories and the example components.
//!
//! Events are generated the way `procd bench ingest` generates them (a JSON string value of an exact
//! size, pseudo-random but reproducible), so figures of the three benchmarks describe the same bytes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

/// Where `cargo build --release --target wasm32-wasip2` in `guest-examples/` puts the components.
pub(super) const DEFAULT_COMPONENTS: &str = "guest-examples/target/wasm32-wasip2/release";
/// How to build them, for the error when they are missing.
const BUILD_HINT: &str = "build them with `cd guest-examples && cargo build --release --target wasm32-wasip2` \
     (or pass --components DIR)";
/// Value characters: JSON-safe (no escaping), 64 of them so each takes 6 random bits.
const VALUE_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Fails unless `lo <= value <= hi`, naming the flag.
pub(super) fn check_range(flag: &str, value: usize, lo: usize, hi: usize) -> anyhow::Result<()> {
    if !(lo..=hi).contains(&value) {
        bail!("{flag} must be in {lo}..={hi}; got {value}");
    }
    Ok(())
}

/// Fails unless every flag's value (a rate multiple or share) is a number in (0, 1000].
pub(super) fn check_factors(flags: &[(&str, f64)]) -> anyhow::Result<()> {
    for &(flag, value) in flags {
        if !(value.is_finite() && value > 0.0 && value <= 1000.0) {
            bail!("{flag} must be in (0, 1000]; got {value}");
        }
    }
    Ok(())
}

/// splitmix64: a reproducible pseudo-random sequence from a seed.
pub(super) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Value of event `i`: a JSON string of exactly `value_bytes` bytes (quotes included), as in
/// `procd bench ingest`.
pub(super) fn event_value(i: usize, value_bytes: usize) -> String {
    let mut out = String::with_capacity(value_bytes);
    out.push('"');
    let mut state = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    let mut bits = 0u64;
    let mut bits_left = 0;
    for _ in 0..value_bytes.saturating_sub(2) {
        if bits_left < 6 {
            bits = splitmix(&mut state);
            bits_left = 64;
        }
        out.push(char::from(VALUE_ALPHABET[(bits & 63) as usize]));
        bits >>= 6;
        bits_left -= 6;
    }
    out.push('"');
    out
}

/// A component of the examples, read from `dir`.
pub(super) struct Component {
    pub name: &'static str,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// Reads `<dir>/<name>.wasm`, or explains in one line how to build it.
pub(super) fn read_component(dir: &Path, name: &'static str) -> anyhow::Result<Component> {
    let path = dir.join(format!("{name}.wasm"));
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Component { name, path, bytes }),
        Err(e) => bail!("cannot read {}: {e}; {BUILD_HINT}", path.display()),
    }
}

/// The components directory: `--components`, or the examples' build output under the current directory.
pub(super) fn components_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from(DEFAULT_COMPONENTS))
}

/// CPU time the calling thread has been running, in nanoseconds, from `/proc/thread-self/schedstat`
/// (exact; unlike wall time it excludes the time the thread waited for a CPU that another process held).
/// Falls back to `/proc/thread-self/stat` (10 ms ticks); `None` off Linux.
pub(super) fn thread_cpu() -> Option<Duration> {
    if let Some(ns) = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .filter(|&ns| ns > 0)
    {
        return Some(Duration::from_nanos(ns));
    }
    stat_cpu("/proc/thread-self/stat")
}

/// CPU time this process has used so far, all threads included, from `/proc/self/stat`; `None` off
/// Linux.
pub(super) fn process_cpu() -> Option<Duration> {
    stat_cpu("/proc/self/stat")
}

pub(super) fn stat_cpu(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields 3.. follow its last `)`.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // In USER_HZ, which Linux fixes at 100 on the architectures procd builds for.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The block device holding a directory, whose writes `/proc/diskstats` counts: what the disk did while a
/// benchmark's clock ran. `None` off Linux and for file systems on no block device (tmpfs).
pub(super) struct DiskWrites {
    major: u64,
    minor: u64,
    /// The kernel's name of the device (`vda`, `nvme0n1p2`).
    pub name: String,
}

impl DiskWrites {
    pub fn of(dir: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let dev = std::fs::metadata(dir).ok()?.dev();
        // glibc's encoding of dev_t.
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
        let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
        let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
        let name = diskstats_line(&stats, major, minor)?.0.to_string();
        Some(Self { major, minor, name })
    }

    /// Bytes written to the device since boot.
    pub fn written(&self) -> Option<u64> {
        let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
        diskstats_line(&stats, self.major, self.minor).map(|(_, bytes)| bytes)
    }
}

/// The device name and bytes written of the `/proc/diskstats` line of `major:minor` (its tenth field
/// counts 512-byte sectors written, whatever the device's sector size).
fn diskstats_line(stats: &str, major: u64, minor: u64) -> Option<(&str, u64)> {
    stats.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(ma), Some(mi), Some(name), Some(sectors)) =
            (fields.first(), fields.get(1), fields.get(2), fields.get(9))
        else {
            return None;
        };
        if ma.parse::<u64>().ok()? != major || mi.parse::<u64>().ok()? != minor {
            return None;
        }
        Some((*name, sectors.parse::<u64>().ok()? * 512))
    })
}

/// Whether [`thread_cpu`] is exact (schedstat) rather than in 10 ms ticks.
pub(super) fn thread_cpu_is_exact() -> bool {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .is_some_and(|ns| ns > 0)
}

/// The 1-minute load average from `/proc/loadavg`; `None` off Linux.
pub(super) fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next().map(str::to_string)
}

/// The machine line of a parameter block.
pub(super) fn machine_line() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    match load_average() {
        Some(load) => format!("{cpus} CPUs; load average {load} (1 min) at start"),
        None => format!("{cpus} CPUs"),
    }
}

/// The `q` quantile of sorted samples (nearest rank).
pub(super) fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}

/// The median of unsorted samples (the lower one of an even count).
pub(super) fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 0.5)
}

/// A fresh directory, removed with its contents when dropped (also when the run fails).
pub(super) struct Scratch(PathBuf);

impl Scratch {
    pub fn create(parent: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!("procd-bench-{}-{nanos}", std::process::id()));
        // `create_dir`, not `create_dir_all`: never adopt (and later delete) a directory that exists.
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the benchmark's data; delete it by hand");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_strings_of_the_requested_size() {
        for size in [2, 3, 17, 256] {
            let value = event_value(7, size);
            assert_eq!(value.len(), size);
            assert!(matches!(serde_json::from_str::<String>(&value), Ok(s) if s.len() == size - 2));
        }
        assert_ne!(event_value(1, 64), event_value(2, 64));
    }

    #[test]
    fn disk_writes_are_read_from_the_devices_diskstats_line() {
        let stats = "   8       0 sda 10 0 80 5 7 0 1000 9 0 3 14 0 0 0 0\n \
                     252       1 vda1 1 0 8 0 4 0 56 2 0 1 2 0 0 0 0\n";
        assert_eq!(diskstats_line(stats, 252, 1), Some(("vda1", 56 * 512)));
        assert_eq!(diskstats_line(stats, 8, 0), Some(("sda", 1000 * 512)));
        assert_eq!(diskstats_line(stats, 8, 1), None);
        assert_eq!(diskstats_line("8 0 sda 1 2", 8, 0), None, "a short line");
    }

    #[test]
    fn medians_and_percentiles_use_nearest_rank() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[]), 0.0);
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 0.99), 99);
    }

    #[test]
    fn a_missing_component_says_how_to_build_it() {
        let err = read_component(Path::new("/nonexistent-procd-dir"), "passthrough")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("cargo build --release --target wasm32-wasip2"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }
}
