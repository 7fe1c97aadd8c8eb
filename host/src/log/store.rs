//! One cell's fjall `Database`: the partition logs and dedup windows of the partitions that cell owns.
//!
//! A `Store` is shared by its cell's writer (the only thread that writes) and by readers (which only read
//! up to the offset the writer has published as durable). Nothing here is shared between cells.
//!
//! A partition log's entries are keyed by offset; an entry holds one record or a run of consecutive
//! records under the first one's offset ([`entry`]): a [`Batch`] gathers the records appended to a
//! partition into runs, and reads split them again, so callers see one record per offset.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use fjall::config::FilterPolicy;
use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};
use serde::{Deserialize, Serialize};

use super::entry::{self, MAX_RUN_BYTES, RunBuilder};
use super::keys::{decode_offset_key, dedup_keyspace, log_keyspace, offset_key};
use super::record;

/// Tells partition logs apart inside a [`Batch`] (a `Keyspace` has no cheap identity of its own).
static NEXT_LOG_ID: AtomicU64 = AtomicU64::new(0);

/// Tuning of a cell's Database. Each cell opens its own, so these are per cell.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Block cache size. Reads are mostly of the recent tail, which the memtable serves.
    pub cache_bytes: u64,
    /// Memtable size per keyspace, the base of each partition's (see `staggered_memtable_bytes`); small,
    /// because there are (topics × partitions / cells) of them.
    pub max_memtable_bytes: u64,
    /// Journal budget; past half of it, maintenance seals the memtables that stopped filling.
    pub max_journal_bytes: u64,
    /// Background flush/compaction threads of this Database (fjall starts its own pool per Database).
    pub worker_threads: usize,
    /// Open file descriptors cached by this Database.
    pub max_cached_files: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 16 * 1024 * 1024,
            max_memtable_bytes: 8 * 1024 * 1024,
            // fjall seals a journal file at 64 MB and, once its journals use this much disk, forces
            // every memtable still holding data of the oldest one to flush at once: a burst that stalls
            // commits (see `staggered_memtable_bytes`). At 64 MiB (fjall's minimum) that happened every
            // ~5 s per cell under steady load; with room for a few journal files, memtables flush as
            // they fill, one at a time. Recovery replays about this much at most (fjall can run a journal
            // file past it before its flushes catch up).
            max_journal_bytes: 256 * 1024 * 1024,
            worker_threads: 1,
            max_cached_files: 128,
        }
    }
}

/// The memtable size of a partition's keyspaces: between 1 and 1.5 × `base`, spread by partition
/// index (golden-ratio steps, so any number of partitions is spread evenly).
///
/// Why: the partitions of a topic fill at about the same rate, so memtables of one size would all seal
/// at the same moment and flush together: a burst of SST writes and fsyncs that stalls every cell
/// writer's commit for tens of milliseconds every few seconds (measured in `procd bench surge`: all 8
/// partitions flushed within 150 ms every 2 s, and the accepted p99 of those seconds jumped from ~3 ms
/// to 15-70 ms). Sizes that differ keep the flushes apart.
fn staggered_memtable_bytes(base: u64, partition: u32) -> u64 {
    const GOLDEN: f64 = 0.618_033_988_749_895;
    let spread = (f64::from(partition) * GOLDEN).fract();
    base + (base as f64 * 0.5 * spread) as u64
}

/// A storage operation failed. Any write error is fatal for the cell (fjall poisons the Database).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// fjall reported an error.
    #[error("storage error in {dir}: {cause}")]
    Fjall { dir: PathBuf, cause: fjall::Error },
    /// A fault injected for testing (`debug.fault_injection`) failed this write as an fsync error would.
    #[error("injected write fault in {dir} (debug.fault_injection)")]
    InjectedFault { dir: PathBuf },
    /// A stored record or key is not in any format procd wrote.
    #[error("corrupt data in {dir} keyspace {keyspace}: {detail}")]
    Corrupt {
        dir: PathBuf,
        keyspace: String,
        detail: String,
    },
}

/// A cell's Database.
#[derive(Clone)]
pub struct Store {
    db: Database,
    dir: PathBuf,
    options: StoreOptions,
    /// Set by [`Store::inject_write_fault`]: every later commit fails. Tests use it to prove that a
    /// storage fault stops one cell only.
    fault: Arc<AtomicBool>,
    /// Set by [`Store::inject_slow_writes`]: every later commit first sleeps this many ms, as on a
    /// slow disk.
    slow_ms: Arc<std::sync::atomic::AtomicU64>,
}

/// One id remembered for deduplication, stored at the offset its event was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    /// The producer's event id.
    pub id: String,
    /// When the event was appended.
    pub timestamp_ms: u64,
}

/// The keyspaces of one topic partition.
#[derive(Clone)]
pub struct PartitionLog {
    log: Keyspace,
    dedup: Keyspace,
    dir: PathBuf,
    /// Unique per opened partition (clones share it).
    id: u64,
}

impl Store {
    /// Opens (or creates) the Database in `dir`.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let db = Database::builder(dir)
            .cache_size(options.cache_bytes)
            .worker_threads(options.worker_threads.max(1))
            .max_cached_files(Some(options.max_cached_files.max(10)))
            .max_journaling_size(options.max_journal_bytes.max(64 * 1024 * 1024))
            // procd decides durability per batch: ingest batches are fsynced before they are acknowledged.
            .manual_journal_persist(true)
            // fjall compresses journal values of 4 KiB and more (runs of records are up to 64 KiB): CPU
            // the cell writer would spend on a file that is deleted after the next flush (measured: 13 %
            // of the writer threads' time in `procd bench e2e`).
            .journal_compression(fjall::CompressionType::None)
            .open()
            .map_err(|cause| StoreError::Fjall {
                dir: dir.to_path_buf(),
                cause,
            })?;
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
            options,
            fault: Arc::default(),
            slow_ms: Arc::default(),
        })
    }

    fn err(&self) -> impl Fn(fjall::Error) -> StoreError + '_ {
        |cause| StoreError::Fjall {
            dir: self.dir.clone(),
            cause,
        }
    }

    /// The Database directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens the keyspaces of a topic partition, creating them if needed.
    pub fn partition(&self, topic: &str, partition: u32) -> Result<PartitionLog, StoreError> {
        let memtable = staggered_memtable_bytes(self.options.max_memtable_bytes, partition);
        // Logs and dedup entries are only ever range-scanned (dedup lookups are served from memory), so
        // building bloom filters at every flush and compaction would be wasted work.
        let opts = move || {
            KeyspaceCreateOptions::default()
                .max_memtable_size(memtable)
                .filter_policy(FilterPolicy::disabled())
        };
        let log = self
            .db
            .keyspace(&log_keyspace(topic, partition), opts)
            .map_err(self.err())?;
        let dedup = self
            .db
            .keyspace(&dedup_keyspace(topic, partition), opts)
            .map_err(self.err())?;
        Ok(PartitionLog {
            log,
            dedup,
            dir: self.dir.clone(),
            id: NEXT_LOG_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub(super) fn options(&self) -> &StoreOptions {
        &self.options
    }

    pub(super) fn keyspace(
        &self,
        name: &str,
        opts: impl FnOnce() -> KeyspaceCreateOptions,
    ) -> Result<Keyspace, StoreError> {
        self.db.keyspace(name, opts).map_err(self.err())
    }

    /// The names of every keyspace of the Database.
    pub(super) fn keyspace_names(&self) -> Vec<String> {
        self.db
            .list_keyspace_names()
            .into_iter()
            .map(|name| name.to_string())
            .collect()
    }

    pub(super) fn delete_keyspace(&self, ks: Keyspace) -> Result<(), StoreError> {
        self.db.delete_keyspace(ks).map_err(self.err())
    }

    pub(super) fn fjall_err(&self, cause: fjall::Error) -> StoreError {
        StoreError::Fjall {
            dir: self.dir.clone(),
            cause,
        }
    }

    pub(super) fn corrupt(&self, ks: &Keyspace, detail: String) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            keyspace: ks.name().to_string(),
            detail,
        }
    }

    /// Deletes a topic partition's keyspaces and their data.
    pub fn delete_partition(&self, partition: PartitionLog) -> Result<(), StoreError> {
        self.db.delete_keyspace(partition.log).map_err(self.err())?;
        self.db.delete_keyspace(partition.dedup).map_err(self.err())
    }

    /// Deletes the keyspaces of topics not in `known`: left behind when a crash interrupted a topic
    /// deletion, and they must not resurface if a topic of the same name is created again.
    pub fn delete_orphans(&self, known: &[&str]) -> Result<(), StoreError> {
        for name in self.db.list_keyspace_names() {
            let Some(topic) = keyspace_topic(&name) else {
                continue;
            };
            if known.contains(&topic) {
                continue;
            }
            let ks = self
                .db
                .keyspace(&name, KeyspaceCreateOptions::default)
                .map_err(self.err())?;
            tracing::warn!(dir = %self.dir.display(), keyspace = %&*name, "deleting keyspace of a deleted topic");
            self.db.delete_keyspace(ks).map_err(self.err())?;
        }
        Ok(())
    }

    /// Starts an atomic write batch.
    pub fn batch(&self) -> Batch {
        Batch {
            inner: self.db.batch(),
            runs: Vec::new(),
        }
    }

    /// Commits a batch atomically; with `durable`, it is fsynced (`SyncData`) before this returns.
    pub fn commit(&self, mut batch: Batch, durable: bool) -> Result<(), StoreError> {
        batch.close_runs();
        if self.fault.load(Ordering::Acquire) {
            return Err(StoreError::InjectedFault {
                dir: self.dir.clone(),
            });
        }
        let slow = self.slow_ms.load(Ordering::Relaxed);
        if slow > 0 {
            std::thread::sleep(std::time::Duration::from_millis(slow));
        }
        let mode = if durable {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        batch
            .inner
            .durability(Some(mode))
            .commit()
            .map_err(self.err())
    }

    /// Makes every later commit fail as if the fsync had failed (test hook behind `debug.fault_injection`).
    pub fn inject_write_fault(&self) {
        self.fault.store(true, Ordering::Release);
    }

    /// Makes every later commit take `ms` longer, as on a slow disk (test hook behind
    /// `debug.fault_injection`); 0 ends it.
    pub fn inject_slow_writes(&self, ms: u64) {
        self.slow_ms.store(ms, Ordering::Relaxed);
    }

    /// Bytes of journal on disk; the writer rotates memtables when it grows, since fjall's own journal
    /// limit only acts when a flush happens.
    pub fn journal_bytes(&self) -> u64 {
        self.db.journal_disk_space().unwrap_or(0)
    }

    /// The journal budget this store was opened with.
    pub fn max_journal_bytes(&self) -> u64 {
        self.options.max_journal_bytes
    }

    /// Seals the memtables (log and dedup window) of `partitions` that hold data appended before
    /// `before_ms`, so they are flushed and the journal files they pin can be deleted. Memtables of busy
    /// partitions fill and flush on their own; sealing them too would flush them all at once.
    pub fn rotate_stale_memtables(
        &self,
        partitions: &[PartitionLog],
        before_ms: u64,
    ) -> Result<(), StoreError> {
        for p in partitions {
            if p.memtable_since()?.is_some_and(|t| t < before_ms) {
                p.log.rotate_memtable().map_err(self.err())?;
            }
            if p.dedup_memtable_since()?.is_some_and(|t| t < before_ms) {
                p.dedup.rotate_memtable().map_err(self.err())?;
            }
        }
        Ok(())
    }
}

/// The topic a partition keyspace (`log-<topic>-<p>` or `dedup-<topic>-<p>`) belongs to.
fn keyspace_topic(name: &str) -> Option<&str> {
    keyspace_owner(name, &["log-", "dedup-"])
}

/// The owner (topic or handler) of a per-partition keyspace named `<prefix><owner>-<p>` with one of
/// `prefixes`: owner names may hold '-', partition numbers do not.
pub(super) fn keyspace_owner<'a>(name: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    let rest = prefixes.iter().find_map(|p| name.strip_prefix(p))?;
    let (owner, partition) = rest.rsplit_once('-')?;
    partition.parse::<u32>().ok()?;
    Some(owner)
}

/// An atomic group of writes to one cell's Database.
pub struct Batch {
    inner: fjall::OwnedWriteBatch,
    /// Records being gathered into log entries, one open run per partition.
    runs: Vec<Run>,
}

/// Consecutive records of one partition, becoming one log entry.
struct Run {
    log: Keyspace,
    log_id: u64,
    first: u64,
    records: RunBuilder,
}

impl Batch {
    /// Appends an encoded record at `offset`, stored with `timestamp_ms` as its timestamp (its log-append
    /// time). Records appended to a partition at consecutive offsets are stored as runs ([`entry`]).
    pub fn append(
        &mut self,
        partition: &PartitionLog,
        offset: u64,
        record: Bytes,
        timestamp_ms: u64,
    ) {
        let open = self.runs.iter().rposition(|r| r.log_id == partition.id);
        if let Some(i) = open {
            let run = &mut self.runs[i];
            if run.first + u64::from(run.records.count()) == offset
                && run.records.len() + record.len() <= MAX_RUN_BYTES
            {
                run.records.push(record, timestamp_ms);
                return;
            }
            let run = self.runs.swap_remove(i);
            self.close(run);
        }
        let mut records = RunBuilder::default();
        records.push(record, timestamp_ms);
        self.runs.push(Run {
            log: partition.log.clone(),
            log_id: partition.id,
            first: offset,
            records,
        });
    }

    fn close(&mut self, run: Run) {
        self.inner
            .insert(&run.log, offset_key(run.first), run.records.finish());
    }

    /// Turns the open runs into entries; done once, by [`Store::commit`].
    fn close_runs(&mut self) {
        for run in std::mem::take(&mut self.runs) {
            self.close(run);
        }
    }

    /// Remembers that the event at `offset` carried `entry.id`.
    pub fn remember_id(&mut self, partition: &PartitionLog, offset: u64, entry: &DedupEntry) {
        let bytes = postcard::to_allocvec(entry).unwrap_or_default();
        self.inner
            .insert(&partition.dedup, offset_key(offset), bytes);
    }

    /// Forgets the id remembered at `offset` (it left the dedup window).
    pub fn forget_id(&mut self, partition: &PartitionLog, offset: u64) {
        self.inner.remove(&partition.dedup, offset_key(offset));
    }

    pub(super) fn insert_raw(&mut self, ks: &Keyspace, key: Vec<u8>, value: Vec<u8>) {
        self.inner.insert(ks, key, value);
    }

    pub(super) fn remove_raw(&mut self, ks: &Keyspace, key: Vec<u8>) {
        self.inner.remove(ks, key);
    }

    /// Number of writes in the batch (an open run counts once).
    pub fn len(&self) -> usize {
        self.inner.len() + self.runs.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty() && self.runs.is_empty()
    }
}

impl PartitionLog {
    fn err(&self) -> impl Fn(fjall::Error) -> StoreError + '_ {
        |cause| StoreError::Fjall {
            dir: self.dir.clone(),
            cause,
        }
    }

    fn corrupt(&self, ks: &Keyspace, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.clone(),
            keyspace: ks.name().to_string(),
            detail: detail.into(),
        }
    }

    fn decode_key(&self, ks: &Keyspace, key: &[u8]) -> Result<u64, StoreError> {
        decode_offset_key(key)
            .ok_or_else(|| self.corrupt(ks, format!("key of {} bytes is not an offset", key.len())))
    }

    fn entry_err(&self, e: entry::EntryError) -> StoreError {
        self.corrupt(&self.log, e.to_string())
    }

    /// The entry holding `offset`, or else the last one before it: `(its first offset, its bytes)`.
    fn entry_at_or_before(&self, offset: u64) -> Result<Option<(u64, Slice)>, StoreError> {
        match self.log.range(..=offset_key(offset)).next_back() {
            None => Ok(None),
            Some(guard) => {
                let (key, value) = guard.into_inner().map_err(self.err())?;
                Ok(Some((self.decode_key(&self.log, &key)?, value)))
            }
        }
    }

    /// The offset the next appended event will get: one past the last stored event.
    pub fn next_offset(&self) -> Result<u64, StoreError> {
        match self.log.last_key_value() {
            None => Ok(0),
            Some(guard) => {
                let (key, value) = guard.into_inner().map_err(self.err())?;
                let first = self.decode_key(&self.log, &key)?;
                Ok(first + entry::count(&value).map_err(|e| self.entry_err(e))?)
            }
        }
    }

    /// The lowest stored offset, if any event is stored.
    pub fn first_offset(&self) -> Result<Option<u64>, StoreError> {
        match self.log.first_key_value() {
            None => Ok(None),
            Some(guard) => Ok(Some(
                self.decode_key(&self.log, &guard.key().map_err(self.err())?)?,
            )),
        }
    }

    /// Whether the first stored entry lies wholly below `offset`, so `drop_before(offset)` could drop it
    /// once it is in a table of its own.
    pub fn holds_entries_below(&self, offset: u64) -> Result<bool, StoreError> {
        match self.log.first_key_value() {
            None => Ok(false),
            Some(guard) => {
                let (key, value) = guard.into_inner().map_err(self.err())?;
                let first = self.decode_key(&self.log, &key)?;
                let count = entry::count(&value).map_err(|e| self.entry_err(e))?;
                Ok(first + count <= offset)
            }
        }
    }

    /// Reads events with offsets in `[from, end)`, at most `max_count` of them and stopping once `max_bytes`
    /// have been read (at least one event is returned if any exists). Each record comes as its own
    /// `Slice`, sharing the entry's memory.
    pub fn read(
        &self,
        from: u64,
        end: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Slice)>, StoreError> {
        let mut out = Vec::new();
        if from >= end {
            return Ok(out);
        }
        // `from` may lie inside a run stored under an earlier offset.
        let start = match self.entry_at_or_before(from)? {
            Some((first, value))
                if first + entry::count(&value).map_err(|e| self.entry_err(e))? > from =>
            {
                first
            }
            _ => from,
        };
        let mut bytes = 0usize;
        for guard in self.log.range(offset_key(start)..offset_key(end)) {
            let (key, value) = guard.into_inner().map_err(self.err())?;
            let first = self.decode_key(&self.log, &key)?;
            // Records share the entry's buffer: one view of it, sliced per record.
            let shared = byteview::ByteView::from(value.clone());
            let ranges = entry::ranges(&value).map_err(|e| self.entry_err(e))?;
            for (offset, range) in (first..).zip(ranges) {
                let range = range.map_err(|e| self.entry_err(e))?;
                if offset < from {
                    continue;
                }
                if offset >= end {
                    return Ok(out);
                }
                bytes += range.len();
                let record = if range.len() == value.len() {
                    value.clone()
                } else {
                    Slice::from(shared.slice(range))
                };
                out.push((offset, record));
                if out.len() >= max_count || bytes >= max_bytes {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Timestamp of the event at `offset`, if it is stored.
    pub fn timestamp_at(&self, offset: u64) -> Result<Option<u64>, StoreError> {
        let Some((first, value)) = self.entry_at_or_before(offset)? else {
            return Ok(None);
        };
        let Some(range) = entry::record(&value, offset - first).map_err(|e| self.entry_err(e))?
        else {
            return Ok(None);
        };
        record::timestamp_of(&value[range])
            .map(Some)
            .ok_or_else(|| self.corrupt(&self.log, "truncated record"))
    }

    /// When the oldest event still in the log's active (unsealed) memtable was appended, if it holds
    /// any. Retention and journal upkeep seal memtables by it.
    pub fn memtable_since(&self) -> Result<Option<u64>, StoreError> {
        let Some(first) = self.log.tree.active_memtable().iter().next() else {
            return Ok(None);
        };
        if first.is_tombstone() {
            // procd never deletes single log entries; should one appear, count it as old.
            return Ok(Some(0));
        }
        let record = entry::record(&first.value, 0).map_err(|e| self.entry_err(e))?;
        Ok(record.and_then(|range| record::timestamp_of(&first.value[range])))
    }

    /// When the oldest id still in the dedup window's active memtable was appended, if it holds any.
    fn dedup_memtable_since(&self) -> Result<Option<u64>, StoreError> {
        let Some(first) = self.dedup.tree.active_memtable().iter().next() else {
            return Ok(None);
        };
        if first.is_tombstone() {
            // A forgotten id: its timestamp is gone, and it left the window, so it is old.
            return Ok(Some(0));
        }
        let entry: DedupEntry = postcard::from_bytes(&first.value)
            .map_err(|e| self.corrupt(&self.dedup, format!("dedup entry: {e}")))?;
        Ok(Some(entry.timestamp_ms))
    }

    /// Every remembered id with its offset, in offset order.
    pub fn dedup_entries(&self) -> Result<Vec<(u64, DedupEntry)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.dedup.iter() {
            let (key, value) = guard.into_inner().map_err(self.err())?;
            let offset = self.decode_key(&self.dedup, &key)?;
            let entry = postcard::from_bytes(&value)
                .map_err(|e| self.corrupt(&self.dedup, e.to_string()))?;
            out.push((offset, entry));
        }
        Ok(out)
    }

    /// Drops the events below `offset` a whole table at a time (fjall `drop_range`): events in tables that
    /// straddle `offset`, or still in a memtable, stay until a later call, and so does a run holding
    /// `offset` with the events before it.
    pub fn drop_before(&self, offset: u64) -> Result<(), StoreError> {
        let keep_from = match self.entry_at_or_before(offset)? {
            Some((first, _)) => first,
            None => return Ok(()),
        };
        if keep_from == 0 {
            return Ok(());
        }
        self.log
            .tree
            .drop_range(offset_key(0)..offset_key(keep_from))
            .map_err(|e| self.err()(e.into()))
    }

    /// Seals the log's memtable so its events become a table that a later `drop_before` can drop whole.
    pub fn seal(&self) -> Result<(), StoreError> {
        self.log.rotate_memtable().map(|_| ()).map_err(self.err())
    }

    /// Approximate bytes this partition's log takes on disk (flushed tables only).
    pub fn disk_bytes(&self) -> u64 {
        self.log.disk_space()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::test_record as record;
    use crate::log::{Payload, Record};

    #[test]
    fn partitions_get_memtables_of_different_sizes_within_half_again_the_base() {
        let base = 8 * 1024 * 1024;
        let sizes: Vec<u64> = (0..16).map(|p| staggered_memtable_bytes(base, p)).collect();
        assert!(sizes.iter().all(|&s| (base..base + base / 2).contains(&s)));
        // Any two partitions differ by at least 1 % of the base, so equal write rates never keep their
        // flushes together.
        for (i, a) in sizes.iter().enumerate() {
            for b in &sizes[i + 1..] {
                assert!(a.abs_diff(*b) >= base / 100, "{sizes:?}");
            }
        }
        assert_eq!(staggered_memtable_bytes(base, 3), sizes[3], "deterministic");
    }

    #[test]
    fn only_memtables_holding_old_data_are_sealed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path(), StoreOptions::default())?;
        let (quiet, busy) = (store.partition("t", 0)?, store.partition("t", 1)?);
        assert_eq!(quiet.memtable_since()?, None);
        let mut batch = store.batch();
        batch.append(&quiet, 0, record(1_000, 0).into(), 1_000);
        batch.append(&quiet, 1, record(1_500, 1).into(), 1_500);
        let id = DedupEntry {
            id: "a".into(),
            timestamp_ms: 1_000,
        };
        batch.remember_id(&quiet, 0, &id);
        batch.append(&busy, 0, record(9_000, 0).into(), 9_000);
        store.commit(batch, true)?;
        assert_eq!(quiet.memtable_since()?, Some(1_000));
        assert_eq!(quiet.dedup_memtable_since()?, Some(1_000));
        assert_eq!(busy.memtable_since()?, Some(9_000));

        store.rotate_stale_memtables(&[quiet.clone(), busy.clone()], 5_000)?;
        assert_eq!(
            quiet.memtable_since()?,
            None,
            "the quiet log's memtable is sealed"
        );
        assert_eq!(
            quiet.dedup_memtable_since()?,
            None,
            "and its dedup window's"
        );
        assert_eq!(
            busy.memtable_since()?,
            Some(9_000),
            "the young one is left to fill"
        );
        // Sealing moves data, it does not lose it.
        assert_eq!(quiet.timestamp_at(1)?, Some(1_500));
        Ok(())
    }

    #[test]
    fn appends_survive_reopen_and_read_back_in_order() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        {
            let store = Store::open(dir.path(), StoreOptions::default())?;
            let p = store.partition("t", 0)?;
            assert_eq!(p.next_offset()?, 0);
            let mut batch = store.batch();
            for o in 0..300u32 {
                batch.append(
                    &p,
                    u64::from(o),
                    record(u64::from(o), o).into(),
                    u64::from(o),
                );
            }
            batch.remember_id(
                &p,
                7,
                &DedupEntry {
                    id: "x".into(),
                    timestamp_ms: 1,
                },
            );
            store.commit(batch, true)?;
        }
        let store = Store::open(dir.path(), StoreOptions::default())?;
        let p = store.partition("t", 0)?;
        assert_eq!(p.next_offset()?, 300);
        assert_eq!(p.first_offset()?, Some(0));
        let got = p.read(10, 300, 5, usize::MAX)?;
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            [10, 11, 12, 13, 14]
        );
        assert_eq!(Record::decode(&got[0].1)?.value, Payload::Json("10".into()));
        assert_eq!(p.read(290, 295, 100, usize::MAX)?.len(), 5);
        assert_eq!(p.timestamp_at(42)?, Some(42));
        assert_eq!(
            p.dedup_entries()?,
            vec![(
                7,
                DedupEntry {
                    id: "x".into(),
                    timestamp_ms: 1
                }
            )]
        );
        Ok(())
    }

    #[test]
    fn runs_of_records_read_back_one_per_offset() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path(), StoreOptions::default())?;
        let (a, b) = (store.partition("t", 0)?, store.partition("t", 1)?);
        // Two partitions interleaved in one batch, and a single record in an entry of its own.
        let mut batch = store.batch();
        for o in 0..10u32 {
            batch.append(
                &a,
                u64::from(o),
                record(u64::from(o), o).into(),
                u64::from(o),
            );
            batch.append(
                &b,
                u64::from(o),
                record(100 + u64::from(o), 100 + o).into(),
                100 + u64::from(o),
            );
        }
        batch.append(&a, 10, record(10, 10).into(), 10);
        store.commit(batch, true)?;
        let mut batch = store.batch();
        batch.append(&a, 11, record(11, 11).into(), 11);
        store.commit(batch, true)?;
        // Entries: a run 0..=10 and a single record at 11.
        assert_eq!(a.log.len()?, 2);
        assert_eq!((a.next_offset()?, b.next_offset()?), (12, 10));
        assert_eq!(a.first_offset()?, Some(0));

        let values = |got: Vec<(u64, Slice)>| -> Vec<(u64, Payload)> {
            got.into_iter()
                .filter_map(|(o, v)| Record::decode(&v).ok().map(|r| (o, r.value)))
                .collect()
        };
        // From the middle of a run, across into the next entry, bounded by `end` and the count.
        assert_eq!(
            values(a.read(8, 12, 100, usize::MAX)?),
            (8..12u32)
                .map(|o| (u64::from(o), Payload::Json(o.to_string())))
                .collect::<Vec<_>>()
        );
        assert_eq!(values(a.read(3, 5, 100, usize::MAX)?).len(), 2);
        assert_eq!(values(a.read(3, 12, 4, usize::MAX)?).len(), 4);
        assert_eq!(
            values(b.read(9, 100, 100, usize::MAX)?),
            [(9, Payload::Json("109".into()))]
        );
        assert!(a.read(12, 20, 100, usize::MAX)?.is_empty());
        assert_eq!(a.timestamp_at(7)?, Some(7));
        assert_eq!(b.timestamp_at(3)?, Some(103));
        assert_eq!(a.timestamp_at(12)?, None);

        // A run holding the cut is kept whole; the entries wholly below it are not.
        assert!(a.holds_entries_below(11)?);
        assert!(!a.holds_entries_below(10)?);
        Ok(())
    }

    #[test]
    fn a_run_is_closed_at_its_size_cap() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path(), StoreOptions::default())?;
        let p = store.partition("t", 0)?;
        let big = Record {
            timestamp_ms: 1,
            key: None,
            value: Payload::Bytes(vec![7; 20_000]),
            headers: vec![],
            id: None,
        }
        .encode();
        let mut batch = store.batch();
        for o in 0..7 {
            batch.append(&p, o, Bytes::from(big.clone()), 1);
        }
        store.commit(batch, true)?;
        // 64 KiB per run: three records each, then the seventh alone.
        assert_eq!(p.log.len()?, 3);
        assert_eq!(p.next_offset()?, 7);
        let got = p.read(0, 7, 100, usize::MAX)?;
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (0..7).collect::<Vec<_>>()
        );
        assert!(got.iter().all(|(_, v)| v.as_ref() == big.as_slice()));
        Ok(())
    }

    #[test]
    fn entries_of_single_records_written_before_runs_still_read()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path(), StoreOptions::default())?;
        let p = store.partition("t", 0)?;
        // As procd wrote logs before runs: one entry per record.
        let mut batch = store.batch();
        for o in 0..3u32 {
            batch.insert_raw(
                &p.log,
                offset_key(u64::from(o)).to_vec(),
                record(u64::from(o), o),
            );
        }
        store.commit(batch, true)?;
        let mut batch = store.batch();
        for o in 3..6u32 {
            batch.append(
                &p,
                u64::from(o),
                record(u64::from(o), o).into(),
                u64::from(o),
            );
        }
        store.commit(batch, true)?;
        assert_eq!(p.next_offset()?, 6);
        let got = p.read(1, 6, 100, usize::MAX)?;
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(p.timestamp_at(2)?, Some(2));
        assert_eq!(p.timestamp_at(4)?, Some(4));
        Ok(())
    }
}
