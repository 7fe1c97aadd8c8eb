//! `procd serve`: flags over env over `procd.toml` over defaults, then run until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::config::{Config, Overrides};
use crate::server::{Server, shutdown_signal};

/// `procd serve` flags; each overrides the config key of the same name.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file (default: ./procd.toml if it exists).
    #[arg(long, env = "PROCD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [key: data_dir].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Data-plane address [key: listen; default 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
    /// Control-plane address [key: admin_listen; default 127.0.0.1:8081].
    #[arg(long)]
    admin_listen: Option<String>,
    /// Partitions per topic, fixed at creation [key: partitions; default 8].
    #[arg(long)]
    partitions: Option<String>,
    /// Cells, fixed at creation [key: cells; default 2].
    #[arg(long)]
    cells: Option<String>,
    /// Any other key, as KEY=VALUE (e.g. --set ingest.max_body_bytes=1048576). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

pub(super) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut flags = Overrides::default();
    if let Some(v) = &args.data_dir {
        flags.set("data_dir", v.display().to_string(), "--data-dir");
    }
    for (key, value, flag) in [
        ("listen", &args.listen, "--listen"),
        ("admin_listen", &args.admin_listen, "--admin-listen"),
        ("partitions", &args.partitions, "--partitions"),
        ("cells", &args.cells, "--cells"),
    ] {
        if let Some(v) = value {
            flags.set(key, v.clone(), flag);
        }
    }
    for kv in &args.set {
        let (key, value) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        flags.set(key.trim(), value, format!("--set {key}"));
    }
    let file = args.config.clone().or_else(|| {
        let default = PathBuf::from("procd.toml");
        default.exists().then_some(default)
    });
    let config = Config::load(file.as_deref(), std::env::vars(), flags)?;
    let server = Server::open(config)?;
    let (data, admin) = server.bind().await?;
    let shutdown = shutdown_signal();
    // One machine-readable line on stdout, for people and for scripts that start procd on port 0.
    println!(
        "procd ready: data=http://{} admin=http://{}",
        data.local_addr()?,
        admin.local_addr()?
    );
    server.run(data, admin, shutdown).await;
    Ok(())
}
