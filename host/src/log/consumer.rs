//! Storage of a handler on one partition (a "consumer" of its input topic): its committed offset, its
//! partition-local state and its dead-letter log. Lives in the cell's Database beside the logs, so the
//! handler's outputs, state writes and offset commit in one atomic batch.
//!
//! Keyspaces: `state-<handler>-<p>` (`0x01` + user key → value; the prefix lets a handler use the empty
//! key, which fjall does not accept), `dlq-<handler>-<p>` (sequence number as
//! big-endian u64 → [`DlqEntry`]), and one `offsets` keyspace per cell (`<handler>/<p>` → [`Committed`],
//! and beside it `<handler>/<p>/incarnation` → the handler's incarnation, written with every offset
//! commit: a handler removed and deployed again under its name must not find the old one's position,
//! state or dead letters, even if the server stopped before they were deleted). Values are postcard
//! behind a format-version byte. This is an on-disk contract.

use fjall::{Keyspace, KeyspaceCreateOptions};
use serde::{Deserialize, Serialize};

use super::keys::{decode_offset_key, offset_key};
use super::store::{Batch, Store, StoreError, keyspace_owner};

const FORMAT_V1: u8 = 1;

/// Prefix of every stored state key (on-disk contract).
const STATE_KEY_PREFIX: u8 = 1;

/// Longest user state key: fjall keys are at most 65 535 bytes, and the prefix takes one.
pub const MAX_STATE_KEY_BYTES: usize = u16::MAX as usize - 1;

fn state_key(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(key.len() + 1);
    stored.push(STATE_KEY_PREFIX);
    stored.extend_from_slice(key);
    stored
}

/// Where a handler stands on a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The next input offset to process.
    pub offset: u64,
    /// The handler version that committed it.
    pub version: u32,
    /// The reset generation this offset belongs to (a reset of the handler increments it).
    pub reset_generation: u64,
}

/// An event a handler could not process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlqEntry {
    /// Its offset in the input topic's partition.
    pub offset: u64,
    /// The handler version that failed on it.
    pub version: u32,
    /// Why.
    pub error: String,
    /// When it was dead-lettered, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The event, as stored in the input log.
    pub record: Vec<u8>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let out = vec![FORMAT_V1];
    match postcard::to_extend(value, out) {
        Ok(bytes) => bytes,
        Err(e) => unreachable!("postcard cannot fail to encode plain data into a Vec: {e}"),
    }
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => postcard::from_bytes(body).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown format version {v}")),
        None => Err("empty value".into()),
    }
}

/// The keyspaces of one handler on one partition.
#[derive(Clone)]
pub struct ConsumerLog {
    state: Keyspace,
    dlq: Keyspace,
    offsets: Keyspace,
    offset_key: Vec<u8>,
    /// The handler incarnation whose commits this log records ([`ConsumerLog::for_incarnation`]).
    incarnation: Option<u64>,
    store: Store,
}

impl Store {
    /// Opens (creating if needed) the storage of `handler` on `partition`.
    pub fn consumer(&self, handler: &str, partition: u32) -> Result<ConsumerLog, StoreError> {
        let memtable = self.options().max_memtable_bytes;
        let opts = move || KeyspaceCreateOptions::default().max_memtable_size(memtable);
        let state = self.keyspace(&format!("state-{handler}-{partition}"), opts)?;
        let dlq = self.keyspace(&format!("dlq-{handler}-{partition}"), opts)?;
        let offsets = self.keyspace("offsets", opts)?;
        Ok(ConsumerLog {
            state,
            dlq,
            offsets,
            offset_key: format!("{handler}/{partition}").into_bytes(),
            incarnation: None,
            store: self.clone(),
        })
    }

    /// Deletes the storage of handlers not in `known` (removed while the server was down, before their
    /// tasks could delete it): their state and dead-letter keyspaces and their offsets. Run when the cell
    /// opens, before any task starts.
    pub fn delete_orphan_consumers(&self, known: &[&str]) -> Result<(), StoreError> {
        let mut orphans = Vec::new();
        for name in self.keyspace_names() {
            if let Some(handler) = keyspace_owner(&name, &["state-", "dlq-"])
                && !known.contains(&handler)
            {
                tracing::warn!(keyspace = %name, "deleting the storage of a removed handler");
                orphans.push(name);
            }
        }
        for name in orphans {
            let ks = self.keyspace(&name, KeyspaceCreateOptions::default)?;
            self.delete_keyspace(ks)?;
        }
        // `<handler>/<p>` and `<handler>/<p>/incarnation`: handler names hold no '/'.
        let offsets = self.keyspace("offsets", KeyspaceCreateOptions::default)?;
        let mut batch = self.batch();
        for guard in offsets.iter() {
            let key = guard.key().map_err(|e| self.fjall_err(e))?;
            let handler = key.split(|&b| b == b'/').next().unwrap_or_default();
            if !known.iter().any(|k| k.as_bytes() == handler) {
                batch.remove_raw(&offsets, key.to_vec());
            }
        }
        if !batch.is_empty() {
            self.commit(batch, true)?;
        }
        Ok(())
    }

    /// Deletes a handler's storage on a partition: state, dead letters, then the committed offset and
    /// incarnation (last, so that a crash in between leaves the marker that says the rest is stale).
    pub fn delete_consumer(&self, consumer: ConsumerLog) -> Result<(), StoreError> {
        self.delete_keyspace(consumer.state.clone())?;
        self.delete_keyspace(consumer.dlq.clone())?;
        let mut batch = self.batch();
        batch.remove_raw(&consumer.offsets, consumer.offset_key.clone());
        batch.remove_raw(&consumer.offsets, consumer.incarnation_key());
        self.commit(batch, true)
    }
}

impl ConsumerLog {
    /// This log as written by incarnation `incarnation` of its handler: its offset commits record it.
    pub fn for_incarnation(mut self, incarnation: u64) -> Self {
        self.incarnation = Some(incarnation);
        self
    }

    fn incarnation_key(&self) -> Vec<u8> {
        let mut key = self.offset_key.clone();
        key.extend_from_slice(b"/incarnation");
        key
    }

    /// The incarnation of the handler that last committed here; `None` if none did, or if it committed
    /// before procd recorded incarnations.
    pub fn stored_incarnation(&self) -> Result<Option<u64>, StoreError> {
        match self
            .offsets
            .get(self.incarnation_key())
            .map_err(|e| self.store.fjall_err(e))?
        {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|d| self.store.corrupt(&self.offsets, d)),
        }
    }

    /// The committed position, if the handler ever committed on this partition.
    pub fn committed(&self) -> Result<Option<Committed>, StoreError> {
        match self
            .offsets
            .get(&self.offset_key)
            .map_err(|e| self.store.fjall_err(e))?
        {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|d| self.store.corrupt(&self.offsets, d)),
        }
    }

    /// The committed value of a state key.
    pub fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if key.len() > MAX_STATE_KEY_BYTES {
            return Ok(None);
        }
        Ok(self
            .state
            .get(state_key(key))
            .map_err(|e| self.store.fjall_err(e))?
            .map(|v| v.to_vec()))
    }

    /// The length of the committed value of a state key, without reading a separated value.
    pub fn state_value_len(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        if key.len() > MAX_STATE_KEY_BYTES {
            return Ok(None);
        }
        Ok(self
            .state
            .size_of(state_key(key))
            .map_err(|e| self.store.fjall_err(e))?
            .map(u64::from))
    }

    /// The committed state's size as the `max_state_bytes` limit counts it: the sum of its keys' and
    /// values' lengths. Reads the whole state, so the cell calls it once per task and keeps the count.
    pub fn state_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for guard in self.state.iter() {
            let (key, value) = guard.into_inner().map_err(|e| self.store.fjall_err(e))?;
            total +=
                crate::runtime::state_entry_bytes(key.len().saturating_sub(1), value.len() as u64);
        }
        Ok(total)
    }

    /// Number of state keys (approximate for large states).
    pub fn state_len(&self) -> usize {
        self.state.approximate_len()
    }

    /// Removes every state key (a reset with `clear_state`).
    pub fn clear_state(&self) -> Result<(), StoreError> {
        self.state.clear().map_err(|e| self.store.fjall_err(e))
    }

    /// The sequence number the next dead letter gets.
    pub fn dlq_next_seq(&self) -> Result<u64, StoreError> {
        match self.dlq.last_key_value() {
            None => Ok(0),
            Some(guard) => {
                let key = guard.key().map_err(|e| self.store.fjall_err(e))?;
                let seq = decode_offset_key(&key)
                    .ok_or_else(|| self.store.corrupt(&self.dlq, "bad dlq key".into()))?;
                Ok(seq + 1)
            }
        }
    }

    /// Dead letter `seq`, if it is held.
    pub fn dlq_get(&self, seq: u64) -> Result<Option<DlqEntry>, StoreError> {
        match self
            .dlq
            .get(offset_key(seq))
            .map_err(|e| self.store.fjall_err(e))?
        {
            None => Ok(None),
            Some(value) => decode(&value)
                .map(Some)
                .map_err(|d| self.store.corrupt(&self.dlq, d)),
        }
    }

    /// Dead letters from sequence `from`, at most `limit`.
    pub fn dlq_list(&self, from: u64, limit: usize) -> Result<Vec<(u64, DlqEntry)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.dlq.range(offset_key(from)..) {
            let (key, value) = guard.into_inner().map_err(|e| self.store.fjall_err(e))?;
            let seq = decode_offset_key(&key)
                .ok_or_else(|| self.store.corrupt(&self.dlq, "bad dlq key".into()))?;
            out.push((
                seq,
                decode(&value).map_err(|d| self.store.corrupt(&self.dlq, d))?,
            ));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Number of dead letters held.
    pub fn dlq_len(&self) -> usize {
        self.dlq.approximate_len()
    }

    /// Sequence numbers of the dead letters below `below`, oldest first.
    fn dlq_seqs_below(&self, below: u64) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for guard in self.dlq.range(..offset_key(below)) {
            let key = guard.key().map_err(|e| self.store.fjall_err(e))?;
            out.push(
                decode_offset_key(&key)
                    .ok_or_else(|| self.store.corrupt(&self.dlq, "bad dlq key".into()))?,
            );
        }
        Ok(out)
    }

    /// The dead letters to delete when one is added under sequence number `seq` so that at most `keep`
    /// remain (sequence numbers are contiguous: those below `seq + 1 - keep`). It reads the store, so a
    /// writer asks before it adds anything of a commit to its batch: a failed read then leaves none of
    /// that commit behind.
    pub fn dlq_evictions(&self, seq: u64, keep: u64) -> Result<Vec<u64>, StoreError> {
        match (seq.saturating_add(1)).checked_sub(keep.max(1)) {
            Some(below) if below > 0 => self.dlq_seqs_below(below),
            _ => Ok(Vec::new()),
        }
    }

    /// Deletes the dead letters up to and including sequence `through` (all of them with `None`),
    /// durably. Returns how many were deleted. Only the cell writer calls this.
    pub fn dlq_purge(&self, through: Option<u64>) -> Result<u64, StoreError> {
        let below = through.map_or(u64::MAX, |t| t.saturating_add(1));
        let seqs = self.dlq_seqs_below(below)?;
        let mut batch = self.store.batch();
        for seq in &seqs {
            batch.remove_raw(&self.dlq, offset_key(*seq).to_vec());
        }
        self.store.commit(batch, true)?;
        Ok(seqs.len() as u64)
    }
}

impl Batch {
    /// Stores (`Some`) or deletes (`None`) a state key.
    /// Keys longer than [`MAX_STATE_KEY_BYTES`] must be refused before (the runtime does).
    pub fn set_state(&mut self, consumer: &ConsumerLog, key: Vec<u8>, value: Option<Vec<u8>>) {
        if key.len() > MAX_STATE_KEY_BYTES {
            return;
        }
        match value {
            Some(v) => self.insert_raw(&consumer.state, state_key(&key), v),
            None => self.remove_raw(&consumer.state, state_key(&key)),
        }
    }

    /// Records the handler's new committed position.
    pub fn commit_offset(&mut self, consumer: &ConsumerLog, committed: &Committed) {
        self.insert_raw(
            &consumer.offsets,
            consumer.offset_key.clone(),
            encode(committed),
        );
        if let Some(incarnation) = consumer.incarnation {
            self.insert_raw(
                &consumer.offsets,
                consumer.incarnation_key(),
                encode(&incarnation),
            );
        }
    }

    /// Deletes dead letter `seq` (it was replayed successfully).
    pub fn forget_dead_letter(&mut self, consumer: &ConsumerLog, seq: u64) {
        self.remove_raw(&consumer.dlq, offset_key(seq).to_vec());
    }

    /// Appends a dead letter under sequence number `seq` and deletes `evicted`, the old ones
    /// [`ConsumerLog::dlq_evictions`] named.
    pub fn dead_letter(
        &mut self,
        consumer: &ConsumerLog,
        seq: u64,
        entry: &DlqEntry,
        evicted: &[u64],
    ) {
        self.insert_raw(&consumer.dlq, offset_key(seq).to_vec(), encode(entry));
        for old in evicted {
            self.remove_raw(&consumer.dlq, offset_key(*old).to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::StoreOptions;

    #[test]
    fn offsets_state_and_dead_letters_commit_together_and_persist()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        {
            let store = Store::open(dir.path(), StoreOptions::default())?;
            let c = store.consumer("h", 3)?;
            assert_eq!(c.committed()?, None);
            let mut batch = store.batch();
            batch.set_state(&c, b"k".to_vec(), Some(b"1".to_vec()));
            batch.set_state(&c, Vec::new(), Some(b"empty key".to_vec()));
            batch.commit_offset(
                &c,
                &Committed {
                    offset: 10,
                    version: 2,
                    reset_generation: 0,
                },
            );
            let entry = DlqEntry {
                offset: 4,
                version: 2,
                error: "bad".into(),
                time_ms: 1,
                record: vec![1],
            };
            let seq = c.dlq_next_seq()?;
            batch.dead_letter(&c, seq, &entry, &c.dlq_evictions(seq, 10)?);
            store.commit(batch, true)?;
        }
        let store = Store::open(dir.path(), StoreOptions::default())?;
        let c = store.consumer("h", 3)?;
        assert_eq!(
            c.committed()?,
            Some(Committed {
                offset: 10,
                version: 2,
                reset_generation: 0
            })
        );
        assert_eq!(c.state_get(b"k")?, Some(b"1".to_vec()));
        assert_eq!(c.state_get(b"")?, Some(b"empty key".to_vec()));
        assert_eq!(c.dlq_next_seq()?, 1);
        assert_eq!(c.dlq_list(0, 10)?[0].1.error, "bad");
        assert!(
            store.consumer("h", 4)?.committed()?.is_none(),
            "partitions are separate"
        );
        Ok(())
    }

    #[test]
    fn the_oldest_dead_letters_go_once_more_than_keep_are_stored()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path(), StoreOptions::default())?;
        let c = store.consumer("h", 0)?;
        let entry = |offset| DlqEntry {
            offset,
            version: 1,
            error: "bad".into(),
            time_ms: 1,
            record: vec![],
        };
        for offset in 0..5 {
            let seq = c.dlq_next_seq()?;
            let evicted = c.dlq_evictions(seq, 3)?;
            let mut batch = store.batch();
            batch.dead_letter(&c, seq, &entry(offset), &evicted);
            store.commit(batch, false)?;
        }
        let kept: Vec<u64> = c.dlq_list(0, 10)?.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(kept, vec![2, 3, 4]);
        assert_eq!(c.dlq_evictions(5, 3)?, vec![2], "the next one evicts one");
        assert_eq!(c.dlq_evictions(0, 3)?, Vec::<u64>::new());
        Ok(())
    }
}
