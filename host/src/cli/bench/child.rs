//! The server of the load benchmarks (`surge`, `fairness`) as a child process: `procd serve` from this
//! very binary on free loopback ports and a fresh data directory, so that its memory (VmRSS) and CPU
//! time are its own and not the load generator's. Dropping it kills the process and, once it has
//! exited, removes the directory.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::util::{Scratch, stat_cpu};
use crate::client::Client;

/// How long the server gets to announce itself.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `procd serve`.
pub(super) struct ChildServer {
    child: Child,
    pid: u32,
    /// `http://127.0.0.1:PORT` of the data plane.
    pub data_url: String,
    admin_url: String,
    /// Declared last: removed after `Drop` has reaped the process.
    _dir: Scratch,
}

impl ChildServer {
    /// Starts `procd serve` with `args` (flags such as `--partitions 8`, `--set KEY=VALUE`) in a new
    /// directory under `parent`. No `procd.toml` and no `PROCD_*` variable reaches it: the benchmark's
    /// printed configuration is the whole of it.
    pub async fn start(parent: &Path, args: Vec<String>) -> anyhow::Result<Self> {
        let parent = parent.to_path_buf();
        tokio::task::spawn_blocking(move || Self::start_blocking(&parent, &args))
            .await
            .context("starting the server panicked")?
    }

    fn start_blocking(parent: &Path, args: &[String]) -> anyhow::Result<Self> {
        let dir = Scratch::create(parent)?;
        let exe = std::env::current_exe().context("cannot find the procd binary")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            // Its working directory holds no procd.toml.
            .current_dir(dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PROCD_") {
                cmd.env_remove(name);
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} serve", exe.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("no stdout from the server")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining, so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let mut server = Self {
            child,
            pid,
            data_url: String::new(),
            admin_url: String::new(),
            _dir: dir,
        };
        let Ok(line) = rx.recv_timeout(START_TIMEOUT) else {
            let status = server.child.try_wait().ok().flatten();
            bail!(
                "the server did not announce itself within {} s (exit status: {status:?})",
                START_TIMEOUT.as_secs()
            );
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
                .with_context(|| format!("unexpected ready line from the server: {line:?}"))
        };
        server.data_url = field("data=")?;
        server.admin_url = field("admin=")?;
        Ok(server)
    }

    /// The data plane's `host:port`.
    pub fn data_addr(&self) -> &str {
        self.data_url.trim_start_matches("http://")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is still running (a crash or an exit ends a benchmark's claim).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Creates `topic` through the admin API.
    pub async fn create_topic(&self, topic: &str) -> anyhow::Result<()> {
        let mut admin = Client::new(&self.admin_url)?;
        let resp = admin
            .post_json("/v1/topics", &serde_json::json!({ "name": topic }))
            .await?;
        crate::cli::check(resp).with_context(|| format!("cannot create topic {topic:?}"))?;
        Ok(())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`); `None` off Linux or once
/// it is gone.
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One sample of the server and of this process.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    /// Seconds since the load started.
    pub at_secs: f64,
    pub server_rss_kib: Option<u64>,
    /// CPU time used so far.
    pub server_cpu: Option<Duration>,
    pub client_cpu: Option<Duration>,
}

/// Samples server RSS and CPU and this process's CPU every `every` until `stop` fires.
pub(super) async fn sample(
    pid: u32,
    started: Instant,
    every: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => samples.push(Sample {
                at_secs: started.elapsed().as_secs_f64(),
                server_rss_kib: rss_kib(pid),
                server_cpu: stat_cpu(&format!("/proc/{pid}/stat")),
                client_cpu: super::util::process_cpu(),
            }),
            _ = &mut stop => break,
        }
    }
    samples
}
