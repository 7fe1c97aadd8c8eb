//! `procd bench surge` and `procd bench fairness` with durations of a few seconds: each runs to the
//! end, prints the report's fields, passes its exactly-once check and leaves no data behind. The
//! figures are not asserted: they depend on the machine.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{TestHost, TestResult};

/// A benchmark that has not finished by then has hung.
const DEADLINE: Duration = Duration::from_secs(180);

/// Runs `procd bench <args>` with its data under a fresh directory; returns its stdout once it has
/// succeeded and left that directory empty.
fn bench(args: &[&str]) -> TestResult<String> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(TestHost::binary())
        .arg("bench")
        .args(args)
        .arg("--dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut pipes = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ] {
        let mut pipe = pipe.ok_or("no pipe")?;
        pipes.push(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        }));
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("procd bench {args:?} did not finish within {DEADLINE:?}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut texts = pipes.into_iter().map(|t| t.join().unwrap_or_default());
    let (stdout, stderr) = (
        texts.next().unwrap_or_default(),
        texts.next().unwrap_or_default(),
    );
    if !status.success() {
        return Err(format!("procd bench {args:?} failed ({status}):\n{stdout}\n{stderr}").into());
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())?.collect();
    assert!(left.is_empty(), "the benchmark left {left:?} behind");
    Ok(stdout)
}

fn assert_has(out: &str, fields: &[&str]) {
    for field in fields {
        assert!(out.contains(field), "no {field:?} in the report:\n{out}");
    }
}

#[test]
fn the_surge_benchmark_reports_every_figure_and_loses_nothing() -> TestResult {
    let out = bench(&[
        "surge",
        "--capacity-secs=1",
        "--capacity-connections=2",
        "--baseline-secs=1",
        "--surge-secs=2",
        "--after-secs=1",
        "--factor=3",
        "--batch=10",
        "--connections=4",
        "--partitions=2",
    ])?;
    assert_has(
        &out,
        &[
            "capacity C ",
            "admission.global_bytes_per_sec=",
            "accepted ms p50/99/999/max",
            "refused ms p50/99/999/max",
            "RSS MiB",
            "TCP connections opened",
            "exactly once: passed",
            "targets (issue 6)",
            "goodput during the surge >= 90 % of C",
            "refusal p99 during the surge <= 5 ms",
            "no crash",
            "server RSS <=",
            "0 accepted events lost",
            "back within 2x baseline",
        ],
    );
    for phase in ["baseline", "surge", "after"] {
        assert!(
            out.lines().any(|l| l.starts_with(phase)),
            "no {phase} row:\n{out}"
        );
    }
    Ok(())
}

#[test]
fn the_fairness_benchmark_reports_each_tenant_and_loses_nothing() -> TestResult {
    let out = bench(&[
        "fairness",
        "--capacity-secs=1",
        "--capacity-connections=2",
        "--secs=2",
        "--tenants=3",
        "--batch=10",
        "--connections=4",
        "--partitions=2",
    ])?;
    assert_has(
        &out,
        &[
            "admission.tenant_bytes_per_sec=",
            "goodput",
            "exactly once: passed",
            "every other tenant's goodput >= 99 %",
        ],
    );
    for tenant in ["hot ", "t1 ", "t2 "] {
        assert!(
            out.lines().any(|l| l.starts_with(tenant)),
            "no row for tenant {tenant:?}:\n{out}"
        );
    }
    Ok(())
}
