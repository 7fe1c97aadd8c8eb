//! The `procd` CLI as a user runs it: produce, consume, topics, and its errors.

use crate::harness::{TestHost, TestResult, procd};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn topics_produce_and_consume_from_the_command_line() -> TestResult {
    let host = TestHost::start()?;
    let out = procd(
        Some(&host),
        &["topics", "create", "clicks", "--max-age-ms", "86400000"],
        b"",
    )?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = procd(Some(&host), &["topics", "list"], b"")?;
    assert!(text(&out.stdout).contains("clicks"));

    let input: String = (0..250)
        .map(|i| format!("{{\"key\":\"user-{}\",\"value\":{{\"n\":{i}}}}}\n", i % 10))
        .collect();
    let out = procd(
        Some(&host),
        &["produce", "clicks", "-", "--batch", "100"],
        input.as_bytes(),
    )?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let results: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(results.len(), 250);
    assert!(
        results
            .iter()
            .enumerate()
            .all(|(i, r)| r["line"] == i + 1 && r["offset"].is_u64())
    );

    let out = procd(Some(&host), &["consume", "clicks"], b"")?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut values: Vec<u64> = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["value"]["n"].as_u64())
        .collect();
    values.sort_unstable();
    assert_eq!(values, (0..250).collect::<Vec<_>>());

    let out = procd(
        Some(&host),
        &["consume", "clicks", "--partition", "3", "--from", "1"],
        b"",
    )?;
    assert!(out.status.success());
    assert!(
        text(&out.stdout)
            .lines()
            .all(|l| l.contains("\"partition\":3"))
    );
    Ok(())
}

#[tokio::test]
async fn cli_errors_are_one_line_with_a_non_zero_exit() -> TestResult {
    let host = TestHost::start()?;
    let bad_input = b"{\"value\":1}\n\n{\"value\":\n";
    // (server, args, stdin, expected in the error line)
    type Case<'a> = (Option<&'a TestHost>, Vec<&'a str>, &'a [u8], &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            None,
            vec!["--url", "http://127.0.0.1:1", "produce", "t"],
            b"{\"value\":1}\n",
            "cannot reach procd",
        ),
        (
            None,
            vec!["--admin-url", "http://127.0.0.1:1", "topics", "list"],
            b"",
            "cannot reach procd",
        ),
        (
            Some(&host),
            vec!["produce", "missing"],
            b"{\"value\":1}\n",
            "unknown_topic",
        ),
        (
            Some(&host),
            vec!["topics", "show", "missing"],
            b"",
            "does not exist",
        ),
        (
            Some(&host),
            vec!["produce", "t", "/no/such/file.ndjson"],
            b"",
            "cannot open /no/such/file.ndjson",
        ),
        (
            Some(&host),
            vec!["topics", "create", "bad name"],
            b"",
            "invalid topic name",
        ),
        (
            None,
            vec!["--url", "localhost:8080", "consume", "t"],
            b"",
            "invalid URL",
        ),
    ];
    host.create_topic("t").await?;
    for (h, args, stdin, expect) in cases {
        let out = procd(h, &args, stdin)?;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expect),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("{ "),
            "{args:?}: {stderr}"
        );
    }
    // A bad line in the input names the file's line.
    let out = procd(Some(&host), &["produce", "t"], bad_input)?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("input line 3"),
        "{}",
        text(&out.stderr)
    );
    // clap's own errors for a bad flag: non-zero, no backtrace.
    let out = procd(None, &["consume", "--bogus"], b"")?;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unexpected argument '--bogus'"));
    Ok(())
}
