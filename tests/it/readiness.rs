//! `/readyz` when the server is not ready: a `503` a prober can act on.

use crate::harness::{TestHost, TestResult, ensure_status};

#[tokio::test]
async fn an_unready_server_says_when_to_ask_again() -> TestResult {
    let host = TestHost::start_with(8, 2, &["debug.fault_injection=true"])?;
    host.create_topic("t").await?;
    let mut admin = host.admin()?;
    let ready = admin.get("/readyz").await?;
    ensure_status(&ready, 200)?;
    assert_eq!(ready.header("retry-after"), None);
    let fault = admin
        .request(
            hyper::Method::POST,
            "/v1/debug/cells/0/fail-writes",
            &[],
            "",
        )
        .await?;
    ensure_status(&fault, 200)?;
    // A write to every partition reaches cell 0, whose storage then fails.
    let body: String = (0..64)
        .map(|i| format!("{{\"key\":\"k{i}\",\"value\":{i}}}\n"))
        .collect();
    host.data()?
        .post_ndjson("/v1/topics/t/events", body)
        .await?;
    let unready = admin.get("/readyz").await?;
    ensure_status(&unready, 503)?;
    assert_eq!(unready.json()?["error"], "cells_failed");
    assert_eq!(unready.header("retry-after"), Some("5"));
    Ok(())
}
