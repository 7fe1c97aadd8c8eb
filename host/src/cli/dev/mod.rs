//! `procd dev [PATH]`: from a handler's source to events flowing through it, with edits applied live.
//!
//! It starts an embedded server on a data directory kept in the project (`PATH/.procd/`, or
//! `./.procd/` for a `.wasm`; reused across runs so state survives; `--fresh` wipes it), builds the
//! crate for wasm32-wasip2 ([`build`]), creates the input and output topics if missing, deploys the
//! handler, prints a ready-to-paste curl line and tails the output topics and the handler's dead
//! letters ([`tail`]). Then it watches the sources
//! ([`watch`]): every change rebuilds and deploys a new version, which the server swaps in at a batch
//! boundary with state and offsets kept. A build that fails leaves the running version in place. PATH
//! may also be a built `.wasm`, redeployed whenever the file changes. Ctrl-C or SIGTERM stop the
//! session and the server cleanly (exit 0).
//!
//! Its own lines go to stdout (`procd dev: ...`, output records); cargo's output and the server's log
//! go to stderr.

mod build;
mod tail;
mod watch;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

use super::progress::{human_bytes, with_spinner};
use super::{check, encode_component, parse_config};
use crate::catalog::{HandlerDef, HandlerVersion};
use crate::client::Client;
use crate::config::{Config, Overrides};
use crate::server::{Server, shutdown_signal};
use tail::Printer;

/// The data directory, inside the project.
const DATA_DIR: &str = ".procd";

#[derive(Debug, Args)]
pub struct DevArgs {
    /// A handler crate (a directory with a Cargo.toml) or a built component (a `.wasm` file).
    #[arg(default_value = ".")]
    path: PathBuf,
    /// Handler name [default: the crate's package name, or the file name without `.wasm`].
    #[arg(long)]
    name: Option<String>,
    /// Input topic (created if missing).
    #[arg(long, default_value = "input")]
    input: String,
    /// Output topic, in the order the handler refers to them by index (created if missing).
    /// Repeatable [default: output].
    #[arg(long = "output", value_name = "TOPIC")]
    outputs: Vec<String>,
    /// Configuration passed to the handler's `init`, as KEY=VALUE. Repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Data-plane address (ingest and reads); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Control-plane address (deploys, status); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin_listen: String,
    /// Partitions per topic, fixed when the data directory is created [default: what `.procd/`
    /// recorded, else 8].
    #[arg(long)]
    partitions: Option<u32>,
    /// Delete the data directory (`PATH/.procd/`, or `./.procd/` for a `.wasm`: topics, state,
    /// offsets) before starting.
    #[arg(long)]
    fresh: bool,
}

/// What is being developed.
#[derive(Debug)]
enum Source {
    /// A cargo package: its directory and manifest (absolute).
    Crate { dir: PathBuf, manifest: PathBuf },
    /// A component built some other way.
    Wasm { path: PathBuf },
}

impl Source {
    fn resolve(path: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "cannot open {}; give a handler crate directory or a .wasm file (procd new NAME creates a crate)",
                path.display()
            )
        })?;
        let path = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?;
        if meta.is_dir() {
            let manifest = path.join("Cargo.toml");
            if !manifest.is_file() {
                bail!(
                    "{} has no Cargo.toml; give a handler crate directory or a .wasm file (procd new NAME creates a crate)",
                    path.display()
                );
            }
            Ok(Source::Crate {
                dir: path,
                manifest,
            })
        } else if path.extension().is_some_and(|e| e == "wasm") {
            Ok(Source::Wasm { path })
        } else {
            bail!(
                "{} is neither a handler crate directory nor a .wasm file",
                path.display()
            )
        }
    }

    /// Where the project lives (its `.procd/` and `events.ndjson`): the crate, or for a component
    /// (often deep in a `target/`), the current directory.
    fn root(&self) -> PathBuf {
        match self {
            Source::Crate { dir, .. } => dir.clone(),
            Source::Wasm { .. } => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        }
    }

    /// The handler name when `--name` is not given.
    fn default_name(&self) -> anyhow::Result<String> {
        match self {
            Source::Crate { manifest, .. } => {
                let text = std::fs::read_to_string(manifest)
                    .with_context(|| format!("cannot read {}", manifest.display()))?;
                let parsed: toml::Table = toml::from_str(&text)
                    .with_context(|| format!("{} is not valid TOML", manifest.display()))?;
                parsed
                    .get("package")
                    .and_then(|p| p.get("name"))
                    .and_then(|n| n.as_str())
                    .map(str::to_string)
                    .with_context(|| {
                        format!(
                            "{} has no [package] name (a workspace?); give the handler crate's own directory",
                            manifest.display()
                        )
                    })
            }
            Source::Wasm { path } => path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
                .with_context(|| {
                    format!(
                        "cannot name a handler after {}; pass --name",
                        path.display()
                    )
                }),
        }
    }

    /// The files whose change means a new version.
    fn watched(&self) -> watch::Watched {
        match self {
            Source::Crate { dir, manifest } => watch::Watched::new(vec![
                dir.join("src"),
                manifest.clone(),
                dir.join("build.rs"),
                dir.join("wit"),
            ]),
            Source::Wasm { path } => watch::Watched::new(vec![path.clone()]),
        }
    }
}

/// A validated session.
struct Session {
    source: Source,
    name: String,
    input: String,
    outputs: Vec<String>,
    /// `config=K%3DV` query parameters; empty keeps what the handler had.
    config_query: Vec<String>,
    /// The same configuration as pairs.
    config: Vec<(String, String)>,
}

impl Session {
    fn deploy_path(&self) -> String {
        let mut query = vec![format!("input={}", encode_component(&self.input))];
        query.extend(
            self.outputs
                .iter()
                .map(|o| format!("output={}", encode_component(o))),
        );
        query.extend(self.config_query.iter().cloned());
        format!(
            "/v1/handlers/{}?{}",
            encode_component(&self.name),
            query.join("&")
        )
    }
}

pub(super) async fn run(args: DevArgs) -> anyhow::Result<()> {
    let source = Source::resolve(&args.path)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => source.default_name()?,
    };
    let mut config_query = Vec::new();
    let mut config_pairs = Vec::new();
    for kv in &args.config {
        config_pairs.push(parse_config(kv)?);
        config_query.push(format!("config={}", encode_component(kv)));
    }
    let outputs = if args.outputs.is_empty() {
        vec!["output".to_string()]
    } else {
        args.outputs.clone()
    };
    let data_dir = source.root().join(DATA_DIR);
    if args.fresh {
        match std::fs::remove_dir_all(&data_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("--fresh: cannot delete {}", data_dir.display()));
            }
        }
    }
    let config = server_config(&args, &data_dir)?;
    let server = Server::open(config).map_err(|e| {
        anyhow::anyhow!(
            "{e} (procd dev keeps its data in {}; --fresh starts over)",
            data_dir.display()
        )
    })?;
    let (data, admin) = server.bind().await?;
    let data_url = format!("http://{}", data.local_addr()?);
    let admin_url = format!("http://{}", admin.local_addr()?);
    let printer = Printer::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // Same shape as `procd serve`'s ready line, so scripts can read the ports.
    println!("procd ready: data={data_url} admin={admin_url}");
    printer.note(&format!(
        "data directory {} (state survives restarts; --fresh wipes it)",
        data_dir.display()
    ));

    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let server_task = tokio::spawn(server.run(data, admin, async move {
        let _ = stopping.wait_for(|s| *s).await;
    }));
    let session = Session {
        source,
        name,
        input: args.input,
        outputs,
        config_query,
        config: config_pairs,
    };
    let result = tokio::select! {
        r = develop(&session, &printer, &data_url, &admin_url) => r,
        () = &mut shutdown => Ok(()),
    };
    printer.note("stopping: finishing requests in flight and closing the data directory");
    stop.send_replace(true);
    server_task.await.context("the server task failed")?;
    result
}

/// Flags over the recorded shape over defaults; `PROCD_*` variables are not read (they configure
/// `procd serve` and the client commands, not this local session).
fn server_config(args: &DevArgs, data_dir: &Path) -> anyhow::Result<Config> {
    let mut flags = Overrides::default();
    flags.set("data_dir", data_dir.display().to_string(), "procd dev");
    flags.set("listen", args.listen.clone(), "--listen");
    flags.set("admin_listen", args.admin_listen.clone(), "--admin-listen");
    let recorded = recorded_shape(data_dir);
    match (args.partitions, recorded) {
        (Some(p), _) => {
            flags.set("partitions", p.to_string(), "--partitions");
            // A cell per partition up to procd's default of 2: cells may not outnumber partitions.
            flags.set("cells", p.clamp(1, 2).to_string(), "--partitions");
        }
        (None, Some((p, c))) => {
            flags.set("partitions", p.to_string(), "the data directory");
            flags.set("cells", c.to_string(), "the data directory");
        }
        (None, None) => {}
    }
    Ok(Config::load(None, std::iter::empty(), flags)?)
}

/// The partitions and cells an existing data directory was created with.
fn recorded_shape(data_dir: &Path) -> Option<(u64, u64)> {
    let bytes = std::fs::read(data_dir.join("procd.json")).ok()?;
    let meta: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((meta["partitions"].as_u64()?, meta["cells"].as_u64()?))
}

/// The session proper: topics, first build and deploy, tails, then rebuild on every change. Returns
/// only on an error that leaves nothing to do.
async fn develop(
    session: &Session,
    printer: &Printer,
    data_url: &str,
    admin_url: &str,
) -> anyhow::Result<()> {
    let mut admin = Client::new(admin_url)?;
    for topic in std::iter::once(&session.input).chain(&session.outputs) {
        create_topic(&mut admin, topic).await?;
    }
    let mut tails = tokio::task::JoinSet::new();
    for topic in &session.outputs {
        for (partition, end) in tail::end_offsets(&mut admin, topic).await? {
            tails.spawn(tail::tail_partition(
                *printer,
                data_url.to_string(),
                topic.clone(),
                partition,
                end,
            ));
        }
    }
    tails.spawn(tail::watch_handler(
        *printer,
        admin_url.to_string(),
        session.name.clone(),
    ));

    if let Source::Crate { dir, .. } = &session.source
        && build::target_installed(dir).await == Some(false)
    {
        printer.warn(&format!(
            "the {} target is not installed for this toolchain; run: rustup target add {}",
            build::TARGET,
            build::TARGET
        ));
    }
    let watched = session.source.watched();
    let mut fingerprint = watched.fingerprint();
    let mut running: Option<(u64, Vec<u8>)> = None;
    // What a previous session left running: a restart with the same component and settings deploys
    // nothing, so versions count changes, not restarts.
    let mut previous = active_version(&mut admin, &session.name).await;
    let mut first = true;
    loop {
        if let Some(bytes) = next_component(session, printer, running.as_ref()).await? {
            if let Some(version) = previous.take().and_then(|p| p.runs(session, &bytes)) {
                printer.note(&format!(
                    "{} v{version} already runs this component with these settings; nothing to deploy",
                    session.name
                ));
                running = Some((version, bytes));
            } else {
                match deploy(&mut admin, session, bytes.clone()).await {
                    Ok(version) => {
                        printer.note(&format!(
                            "deployed {} v{version} ({}){}",
                            session.name,
                            human_bytes(bytes.len() as u64),
                            if running.is_some() {
                                "; partitions switch at their next batch, keeping state and offsets"
                            } else {
                                ""
                            }
                        ));
                        running = Some((version, bytes));
                    }
                    Err(e) => printer.warn(&format!("deploy failed: {e:#}")),
                }
            }
        }
        if first {
            first = false;
            print_how_to_send(printer, session, data_url);
        }
        fingerprint = watched.changed(&fingerprint).await;
        printer.note("change detected");
    }
}

/// The version a handler runs on the server, read back into the catalog's own types.
struct Active {
    input: String,
    version: HandlerVersion,
}

impl Active {
    /// The version number, if it is `bytes` deployed as `session` would deploy them.
    fn runs(&self, session: &Session, bytes: &[u8]) -> Option<u64> {
        let v = &self.version;
        let same = !v.sha256.is_empty()
            && v.sha256 == crate::catalog::component_digest(bytes)
            && self.input == session.input
            && v.outputs == session.outputs
            // No `--config` keeps the handler's configuration.
            && (session.config.is_empty() || v.config == session.config);
        same.then_some(u64::from(v.version))
    }
}

/// The active version of handler `name`, if it exists and the answer is readable.
async fn active_version(admin: &mut Client, name: &str) -> Option<Active> {
    let resp = admin
        .get(&format!("/v1/handlers/{}", encode_component(name)))
        .await
        .ok()?;
    if resp.status != 200 {
        return None;
    }
    // The answer is the catalog's `HandlerDef` plus per-partition fields, which are ignored here.
    let def: HandlerDef = serde_json::from_value(resp.json().ok()?).ok()?;
    let version = def.versions.into_iter().find(|v| v.version == def.active)?;
    Some(Active {
        input: def.input,
        version,
    })
}

/// Builds (or reads) the component; `None` when there is nothing new to deploy.
async fn next_component(
    session: &Session,
    printer: &Printer,
    running: Option<&(u64, Vec<u8>)>,
) -> anyhow::Result<Option<Vec<u8>>> {
    let keeps = |what: &str| match running {
        Some((v, _)) => format!("{what}; v{v} keeps running"),
        None => format!("{what}; nothing is deployed yet"),
    };
    let path = match &session.source {
        Source::Wasm { path } => path.clone(),
        Source::Crate { dir, manifest } => {
            printer.note(&format!(
                "building {} (cargo build --release --target {})",
                session.name,
                build::TARGET
            ));
            let started = std::time::Instant::now();
            match build::build(dir, manifest).await {
                Ok(build::Outcome::Built(path)) => {
                    printer.note(&format!(
                        "built in {:.1} s",
                        started.elapsed().as_secs_f64()
                    ));
                    path
                }
                Ok(build::Outcome::Failed) => {
                    printer.warn(&keeps("build failed (cargo's errors are above)"));
                    printer.note("fix the code and save: it rebuilds on every change");
                    return Ok(None);
                }
                // No cargo, or no component from the build (e.g. a crate-type edit): say so and
                // keep watching, since the next save may fix it.
                Err(e) => {
                    printer.warn(&keeps(&format!("{e:#}")));
                    return Ok(None);
                }
            }
        }
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            printer.warn(&keeps(&format!("cannot read {}: {e}", path.display())));
            return Ok(None);
        }
    };
    if running.is_some_and(|(_, b)| *b == bytes) {
        printer.note("the component did not change; nothing to deploy");
        return Ok(None);
    }
    Ok(Some(bytes))
}

async fn create_topic(admin: &mut Client, topic: &str) -> anyhow::Result<()> {
    let resp = admin
        .post_json("/v1/topics", &serde_json::json!({ "name": topic }))
        .await?;
    match resp.status {
        201 | 409 => Ok(()),
        _ => Err(anyhow::anyhow!(
            "cannot create topic {topic:?}: {}",
            resp.error_line()
        )),
    }
}

/// Uploads `bytes` as a new version; returns the version number.
async fn deploy(admin: &mut Client, session: &Session, bytes: Vec<u8>) -> anyhow::Result<u64> {
    let label = format!("deploying {}", session.name);
    let path = session.deploy_path();
    let request = admin.request(
        hyper::Method::PUT,
        &path,
        &[("content-type", "application/wasm")],
        bytes,
    );
    let resp = check(with_spinner(&label, request).await?)?;
    resp.json()?["version"]
        .as_u64()
        .context("the server's answer has no version")
}

fn print_how_to_send(printer: &Printer, session: &Session, data_url: &str) {
    let url = format!(
        "{data_url}/v1/topics/{}/events",
        encode_component(&session.input)
    );
    printer.note(&format!("send events to topic {:?}:", session.input));
    println!(
        "  curl -s {url} -H 'content-type: application/x-ndjson' --data-binary '{{\"key\":\"alice\",\"value\":{{\"n\":1}}}}'"
    );
    let sample = session.source.root().join("events.ndjson");
    if sample.is_file() {
        // As the user would type it from where they started `procd dev`.
        let cwd = std::env::current_dir().unwrap_or_default();
        let shown = sample.strip_prefix(&cwd).unwrap_or(&sample);
        println!(
            "  curl -s {url} -H 'content-type: application/x-ndjson' --data-binary @{}",
            shown.display()
        );
    }
    printer.note(&format!(
        "watching for changes; outputs of {} appear below (Ctrl-C stops)",
        session.outputs.join(", ")
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> DevArgs {
        #[derive(Debug, clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: DevArgs,
        }
        let argv = ["dev"].iter().chain(extra);
        match <Wrapper as clap::Parser>::try_parse_from(argv) {
            Ok(w) => w.args,
            Err(e) => panic!("test arguments do not parse: {e}"),
        }
    }

    #[test]
    fn partitions_bring_a_matching_cell_count() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let one = server_config(&args(&["--partitions", "1"]), dir.path())?;
        assert_eq!((one.partitions, one.cells), (1, 1));
        let four = server_config(&args(&["--partitions", "4"]), dir.path())?;
        assert_eq!((four.partitions, four.cells), (4, 2));
        Ok(())
    }

    #[test]
    fn an_existing_data_directory_keeps_its_shape() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("procd.json"),
            r#"{"format":1,"partitions":3,"cells":3}"#,
        )?;
        let config = server_config(&args(&[]), dir.path())?;
        assert_eq!((config.partitions, config.cells), (3, 3));
        Ok(())
    }

    #[test]
    fn sources_are_crates_or_components() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("Cargo.toml"), "[package]\nname = \"hi\"\n")?;
        std::fs::write(dir.path().join("h.wasm"), "")?;
        let krate = Source::resolve(dir.path())?;
        assert!(matches!(krate, Source::Crate { .. }));
        assert_eq!(krate.default_name()?, "hi");
        let wasm = Source::resolve(&dir.path().join("h.wasm"))?;
        assert!(matches!(wasm, Source::Wasm { .. }));
        assert_eq!(wasm.default_name()?, "h");
        assert_eq!(wasm.root(), std::env::current_dir()?);
        std::fs::write(dir.path().join("notes.txt"), "")?;
        let err = Source::resolve(&dir.path().join("notes.txt"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("neither"), "{err}");
        Ok(())
    }
}
