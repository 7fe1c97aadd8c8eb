//! `procd bench fairness`: one tenant floods, the others must not notice (issue 6).
//!
//! C is measured (or given) as for `surge`, and each of `--tenants` tenants gets a quota of
//! `--quota-share` × C / tenants
//! (`admission.tenant_bytes_per_sec`, burst `--burst-ms` of it; the global bucket stays off), unless
//! `--quota` says otherwise. Then, for `--secs`, tenant `hot` offers `--hot-factor` × its quota and
//! the others `--others-share` × theirs, open-loop, each tenant over its own connections with its
//! `Procd-Tenant` header. Reported per tenant: offered, accepted (goodput), refusals, latencies; the
//! target is that every other tenant keeps at least 99 % of what it offered. The topic is read back
//! as in `surge`: every accepted event exactly once, nothing refused.

use anyhow::bail;
use clap::Args;

use super::exactly_once;
use super::load::{LoadArgs, settings_line, verdict};
use super::open_loop::{self, Latencies, Phase, Stream, Tally};

const TOPIC: &str = "fairness";
/// The flooding tenant's name.
const HOT: &str = "hot";
/// Target of issue 6: the other tenants' goodput.
const TARGET_OTHERS_GOODPUT: f64 = 0.99;

/// `procd bench fairness` flags. The default run takes about 40 s: 5 s measuring capacity, 30 s of
/// load, then reading the topic back.
#[derive(Debug, Args)]
pub struct FairnessArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Tenants, the flooding one included.
    #[arg(long, default_value_t = 4)]
    tenants: usize,
    /// Each tenant's quota in requests per second [default: --quota-share × C / tenants].
    #[arg(long, value_name = "REQUESTS_PER_SEC")]
    quota: Option<f64>,
    /// Share of C the quotas add up to when --quota is not given: below 1, so that what the tenants
    /// are allowed fits in what the server can do while it also refuses the flood.
    #[arg(long, default_value_t = 0.5)]
    quota_share: f64,
    /// What the flooding tenant offers, as a multiple of its quota.
    #[arg(long, default_value_t = 20.0)]
    hot_factor: f64,
    /// What each other tenant offers, as a share of its quota.
    #[arg(long, default_value_t = 0.95)]
    others_share: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Each tenant's burst (admission.tenant_burst_bytes) in milliseconds of its quota.
    #[arg(long, default_value_t = 1000)]
    burst_ms: u64,
}

impl FairnessArgs {
    /// Refuses flags out of their ranges.
    fn check(&self) -> anyhow::Result<()> {
        if !(2..=64).contains(&self.tenants) {
            bail!("--tenants must be in 2..=64; got {}", self.tenants);
        }
        super::util::check_factors(&[
            ("--hot-factor", self.hot_factor),
            ("--others-share", self.others_share),
            ("--quota-share", self.quota_share),
        ])?;
        if self.secs == 0 {
            bail!("--secs must be at least 1");
        }
        Ok(())
    }
}

pub(super) async fn run(args: FairnessArgs) -> anyhow::Result<()> {
    let bodies = args.load.bodies()?;
    args.check()?;

    println!("procd bench fairness");
    args.load.print_common(&bodies);
    let quota = match args.quota {
        Some(q) if q.is_finite() && q > 0.0 => q,
        Some(q) => bail!("--quota must be a positive number of requests per second; got {q}"),
        None => {
            let capacity = args.load.capacity(&bodies).await?;
            println!("  capacity C    {}", capacity.line(&bodies));
            args.quota_share * capacity.requests_per_sec / args.tenants as f64
        }
    };
    let quota_bytes = (quota * bodies.len() as f64).round().max(1.0) as u64;
    let burst_bytes = (quota_bytes.saturating_mul(args.burst_ms) / 1000).max(bodies.len() as u64);
    let settings = vec![
        format!("admission.tenant_bytes_per_sec={quota_bytes}"),
        format!("admission.tenant_burst_bytes={burst_bytes}"),
    ];
    println!(
        "  server config {} (quota {quota:.0} requests/s = {:.0} events/s per tenant, burst {} ms of it; \
         global bucket off)",
        settings_line(&settings, &args.load.set),
        quota * bodies.batch() as f64,
        args.burst_ms
    );
    let names: Vec<String> = std::iter::once(HOT.to_string())
        .chain((1..args.tenants).map(|i| format!("t{i}")))
        .collect();
    let streams: Vec<Stream> = names
        .iter()
        .map(|name| {
            let share = if name == HOT {
                args.hot_factor
            } else {
                args.others_share
            };
            Stream {
                tenant: Some(name.clone()),
                phases: vec![Phase {
                    name: "load",
                    requests_per_sec: share * quota,
                    secs: args.secs as f64,
                }],
                connections: args.load.connections,
                backlog: args.load.backlog,
            }
        })
        .collect();
    println!(
        "  load          {} s: tenant {HOT} offers {:.0} requests/s ({} × quota), {} others {:.0} each \
         ({} × quota)",
        args.secs,
        args.hot_factor * quota,
        args.hot_factor,
        args.tenants - 1,
        args.others_share * quota,
        args.others_share
    );
    println!();

    let mut server = args.load.server(&settings).await?;
    server.create_topic(TOPIC).await?;
    let rec = open_loop::run(
        server.data_addr(),
        TOPIC,
        bodies.clone(),
        &streams,
        server.pid(),
    )
    .await?;
    let (alive, check) = exactly_once::check_if_alive(
        &mut server,
        TOPIC,
        args.load.partitions,
        &rec,
        bodies.batch(),
    )
    .await?;
    drop(server);

    let report = Report {
        names: &names,
        secs: args.secs as f64,
        quota_events_per_sec: quota * bodies.batch() as f64,
        batch: bodies.batch(),
    };
    let check_line = report.print(&rec, check.as_ref());
    if !alive {
        bail!("the server died during the run");
    }
    if !check.as_ref().is_some_and(exactly_once::Check::passed) {
        bail!("the exactly-once check failed: {check_line}");
    }
    Ok(())
}

/// What the report needs besides the run's records.
struct Report<'a> {
    /// Tenant names, the flooding one first, in stream order.
    names: &'a [String],
    secs: f64,
    /// One tenant's quota in events per second.
    quota_events_per_sec: f64,
    /// Events per request.
    batch: usize,
}

impl Report<'_> {
    /// Prints the per-tenant table, the client's figures, the exactly-once check and the targets;
    /// returns the check's line.
    fn print(&self, rec: &open_loop::Recording, check: Option<&exactly_once::Check>) -> String {
        let mut tallies = vec![Tally::default(); self.names.len()];
        for r in &rec.records {
            if let Some(t) = tallies.get_mut(r.stream) {
                t.add(r, self.batch);
            }
        }
        tallies.iter_mut().for_each(Tally::finish);
        let secs = self.secs;
        println!(
            "{:<7} {:>10} {:>10} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6}  {:<24} {:<24}",
            "tenant",
            "offered/s",
            "accepted/s",
            "goodput",
            "429",
            "503",
            "other",
            "failed",
            "unsent",
            "accepted ms p50/99/999/max",
            "refused ms p50/99/999/max"
        );
        let mut worst_other = f64::INFINITY;
        for (name, t) in self.names.iter().zip(&tallies) {
            let goodput = t.events_accepted as f64 / (t.events_offered as f64).max(1.0);
            if name != HOT {
                worst_other = worst_other.min(goodput);
            }
            println!(
                "{:<7} {:>10.0} {:>10.0} {:>7.2}% {:>8} {:>6} {:>6} {:>6} {:>6}  {:<24} {:<24}",
                name,
                t.events_offered as f64 / secs,
                t.events_accepted as f64 / secs,
                goodput * 100.0,
                t.refused_429,
                t.refused_503,
                t.refused_other,
                t.failed,
                t.not_sent,
                Latencies::of(&t.accepted_us).cell(),
                Latencies::of(&t.refused_us).cell()
            );
        }
        println!(
            "(rates in events per second; goodput = accepted / offered events; latency from intended send time)"
        );
        let connects: u64 = rec.connects.iter().sum();
        let cpu = rec.client_cpu.map_or("-".into(), |cpu| {
            format!(
                "{:.2} cores",
                cpu.as_secs_f64() / rec.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
            )
        });
        let max_rss = rec
            .samples
            .iter()
            .filter_map(|s| s.server_rss_kib)
            .max()
            .unwrap_or(0);
        println!(
            "client: {} requests in {:.1} s, {connects} TCP connections opened, CPU {cpu}; server RSS max {:.0} MiB; \
             load average {} (1 min) at the end",
            rec.records.len(),
            rec.elapsed.as_secs_f64(),
            max_rss as f64 / 1024.0,
            super::util::load_average().unwrap_or_else(|| "-".into())
        );
        for e in &rec.errors {
            println!("  error: {e}");
        }
        let check_line = check.map_or_else(
            || "exactly once: not checked (the server is gone)".to_string(),
            exactly_once::Check::line,
        );
        println!("{check_line}");
        println!();
        let hot = tallies.first().cloned().unwrap_or_default();
        println!("targets (issue 6)");
        println!(
            "  {:<52} {:<22} {}",
            format!(
                "every other tenant's goodput >= {:.0} %",
                TARGET_OTHERS_GOODPUT * 100.0
            ),
            format!("worst {:.2} %", worst_other * 100.0),
            verdict(worst_other >= TARGET_OTHERS_GOODPUT)
        );
        println!(
            "  {:<52} {:<22}",
            format!("({HOT} got, of its quota)"),
            format!(
                "{:.1} %",
                100.0 * hot.events_accepted as f64 / secs / self.quota_events_per_sec
            )
        );
        check_line
    }
}
