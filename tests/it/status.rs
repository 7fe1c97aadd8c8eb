//! `procd status` against a real server: one row per handler and partition with the figures the
//! control plane reports, and one-line errors.

use std::time::Duration;

use crate::harness::guests::example;
use crate::harness::{TestHost, TestResult, ensure_status, procd};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn status_shows_each_partition_of_each_handler() -> TestResult {
    let host = TestHost::start_with(2, 1, &[])?;
    host.create_topics(&["in", "counts"]).await?;

    let out = procd(Some(&host), &["status"], b"")?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("no handlers deployed"));

    let resp = host
        .deploy("counter", example("counter")?, "in", &["counts"], &[])
        .await?;
    ensure_status(&resp, 201)?;
    let events: String = (0..20)
        .map(|i| format!("{{\"key\":\"k{}\",\"value\":{i}}}\n", i % 5))
        .collect();
    let resp = host
        .data()?
        .post_ndjson("/v1/topics/in/events", events)
        .await?;
    ensure_status(&resp, 202)?;
    host.wait_caught_up("counter", Duration::from_secs(60))
        .await?;

    let out = procd(Some(&host), &["status"], b"")?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "a header and one row per partition:\n{stdout}"
    );
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "HANDLER",
            "VERSION",
            "PARTITION",
            "COMMITTED",
            "LAG",
            "LAG_S",
            "EVENTS/S",
            "STATE",
            "DLQ"
        ]
    );
    let mut committed = 0;
    for (p, line) in lines[1..].iter().enumerate() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells.len(), 9, "{stdout}");
        assert_eq!((cells[0], cells[1]), ("counter", "v1"), "{stdout}");
        assert_eq!(cells[2], p.to_string(), "{stdout}");
        committed += cells[3].parse::<u64>()?;
        assert_eq!(
            (cells[4], cells[8]),
            ("0", "0"),
            "caught up, no dead letters: {stdout}"
        );
        assert!(
            cells[6].parse::<f64>().is_ok(),
            "events/s is a number: {stdout}"
        );
    }
    assert_eq!(committed, 20, "{stdout}");
    Ok(())
}

#[tokio::test]
async fn status_errors_are_one_line() -> TestResult {
    // Nothing listens on port 9 of loopback (discard); the error must say where it looked.
    let out = procd(None, &["status", "--admin-url", "http://127.0.0.1:9"], b"")?;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach procd at 127.0.0.1:9"),
        "{stderr}"
    );

    let out = procd(None, &["status", "--watch", "0"], b"")?;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--watch"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn status_watch_refreshes_until_interrupted() -> TestResult {
    let host = TestHost::start_with(1, 1, &[])?;
    let child = std::process::Command::new(TestHost::binary())
        .args(["status", "--watch", "0.3"])
        .env("PROCD_ADMIN_URL", &host.admin_url)
        .env("RUST_LOG", "off")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = i32::try_from(child.id())?;
    // SAFETY: kill(2) on a child we spawned and have not waited for.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(rc, 0);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let refreshes = text(&out.stdout).matches("no handlers deployed").count();
    assert!(refreshes >= 2, "{}", text(&out.stdout));
    Ok(())
}
