//! The integration-test harness: runs the real `procd` binary on port 0 with a temporary data directory,
//! and talks to it over real sockets with procd's own client.
//!
//! `TestHost::start` waits for the `procd ready: data=... admin=...` line; `stop` sends SIGINT and waits
//! for a clean exit; `kill` sends SIGKILL; `restart` starts again on the same data directory (new ports).
//!
//! The server's log (warnings and errors) goes to `server.log` in the temporary directory, not to the
//! test's stderr: dozens of servers run at once and their warnings drowned the failure reports. When a
//! `TestHost` is dropped it prints the log's tail, which the test harness shows only for a failed test.

#![allow(dead_code)]

pub mod guests;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use procd::client::{Client, Response};

/// Result type of tests.
pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How long a server gets to start or stop before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of the server's log printed when a `TestHost` is dropped.
const LOG_TAIL_LINES: usize = 40;

/// A running `procd serve`.
pub struct TestHost {
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` of the data plane.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the control plane.
    pub admin_url: String,
}

impl TestHost {
    /// Starts a server with `partitions` and `cells` and extra `--set KEY=VALUE` settings.
    pub fn start_with(partitions: u32, cells: u32, settings: &[&str]) -> TestResult<Self> {
        let dir = tempfile::tempdir()?;
        let mut args = vec![
            format!("--partitions={partitions}"),
            format!("--cells={cells}"),
        ];
        args.extend(settings.iter().map(|s| format!("--set={s}")));
        let mut host = Self {
            dir,
            args,
            child: None,
            url: String::new(),
            admin_url: String::new(),
        };
        host.spawn()?;
        Ok(host)
    }

    /// Starts a server with 8 partitions in 2 cells.
    pub fn start() -> TestResult<Self> {
        Self::start_with(8, 2, &[])
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `procd` binary under test.
    pub fn binary() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_procd"))
    }

    /// The server's log, kept over restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn spawn(&mut self) -> TestResult {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut child = Command::new(Self::binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait()?;
                return Err(format!("procd did not become ready (exit: {status})").into());
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
                .ok_or(format!("bad ready line {line:?}"))
        };
        self.url = field("data=")?;
        self.admin_url = field("admin=")?;
        self.child = Some(child);
        Ok(())
    }

    /// A client for the data plane.
    pub fn data(&self) -> TestResult<Client> {
        Ok(Client::new(&self.url)?)
    }

    /// A client for the control plane.
    pub fn admin(&self) -> TestResult<Client> {
        Ok(Client::new(&self.admin_url)?)
    }

    /// Stops the server with SIGINT and returns its exit code.
    pub fn stop(&mut self) -> TestResult<i32> {
        let mut child = self.child.take().ok_or("not running")?;
        signal(&child, libc::SIGINT)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("procd did not exit within 30 s of SIGINT".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL (no chance to clean up).
    pub fn kill(&mut self) -> TestResult {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same data directory.
    pub fn restart(&mut self) -> TestResult {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()
    }

    /// Runs `procd serve` on this data directory with other arguments, expecting it to fail at start;
    /// returns its exit code and stderr.
    pub fn start_failing(&self, args: &[&str]) -> TestResult<(i32, String)> {
        let out = Command::new(Self::binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Creates a topic, panicking on failure.
    pub async fn create_topic(&self, name: &str) -> TestResult {
        let resp = self
            .admin()?
            .post_json("/v1/topics", &serde_json::json!({ "name": name }))
            .await?;
        ensure_status(&resp, 201)
    }

    /// Creates each of `names` with default settings, in order.
    pub async fn create_topics(&self, names: &[&str]) -> TestResult {
        for name in names {
            self.create_topic(name).await?;
        }
        Ok(())
    }

    /// Reads a whole partition from `from` to its end offset.
    pub async fn read_all(
        &self,
        topic: &str,
        partition: u32,
    ) -> TestResult<Vec<serde_json::Value>> {
        let mut client = self.data()?;
        let mut from = 0u64;
        let mut events = Vec::new();
        loop {
            let resp = client
                .get(&format!(
                    "/v1/topics/{topic}/partitions/{partition}/events?from={from}&limit=10000"
                ))
                .await?;
            ensure_status(&resp, 200)?;
            let lines = ndjson(&resp)?;
            let end: u64 = resp
                .header("procd-end-offset")
                .ok_or("no end offset")?
                .parse()?;
            from = resp
                .header("procd-next-offset")
                .ok_or("no next offset")?
                .parse()?;
            events.extend(lines);
            if from >= end {
                return Ok(events);
            }
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Captured by the test harness: shown only if the test failed.
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        if !lines.is_empty() {
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "--- the server's log ({} lines, the last {}):\n{}",
                lines.len(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

fn signal(child: &Child, sig: i32) -> TestResult {
    let pid = i32::try_from(child.id())?;
    // SAFETY: kill(2) with a pid we spawned and still own (not yet waited for).
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().into())
    }
}

/// Fails unless the response has `status`.
pub fn ensure_status(resp: &Response, status: u16) -> TestResult {
    if resp.status == status {
        Ok(())
    } else {
        Err(format!(
            "expected HTTP {status}, got {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        )
        .into())
    }
}

/// Parses an NDJSON body.
pub fn ndjson(resp: &Response) -> TestResult<Vec<serde_json::Value>> {
    let text = std::str::from_utf8(&resp.body)?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

impl TestHost {
    /// Deploys component `bytes` as handler `name` reading `input` and writing `outputs`, with extra
    /// query parameters (e.g. `config=k=v`, `from=latest`); returns the response.
    pub async fn deploy(
        &self,
        name: &str,
        bytes: Vec<u8>,
        input: &str,
        outputs: &[&str],
        extra: &[&str],
    ) -> TestResult<Response> {
        let mut query = format!("input={input}");
        for o in outputs {
            query.push_str(&format!("&output={o}"));
        }
        for e in extra {
            query.push('&');
            query.push_str(e);
        }
        let path = format!("/v1/handlers/{name}?{query}");
        Ok(self
            .admin()?
            .request(
                hyper::Method::PUT,
                &path,
                &[("content-type", "application/wasm")],
                bytes,
            )
            .await?)
    }

    /// Waits until handler `name` has processed everything (lag 0 on every partition) or `timeout`.
    pub async fn wait_caught_up(&self, name: &str, timeout: Duration) -> TestResult {
        let deadline = Instant::now() + timeout;
        let mut admin = self.admin()?;
        loop {
            let resp = admin.get(&format!("/v1/handlers/{name}")).await?;
            ensure_status(&resp, 200)?;
            let v = resp.json()?;
            let parts = v["partitions"].as_array().cloned().unwrap_or_default();
            let caught_up = !parts.is_empty()
                && parts.iter().all(|p| {
                    p["lag"] == 0 && p["end_offset"].as_u64().is_some() && p["status"] != "failed"
                });
            if caught_up {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(
                    format!("handler {name} did not catch up within {timeout:?}: {v}").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs the `procd` CLI as a user would, with `stdin` as its input, against `host` (through
/// `PROCD_URL`/`PROCD_ADMIN_URL`) or with no server configured.
pub fn procd(
    host: Option<&TestHost>,
    args: &[&str],
    stdin: &[u8],
) -> TestResult<std::process::Output> {
    use std::io::Write as _;
    let mut cmd = Command::new(TestHost::binary());
    cmd.args(args)
        .env("RUST_LOG", "off")
        .env_remove("PROCD_URL")
        .env_remove("PROCD_ADMIN_URL");
    if let Some(host) = host {
        cmd.env("PROCD_URL", &host.url)
            .env("PROCD_ADMIN_URL", &host.admin_url);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin)?;
    }
    Ok(child.wait_with_output()?)
}
