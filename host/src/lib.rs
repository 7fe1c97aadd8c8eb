//! procd: a WebAssembly-extensible stream processor.
//!
//! # Layout
//! - [`log`]: durable partitioned storage on fjall, its on-disk encodings and the data-directory layout.
//! - [`cell`]: a cell owns a set of partitions: its Database, its writer thread (group commit,
//!   offsets, dedup) and its retention; nothing is shared between cells.
//! - [`runtime`]: the wasmtime engine, handler components (compiled, cached) and sandboxed instances.
//! - [`catalog`]: topics and handlers, persisted in the control Database.
//! - [`ingest`]: the HTTP data plane (append and read events), and the partitioner.
//! - [`backpressure`]: admission at the edge (per-tenant and global token buckets).
//! - [`admin`]: the HTTP control plane (topics, handlers, health).
//! - [`http`]: what both listeners share: error bodies, body limits, connection serving.
//! - [`metrics`]: the golden signals at `/metrics`: lock-free recording primitives and the exposition.
//! - [`server`]: wires the above together and runs until shutdown.
//! - [`config`]: layered configuration (defaults < `procd.toml` < `PROCD_*` env < flags), validated once.
//! - [`client`]: a small HTTP client used by the CLI, the benchmark and the tests.
//! - [`cli`]: the `procd` command line.

pub mod admin;
pub mod backpressure;
pub mod catalog;
pub mod cell;
pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod ingest;
pub mod log;
pub mod metrics;
pub mod runtime;
pub mod server;
