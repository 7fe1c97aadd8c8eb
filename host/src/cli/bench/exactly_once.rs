//! After a load run: every accepted event is in the log exactly once and nothing refused is, checked
//! by reading the whole topic back through the read API and recognising each event by the number in
//! its value (see [`super::requests`]). Ids are not used: ingest dedups by id and would hide a
//! duplicate.

use anyhow::{Context as _, bail};

use super::open_loop::{Outcome, Recording};
use super::requests::seq_of_line;
use crate::client::Client;

/// Events per read request (the server's default `read.max_limit`).
const READ_LIMIT: u64 = 10_000;
/// No slot: the request's events must not be in the log.
const NONE: u32 = u32::MAX;

/// What the read-back found.
#[derive(Debug, Default)]
pub(super) struct Check {
    /// Events the server accepted (`202`, and the accepted ones of `207`).
    pub accepted: u64,
    /// Events read back.
    pub read: u64,
    /// Accepted events not in the log.
    pub lost: u64,
    /// Events in the log more than once (each extra copy counted).
    pub duplicated: u64,
    /// Events refused (or never sent) that are in the log anyway.
    pub refused_present: u64,
    /// Events of requests without an answer (outcome unknown), and how many of them are in the log.
    pub unknown: u64,
    pub unknown_present: u64,
    /// Lines that are not one of the run's events.
    pub foreign: u64,
}

impl Check {
    /// Exactly once: no accepted event lost or duplicated, no refused event present.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.refused_present == 0 && self.foreign == 0
    }

    /// The report's line.
    pub fn line(&self) -> String {
        format!(
            "exactly once: {} ({} events accepted, {} read back: {} lost, {} duplicated, {} refused \
             but present, {} not ours; {} events of unanswered requests, {} of them present)",
            if self.passed() { "passed" } else { "FAILED" },
            self.accepted,
            self.read,
            self.lost,
            self.duplicated,
            self.refused_present,
            self.foreign,
            self.unknown,
            self.unknown_present
        )
    }
}

/// Reads `topic` (all `partitions`) back from the server at `data_url` and checks it against `rec`.
/// Whether the benchmark's server survived, and if it did, [`check`] on it (a dead server cannot be
/// read back).
pub(super) async fn check_if_alive(
    server: &mut super::child::ChildServer,
    topic: &str,
    partitions: u32,
    rec: &Recording,
    batch: usize,
) -> anyhow::Result<(bool, Option<Check>)> {
    if !server.alive() {
        return Ok((false, None));
    }
    let check = check(&server.data_url, topic, partitions, rec, batch).await?;
    Ok((true, Some(check)))
}

pub(super) async fn check(
    data_url: &str,
    topic: &str,
    partitions: u32,
    rec: &Recording,
    batch: usize,
) -> anyhow::Result<Check> {
    // A slot of `batch` counters for each request whose events may be in the log.
    let mut slots = Vec::with_capacity(rec.records.len());
    let mut next = 0u32;
    let mut check = Check::default();
    for r in &rec.records {
        match r.outcome {
            Outcome::Accepted | Outcome::Partial | Outcome::Failed => {
                slots.push(next);
                next = next.checked_add(1).context("too many requests to check")?;
            }
            Outcome::Refused(_) | Outcome::NotSent => slots.push(NONE),
        }
        check.accepted += u64::from(r.accepted);
        if r.outcome == Outcome::Failed {
            check.unknown += batch as u64;
        }
    }
    let mut counts = vec![0u8; (next as usize).saturating_mul(batch)];

    let mut client = Client::new(data_url)?;
    for partition in 0..partitions {
        let mut from = 0u64;
        loop {
            let resp = client
                .get(&format!(
                    "/v1/topics/{topic}/partitions/{partition}/events?from={from}&limit={READ_LIMIT}"
                ))
                .await?;
            let resp = crate::cli::check(resp)
                .with_context(|| format!("reading back partition {partition}"))?;
            let header = |name: &str| -> anyhow::Result<u64> {
                resp.header(name)
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("the read API answered without {name}"))
            };
            let (next_offset, end) = (header("procd-next-offset")?, header("procd-end-offset")?);
            let text = std::str::from_utf8(&resp.body).context("the read API sent non-UTF-8")?;
            for line in text.lines().filter(|l| !l.is_empty()) {
                check.read += 1;
                let Some(seq) = seq_of_line(line) else {
                    check.foreign += 1;
                    continue;
                };
                let (request, index) = (seq / batch as u64, (seq % batch as u64) as usize);
                let Some(&slot) = slots.get(request as usize) else {
                    check.foreign += 1;
                    continue;
                };
                if slot == NONE {
                    check.refused_present += 1;
                    continue;
                }
                if let Some(c) = counts.get_mut(slot as usize * batch + index) {
                    *c = c.saturating_add(1);
                }
            }
            if next_offset >= end {
                break;
            }
            if next_offset <= from {
                bail!("reading back partition {partition} made no progress at offset {from}");
            }
            from = next_offset;
        }
    }

    for (r, &slot) in rec.records.iter().zip(&slots) {
        if slot == NONE {
            continue;
        }
        let mask = rec.partial.get(&r.request);
        let first = slot as usize * batch;
        for index in 0..batch {
            let count = u64::from(counts.get(first + index).copied().unwrap_or(0));
            let accepted = match r.outcome {
                Outcome::Accepted => true,
                Outcome::Partial => mask.and_then(|m| m.get(index)).copied().unwrap_or(false),
                _ => {
                    // Unknown outcome: at most once.
                    check.unknown_present += count.min(1);
                    check.duplicated += count.saturating_sub(1);
                    continue;
                }
            };
            if accepted {
                check.lost += u64::from(count == 0);
                check.duplicated += count.saturating_sub(1);
            } else {
                check.refused_present += count;
            }
        }
    }
    Ok(check)
}
