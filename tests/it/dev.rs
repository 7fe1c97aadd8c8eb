//! `procd new` and `procd dev` as a user runs them: scaffold a crate, start the dev runner on it, post
//! events, see the outputs in its stdout, edit the source and see the new behaviour with no event or
//! state lost, break the build and see the old version keep running, stop with SIGINT (exit 0), start
//! again and find the state where it was.
//!
//! The handler builds use their own cargo target directory (`$CARGO_TARGET_DIR/dev-handlers`, else
//! `target/dev-handlers`), so the first run compiles the SDK's dependencies for wasm32-wasip2 once
//! and later runs only the handler crate. Every wait is bounded.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use procd::client::Client;

use crate::harness::{TestHost, TestResult, ensure_status, procd};

/// The first build compiles the SDK and its dependencies for wasm32-wasip2 (about a minute on two
/// cores; more while other tests build).
const FIRST_DEPLOY: Duration = Duration::from_secs(600);
/// A rebuild of the handler crate alone, plus the deploy.
const REDEPLOY: Duration = Duration::from_secs(180);
/// An event through the handler to the tail.
const OUTPUT: Duration = Duration::from_secs(60);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn handler_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("dev-handlers")
}

/// `procd new NAME` in a fresh temporary directory; returns (that directory, the crate's path).
fn scaffold(name: &str) -> TestResult<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    let out = procd(None, &["new", path.to_str().ok_or("non-UTF-8 path")?], b"")?;
    if !out.status.success() {
        return Err(format!("procd new failed: {}", text(&out.stderr)).into());
    }
    Ok((dir, path))
}

/// A running `procd dev` (or `procd serve`), with its stdout lines as they come and its stderr
/// collected.
pub(crate) struct Dev {
    child: Option<Child>,
    lines: Receiver<String>,
    pub(crate) seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    pub(crate) data_url: String,
    pub(crate) admin_url: String,
}

impl Dev {
    fn start(crate_dir: &Path) -> TestResult<Self> {
        let mut cmd = Command::new(TestHost::binary());
        cmd.arg("dev")
            .arg(crate_dir)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--partitions", "2"])
            .env("CARGO_TARGET_DIR", handler_target_dir());
        Self::spawn(cmd)
    }

    /// Spawns `cmd` (a `procd dev` or `procd serve` on port 0) and waits for its ready line.
    pub(crate) fn spawn(mut cmd: Command) -> TestResult<Self> {
        let mut child = cmd
            .env("RUST_LOG", "warn")
            // Cargo may set these for the test process; a handler build must not inherit them.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut stderr_pipe = child.stderr.take().ok_or("no stderr")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let mut dev = Self {
            child: Some(child),
            lines,
            seen: Vec::new(),
            stderr,
            data_url: String::new(),
            admin_url: String::new(),
        };
        let ready = dev.wait_for(|l| l.starts_with("procd ready:"), Duration::from_secs(60))?;
        let field = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
                .ok_or(format!("bad ready line {ready:?}"))
        };
        dev.data_url = field("data=")?;
        dev.admin_url = field("admin=")?;
        Ok(dev)
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for the next stdout line matching `pred` (lines before it are kept in `seen`).
    pub(crate) fn wait_for(
        &mut self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> TestResult<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "procd dev did not print the expected line within {timeout:?}; stdout so far:\n{}\nstderr:\n{}",
                        self.seen.join("\n"),
                        self.stderr()
                    )
                    .into());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "procd dev exited; stdout:\n{}\nstderr:\n{}",
                        self.seen.join("\n"),
                        self.stderr()
                    )
                    .into());
                }
            }
        }
    }

    /// Waits until `n` output lines containing `needle` were printed (since the start); returns them.
    fn wait_outputs(&mut self, needle: &str, n: usize) -> TestResult<Vec<String>> {
        let matching = |seen: &[String]| -> Vec<String> {
            seen.iter()
                .filter(|l| l.starts_with("output ") && l.contains(needle))
                .cloned()
                .collect()
        };
        let deadline = Instant::now() + OUTPUT;
        while matching(&self.seen).len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_for(|l| l.starts_with("output ") && l.contains(needle), left)?;
        }
        Ok(matching(&self.seen))
    }

    async fn post(&self, ndjson: &str) -> TestResult {
        let resp = Client::new(&self.data_url)?
            .post_ndjson("/v1/topics/input/events", ndjson.to_string())
            .await?;
        ensure_status(&resp, 202)
    }

    /// SIGINT, then the exit code.
    pub(crate) fn interrupt(&mut self) -> TestResult<i32> {
        let mut child = self.child.take().ok_or("not running")?;
        let pid = i32::try_from(child.id())?;
        // SAFETY: kill(2) on a child we spawned and have not waited for.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, libc::SIGINT) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("procd dev did not exit within 30 s of SIGINT".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `output p1@7 alice {...}` → (partition, offset).
fn position(line: &str) -> Option<(u32, u64)> {
    let pos = line.split_whitespace().nth(1)?.strip_prefix('p')?;
    let (p, o) = pos.split_once('@')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

fn edit(file: &Path, from: &str, to: &str) -> TestResult {
    let source = std::fs::read_to_string(file)?;
    if !source.contains(from) {
        return Err(format!("{} does not contain {from:?}", file.display()).into());
    }
    std::fs::write(file, source.replace(from, to))?;
    Ok(())
}

#[tokio::test]
async fn dev_runs_a_new_crate_and_applies_edits_live() -> TestResult {
    let (_tmp, crate_dir) = scaffold("greeter")?;
    let mut dev = Dev::start(&crate_dir)?;
    dev.wait_for(|l| l.contains("deployed greeter v1"), FIRST_DEPLOY)?;
    let url = dev.data_url.clone();
    let curl = dev.wait_for(|l| l.contains("curl -s "), OUTPUT)?;
    assert!(
        curl.contains(&format!("{url}/v1/topics/input/events")),
        "{curl}"
    );

    let sample = std::fs::read_to_string(crate_dir.join("events.ndjson"))?;
    dev.post(&sample).await?;
    let first = dev.wait_outputs("\"message\":\"hello, ", 3)?;
    for expected in [
        r#"alice {"message":"hello, alice","count":1,"value":{"item":"book","qty":1}}"#,
        r#"bob {"message":"hello, bob","count":1,"value":{"item":"pen","qty":3}}"#,
        r#"alice {"message":"hello, alice","count":2,"value":{"item":"lamp","qty":2}}"#,
    ] {
        assert!(
            first.iter().any(|l| l.ends_with(expected)),
            "{expected} in {first:?}"
        );
    }

    // The user edits the handler: the runner rebuilds and hot-swaps it.
    edit(
        &crate_dir.join("src/lib.rs"),
        r#"DEFAULT_GREETING: &str = "hello""#,
        r#"DEFAULT_GREETING: &str = "bonjour""#,
    )?;
    let started = Instant::now();
    dev.wait_for(|l| l.contains("deployed greeter v2"), REDEPLOY)?;
    eprintln!("edit to v2 deployed in {:?}", started.elapsed());

    // New behaviour, same state: alice's count goes on from 2.
    dev.post("{\"key\":\"alice\",\"value\":\"again\"}\n")
        .await?;
    let after = dev.wait_outputs("bonjour, alice", 1)?;
    assert!(
        after[0].ends_with(r#"alice {"message":"bonjour, alice","count":3,"value":"again"}"#),
        "{after:?}"
    );

    // Every event gave exactly one output, at dense offsets per partition: nothing lost or repeated.
    let mut positions: Vec<(u32, u64)> = dev
        .seen
        .iter()
        .filter(|l| l.starts_with("output "))
        .filter_map(|l| position(l))
        .collect();
    assert_eq!(positions.len(), 4, "{:?}", dev.seen);
    positions.sort_unstable();
    for p in [0, 1] {
        let offsets: Vec<u64> = positions.iter().filter(|x| x.0 == p).map(|x| x.1).collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as u64).collect::<Vec<_>>(),
            "{positions:?}"
        );
    }

    assert_eq!(dev.interrupt()?, 0, "stderr:\n{}", dev.stderr());
    assert!(crate_dir.join(".procd").join("procd.json").is_file());

    // A second session on the same crate reuses .procd/: the count goes on from 3, and the unchanged
    // component is not deployed again.
    let mut again = Dev::start(&crate_dir)?;
    again.wait_for(
        |l| l.contains("greeter v2 already runs this component"),
        FIRST_DEPLOY,
    )?;
    again.post("{\"key\":\"alice\",\"value\":4}\n").await?;
    let resumed = again.wait_outputs("bonjour, alice", 1)?;
    assert!(
        resumed[0].ends_with(r#"alice {"message":"bonjour, alice","count":4,"value":4}"#),
        "{resumed:?}"
    );
    assert_eq!(again.interrupt()?, 0, "stderr:\n{}", again.stderr());
    Ok(())
}

#[tokio::test]
async fn dev_keeps_the_running_version_when_the_build_fails() -> TestResult {
    let (_tmp, crate_dir) = scaffold("fixme")?;
    let mut dev = Dev::start(&crate_dir)?;
    dev.wait_for(|l| l.contains("deployed fixme v1"), FIRST_DEPLOY)?;
    let lib = crate_dir.join("src/lib.rs");

    // Break it: cargo's errors reach the terminal, v1 keeps running.
    edit(
        &lib,
        "procd_sdk::export!",
        "fn broken( {\nprocd_sdk::export!",
    )?;
    dev.wait_for(|l| l.contains("build failed"), REDEPLOY)?;
    assert!(
        dev.seen.iter().any(|l| l.contains("v1 keeps running")),
        "{:?}",
        dev.seen
    );
    let stderr = dev.stderr();
    assert!(
        stderr.contains("error") && stderr.contains("unclosed delimiter"),
        "the compiler's errors are shown: {stderr}"
    );
    dev.post("{\"key\":\"k\",\"value\":1}\n").await?;
    dev.wait_outputs(r#""message":"hello, k","count":1"#, 1)?;

    // Fix it, with a visible change: the fix is deployed and runs.
    edit(&lib, "fn broken( {\n", "")?;
    edit(
        &lib,
        r#"DEFAULT_GREETING: &str = "hello""#,
        r#"DEFAULT_GREETING: &str = "fixed""#,
    )?;
    dev.wait_for(|l| l.contains("deployed fixme v2"), REDEPLOY)?;
    dev.post("{\"key\":\"k\",\"value\":2}\n").await?;
    dev.wait_outputs(r#""message":"fixed, k","count":2"#, 1)?;

    assert_eq!(dev.interrupt()?, 0, "stderr:\n{}", dev.stderr());
    Ok(())
}

#[tokio::test]
async fn dev_and_new_errors_are_one_line() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = |p: &str| dir.path().join(p).display().to_string();
    std::fs::create_dir(dir.path().join("full"))?;
    std::fs::write(dir.path().join("full").join("notes.txt"), "x")?;
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["dev".into(), path("missing")], "cannot open"),
        (
            vec!["dev".into(), dir.path().display().to_string()],
            "no Cargo.toml",
        ),
        (
            vec!["dev".into(), path("full/notes.txt")],
            "neither a handler crate",
        ),
        (vec!["new".into(), path("full")], "not empty"),
        (vec!["new".into(), path("9lives")], "invalid handler name"),
        (
            vec![
                "new".into(),
                path("x"),
                "--sdk-path".into(),
                path("nowhere"),
            ],
            "--sdk-path",
        ),
        (
            vec!["dev".into(), "--partitions".into(), "many".into()],
            "invalid value",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = procd(None, &args, b"")?;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Backtrace"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn dev_restarted_on_the_same_component_deploys_nothing() -> TestResult {
    // A built component as the source: no cargo build, so this test is quick.
    let dir = tempfile::tempdir()?;
    let wasm = dir.path().join("counter.wasm");
    std::fs::write(&wasm, crate::harness::guests::example("counter")?)?;
    let start = |extra: &[&str]| -> TestResult<Dev> {
        let mut cmd = Command::new(TestHost::binary());
        // For a `.wasm`, the data directory is `./.procd/`.
        cmd.current_dir(dir.path())
            .arg("dev")
            .arg(&wasm)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--partitions", "2"])
            .args(extra);
        Dev::spawn(cmd)
    };
    let versions = |dev: &Dev| {
        let admin_url = dev.admin_url.clone();
        async move {
            let mut admin = Client::new(&admin_url)?;
            let resp = admin.get("/v1/handlers/counter").await?;
            ensure_status(&resp, 200)?;
            let def = resp.json()?;
            TestResult::Ok(def["versions"].as_array().map_or(0, Vec::len))
        }
    };

    let mut dev = start(&[])?;
    dev.wait_for(|l| l.contains("deployed counter v1"), REDEPLOY)?;
    assert_eq!(dev.interrupt()?, 0, "stderr:\n{}", dev.stderr());
    assert!(dir.path().join(".procd").join("procd.json").is_file());

    // The same component and settings: v1 keeps running, no new version.
    let mut dev = start(&[])?;
    dev.wait_for(
        |l| l.contains("counter v1 already runs this component with these settings"),
        REDEPLOY,
    )?;
    assert_eq!(versions(&dev).await?, 1);
    dev.post("{\"key\":\"k\",\"value\":1}\n").await?;
    dev.wait_outputs(" k 1", 1)?;
    assert_eq!(dev.interrupt()?, 0, "stderr:\n{}", dev.stderr());

    // Other settings are a change: a new version.
    let mut dev = start(&["--config", "note=x"])?;
    dev.wait_for(|l| l.contains("deployed counter v2"), REDEPLOY)?;
    assert_eq!(versions(&dev).await?, 2);
    assert_eq!(dev.interrupt()?, 0, "stderr:\n{}", dev.stderr());
    Ok(())
}
