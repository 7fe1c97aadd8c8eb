//! What `procd dev` shows while it runs: every record appended to the output topics (one line each:
//! topic, partition, offset, key, value), and each new dead letter or partition failure of the
//! handler as it happens. Colour only when stdout is a terminal.
//!
//! Outputs are long-polled per partition from the end offsets they had when the session started, so
//! a reused data directory does not replay old outputs. Dead letters are found by polling the
//! handler's status (its `dead_letters` counters) and then listing the new entries from the last
//! sequence number seen.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cli::{check, encode_component};
use crate::client::Client;

/// How long one read of an output partition waits for new records.
const READ_WAIT_MS: u64 = 5_000;
/// Records per read.
const READ_LIMIT: usize = 1_000;
/// How often the handler's status is polled for new dead letters and failures.
const STATUS_POLL: Duration = Duration::from_secs(1);
/// Dead letters listed per request.
const DLQ_PAGE: usize = 1_000;
/// After a failed request, how long a poller waits before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// Writes the session's lines to stdout, coloured when it is a terminal.
#[derive(Debug, Clone, Copy)]
pub(super) struct Printer {
    colour: bool,
}

impl Printer {
    pub(super) fn new() -> Self {
        Self {
            colour: std::io::stdout().is_terminal(),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// A line about the session itself (build, deploy, errors).
    pub(super) fn note(&self, text: &str) {
        self.line(&format!("{} {text}", self.paint("1;34", "procd dev:")));
    }

    /// A warning: something the user should act on.
    pub(super) fn warn(&self, text: &str) {
        self.line(&format!("{} {text}", self.paint("1;33", "procd dev:")));
    }

    fn line(&self, text: &str) {
        // One locked write per line, so lines from concurrent tailers never interleave.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// One line of the read API.
#[derive(Deserialize)]
struct ReadLine<'a> {
    offset: u64,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_base64: Option<String>,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
    #[serde(default)]
    value_base64: Option<String>,
}

/// `output p1@7 alice {"n":1}`: the value as it was written.
fn format_record(p: &Printer, topic: &str, partition: u32, line: &ReadLine<'_>) -> String {
    let key = match (&line.key, &line.key_base64) {
        (Some(k), _) => k.clone(),
        (None, Some(b64)) => format!("base64:{b64}"),
        (None, None) => "-".to_string(),
    };
    let value = match (line.value, &line.value_base64) {
        (Some(v), _) => v.get().to_string(),
        (None, Some(b64)) => format!("base64:{b64}"),
        (None, None) => String::new(),
    };
    format!(
        "{} {} {}",
        p.paint("2", &format!("{topic} p{partition}@{}", line.offset)),
        p.paint("36", &key),
        value
    )
}

/// Tails `topic`'s partition `partition` from `from`, forever.
pub(super) async fn tail_partition(
    printer: Printer,
    url: String,
    topic: String,
    partition: u32,
    mut from: u64,
) {
    let Ok(mut client) = Client::new(&url) else {
        return;
    };
    let path_topic = encode_component(&topic);
    loop {
        let path = format!(
            "/v1/topics/{path_topic}/partitions/{partition}/events?from={from}&limit={READ_LIMIT}&wait_ms={READ_WAIT_MS}"
        );
        let resp = match client
            .get(&path)
            .await
            .map_err(anyhow::Error::from)
            .and_then(check)
        {
            Ok(resp) => resp,
            Err(_) => {
                // The server is stopping, or the topic was deleted: nothing to show until it is back.
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let text = String::from_utf8_lossy(&resp.body);
        let mut out = String::new();
        for raw in text.lines().filter(|l| !l.is_empty()) {
            if let Ok(line) = serde_json::from_str::<ReadLine<'_>>(raw) {
                out.push_str(&format_record(&printer, &topic, partition, &line));
                out.push('\n');
                from = from.max(line.offset + 1);
            }
        }
        if !out.is_empty() {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(out.as_bytes());
            let _ = stdout.flush();
        }
        if let Some(next) = resp
            .header("procd-next-offset")
            .and_then(|v| v.parse::<u64>().ok())
        {
            from = from.max(next);
        }
    }
}

/// The end offset of each partition of `topic` now.
pub(super) async fn end_offsets(
    admin: &mut Client,
    topic: &str,
) -> anyhow::Result<Vec<(u32, u64)>> {
    let v = check(
        admin
            .get(&format!("/v1/topics/{}", encode_component(topic)))
            .await?,
    )?
    .json()?;
    Ok(v["partition_offsets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                u32::try_from(p["partition"].as_u64()?).ok()?,
                p["end_offset"].as_u64()?,
            ))
        })
        .collect())
}

/// Watches handler `name` for new dead letters and partitions that fail or wait, forever.
pub(super) async fn watch_handler(printer: Printer, admin_url: String, name: String) {
    let Ok(mut admin) = Client::new(&admin_url) else {
        return;
    };
    let path = format!("/v1/handlers/{}", encode_component(&name));
    // Next dead-letter sequence number to show, per partition: those before the session are old news.
    let mut next_seq: HashMap<u64, u64> = HashMap::new();
    let mut seen_dead: HashMap<u64, u64> = HashMap::new();
    let mut trouble: HashMap<u64, String> = HashMap::new();
    let mut primed = false;
    loop {
        tokio::time::sleep(if primed { STATUS_POLL } else { Duration::ZERO }).await;
        let Ok(resp) = admin.get(&path).await else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        if resp.status == 404 {
            // Not deployed yet (the first build is running or failed): no dead letters before it.
            primed = true;
            continue;
        }
        let Ok(def) = resp.json() else { continue };
        for p in def["partitions"].as_array().into_iter().flatten() {
            let Some(partition) = p["partition"].as_u64() else {
                continue;
            };
            let status = p["status"].as_str().unwrap_or("");
            let detail = p["detail"].as_str().unwrap_or("");
            if matches!(status, "failed" | "waiting") {
                let now = format!("{status}: {detail}");
                if trouble.get(&partition) != Some(&now) {
                    printer.warn(&format!("{name} partition {partition} is {now}"));
                    trouble.insert(partition, now);
                }
            } else if trouble.remove(&partition).is_some() {
                printer.note(&format!("{name} partition {partition} is {status} again"));
            }
            let dead = p["dead_letters"].as_u64().unwrap_or(0);
            let changed = seen_dead.insert(partition, dead) != Some(dead);
            if !primed || changed {
                let from = next_seq.get(&partition).copied().unwrap_or(0);
                let show = primed;
                let last = dead_letters(&printer, &mut admin, &name, partition, from, show).await;
                if let Some(last) = last {
                    next_seq.insert(partition, last + 1);
                }
            }
        }
        primed = true;
    }
}

/// Lists (and prints, if `show`) the dead letters of `partition` from sequence `from`; returns the
/// last sequence number seen.
async fn dead_letters(
    printer: &Printer,
    admin: &mut Client,
    name: &str,
    partition: u64,
    mut from: u64,
    show: bool,
) -> Option<u64> {
    let mut last = None;
    loop {
        let path = format!(
            "/v1/handlers/{}/dlq?partition={partition}&from={from}&limit={DLQ_PAGE}",
            encode_component(name)
        );
        let entries = admin.get(&path).await.ok()?.json().ok()?["dead_letters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for e in &entries {
            let Some(seq) = e["seq"].as_u64() else {
                continue;
            };
            if show {
                printer.warn(&format!(
                    "dead letter: {name} p{partition}@{} (v{}) key={}: {}",
                    e["offset"],
                    e["version"],
                    e["key"].as_str().unwrap_or("-"),
                    e["error"].as_str().unwrap_or("?")
                ));
            }
            last = Some(seq);
            from = seq + 1;
        }
        if entries.len() < DLQ_PAGE {
            return last;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_print_as_one_plain_line_off_a_terminal() -> serde_json::Result<()> {
        let p = Printer { colour: false };
        let line: ReadLine<'_> = serde_json::from_str(
            r#"{"partition":1,"offset":7,"timestamp_ms":1,"key":"alice","value":{"b":1,"a":2},"headers":{}}"#,
        )?;
        assert_eq!(
            format_record(&p, "out", 1, &line),
            r#"out p1@7 alice {"b":1,"a":2}"#
        );
        let raw: ReadLine<'_> = serde_json::from_str(
            r#"{"partition":0,"offset":0,"timestamp_ms":1,"key":null,"value_base64":"AAE=","headers":{}}"#,
        )?;
        assert_eq!(format_record(&p, "out", 0, &raw), "out p0@0 - base64:AAE=");
        Ok(())
    }

    #[test]
    fn colour_is_added_only_when_asked() {
        assert_eq!(Printer { colour: false }.paint("36", "k"), "k");
        assert_eq!(
            Printer { colour: true }.paint("36", "k"),
            "\x1b[36mk\x1b[0m"
        );
    }
}
