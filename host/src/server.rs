//! Wires storage, cells and both listeners together, and shuts them down in order.
//!
//! Like mini-redis, [`Server::run`] takes already-bound listeners and a shutdown future, so tests and the
//! benchmark bind port 0 and stop it when they like. Shutdown: both listeners stop accepting and answer
//! every request already in flight; then each cell's writer drains its queue (every queued append is
//! committed and acknowledged) and the Databases close.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::catalog::{Catalog, CatalogError};
use crate::cell::{Cell, OpenError};
use crate::config::Config;
use crate::http::ListenerLimits;
use crate::log::layout::{DataDir, LayoutError, Shape};
use crate::runtime::{Runtime, RuntimeError};

/// Everything both listeners share.
pub struct AppState {
    /// Validated configuration.
    pub config: Config,
    /// Partitions and cells.
    pub shape: Shape,
    /// Topics and handlers.
    pub catalog: Arc<Catalog>,
    /// The wasm runtime (one engine per process).
    pub runtime: Arc<Runtime>,
    /// Cells, indexed by cell number.
    pub cells: Vec<Cell>,
    /// Admission of appends (token buckets).
    pub admission: crate::backpressure::Admission,
    /// Serializes control-plane changes (create, delete) so each is applied whole. Never taken by the
    /// data plane.
    pub admin_lock: tokio::sync::Mutex<()>,
    /// Turns true when shutdown begins: long-polls return at once instead of holding shutdown up.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Server-wide metrics: request latency and refusals (per-cell ones live in the cells).
    pub metrics: crate::metrics::Metrics,
    /// The deploy compiler's one slot: components compile one at a time, on one blocking thread, so
    /// deploys can never take more than one core from the cells.
    pub compiler: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// The cell owning `partition`.
    pub fn cell_for(&self, partition: u32) -> &Cell {
        // Partitions are < P and the cell vector has C entries, so the index is always in range.
        &self.cells[self.shape.cell_of(partition) as usize]
    }
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory is unusable.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The control Database is unusable.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A cell could not be opened.
    #[error(transparent)]
    Cell(#[from] OpenError),
    /// The wasm runtime could not start.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({key}): {cause}")]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        cause: std::io::Error,
    },
}

/// An opened server, ready to run.
pub struct Server {
    state: Arc<AppState>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Server {
    /// Opens the data directory, the catalog and every cell (recovering from their journals).
    pub fn open(config: Config) -> Result<Self, StartError> {
        let shape = Shape {
            partitions: config.partitions,
            cells: config.cells,
        };
        let dir = DataDir::open(&config.data_dir, shape)?;
        let catalog = Arc::new(Catalog::open(&dir.control_dir())?);
        let runtime = Arc::new(Runtime::new(
            &dir.root().join("compiled"),
            config.handler.max_wasm_stack_bytes,
        )?);
        let options = config.cell_options();
        let cells = (0..shape.cells)
            .map(|k| Cell::open(k, &dir.cell_dir(k), shape, &catalog, &runtime, &options))
            .collect::<Result<Vec<_>, _>>()?;
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let admin_lock = tokio::sync::Mutex::new(());
        let admission = crate::backpressure::Admission::new(config.admission_options());
        let state = AppState {
            admission,
            config,
            shape,
            catalog,
            runtime,
            cells,
            admin_lock,
            stopping,
            metrics: crate::metrics::Metrics::default(),
            compiler: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        Ok(Self {
            state: Arc::new(state),
            stop,
        })
    }

    /// Binds the configured listeners.
    pub async fn bind(&self) -> Result<(TcpListener, TcpListener), StartError> {
        let config = &self.state.config;
        let bind = |addr: SocketAddr, key: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|cause| StartError::Bind { addr, key, cause })
        };
        Ok((
            bind(config.listen, "listen").await?,
            bind(config.admin_listen, "admin_listen").await?,
        ))
    }

    /// The shared state (for in-process callers such as the benchmark).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves the data plane on `data` and the control plane on `admin` until `shutdown` resolves, then
    /// shuts down gracefully.
    pub async fn run(
        self,
        data: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        let config = &self.state.config;
        let limits = ListenerLimits {
            max_connections: config.ingest.max_connections,
            header_read_timeout: std::time::Duration::from_millis(
                config.ingest.header_read_timeout_ms,
            ),
            max_headers: config.ingest.max_headers,
            max_header_bytes: config.ingest.max_header_bytes,
            write_stall_timeout: std::time::Duration::from_millis(
                config.ingest.body_idle_timeout_ms,
            ),
        };
        if let Ok(addr) = data.local_addr() {
            tracing::info!(%addr, "data plane listening");
        }
        if let Ok(addr) = admin.local_addr() {
            tracing::info!(%addr, "control plane listening");
        }
        let stop_rx = self.stop.subscribe();
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let data_state = self.state.clone();
        let data_task = tokio::spawn(crate::http::serve(
            "data",
            data,
            limits.clone(),
            move |req| crate::ingest::handle(data_state.clone(), req),
            stopped(stop_rx.clone()),
        ));
        let admin_state = self.state.clone();
        let admin_task = tokio::spawn(crate::http::serve(
            "admin",
            admin,
            limits,
            move |req| crate::admin::handle(admin_state.clone(), req),
            stopped(stop_rx),
        ));
        shutdown.await;
        tracing::info!("shutting down: no new connections; answering requests in flight");
        self.stop.send_replace(true);
        let _ = data_task.await;
        let _ = admin_task.await;
        let state = self.state;
        let joined = tokio::task::spawn_blocking(move || {
            for cell in &state.cells {
                cell.shutdown();
            }
        })
        .await;
        if joined.is_err() {
            tracing::error!("cell shutdown panicked");
        }
        tracing::info!("shutdown complete");
    }
}

/// Takes over SIGINT and SIGTERM now, and returns a future that resolves on either. Call it before
/// announcing readiness: a signal that arrives before the handlers exist gets its inherited disposition,
/// which is "ignore" for a process a non-interactive shell started in the background.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
