//! Cell maintenance: retention and journal upkeep, on the cell's own thread so the writer never waits for it.
//!
//! Retention drops whole ranges below a cut offset (fjall `drop_range`: whole tables only, so it is
//! approximate, like Kafka's segment-granular retention). The cut is the highest of the age cut and the
//! size cut, but never past the partition's last event (the next offset is recovered from it) and never
//! past the lowest committed offset of the topic's consumers unless the topic sets `drop_unconsumed`.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use super::{PartitionView, Shared, now_ms};
use crate::catalog::{Retention, StartPosition, Topic};
use crate::log::StoreError;

pub(super) fn run(shared: &Shared, interval: Duration, stop: &Receiver<()>) {
    let _span = tracing::info_span!("procd.cell.maintenance", cell = shared.index).entered();
    loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            // Stopped (sender dropped) or told to stop.
            _ => return,
        }
        if shared.health.failure().is_some() {
            continue;
        }
        if let Err(e) = tick(shared, interval) {
            tracing::warn!(cell = shared.index, error = %e, "maintenance failed; retrying next tick");
        }
    }
}

/// A partition with an age limit has its memtable sealed once its oldest events are this share of the
/// limit old, so that tables never span much more time than that and age retention can drop them whole.
/// Without it a quiet partition would keep old and new events in one memtable, later one table, that
/// `drop_range` can never drop while the newest event is young.
const SEAL_AGE_SHARE: u64 = 4;

fn tick(shared: &Shared, interval: Duration) -> Result<(), StoreError> {
    let topics = shared.topics.load();
    let mut logs = Vec::new();
    for tp in topics.values() {
        for view in tp.by_partition.values() {
            logs.push(view.log().clone());
            // One partition's failure (a corrupt entry, say) must not stop the others' retention, nor
            // the journal upkeep below.
            if let Err(e) = upkeep_partition(shared, &tp.topic, view) {
                tracing::warn!(cell = shared.index, topic = %tp.topic.name, partition = view.partition, error = %e, "retention failed on a partition; retrying next tick");
            }
        }
    }
    // fjall deletes a journal file only once every memtable holding its data has flushed; memtables
    // that stopped filling (quiet partitions, dedup windows) would keep journals forever. Seal those
    // (older than a tick) before the budget is reached, leaving busy ones to flush as they fill.
    if shared.store.journal_bytes() > shared.store.max_journal_bytes() / 2 {
        let before_ms = now_ms().saturating_sub(interval.as_millis() as u64);
        shared.store.rotate_stale_memtables(&logs, before_ms)?;
    }
    Ok(())
}

/// Seals a partition's memtable once it spans enough of the age limit, and drops what retention cuts.
fn upkeep_partition(
    shared: &Shared,
    topic: &Topic,
    view: &PartitionView,
) -> Result<(), StoreError> {
    if let Some(max_age_ms) = topic.retention.max_age_ms {
        let seal_after_ms = (max_age_ms / SEAL_AGE_SHARE).max(1);
        if view
            .log()
            .memtable_since()?
            .is_some_and(|t| now_ms().saturating_sub(t) >= seal_after_ms)
        {
            view.log().seal()?;
        }
    }
    let floor = consumer_floor(shared, &topic.name, view.partition)?;
    if let Some(cut) = retention_cut(view, &topic.retention, now_ms(), floor)? {
        tracing::debug!(topic = %topic.name, partition = view.partition, cut, "retention: dropping");
        view.log().drop_before(cut)?;
        // Events below the cut still in the memtable (or in a table reaching past the cut) stay;
        // sealing the memtable puts them in a table of their own that the next tick can drop.
        if view.log().holds_entries_below(cut)? {
            view.log().seal()?;
        }
    }
    Ok(())
}

/// The lowest offset a handler reading `topic` still needs on `partition`: its committed offset or, for
/// a handler that has not committed there yet, where it will start (the earliest event, the end when it
/// was deployed for `latest`, or its offset).
fn consumer_floor(shared: &Shared, topic: &str, partition: u32) -> Result<Option<u64>, StoreError> {
    let mut floor: Option<u64> = None;
    for def in shared
        .catalog
        .handlers()
        .values()
        .filter(|d| d.input == topic)
    {
        let needed = match shared.store.consumer(&def.name, partition)?.committed()? {
            Some(c) => c.offset,
            None => match def.start {
                StartPosition::Earliest => 0,
                StartPosition::Latest => match def.start_offsets.get(partition as usize) {
                    Some(&end) => end,
                    // Deployed before procd recorded them: it starts at the end it finds.
                    None => continue,
                },
                StartPosition::Offset(n) => n,
            },
        };
        floor = Some(floor.map_or(needed, |f| f.min(needed)));
    }
    Ok(floor)
}

/// The offset below which events may be dropped, if any. `consumer_floor` is the lowest committed offset
/// of the partition's consumers.
pub(crate) fn retention_cut(
    view: &PartitionView,
    retention: &Retention,
    now_ms: u64,
    consumer_floor: Option<u64>,
) -> Result<Option<u64>, StoreError> {
    let log = view.log();
    let end = view.end_offset();
    let Some(first) = log.first_offset()? else {
        return Ok(None);
    };
    if end <= first + 1 {
        return Ok(None);
    }
    let mut cut = first;
    if let Some(max_age_ms) = retention.max_age_ms {
        let oldest_kept_ms = now_ms.saturating_sub(max_age_ms);
        cut = cut.max(first_at_or_after(view, first, end, oldest_kept_ms)?);
    }
    if let Some(max_bytes) = retention.max_bytes {
        let disk = log.disk_bytes();
        if disk > max_bytes {
            // Tables hold whole events; estimate the events that fit from the average stored size.
            let count = end - first;
            let per_event = (disk / count).max(1);
            let keep = max_bytes / per_event;
            cut = cut.max(end.saturating_sub(keep));
        }
    }
    // Keep the last event: the next offset is recovered from it after a restart.
    cut = cut.min(end - 1);
    if let Some(floor) = consumer_floor.filter(|_| !retention.drop_unconsumed) {
        cut = cut.min(floor);
    }
    Ok((cut > first).then_some(cut))
}

/// The first offset in `[lo, hi)` whose timestamp is `>= ts` (`hi` if none); timestamps are non-decreasing.
pub(super) fn first_at_or_after(
    view: &PartitionView,
    mut lo: u64,
    mut hi: u64,
    ts: u64,
) -> Result<u64, StoreError> {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // A missing offset lies below the log start (already dropped): treat it as old.
        match view.log().timestamp_at(mid)? {
            Some(t) if t >= ts => hi = mid,
            _ => lo = mid + 1,
        }
    }
    Ok(lo)
}
