//! Server configuration, layered `defaults < procd.toml < PROCD_* env < flags` and validated once.
//!
//! Every key has a dotted name (`ingest.max_body_bytes`) used the same way in every layer: as a TOML key
//! (in its table), as an env var (`PROCD_INGEST_MAX_BODY_BYTES`) and in errors, which name the key, the
//! layer it came from and the valid range.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cell::CellOptions;
use crate::log::StoreOptions;

/// The validated configuration of `procd serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where all data lives.
    pub data_dir: PathBuf,
    /// Data-plane listener (ingest and reads).
    pub listen: SocketAddr,
    /// Control-plane listener (topics, health), apart so admin and data traffic cannot starve each other.
    pub admin_listen: SocketAddr,
    /// Partitions of every topic; fixed when the data directory is created.
    pub partitions: u32,
    /// Cells the partitions are spread over; fixed when the data directory is created.
    pub cells: u32,
    /// HTTP limits of both listeners.
    pub ingest: IngestConfig,
    /// Idempotent-ingest window.
    pub dedup: DedupConfig,
    /// Cell writer and maintenance.
    pub cell: CellConfig,
    /// Read API bounds.
    pub read: ReadConfig,
    /// Admission at the edge: per-tenant and global token buckets.
    pub admission: AdmissionConfig,
    /// Handlers: limits and batching.
    pub handler: HandlerConfig,
    /// Test hooks; all off by default.
    pub debug: DebugConfig,
}

/// Handler limits and batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerConfig {
    /// Largest component accepted by a deploy (`413` above).
    pub max_component_bytes: usize,
    /// The wasm stack of every instance (server-wide: wasmtime bounds it per engine); deeper
    /// recursion traps as a stack overflow.
    pub max_wasm_stack_bytes: usize,
    /// Linear memory an instance may use.
    pub max_memory_bytes: usize,
    /// Wall-clock time one batch may take.
    pub deadline_ms: u64,
    /// Events per batch at most.
    pub batch_max_events: usize,
    /// Largest state value.
    pub max_state_value_bytes: usize,
    /// State bytes (keys and values) one handler may hold on one partition.
    pub max_state_bytes: u64,
    /// Log lines per second per instance.
    pub log_lines_per_sec: u32,
    /// Records one batch may emit (more fails the batch, which is then halved).
    pub max_outputs_per_batch: usize,
    /// Bytes of keys and values one batch may emit.
    pub max_output_bytes_per_batch: usize,
    /// Dead letters kept per handler and partition; beyond it the oldest are deleted.
    pub dlq_max_entries: u64,
    /// Failed share of a handler's events on a partition, in percent, that trips its circuit breaker.
    pub breaker_failure_percent: u32,
    /// Events the breaker's window must hold before the failed share counts.
    pub breaker_min_events: u64,
    /// The breaker's sliding window.
    pub breaker_window_ms: u64,
    /// How long a tripped breaker waits before one trial batch.
    pub breaker_cooldown_ms: u64,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        let limits = crate::runtime::Limits::default();
        let breaker = crate::cell::BreakerOptions::default();
        Self {
            max_component_bytes: 10 * 1024 * 1024,
            max_wasm_stack_bytes: crate::runtime::DEFAULT_MAX_WASM_STACK,
            max_memory_bytes: limits.max_memory_bytes,
            deadline_ms: u64::try_from(limits.deadline.as_millis()).unwrap_or(1000),
            batch_max_events: 1000,
            max_state_value_bytes: limits.max_state_value_bytes,
            max_state_bytes: limits.max_state_bytes,
            log_lines_per_sec: limits.log_lines_per_sec,
            max_outputs_per_batch: limits.max_outputs_per_batch,
            max_output_bytes_per_batch: limits.max_output_bytes_per_batch,
            dlq_max_entries: 10_000,
            breaker_failure_percent: breaker.failure_percent,
            breaker_min_events: breaker.min_events,
            breaker_window_ms: millis(breaker.window),
            breaker_cooldown_ms: millis(breaker.cooldown),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Test hooks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// Enables `POST /v1/debug/cells/{k}/fail-writes` (cell k's storage fails like a broken disk) and
    /// `POST /v1/debug/cells/{k}/slow-writes?ms=N` (each of its writes takes N ms longer) on the control
    /// plane. Never enable in production.
    pub fault_injection: bool,
}

/// HTTP limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest request body accepted (`413` above).
    pub max_body_bytes: usize,
    /// Time allowed for the whole body to arrive (`408` after).
    pub body_timeout_ms: u64,
    /// Longest pause within a body (`408` after): a body trickling in is cut off long before
    /// `body_timeout_ms`. Also the longest an answer may wait for the client to read it: the
    /// connection is closed after.
    pub body_idle_timeout_ms: u64,
    /// Time allowed for a request head to arrive, counted from the connection's start or from the end
    /// of the previous response, so it is also the keep-alive idle timeout (the connection is closed
    /// after).
    pub header_read_timeout_ms: u64,
    /// Connections served at once per listener.
    pub max_connections: usize,
    /// Header fields a request may have (`431` above).
    pub max_headers: usize,
    /// Bytes of header fields (names and values) a request may have (`431` above).
    pub max_header_bytes: usize,
}

/// Dedup window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// How long an event id is remembered.
    pub window_ms: u64,
    /// At most this many ids are remembered per partition (memory bound).
    pub max_ids: usize,
}

/// Cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CellConfig {
    /// Append requests queued per cell before `503`.
    pub queue_len: usize,
    /// A group commit (one fsync) stops collecting requests at this many appended events (a handler's
    /// processing commit counts as one).
    pub group_commit_max_events: usize,
    /// How often retention and journal upkeep run.
    pub maintenance_interval_ms: u64,
    /// Memtable size per partition keyspace.
    pub max_memtable_bytes: u64,
    /// Block cache per cell.
    pub cache_bytes: u64,
    /// How long a cell's processor may make no progress while it has work before `/readyz` reports
    /// it stalled.
    pub processing_stall_ms: u64,
    /// Standing queue delay past which `normal` appends are shed with `503`, with a chance rising from
    /// 0 to 1 at twice it (`low` from half of it to it, `critical` never); 0: shed by queue length only.
    pub queue_delay_target_ms: u64,
}

/// Admission (see [`crate::backpressure`]): rates of 0 turn a bucket off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Body bytes per second each tenant (`Procd-Tenant` header) may append; over it: `429`.
    pub tenant_bytes_per_sec: u64,
    /// A tenant's burst in bytes (also its largest request).
    pub tenant_burst_bytes: u64,
    /// Tenants with a quota of their own: `TENANT=RATE[/BURST],...` in body bytes (per second); a rate
    /// of 0 exempts the tenant.
    pub tenant_overrides: String,
    /// Body bytes per second the server accepts in all; over it: `503`.
    pub global_bytes_per_sec: u64,
    /// The server's burst in bytes.
    pub global_burst_bytes: u64,
    /// Request body bytes admitted and not yet answered, at most; over it: `503`. 0: no budget.
    pub max_in_flight_bytes: u64,
    /// A partition whose handlers lag more events than this refuses writes (`429`); 0: off.
    pub lag_high_events: u64,
    /// ... until they are back under this many.
    pub lag_low_events: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            tenant_bytes_per_sec: 0,
            tenant_burst_bytes: 16 * 1024 * 1024,
            tenant_overrides: String::new(),
            global_bytes_per_sec: 0,
            global_burst_bytes: 64 * 1024 * 1024,
            max_in_flight_bytes: 256 * 1024 * 1024,
            lag_high_events: 0,
            lag_low_events: 0,
        }
    }
}

/// Read API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadConfig {
    /// Largest `limit` a read may ask for.
    pub max_limit: usize,
    /// Largest `wait_ms` a long-poll may ask for.
    pub max_wait_ms: u64,
    /// A read response stops after this many bytes of events (at least one event is returned).
    pub max_response_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("procd-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            partitions: 8,
            cells: 2,
            ingest: IngestConfig::default(),
            dedup: DedupConfig::default(),
            cell: CellConfig::default(),
            read: ReadConfig::default(),
            admission: AdmissionConfig::default(),
            handler: HandlerConfig::default(),
            debug: DebugConfig::default(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            body_timeout_ms: 30_000,
            body_idle_timeout_ms: 10_000,
            header_read_timeout_ms: 10_000,
            max_connections: 1024,
            max_headers: 100,
            max_header_bytes: 16 * 1024,
        }
    }
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            window_ms: 10 * 60 * 1000,
            max_ids: 100_000,
        }
    }
}

impl Default for CellConfig {
    fn default() -> Self {
        let store = StoreOptions::default();
        let cell = CellOptions::default();
        Self {
            queue_len: cell.queue_len,
            group_commit_max_events: cell.group_commit_max_events,
            maintenance_interval_ms: cell.maintenance_interval_ms,
            max_memtable_bytes: store.max_memtable_bytes,
            cache_bytes: store.cache_bytes,
            processing_stall_ms: cell.processing_stall_ms,
            queue_delay_target_ms: cell.queue_delay_target_ms,
        }
    }
}

impl Default for ReadConfig {
    fn default() -> Self {
        Self {
            max_limit: 10_000,
            max_wait_ms: 60_000,
            max_response_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The configuration is invalid; the message names the key, where it came from and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// One layer's worth of settings by dotted key, with where each came from.
#[derive(Debug, Default)]
pub struct Overrides {
    entries: Vec<(String, String, String)>,
}

impl Overrides {
    /// Sets `key` (dotted) to a raw string value, attributing it to `source` in errors.
    pub fn set(&mut self, key: &str, value: impl Into<String>, source: impl Into<String>) {
        self.entries
            .push((key.to_string(), value.into(), source.into()));
    }
}

impl Config {
    /// Builds the configuration from its layers: defaults, then the TOML file (if any), then `PROCD_*`
    /// variables from `env`, then `flags`; then validates it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: Overrides,
    ) -> Result<Self, ConfigError> {
        let defaults =
            toml::Table::try_from(Config::default()).map_err(|e| ConfigError(e.to_string()))?;
        let mut merged = defaults.clone();
        let mut origin: Vec<(String, String)> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| {
                ConfigError(format!(
                    "config file {} is not valid TOML: {e}",
                    path.display()
                ))
            })?;
            for (key, value) in flatten(&table) {
                if lookup(&defaults, &key).is_none() {
                    return Err(ConfigError(format!(
                        "unknown key `{key}` in {}; known keys: {}",
                        path.display(),
                        keys(&defaults).join(", ")
                    )));
                }
                origin.push((key.clone(), path.display().to_string()));
                insert(&mut merged, &key, value);
            }
        }
        let mut layers = Overrides::default();
        let env: Vec<(String, String)> = env.into_iter().collect();
        for key in keys(&defaults) {
            let var = format!("PROCD_{}", key.replace('.', "_").to_ascii_uppercase());
            if let Some((_, value)) = env.iter().find(|(k, _)| *k == var) {
                layers.set(&key, value.clone(), var);
            }
        }
        layers.entries.extend(flags.entries);
        for (key, raw, source) in layers.entries {
            let Some(default) = lookup(&defaults, &key) else {
                return Err(ConfigError(format!(
                    "unknown config key `{key}` (from {source})"
                )));
            };
            let value = match default {
                toml::Value::Integer(_) => raw
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| {
                        ConfigError(format!(
                            "{key} (from {source}) must be a whole number; got {raw:?}"
                        ))
                    })?,
                toml::Value::Boolean(_) => raw
                    .trim()
                    .parse::<bool>()
                    .map(toml::Value::Boolean)
                    .map_err(|_| {
                        ConfigError(format!(
                            "{key} (from {source}) must be true or false; got {raw:?}"
                        ))
                    })?,
                _ => toml::Value::String(raw),
            };
            origin.push((key.clone(), source));
            insert(&mut merged, &key, value);
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
                let key = e.path().to_string();
                let source = origin
                    .iter()
                    .rev()
                    .find(|(k, _)| *k == key)
                    .map(|(_, s)| s.as_str())
                    .unwrap_or("defaults");
                ConfigError(format!("{key} (from {source}) is invalid: {}", e.inner()))
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against its valid range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range<T: PartialOrd + std::fmt::Display>(
            key: &str,
            v: T,
            lo: T,
            hi: T,
        ) -> Result<(), ConfigError> {
            if v < lo || v > hi {
                return Err(ConfigError(format!(
                    "{key} must be in {lo}..={hi}; got {v}"
                )));
            }
            Ok(())
        }
        range("partitions", self.partitions, 1, 4096)?;
        range("cells", self.cells, 1, 256)?;
        if self.cells > self.partitions {
            return Err(ConfigError(format!(
                "cells must not exceed partitions (a cell without partitions does nothing); got cells={} partitions={}",
                self.cells, self.partitions
            )));
        }
        range(
            "ingest.max_body_bytes",
            self.ingest.max_body_bytes,
            1,
            1 << 30,
        )?;
        range(
            "ingest.body_timeout_ms",
            self.ingest.body_timeout_ms,
            1,
            3_600_000,
        )?;
        range(
            "ingest.body_idle_timeout_ms",
            self.ingest.body_idle_timeout_ms,
            1,
            3_600_000,
        )?;
        range(
            "ingest.header_read_timeout_ms",
            self.ingest.header_read_timeout_ms,
            1,
            3_600_000,
        )?;
        range(
            "ingest.max_connections",
            self.ingest.max_connections,
            1,
            1_000_000,
        )?;
        range("ingest.max_headers", self.ingest.max_headers, 1, 10_000)?;
        range(
            "ingest.max_header_bytes",
            self.ingest.max_header_bytes,
            1024,
            1 << 20,
        )?;
        range(
            "dedup.window_ms",
            self.dedup.window_ms,
            0,
            7 * 24 * 3_600_000,
        )?;
        range("dedup.max_ids", self.dedup.max_ids, 0, 100_000_000)?;
        range("cell.queue_len", self.cell.queue_len, 1, 1_000_000)?;
        range(
            "cell.group_commit_max_events",
            self.cell.group_commit_max_events,
            1,
            1_000_000,
        )?;
        range(
            "cell.processing_stall_ms",
            self.cell.processing_stall_ms,
            100,
            86_400_000,
        )?;
        range(
            "cell.queue_delay_target_ms",
            self.cell.queue_delay_target_ms,
            0,
            3_600_000,
        )?;
        range(
            "cell.maintenance_interval_ms",
            self.cell.maintenance_interval_ms,
            10,
            3_600_000,
        )?;
        range(
            "cell.max_memtable_bytes",
            self.cell.max_memtable_bytes,
            1 << 20,
            1 << 30,
        )?;
        range("cell.cache_bytes", self.cell.cache_bytes, 1 << 20, 1 << 40)?;
        range("read.max_limit", self.read.max_limit, 1, 1_000_000)?;
        // Instances run on threads with 2 MiB stacks (tokio's and std's default): leave the host room.
        range(
            "handler.max_wasm_stack_bytes",
            self.handler.max_wasm_stack_bytes,
            64 * 1024,
            1024 * 1024,
        )?;
        range(
            "handler.max_component_bytes",
            self.handler.max_component_bytes,
            1024,
            1 << 30,
        )?;
        range(
            "handler.max_memory_bytes",
            self.handler.max_memory_bytes,
            1 << 20,
            4 << 30,
        )?;
        range(
            "handler.deadline_ms",
            self.handler.deadline_ms,
            1,
            3_600_000,
        )?;
        range(
            "handler.batch_max_events",
            self.handler.batch_max_events,
            1,
            100_000,
        )?;
        range(
            "handler.max_state_value_bytes",
            self.handler.max_state_value_bytes,
            1,
            64 << 20,
        )?;
        range(
            "handler.max_state_bytes",
            self.handler.max_state_bytes,
            1,
            1 << 44,
        )?;
        range(
            "handler.log_lines_per_sec",
            self.handler.log_lines_per_sec,
            1,
            1_000_000,
        )?;
        range(
            "handler.max_outputs_per_batch",
            self.handler.max_outputs_per_batch,
            1,
            100_000_000,
        )?;
        range(
            "handler.max_output_bytes_per_batch",
            self.handler.max_output_bytes_per_batch,
            1024,
            1 << 30,
        )?;
        range(
            "handler.dlq_max_entries",
            self.handler.dlq_max_entries,
            1,
            100_000_000,
        )?;
        range(
            "handler.breaker_failure_percent",
            self.handler.breaker_failure_percent,
            1,
            100,
        )?;
        range(
            "handler.breaker_min_events",
            self.handler.breaker_min_events,
            1,
            1_000_000_000,
        )?;
        range(
            "handler.breaker_window_ms",
            self.handler.breaker_window_ms,
            1_000,
            86_400_000,
        )?;
        range(
            "handler.breaker_cooldown_ms",
            self.handler.breaker_cooldown_ms,
            1,
            86_400_000,
        )?;
        range("read.max_wait_ms", self.read.max_wait_ms, 0, 3_600_000)?;
        let a = &self.admission;
        range(
            "admission.tenant_bytes_per_sec",
            a.tenant_bytes_per_sec,
            0,
            1 << 40,
        )?;
        range(
            "admission.tenant_burst_bytes",
            a.tenant_burst_bytes,
            1,
            1 << 40,
        )?;
        range(
            "admission.global_bytes_per_sec",
            a.global_bytes_per_sec,
            0,
            1 << 40,
        )?;
        range(
            "admission.global_burst_bytes",
            a.global_burst_bytes,
            1,
            1 << 40,
        )?;
        range(
            "admission.max_in_flight_bytes",
            a.max_in_flight_bytes,
            0,
            1 << 40,
        )?;
        crate::backpressure::parse_tenant_overrides(&a.tenant_overrides, a.tenant_burst_bytes)
            .map_err(|e| ConfigError(format!("admission.tenant_overrides: {e}")))?;
        range("admission.lag_high_events", a.lag_high_events, 0, 1 << 40)?;
        if a.lag_high_events > 0 && a.lag_low_events >= a.lag_high_events {
            return Err(ConfigError(format!(
                "admission.lag_low_events must be below admission.lag_high_events ({}); got {}",
                a.lag_high_events, a.lag_low_events
            )));
        }
        range(
            "read.max_response_bytes",
            self.read.max_response_bytes,
            1024,
            1 << 30,
        )?;
        Ok(())
    }

    /// The cell options these settings give.
    pub fn cell_options(&self) -> CellOptions {
        CellOptions {
            store: StoreOptions {
                cache_bytes: self.cell.cache_bytes,
                max_memtable_bytes: self.cell.max_memtable_bytes,
                ..StoreOptions::default()
            },
            queue_len: self.cell.queue_len,
            group_commit_max_events: self.cell.group_commit_max_events,
            dedup_window_ms: self.dedup.window_ms,
            dedup_max_ids: self.dedup.max_ids,
            maintenance_interval_ms: self.cell.maintenance_interval_ms,
            processing_stall_ms: self.cell.processing_stall_ms,
            queue_delay_target_ms: self.cell.queue_delay_target_ms,
            processor: crate::cell::ProcessorOptions {
                limits: self.handler_limits(),
                batch_max_events: self.handler.batch_max_events,
                breaker: crate::cell::BreakerOptions {
                    failure_percent: self.handler.breaker_failure_percent,
                    min_events: self.handler.breaker_min_events,
                    window: Duration::from_millis(self.handler.breaker_window_ms),
                    cooldown: Duration::from_millis(self.handler.breaker_cooldown_ms),
                },
                dlq_max_entries: self.handler.dlq_max_entries,
                lag_watermarks: (self.admission.lag_high_events > 0).then_some((
                    self.admission.lag_high_events,
                    self.admission.lag_low_events,
                )),
            },
        }
    }

    /// The admission settings these give.
    pub fn admission_options(&self) -> crate::backpressure::AdmissionOptions {
        let a = &self.admission;
        crate::backpressure::AdmissionOptions {
            tenant_bytes_per_sec: a.tenant_bytes_per_sec,
            tenant_burst_bytes: a.tenant_burst_bytes,
            // Checked by `validate`.
            tenant_overrides: crate::backpressure::parse_tenant_overrides(
                &a.tenant_overrides,
                a.tenant_burst_bytes,
            )
            .unwrap_or_default(),
            global_bytes_per_sec: a.global_bytes_per_sec,
            global_burst_bytes: a.global_burst_bytes,
            max_in_flight_bytes: a.max_in_flight_bytes,
        }
    }

    /// The instance limits these settings give.
    pub fn handler_limits(&self) -> crate::runtime::Limits {
        crate::runtime::Limits {
            max_memory_bytes: self.handler.max_memory_bytes,
            deadline: Duration::from_millis(self.handler.deadline_ms),
            max_state_value_bytes: self.handler.max_state_value_bytes,
            max_state_bytes: self.handler.max_state_bytes,
            log_lines_per_sec: self.handler.log_lines_per_sec,
            max_outputs_per_batch: self.handler.max_outputs_per_batch,
            max_output_bytes_per_batch: self.handler.max_output_bytes_per_batch,
        }
    }

    /// How long a request body may take to arrive.
    pub fn body_timeouts(&self) -> crate::http::BodyTimeouts {
        crate::http::BodyTimeouts {
            total: Duration::from_millis(self.ingest.body_timeout_ms),
            idle: Duration::from_millis(self.ingest.body_idle_timeout_ms),
        }
    }
}

fn flatten(table: &toml::Table) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    for (k, v) in table {
        match v {
            toml::Value::Table(inner) => {
                out.extend(
                    flatten(inner)
                        .into_iter()
                        .map(|(ik, iv)| (format!("{k}.{ik}"), iv)),
                );
            }
            other => out.push((k.clone(), other.clone())),
        }
    }
    out
}

fn keys(table: &toml::Table) -> Vec<String> {
    flatten(table).into_iter().map(|(k, _)| k).collect()
}

fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (head, rest) = match key.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (key, None),
    };
    match (table.get(head)?, rest) {
        (toml::Value::Table(inner), Some(rest)) => lookup(inner, rest),
        (toml::Value::Table(_), None) => None,
        (value, None) => Some(value),
        (_, Some(_)) => None,
    }
}

fn insert(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        Some((head, rest)) => {
            if let toml::Value::Table(inner) = table
                .entry(head.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                insert(inner, rest, value);
            }
        }
        None => {
            table.insert(key.to_string(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_override_in_order() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("procd.toml");
        std::fs::write(
            &file,
            "partitions = 4\ncells = 4\n[ingest]\nmax_body_bytes = 100\n",
        )?;
        let mut flags = Overrides::default();
        flags.set("cells", "2", "--cells");
        let config = Config::load(
            Some(&file),
            env(&[
                ("PROCD_CELLS", "1"),
                ("PROCD_INGEST_MAX_BODY_BYTES", "200"),
                ("PROCD_URL", "x"),
            ]),
            flags,
        )?;
        assert_eq!(
            (
                config.partitions,
                config.cells,
                config.ingest.max_body_bytes
            ),
            (4, 2, 200)
        );
        Ok(())
    }

    #[test]
    fn errors_name_the_key_source_and_range() {
        let mut flags = Overrides::default();
        flags.set("partitions", "0", "--partitions");
        let err = Config::load(None, vec![], flags)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, "partitions must be in 1..=4096; got 0");
        let err = Config::load(None, env(&[("PROCD_LISTEN", "nope")]), Overrides::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("listen (from PROCD_LISTEN) is invalid"),
            "{err}"
        );
        let err = Config::load(
            None,
            env(&[("PROCD_DEDUP_MAX_IDS", "lots")]),
            Overrides::default(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("dedup.max_ids (from PROCD_DEDUP_MAX_IDS) must be a whole number"),
            "{err}"
        );
    }

    #[test]
    fn unknown_file_keys_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("procd.toml");
        std::fs::write(&file, "[ingest]\nmax_body = 1\n")?;
        let err = Config::load(Some(&file), vec![], Overrides::default())
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("unknown key `ingest.max_body`")));
        Ok(())
    }
}
