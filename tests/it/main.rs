//! procd's integration tests: the real binary, real sockets, real files. See `tests/harness`.

#[path = "../harness/mod.rs"]
mod harness;

mod bench;
mod cli;
mod cli_handlers;
mod dev;
mod handlers;
mod hostile;
mod ingest;
mod lifecycle;
mod metrics;
mod readiness;
mod readme;
mod status;
mod topics;
