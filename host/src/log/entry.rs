//! The stored form of one entry of a partition log: a single record, or a *run* of records with
//! consecutive offsets stored under the first one's offset. This is an on-disk contract: decoding must
//! keep accepting every format ever written.
//!
//! - Format 1: the entry is one record (see [`record`](super::record), whose first byte is its version 1).
//! - Format 2, a run: `[2][count: u32 big-endian]`, then per record `[length: u32 big-endian][record]`.
//!
//! Why runs: fjall's cost is mostly per entry (a memtable skiplist insert, a journal frame, an
//! allocation, and at flush a clone, an encode and a drop), not per byte. A cell writer's group commit
//! appends tens to hundreds of consecutive events to each partition, so storing them as one entry
//! divides those costs by as much. Runs are capped at [`MAX_RUN_BYTES`] so a read of one event never has
//! to load a huge block, and a run of one record is stored as the record itself.

use std::ops::Range;

use super::record::FORMAT_V1;

/// Format byte of a run.
pub const FORMAT_RUN: u8 = 2;
const RUN_HEADER: usize = 1 + 4;
const LEN_PREFIX: usize = 4;
/// A run is closed once it holds this many bytes (a record larger than this is stored alone).
pub const MAX_RUN_BYTES: usize = 64 * 1024;

/// Why an entry cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Empty, or cut short.
    #[error("log entry truncated at {0} bytes")]
    Truncated(usize),
    /// Written by a newer procd.
    #[error("log entry format {0} is not supported by this procd (knows 1 and 2)")]
    UnknownFormat(u8),
}

/// Builds one entry from records appended in offset order.
#[derive(Debug, Default)]
pub struct RunBuilder {
    /// The first record, kept as is while it is alone.
    single: Option<Vec<u8>>,
    /// The run, once it holds two records or more.
    run: Vec<u8>,
    count: u32,
}

impl RunBuilder {
    /// Appends the next record.
    pub fn push(&mut self, record: Vec<u8>) {
        match self.count {
            0 => self.single = Some(record),
            _ => {
                if let Some(first) = self.single.take() {
                    self.run
                        .reserve(RUN_HEADER + 2 * LEN_PREFIX + first.len() + record.len());
                    self.run.push(FORMAT_RUN);
                    self.run.extend_from_slice(&[0; 4]);
                    push_framed(&mut self.run, &first);
                }
                push_framed(&mut self.run, &record);
            }
        }
        self.count += 1;
    }

    /// Records in the entry so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes of the entry so far.
    pub fn len(&self) -> usize {
        self.single.as_ref().map_or(self.run.len(), Vec::len)
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entry's bytes.
    pub fn finish(mut self) -> Vec<u8> {
        if let Some(single) = self.single.take() {
            return single;
        }
        if let Some(count) = self.run.get_mut(1..RUN_HEADER) {
            count.copy_from_slice(&self.count.to_be_bytes());
        }
        self.run
    }
}

fn push_framed(out: &mut Vec<u8>, record: &[u8]) {
    // A record is far below 4 GiB: request bodies are limited to a few MiB.
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(record);
}

/// How many records `entry` holds.
pub fn count(entry: &[u8]) -> Result<u64, EntryError> {
    match entry.first() {
        None => Err(EntryError::Truncated(0)),
        Some(&FORMAT_V1) => Ok(1),
        Some(&FORMAT_RUN) => {
            let count: [u8; 4] = entry
                .get(1..RUN_HEADER)
                .and_then(|c| c.try_into().ok())
                .ok_or(EntryError::Truncated(entry.len()))?;
            Ok(u64::from(u32::from_be_bytes(count)))
        }
        Some(&other) => Err(EntryError::UnknownFormat(other)),
    }
}

/// Where each record of `entry` lies in it, in offset order.
pub fn records(entry: &[u8]) -> Result<Vec<Range<usize>>, EntryError> {
    let n = count(entry)?;
    if entry.first() == Some(&FORMAT_V1) {
        // One range covering the whole entry: its only record.
        #[allow(clippy::single_range_in_vec_init)]
        return Ok(vec![0..entry.len()]);
    }
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(entry.len()));
    let mut at = RUN_HEADER;
    for _ in 0..n {
        let len: [u8; 4] = entry
            .get(at..at + LEN_PREFIX)
            .and_then(|l| l.try_into().ok())
            .ok_or(EntryError::Truncated(entry.len()))?;
        let start = at + LEN_PREFIX;
        let end = start
            .checked_add(u32::from_be_bytes(len) as usize)
            .filter(|&end| end <= entry.len())
            .ok_or(EntryError::Truncated(entry.len()))?;
        out.push(start..end);
        at = end;
    }
    Ok(out)
}

/// The range of record `index` of `entry`, if it holds that many.
pub fn record(entry: &[u8], index: u64) -> Result<Option<Range<usize>>, EntryError> {
    let index = usize::try_from(index).unwrap_or(usize::MAX);
    Ok(records(entry)?.get(index).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Record;
    use crate::log::record::test_record;

    fn record_bytes(n: u32) -> Vec<u8> {
        test_record(u64::from(n), n)
    }

    #[test]
    fn a_single_record_is_stored_as_itself() -> Result<(), EntryError> {
        let mut b = RunBuilder::default();
        b.push(record_bytes(7));
        assert_eq!(b.count(), 1);
        let entry = b.finish();
        assert_eq!(entry, record_bytes(7));
        assert_eq!(count(&entry)?, 1);
        assert_eq!(
            records(&entry)?,
            std::iter::once(0..entry.len()).collect::<Vec<_>>()
        );
        Ok(())
    }

    #[test]
    fn a_run_holds_its_records_in_order() -> Result<(), EntryError> {
        let mut b = RunBuilder::default();
        for n in 0..5 {
            b.push(record_bytes(n));
        }
        let entry = b.finish();
        assert_eq!(entry[0], FORMAT_RUN);
        assert_eq!(count(&entry)?, 5);
        let got: Vec<Record> = records(&entry)?
            .into_iter()
            .filter_map(|r| Record::decode(&entry[r]).ok())
            .collect();
        assert_eq!(got.len(), 5);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, r)| r.timestamp_ms == i as u64)
        );
        assert_eq!(
            record(&entry, 4)?.map(|r| entry[r].to_vec()),
            Some(record_bytes(4))
        );
        assert_eq!(record(&entry, 5)?, None);
        Ok(())
    }

    #[test]
    fn corrupt_and_unknown_entries_are_errors() {
        let mut b = RunBuilder::default();
        b.push(record_bytes(1));
        b.push(record_bytes(2));
        let entry = b.finish();
        assert!(matches!(
            records(&entry[..entry.len() - 1]),
            Err(EntryError::Truncated(_))
        ));
        assert_eq!(count(&[]), Err(EntryError::Truncated(0)));
        assert_eq!(count(&[9, 0]), Err(EntryError::UnknownFormat(9)));
        assert_eq!(count(&[2, 0]), Err(EntryError::Truncated(2)));
    }
}
