//! One cell's fjall `Database`: the partition logs and dedup windows of the partitions that cell owns.
//!
//! A `Store` is shared by its cell's writer (the only thread that writes) and by readers (which only read
//! up to the offset the writer has published as durable). Nothing here is shared between cells.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fjall::config::FilterPolicy;
use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};
use serde::{Deserialize, Serialize};

use super::keys::{decode_offset_key, dedup_keyspace, log_keyspace, offset_key};
use super::record;

/// Tuning of a cell's Database. Each cell opens its own, so these are per cell.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Block cache size. Reads are mostly of the recent tail, which the memtable serves.
    pub cache_bytes: u64,
    /// Memtable size per keyspace; small, because there are (topics × partitions / cells) of them.
    pub max_memtable_bytes: u64,
    /// Journal budget; the writer rotates memtables when the journal grows past half of it.
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
            // fjall's minimum; memtables are rotated long before this is reached.
            max_journal_bytes: 64 * 1024 * 1024,
            worker_threads: 1,
            max_cached_files: 128,
        }
    }
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
        let memtable = self.options.max_memtable_bytes;
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
        }
    }

    /// Commits a batch atomically; with `durable`, it is fsynced (`SyncData`) before this returns.
    pub fn commit(&self, batch: Batch, durable: bool) -> Result<(), StoreError> {
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

    /// Seals every non-empty memtable so it is flushed and the journal can be truncated.
    pub fn rotate_memtables(&self, partitions: &[PartitionLog]) -> Result<(), StoreError> {
        for p in partitions {
            p.log.rotate_memtable().map_err(self.err())?;
            p.dedup.rotate_memtable().map_err(self.err())?;
        }
        Ok(())
    }
}

/// The topic a partition keyspace (`log-<topic>-<p>` or `dedup-<topic>-<p>`) belongs to.
fn keyspace_topic(name: &str) -> Option<&str> {
    let rest = name
        .strip_prefix("log-")
        .or_else(|| name.strip_prefix("dedup-"))?;
    let (topic, partition) = rest.rsplit_once('-')?;
    partition.parse::<u32>().ok()?;
    Some(topic)
}

/// An atomic group of writes to one cell's Database.
pub struct Batch {
    inner: fjall::OwnedWriteBatch,
}

impl Batch {
    /// Appends an encoded record at `offset`.
    pub fn append(&mut self, partition: &PartitionLog, offset: u64, record: Vec<u8>) {
        self.inner
            .insert(&partition.log, offset_key(offset), record);
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

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
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

    /// The offset the next appended event will get: one past the last stored event.
    pub fn next_offset(&self) -> Result<u64, StoreError> {
        match self.log.last_key_value() {
            None => Ok(0),
            Some(guard) => Ok(self.decode_key(&self.log, &guard.key().map_err(self.err())?)? + 1),
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

    /// Reads events with offsets in `[from, end)`, at most `max_count` of them and stopping once `max_bytes`
    /// have been read (at least one event is returned if any exists).
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
        let mut bytes = 0usize;
        for guard in self.log.range(offset_key(from)..offset_key(end)) {
            let (key, value) = guard.into_inner().map_err(self.err())?;
            let offset = self.decode_key(&self.log, &key)?;
            bytes += value.len();
            out.push((offset, value));
            if out.len() >= max_count || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Timestamp of the event at `offset`, if it is stored.
    pub fn timestamp_at(&self, offset: u64) -> Result<Option<u64>, StoreError> {
        match self.log.get(offset_key(offset)).map_err(self.err())? {
            None => Ok(None),
            Some(v) => record::timestamp_of(&v)
                .map(Some)
                .ok_or_else(|| self.corrupt(&self.log, "truncated record")),
        }
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
    /// straddle `offset`, or still in a memtable, stay until a later call.
    pub fn drop_before(&self, offset: u64) -> Result<(), StoreError> {
        if offset == 0 {
            return Ok(());
        }
        self.log
            .tree
            .drop_range(offset_key(0)..offset_key(offset))
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
    use crate::log::{Payload, Record};

    fn record(ts: u64, n: u32) -> Vec<u8> {
        Record {
            timestamp_ms: ts,
            key: None,
            value: Payload::Json(n.to_string()),
            headers: vec![],
            id: None,
        }
        .encode()
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
                batch.append(&p, u64::from(o), record(u64::from(o), o));
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
}
