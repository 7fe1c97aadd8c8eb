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

use bytes::Bytes;
use byteview::ByteView;

use super::record::{FORMAT_V1, set_timestamp};

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

/// Builds one entry from records appended in offset order, each stamped with its log-append time.
///
/// The records are kept as they come (slices of the buffers they arrived in) and copied once, when the
/// entry is finished, into a buffer of the entry's exact size, which fjall then keeps as it is: no
/// growing buffer, no second copy. The timestamp is written over each record's own as it is copied,
/// so the buffers a record arrived in are only read.
#[derive(Debug, Default)]
pub struct RunBuilder {
    records: Vec<(Bytes, u64)>,
    /// Bytes of the framed records (length prefixes included).
    framed: usize,
}

impl RunBuilder {
    /// Appends the next record, to be stored with `timestamp_ms` as its timestamp.
    pub fn push(&mut self, record: Bytes, timestamp_ms: u64) {
        self.framed += LEN_PREFIX + record.len();
        self.records.push((record, timestamp_ms));
    }

    /// Records in the entry so far.
    pub fn count(&self) -> u32 {
        // A run is bounded by MAX_RUN_BYTES, so its count is far below u32::MAX.
        self.records.len() as u32
    }

    /// Bytes of the entry so far.
    pub fn len(&self) -> usize {
        match &self.records[..] {
            [] => 0,
            [(single, _)] => single.len(),
            _ => RUN_HEADER + self.framed,
        }
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The entry's bytes.
    pub fn finish(self) -> ByteView {
        let len = self.len();
        // `from_reader` fills a buffer it did not zero (a zeroed one cost the writer ~4 % of its time
        // in `procd bench e2e`); `Fill` writes all of it in the one read it gets.
        match ByteView::from_reader(&mut Fill(Some(&self)), len) {
            Ok(entry) => entry,
            // Only if byteview ever handed `read` a shorter buffer: build the entry the slow way.
            Err(_) => {
                let mut bytes = vec![0; len];
                self.write_entry(&mut bytes);
                ByteView::from(bytes)
            }
        }
    }

    /// Writes the entry into `out`, which is exactly [`Self::len`] bytes long: a single record as
    /// itself, more as a run.
    fn write_entry(&self, out: &mut [u8]) {
        let mut at = 0;
        let mut put = |bytes: &[u8], stamp: Option<u64>| {
            if let Some(dst) = out.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
                if let Some(timestamp_ms) = stamp {
                    set_timestamp(dst, timestamp_ms);
                }
            }
            at += bytes.len();
        };
        if let [(single, timestamp_ms)] = &self.records[..] {
            put(single, Some(*timestamp_ms));
            return;
        }
        put(&[FORMAT_RUN], None);
        put(&self.count().to_be_bytes(), None);
        for (record, timestamp_ms) in &self.records {
            // A record is far below 4 GiB: request bodies are limited to a few MiB.
            put(&(record.len() as u32).to_be_bytes(), None);
            put(record, Some(*timestamp_ms));
        }
    }
}

/// A reader that yields a whole run at once, into a buffer at least as long as the run.
struct Fill<'a>(Option<&'a RunBuilder>);

impl std::io::Read for Fill<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(run) = self.0.take() else {
            return Ok(0);
        };
        let out = buf
            .get_mut(..run.len())
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        run.write_entry(out);
        Ok(out.len())
    }
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
    ranges(entry)?.collect()
}

/// Where each record of `entry` lies in it, in offset order, found as it goes (reads use this: no
/// allocation per entry).
pub fn ranges(entry: &[u8]) -> Result<Ranges<'_>, EntryError> {
    let left = count(entry)?;
    let single = entry.first() == Some(&FORMAT_V1);
    Ok(Ranges {
        entry,
        at: if single { 0 } else { RUN_HEADER },
        left,
        single,
    })
}

/// The iterator [`ranges`] returns; it ends after an error.
#[derive(Debug)]
pub struct Ranges<'a> {
    entry: &'a [u8],
    at: usize,
    left: u64,
    single: bool,
}

impl Iterator for Ranges<'_> {
    type Item = Result<Range<usize>, EntryError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        if self.single {
            // One range covering the whole entry: its only record.
            return Some(Ok(0..self.entry.len()));
        }
        let truncated = EntryError::Truncated(self.entry.len());
        let at = self.at;
        let Some(len) = self
            .entry
            .get(at..at + LEN_PREFIX)
            .and_then(|l| <[u8; LEN_PREFIX]>::try_from(l).ok())
        else {
            self.left = 0;
            return Some(Err(truncated));
        };
        let start = at + LEN_PREFIX;
        match start
            .checked_add(u32::from_be_bytes(len) as usize)
            .filter(|&end| end <= self.entry.len())
        {
            Some(end) => {
                self.at = end;
                Some(Ok(start..end))
            }
            None => {
                self.left = 0;
                Some(Err(truncated))
            }
        }
    }
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

    /// Record `n`, pushed with timestamp `n` over the 0 it was encoded with.
    fn push(b: &mut RunBuilder, n: u32) {
        b.push(Bytes::from(test_record(0, n)), u64::from(n));
    }

    #[test]
    fn a_single_record_is_stored_as_itself() -> Result<(), EntryError> {
        let mut b = RunBuilder::default();
        push(&mut b, 7);
        assert_eq!(b.count(), 1);
        let entry = b.finish();
        assert_eq!(&*entry, &record_bytes(7)[..]);
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
            push(&mut b, n);
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
        push(&mut b, 1);
        push(&mut b, 2);
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
