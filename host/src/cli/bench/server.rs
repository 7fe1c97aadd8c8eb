//! The in-process server the whole-system benchmarks (`e2e`, `isolation`) drive: started on a fresh
//! data directory with the benchmark's configuration, used through its real HTTP APIs (plus an
//! in-process look at durable end offsets), stopped so its Databases close before the directory goes.
//! Also [`post_all`], the closed-loop posting of pre-built bodies that `ingest`'s (b) uses too.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use serde::Deserialize;

use crate::client::Client;
use crate::config::Config;
use crate::server::{AppState, Server};

/// A server running in this process.
pub(super) struct Running {
    pub state: Arc<AppState>,
    pub data_url: String,
    /// A keep-alive client of the data plane.
    pub data: Client,
    admin: Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts a server with `config` on `data_dir`, on free loopback ports.
    pub async fn start(config: &Config, data_dir: &Path) -> anyhow::Result<Self> {
        let config = Config {
            data_dir: data_dir.to_path_buf(),
            ..config.clone()
        };
        let server = Server::open(config).context("cannot open the benchmark server")?;
        let state = server.state().clone();
        let (data, admin) = server.bind().await?;
        let data_url = format!("http://{}", data.local_addr()?);
        let admin_url = format!("http://{}", admin.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(data, admin, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            state,
            data: Client::new(&data_url)?,
            admin: Client::new(&admin_url)?,
            data_url,
            stop,
            task,
        })
    }

    /// Shuts the server down and closes its Databases.
    pub async fn stop(self) -> anyhow::Result<()> {
        let Self {
            state, stop, task, ..
        } = self;
        let _ = stop.send(());
        task.await.context("the benchmark server panicked")?;
        // The last handle on the cells: their Databases close here, before the directory is removed.
        drop(state);
        Ok(())
    }

    pub async fn create_topic(&mut self, name: &str) -> anyhow::Result<()> {
        let created = self
            .admin
            .post_json("/v1/topics", &serde_json::json!({ "name": name }))
            .await?;
        crate::cli::check(created).with_context(|| format!("cannot create topic {name:?}"))?;
        Ok(())
    }

    /// Events durable in `topic`, summed over partitions, from the admin API.
    pub async fn end_offsets(&mut self, topic: &str) -> anyhow::Result<u64> {
        #[derive(Deserialize)]
        struct Topic {
            partition_offsets: Vec<PartitionOffsets>,
        }
        #[derive(Deserialize)]
        struct PartitionOffsets {
            end_offset: u64,
        }
        let resp = self.admin.get(&format!("/v1/topics/{topic}")).await?;
        let resp = crate::cli::check(resp)?;
        let topic: Topic =
            serde_json::from_slice(&resp.body).context("unexpected GET /v1/topics answer")?;
        Ok(topic.partition_offsets.iter().map(|p| p.end_offset).sum())
    }

    /// The durable end offset of `topic`'s `partition`, read in-process (no request in the way).
    pub fn end_offset(&self, topic: &str, partition: u32) -> u64 {
        self.state
            .cell_for(partition)
            .partition(topic, partition)
            .map_or(0, |view| view.end_offset())
    }

    /// Deploys `component` as handler `name` with the deploy `query` (`input=..&output=..`, ...) and
    /// waits until every partition runs an instance of it.
    pub async fn deploy(
        &mut self,
        name: &str,
        query: &str,
        component: Bytes,
    ) -> anyhow::Result<()> {
        let resp = self
            .admin
            .request(
                hyper::Method::PUT,
                &format!("/v1/handlers/{name}?{query}"),
                &[("content-type", "application/wasm")],
                component,
            )
            .await?;
        crate::cli::check(resp).with_context(|| format!("cannot deploy handler {name}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.handler_status(name).await?;
            let partitions = self.state.shape.partitions as usize;
            if status.partitions.len() == partitions
                && status
                    .partitions
                    .iter()
                    .all(|p| p.version == 1 && p.status == "idle")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("handler {name} did not start on every partition within 30 s: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn handler_status(&mut self, name: &str) -> anyhow::Result<HandlerStatus> {
        let resp = self.admin.get(&format!("/v1/handlers/{name}")).await?;
        let resp = crate::cli::check(resp)?;
        serde_json::from_slice(&resp.body).context("unexpected GET /v1/handlers answer")
    }

    /// Dead letters of handler `name` on `partition` (up to the API's page size of 10 000).
    pub async fn dead_letters(&mut self, name: &str, partition: u32) -> anyhow::Result<usize> {
        #[derive(Deserialize)]
        struct Dlq {
            dead_letters: Vec<serde_json::Value>,
        }
        let resp = self
            .admin
            .get(&format!(
                "/v1/handlers/{name}/dlq?partition={partition}&limit=10000"
            ))
            .await?;
        let resp = crate::cli::check(resp)?;
        let dlq: Dlq = serde_json::from_slice(&resp.body).context("unexpected GET dlq answer")?;
        Ok(dlq.dead_letters.len())
    }

    /// Up to `limit` events of `topic`'s `partition` from `from`, through the read API.
    pub async fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        limit: u64,
    ) -> anyhow::Result<Vec<ReadEvent>> {
        let resp = self
            .data
            .get(&format!(
                "/v1/topics/{topic}/partitions/{partition}/events?from={from}&limit={limit}"
            ))
            .await?;
        let resp = crate::cli::check(resp)?;
        resp.body
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).context("unexpected event line"))
            .collect()
    }
}

/// The part of `GET /v1/handlers/{name}` the benchmarks read.
#[derive(Debug, Deserialize)]
pub(super) struct HandlerStatus {
    pub partitions: Vec<TaskStatus>,
}

#[derive(Debug, Deserialize)]
pub(super) struct TaskStatus {
    pub partition: u32,
    pub version: u32,
    pub status: String,
    pub committed_offset: u64,
    #[serde(default)]
    pub dead_letters: u64,
}

/// One event line of the read API, as far as the benchmarks need it.
#[derive(Deserialize)]
pub(super) struct ReadEvent {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub key: Option<String>,
}

/// The part of an append response the benchmarks check.
#[derive(Deserialize)]
pub(super) struct AppendResults {
    pub results: Vec<AppendOutcome>,
}

#[derive(Deserialize)]
pub(super) struct AppendOutcome {
    pub partition: u32,
    pub offset: Option<u64>,
    #[serde(default)]
    pub duplicate: bool,
}

/// What [`post_all`] saw: each request's latency, and the answers, kept to be checked once the clock has
/// stopped.
pub(super) struct Posted {
    pub latencies: Vec<Duration>,
    answers: Vec<(usize, Bytes)>,
}

impl Posted {
    /// Fails unless exactly `events` events were accepted as new. Parsing the answers is the client's
    /// work, not the server's, and a 1000-event answer holds 1000 outcomes: on a machine whose cores run
    /// both, parsing them while the clock ran took ~5 % of HTTP ingest's CPU in `procd bench ingest`.
    pub fn check(&self, events: usize) -> anyhow::Result<()> {
        let mut accepted = 0;
        for (index, body) in &self.answers {
            let answer: AppendResults = serde_json::from_slice(body)
                .with_context(|| format!("request {index}: unexpected answer"))?;
            accepted += answer
                .results
                .iter()
                .filter(|o| o.offset.is_some() && !o.duplicate)
                .count();
        }
        if accepted != events {
            bail!("{accepted} of {events} events were accepted as new");
        }
        Ok(())
    }
}

/// Posts every body to `topic` over `connections` keep-alive connections; fails on the first answer
/// that is not a `202` (a benchmark run needs every event accepted). See [`Posted::check`] for the rest.
pub(super) async fn post_all(
    data_url: &str,
    topic: &str,
    connections: usize,
    bodies: Arc<Vec<Bytes>>,
) -> anyhow::Result<Posted> {
    let path: Arc<str> = Arc::from(format!("/v1/topics/{topic}/events"));
    // Connections take the next body from a shared cursor, so they all finish together.
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let mut client = Client::new(data_url)?;
        let (bodies, path, next) = (bodies.clone(), path.clone(), next.clone());
        tasks.spawn(async move {
            let mut posted = Posted {
                latencies: Vec::new(),
                answers: Vec::new(),
            };
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(index) else { break };
                let sent = Instant::now();
                let resp = client.post_ndjson(&path, body.clone()).await?;
                posted.latencies.push(sent.elapsed());
                if resp.status != 202 {
                    bail!(
                        "request {index} was answered {}; a benchmark run needs every event accepted",
                        resp.error_line()
                    );
                }
                posted.answers.push((index, resp.body));
            }
            anyhow::Ok(posted)
        });
    }
    let mut all = Posted {
        latencies: Vec::with_capacity(bodies.len()),
        answers: Vec::with_capacity(bodies.len()),
    };
    while let Some(joined) = tasks.join_next().await {
        let posted = joined.context("a benchmark connection panicked")??;
        all.latencies.extend(posted.latencies);
        all.answers.extend(posted.answers);
    }
    Ok(all)
}
