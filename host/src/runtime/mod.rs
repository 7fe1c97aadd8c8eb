//! The wasm runtime: one wasmtime `Engine` for the process, handler components compiled (and cached on
//! disk), and one sandboxed instance per handler and partition.
//!
//! `runtime` never touches fjall: an instance reads committed state through the [`StateStore`] the cell
//! gives it and hands its writes back to the cell, which commits them with the outputs and the offset.
//!
//! Sandbox: guests get no WASI. Only procd's `input`, `state` and `log` imports are linked; every other
//! import (std's WASI imports included) is defined as a trap, so a guest can never reach files, network,
//! environment, clocks or randomness. Every store has memory, table and instance limits
//! (`trap_on_grow_failure`) and a per-call wall-clock deadline by epoch interruption (a 1 ms ticker); a
//! call still running after 10 ms (or a quarter of its deadline) yields the CPU to threads waiting for one
//! (`throttle`).

mod bindings;
mod compile;
mod instance;
mod throttle;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine};

pub use bindings::{Batch, EventError, OutputBatch};
pub use compile::{CompileError, Compiled};
pub use instance::{
    CallError, HandleOutcome, Instance, InstanceError, LogLabel, StateChanges, StateStore,
    StateWrite, state_entry_bytes,
};

/// The wasm stack bound of every instance unless `handler.max_wasm_stack_bytes` says otherwise.
pub const DEFAULT_MAX_WASM_STACK: usize = 512 * 1024;

/// Epoch tick period: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Resource limits of one instance.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Linear memory an instance may grow to.
    pub max_memory_bytes: usize,
    /// Wall-clock time one `handle` (or `init`) call may take.
    pub deadline: Duration,
    /// Largest state value a handler may store.
    pub max_state_value_bytes: usize,
    /// State one handler may hold on one partition, in key and value bytes.
    pub max_state_bytes: u64,
    /// Log lines per second per instance (burst of the same size); excess lines are dropped and counted.
    pub log_lines_per_sec: u32,
    /// Records one batch may emit.
    pub max_outputs_per_batch: usize,
    /// Bytes of keys and values one batch may emit.
    pub max_output_bytes_per_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory_bytes: 64 * 1024 * 1024,
            deadline: Duration::from_secs(1),
            max_state_value_bytes: 1024 * 1024,
            max_state_bytes: 1 << 30,
            log_lines_per_sec: 100,
            max_outputs_per_batch: 100_000,
            max_output_bytes_per_batch: 32 * 1024 * 1024,
        }
    }
}

/// The runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime refused the engine configuration.
    #[error("cannot create the wasm engine: {0}")]
    Engine(String),
    /// The compiled-component cache directory is unusable.
    #[error("component cache {dir}: {cause}")]
    Cache { dir: PathBuf, cause: std::io::Error },
}

/// The process-wide wasm runtime.
pub struct Runtime {
    engine: Engine,
    linker: Linker<instance::HostState>,
    cache_dir: PathBuf,
    ticker_stop: Arc<AtomicBool>,
    /// The engine's wasm stack bound, for trap messages.
    max_wasm_stack: usize,
}

impl Runtime {
    /// Creates the engine, links procd's imports, and starts the epoch ticker. Compiled components are
    /// cached in `cache_dir`.
    ///
    /// `max_wasm_stack` bounds the wasm stack of every instance (`handler.max_wasm_stack_bytes`): set
    /// explicitly, so unbounded recursion traps the same way on every machine. wasmtime sets it per
    /// `Engine`, and there is one engine per process, so it is server-wide, not per handler. It must stay
    /// well under the host threads' stacks (2 MiB), which config validation ensures.
    pub fn new(cache_dir: &Path, max_wasm_stack: usize) -> Result<Self, RuntimeError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(max_wasm_stack);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let linker = instance::linker(&engine).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        std::fs::create_dir_all(cache_dir).map_err(|cause| RuntimeError::Cache {
            dir: cache_dir.to_path_buf(),
            cause,
        })?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            }
        };
        std::thread::Builder::new()
            .name("procd-epoch".into())
            .spawn(ticker)
            .map_err(|cause| RuntimeError::Cache {
                dir: cache_dir.to_path_buf(),
                cause,
            })?;
        Ok(Self {
            engine,
            linker,
            cache_dir: cache_dir.to_path_buf(),
            ticker_stop,
            max_wasm_stack,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}
