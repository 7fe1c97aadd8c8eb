//! Topic administration on the control plane.

use serde_json::json;

use crate::harness::{TestHost, TestResult, ensure_status};

#[tokio::test]
async fn create_list_show_delete_and_recreate() -> TestResult {
    let host = TestHost::start()?;
    let mut admin = host.admin()?;
    let resp = admin
        .post_json(
            "/v1/topics",
            &json!({"name": "orders.v1", "retention": {"max_age_ms": 60000, "max_bytes": 1048576}}),
        )
        .await?;
    ensure_status(&resp, 201)?;
    let v = resp.json()?;
    assert_eq!(v["retention"]["max_age_ms"], 60000);
    assert_eq!(v["partitions"], 8);

    let resp = admin
        .post_json("/v1/topics", &json!({"name": "orders.v1"}))
        .await?;
    ensure_status(&resp, 409)?;
    for bad in [
        json!({"name": "bad name"}),
        json!({"name": ""}),
        json!({"name": "x".repeat(129)}),
        json!({"nom": "x"}),
    ] {
        let resp = admin.post_json("/v1/topics", &bad).await?;
        ensure_status(&resp, 400)?;
        assert!(
            resp.json()?["detail"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
    }
    host.create_topic("b").await?;
    let list = admin.get("/v1/topics").await?.json()?;
    let names: Vec<&str> = list["topics"]
        .as_array()
        .ok_or("topics")?
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["b", "orders.v1"]);

    let mut data = host.data()?;
    ensure_status(
        &data
            .post_ndjson("/v1/topics/b/events", "{\"key\":\"k\",\"value\":1}")
            .await?,
        202,
    )?;
    let show = admin.get("/v1/topics/b").await?.json()?;
    let total: u64 = show["partition_offsets"]
        .as_array()
        .ok_or("offsets")?
        .iter()
        .filter_map(|p| p["end_offset"].as_u64())
        .sum();
    assert_eq!(total, 1);

    ensure_status(&admin.delete("/v1/topics/b").await?, 200)?;
    ensure_status(&admin.delete("/v1/topics/b").await?, 404)?;
    ensure_status(&admin.get("/v1/topics/b").await?, 404)?;
    ensure_status(
        &data
            .post_ndjson("/v1/topics/b/events", "{\"value\":1}")
            .await?,
        404,
    )?;

    // A topic created again under the same name starts empty.
    host.create_topic("b").await?;
    let show = admin.get("/v1/topics/b").await?.json()?;
    let total: u64 = show["partition_offsets"]
        .as_array()
        .ok_or("offsets")?
        .iter()
        .filter_map(|p| p["end_offset"].as_u64())
        .sum();
    assert_eq!(total, 0);
    Ok(())
}

#[tokio::test]
async fn health_endpoints_and_unknown_routes() -> TestResult {
    let host = TestHost::start()?;
    let mut admin = host.admin()?;
    ensure_status(&admin.get("/healthz").await?, 200)?;
    let ready = admin.get("/readyz").await?;
    ensure_status(&ready, 200)?;
    let resp = admin.get("/v1/nothing").await?;
    ensure_status(&resp, 404)?;
    assert_eq!(resp.json()?["error"], "not_found");
    // The data plane does not serve admin routes, nor the reverse.
    ensure_status(&host.data()?.get("/v1/topics").await?, 404)?;
    ensure_status(&admin.post_ndjson("/v1/topics/x/events", "{}").await?, 404)?;
    Ok(())
}
