//! Topic administration: create, list, show, delete.
//!
//! Create records the topic durably in the catalog, has every cell create its partitions, and only then
//! makes it visible to the data plane, so no event can be routed to a partition that does not exist yet.
//! Delete hides it first, then the cells delete its data.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};

use crate::catalog::{CatalogError, Retention, Topic};
use crate::http::{ApiError, HttpResponse, json, read_body};
use crate::server::AppState;

/// Largest topic-definition body.
const MAX_TOPIC_BODY_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopic {
    name: String,
    #[serde(default)]
    retention: Retention,
}

#[derive(Serialize)]
struct PartitionInfo {
    partition: u32,
    cell: u32,
    start_offset: Option<u64>,
    end_offset: u64,
}

#[derive(Serialize)]
struct TopicInfo<'a> {
    #[serde(flatten)]
    topic: &'a Topic,
    partitions: u32,
}

fn catalog_error(e: CatalogError) -> ApiError {
    match e {
        CatalogError::InvalidName(_) => ApiError::bad_request("invalid_topic", e.to_string()),
        CatalogError::Exists(_) => {
            ApiError::new(StatusCode::CONFLICT, "topic_exists", e.to_string())
        }
        CatalogError::NotFound(_) => ApiError::not_found("unknown_topic", e.to_string()),
        other => ApiError::internal("control database failed", &other),
    }
}

pub(super) async fn create(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(req, MAX_TOPIC_BODY_BYTES, state.config.body_timeouts()).await?;
    let spec: CreateTopic = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_topic",
            format!("{e}; expected {{\"name\": \"...\", \"retention\": {{\"max_age_ms\": N, \"max_bytes\": N, \"drop_unconsumed\": false}}}}"),
        )
    })?;
    let created_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let topic = Topic {
        name: spec.name,
        retention: spec.retention,
        created_ms,
    };
    let _guard = state.admin_lock.lock().await;
    state.catalog.insert(&topic).map_err(catalog_error)?;
    let shared = std::sync::Arc::new(topic.clone());
    for cell in &state.cells {
        // A failed cell refuses this topic's writes like any other; the topic itself is recorded, and the
        // cell creates its partitions when it is next opened.
        if let Err(e) = cell.create_topic(shared.clone()).await {
            tracing::error!(topic = %topic.name, cell = cell.index(), error = %e, "cell could not create topic partitions");
        }
    }
    state.catalog.publish(topic.clone());
    tracing::info!(topic = %topic.name, "topic created");
    Ok(json(
        StatusCode::CREATED,
        &TopicInfo {
            topic: &topic,
            partitions: state.shape.partitions,
        },
    ))
}

pub(super) fn list(state: &AppState) -> HttpResponse {
    let topics = state.catalog.list();
    let infos: Vec<TopicInfo<'_>> = topics
        .iter()
        .map(|t| TopicInfo {
            topic: t,
            partitions: state.shape.partitions,
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "topics": infos }))
}

pub(super) fn show(state: &AppState, name: &str) -> Result<HttpResponse, ApiError> {
    let topic = state
        .catalog
        .get(name)
        .ok_or_else(|| catalog_error(CatalogError::NotFound(name.into())))?;
    let mut partitions = Vec::new();
    for p in 0..state.shape.partitions {
        let cell = state.cell_for(p);
        let Some(view) = cell.partition(name, p) else {
            continue;
        };
        let start_offset = view
            .log()
            .first_offset()
            .map_err(|e| ApiError::internal("cannot read partition", &e))?;
        partitions.push(PartitionInfo {
            partition: p,
            cell: cell.index(),
            start_offset,
            end_offset: view.end_offset(),
        });
    }
    let info = TopicInfo {
        topic: &topic,
        partitions: state.shape.partitions,
    };
    let mut value = serde_json::to_value(&info).unwrap_or_default();
    value["partition_offsets"] = serde_json::to_value(&partitions).unwrap_or_default();
    Ok(json(StatusCode::OK, &value))
}

pub(super) async fn delete(state: &AppState, name: &str) -> Result<HttpResponse, ApiError> {
    let _guard = state.admin_lock.lock().await;
    // A handler's position and outputs are offsets of the topic: deleting it under the handler would
    // make a topic created again under the name skip (or repeat) those offsets.
    let mut users: Vec<String> = state
        .catalog
        .handlers()
        .values()
        .filter(|def| {
            def.input == name
                || def
                    .version(def.active)
                    .is_some_and(|v| v.outputs.iter().any(|o| o == name))
        })
        .map(|def| format!("{:?}", def.name))
        .collect();
    if !users.is_empty() {
        users.sort();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "topic_in_use",
            format!(
                "topic {name:?} is read or written by handler {}; remove the handler first",
                users.join(", ")
            ),
        ));
    }
    state.catalog.remove(name).map_err(catalog_error)?;
    for cell in &state.cells {
        // A cell that cannot delete now deletes the orphaned partitions when it is next opened.
        if let Err(e) = cell.delete_topic(name).await {
            tracing::error!(topic = %name, cell = cell.index(), error = %e, "cell could not delete topic partitions");
        }
    }
    tracing::info!(topic = %name, "topic deleted");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "deleted": name }),
    ))
}
