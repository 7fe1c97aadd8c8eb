//! `procd handlers list|show|rollback|pause|resume|reset|remove|dlq|replay-dlq|purge-dlq`: the handler control plane
//! (`/v1/handlers`) from the command line.
//!
//! Tables are for people (columns sized to their contents); `dlq` prints NDJSON for tools. Flags are
//! validated here, before any request, so a typo gets a one-line error naming the flag and its forms.

use clap::Subcommand;
use serde_json::{Value, json};

use super::table::print_table;
use super::{Endpoints, check, encode_component};
use crate::catalog::ResetTo;
use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum HandlersCommand {
    /// List handlers: input, outputs, active version, paused, total lag.
    List,
    /// Show a handler's versions and each partition's progress.
    Show {
        /// Handler name.
        name: String,
    },
    /// Make an earlier version active again (default: the newest one before the active version).
    // `--version N` names a handler version here, so procd's own `--version` is off for this command.
    #[command(disable_version_flag = true)]
    Rollback {
        /// Handler name.
        name: String,
        /// Version to activate.
        #[arg(long)]
        version: Option<u32>,
    },
    /// Stop processing; input keeps accumulating until `resume`.
    Pause {
        /// Handler name.
        name: String,
    },
    /// Resume processing where it stopped.
    Resume {
        /// Handler name.
        name: String,
    },
    /// Move every partition's position (applied at each partition's next batch boundary).
    Reset {
        /// Handler name.
        name: String,
        /// Target: earliest, latest, offset:N or timestamp:MS (ms since the Unix epoch).
        #[arg(long, value_name = "earliest|latest|offset:N|timestamp:MS")]
        to: String,
        /// Also delete the handler's state.
        #[arg(long)]
        clear_state: bool,
    },
    /// Remove a handler with its versions, positions, state and dead letters.
    Remove {
        /// Handler name.
        name: String,
    },
    /// Print a handler's dead letters as NDJSON.
    Dlq {
        /// Handler name.
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<u32>,
        /// Entries per partition at most.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Run a handler's dead letters again through its current version; those that succeed leave the log.
    ReplayDlq {
        /// Handler name.
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<u32>,
        /// Only this dead letter (`seq` in `dlq` output; give --partition too).
        #[arg(long, requires = "partition")]
        seq: Option<u64>,
    },
    /// Delete a handler's dead letters (all, or one partition's, or up to a sequence number).
    PurgeDlq {
        /// Handler name.
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<u32>,
        /// Only entries up to and including this sequence number (`seq` in `dlq` output).
        #[arg(long)]
        through: Option<u64>,
    },
}

/// Parses `--to`: `earliest`, `latest`, `offset:N` or `timestamp:MS`.
fn parse_reset_to(s: &str) -> anyhow::Result<ResetTo> {
    let number = |n: &str, what: &str| {
        n.parse::<u64>().map_err(|_| {
            anyhow::anyhow!("--to {s:?}: {what} must be a whole number, e.g. --to {what}:0")
        })
    };
    match s.split_once(':') {
        None if s == "earliest" => Ok(ResetTo::Earliest),
        None if s == "latest" => Ok(ResetTo::Latest),
        Some(("offset", n)) => Ok(ResetTo::Offset(number(n, "offset")?)),
        Some(("timestamp", n)) => Ok(ResetTo::Timestamp(number(n, "timestamp")?)),
        _ => anyhow::bail!("invalid --to {s:?}: use earliest, latest, offset:N or timestamp:MS"),
    }
}

fn describe_reset_to(to: &ResetTo) -> String {
    match to {
        ResetTo::Earliest => "earliest".into(),
        ResetTo::Latest => "latest".into(),
        ResetTo::Offset(n) => format!("offset {n}"),
        ResetTo::Timestamp(ms) => format!("timestamp {ms} ms"),
    }
}

pub(super) async fn run(command: HandlersCommand, endpoints: &Endpoints) -> anyhow::Result<()> {
    let mut admin = Client::new(&endpoints.admin_url)?;
    let path = |name: &str| format!("/v1/handlers/{}", encode_component(name));
    match command {
        HandlersCommand::List => {
            let resp = check(admin.get("/v1/handlers").await?)?.json()?;
            let rows = resp["handlers"]
                .as_array()
                .map(|hs| hs.iter().map(list_row).collect())
                .unwrap_or_default();
            print_table(
                &["NAME", "INPUT", "OUTPUTS", "VERSION", "PAUSED", "LAG"],
                rows,
            );
        }
        HandlersCommand::Show { name } => {
            let def = check(admin.get(&path(&name)).await?)?.json()?;
            show(&def);
        }
        HandlersCommand::Rollback { name, version } => {
            let body = version.map_or_else(|| json!({}), |v| json!({ "version": v }));
            let def = check(
                admin
                    .post_json(&format!("{}/rollback", path(&name)), &body)
                    .await?,
            )?
            .json()?;
            println!("rolled back {name} to v{}", def["active"]);
        }
        HandlersCommand::Pause { name } => {
            check(
                admin
                    .post_json(&format!("{}/pause", path(&name)), &json!({}))
                    .await?,
            )?;
            println!("paused {name}");
        }
        HandlersCommand::Resume { name } => {
            check(
                admin
                    .post_json(&format!("{}/resume", path(&name)), &json!({}))
                    .await?,
            )?;
            println!("resumed {name}");
        }
        HandlersCommand::Reset {
            name,
            to,
            clear_state,
        } => {
            let to = parse_reset_to(&to)?;
            let body = json!({ "to": to, "clear_state": clear_state });
            check(
                admin
                    .post_json(&format!("{}/reset", path(&name)), &body)
                    .await?,
            )?;
            println!(
                "reset {name} to {}{}; each partition moves at its next batch boundary",
                describe_reset_to(&to),
                if clear_state { ", state cleared" } else { "" }
            );
        }
        HandlersCommand::Remove { name } => {
            check(admin.delete(&path(&name)).await?)?;
            println!("removed handler {name}");
        }
        HandlersCommand::Dlq {
            name,
            partition,
            limit,
        } => {
            let mut query = format!("limit={limit}");
            if let Some(p) = partition {
                query.push_str(&format!("&partition={p}"));
            }
            let resp = check(admin.get(&format!("{}/dlq?{query}", path(&name))).await?)?.json()?;
            let mut out = String::new();
            for entry in resp["dead_letters"].as_array().into_iter().flatten() {
                out.push_str(&entry.to_string());
                out.push('\n');
            }
            print!("{out}");
        }
        HandlersCommand::ReplayDlq {
            name,
            partition,
            seq,
        } => {
            let mut query = Vec::new();
            if let Some(p) = partition {
                query.push(format!("partition={p}"));
            }
            if let Some(s) = seq {
                query.push(format!("seq={s}"));
            }
            let url = format!("{}/dlq/replay?{}", path(&name), query.join("&"));
            let resp = check(admin.post_json(&url, &serde_json::json!({})).await?)?.json()?;
            let failed = resp["failed"].as_array().map_or(0, Vec::len);
            println!(
                "replayed {} dead letters of {name}; {failed} failed again",
                resp["replayed"]
            );
            for f in resp["failed"].as_array().into_iter().flatten() {
                println!("{f}");
            }
        }
        HandlersCommand::PurgeDlq {
            name,
            partition,
            through,
        } => {
            let mut query = Vec::new();
            if let Some(p) = partition {
                query.push(format!("partition={p}"));
            }
            if let Some(t) = through {
                query.push(format!("through={t}"));
            }
            let url = format!("{}/dlq?{}", path(&name), query.join("&"));
            let resp = check(admin.delete(&url).await?)?.json()?;
            println!("purged {} dead letters of {name}", resp["purged"]);
        }
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn yes_no(v: &Value) -> String {
    if v.as_bool().unwrap_or(false) {
        "yes".into()
    } else {
        "no".into()
    }
}

/// The active version's definition in a handler description.
fn active_version(def: &Value) -> Option<&Value> {
    def["versions"]
        .as_array()?
        .iter()
        .find(|v| v["version"] == def["active"])
}

fn outputs_of(version: Option<&Value>) -> String {
    let outputs: Vec<String> = version
        .and_then(|v| v["outputs"].as_array())
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default();
    if outputs.is_empty() {
        "-".into()
    } else {
        outputs.join(",")
    }
}

fn list_row(def: &Value) -> Vec<String> {
    vec![
        text(&def["name"]),
        text(&def["input"]),
        outputs_of(active_version(def)),
        format!("v{}", def["active"]),
        yes_no(&def["paused"]),
        text(&def["lag"]),
    ]
}

fn show(def: &Value) {
    println!("name:    {}", text(&def["name"]));
    println!(
        "input:   {} (new partitions start at {})",
        text(&def["input"]),
        text(&def["start"])
    );
    println!("active:  v{}", def["active"]);
    println!("paused:  {}", yes_no(&def["paused"]));
    println!("lag:     {}", text(&def["lag"]));
    if let Ok(reset) = serde_json::from_value::<crate::catalog::Reset>(def["reset"].clone()) {
        println!(
            "reset:   #{} to {}{}",
            reset.generation,
            describe_reset_to(&reset.to),
            if reset.clear_state {
                ", state cleared"
            } else {
                ""
            }
        );
    }

    println!();
    let versions = def["versions"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .map(|v| {
                    let active = if v["version"] == def["active"] {
                        " (active)"
                    } else {
                        ""
                    };
                    let config: Vec<String> = v["config"]
                        .as_array()
                        .map(|c| {
                            c.iter()
                                .map(|kv| format!("{}={}", text(&kv[0]), text(&kv[1])))
                                .collect()
                        })
                        .unwrap_or_default();
                    vec![
                        format!("v{}{active}", v["version"]),
                        outputs_of(Some(v)),
                        if config.is_empty() {
                            "-".into()
                        } else {
                            config.join(",")
                        },
                        text(&v["size_bytes"]),
                        // The first 12 hex digits, like a short git hash; `-` before digests existed.
                        match v["sha256"].as_str() {
                            Some(d) if !d.is_empty() => d.chars().take(12).collect(),
                            _ => "-".into(),
                        },
                        text(&v["created_ms"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print_table(
        &[
            "VERSION",
            "OUTPUTS",
            "CONFIG",
            "SIZE_BYTES",
            "SHA256",
            "CREATED_MS",
        ],
        versions,
    );

    println!();
    let partitions: Vec<&Value> = def["partitions"].as_array().into_iter().flatten().collect();
    let rows = partitions
        .iter()
        .map(|p| {
            let version = match p["version"].as_u64() {
                Some(0) | None => "-".to_string(),
                Some(v) => format!("v{v}"),
            };
            vec![
                text(&p["partition"]),
                version,
                text(&p["committed_offset"]),
                text(&p["end_offset"]),
                text(&p["lag"]),
                text(&p["lag_ms"]),
                text(&p["status"]),
                text(&p["dead_letters"]),
            ]
        })
        .collect();
    print_table(
        &[
            "PARTITION",
            "VERSION",
            "COMMITTED",
            "END",
            "LAG",
            "LAG_MS",
            "STATUS",
            "DLQ",
        ],
        rows,
    );
    // Why a partition waits or failed can be long: below the table, not in it.
    for p in partitions {
        if let Some(detail) = p["detail"].as_str() {
            println!(
                "partition {} is {}: {detail}",
                text(&p["partition"]),
                text(&p["status"])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_targets_parse_or_name_the_valid_forms() {
        assert_eq!(parse_reset_to("earliest").ok(), Some(ResetTo::Earliest));
        assert_eq!(parse_reset_to("latest").ok(), Some(ResetTo::Latest));
        assert_eq!(parse_reset_to("offset:42").ok(), Some(ResetTo::Offset(42)));
        assert_eq!(
            parse_reset_to("timestamp:1700000000000").ok(),
            Some(ResetTo::Timestamp(1_700_000_000_000))
        );
        for bad in [
            "sideways",
            "offset:",
            "offset:-1",
            "timestamp:soon",
            "42",
            "",
        ] {
            let err = parse_reset_to(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("--to"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn list_rows_show_the_active_version() {
        let def = json!({
            "name": "c", "input": "in", "active": 2, "paused": true, "lag": 7,
            "versions": [{"version": 1, "outputs": ["a"]}, {"version": 2, "outputs": ["a", "b"]}],
        });
        assert_eq!(list_row(&def), ["c", "in", "a,b", "v2", "yes", "7"]);
    }
}
