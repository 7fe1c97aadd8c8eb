//! Encoded records back to back in one buffer: how a request's events travel from ingest to a cell's
//! writer, and a handler batch's outputs from the processor.
//!
//! One allocation for a whole request's share (or a batch's outputs to one topic) instead of one per
//! record: ingest used to allocate ~1000 small buffers per request that the writer, on another thread,
//! then freed one by one. The writer takes the records as [`Bytes`] slices of the one buffer, so a run
//! can keep them until the group is committed without copying them out first.

use bytes::Bytes;

use super::RecordRef;

/// Encoded records, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    bytes: Vec<u8>,
    /// Where each record ends in `bytes`; it starts where the one before ends.
    ends: Vec<usize>,
}

impl Records {
    /// Room for `records` more records of `bytes` more bytes, so that pushing them does not regrow.
    pub fn reserve(&mut self, records: usize, bytes: usize) {
        self.bytes.reserve(bytes);
        self.ends.reserve(records);
    }

    /// Encodes `record` after the others.
    pub fn push(&mut self, record: &RecordRef<'_>) {
        record.encode_into(&mut self.bytes);
        self.ends.push(self.bytes.len());
    }

    /// How many records there are.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The encoded records, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let record = self.bytes.get(start..end).unwrap_or_default();
            start = end;
            record
        })
    }

    /// The records as slices sharing the one buffer (no copy).
    pub fn into_shared(self) -> impl ExactSizeIterator<Item = Bytes> {
        let bytes = Bytes::from(self.bytes);
        let mut start = 0;
        self.ends.into_iter().map(move |end| {
            // `ends` only grows, within `bytes`; the check keeps `slice` from panicking regardless.
            let record = if start <= end && end <= bytes.len() {
                bytes.slice(start..end)
            } else {
                Bytes::new()
            };
            start = end;
            record
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::PayloadRef;

    fn event(key: &'static str, value: &'static str) -> RecordRef<'static> {
        RecordRef {
            timestamp_ms: 7,
            key: Some(key.as_bytes()),
            value: PayloadRef::Json(value.as_bytes()),
            headers: vec![],
            id: None,
        }
    }

    #[test]
    fn records_come_back_as_encoded_in_order() {
        let events = [event("a", "1"), event("bb", "\"two\""), event("", "[]")];
        let mut records = Records::default();
        records.reserve(1, 4);
        for e in &events {
            records.push(e);
        }
        let expected: Vec<Vec<u8>> = events.iter().map(RecordRef::encode).collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records.iter().collect::<Vec<_>>(), expected);
        let shared: Vec<Bytes> = records.into_shared().collect();
        assert_eq!(shared, expected);
    }

    #[test]
    fn no_records_is_empty() {
        let records = Records::default();
        assert!(records.is_empty());
        assert_eq!(records.iter().count(), 0);
        assert_eq!(records.into_shared().count(), 0);
    }
}
