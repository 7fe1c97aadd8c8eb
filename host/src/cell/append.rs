//! What ingest hands a cell's writer: one request's events for the cell, their records encoded back to
//! back in one buffer ([`Records`]), each with its partition and, when it has one, its id.

use bytes::Bytes;

use crate::log::{RecordRef, Records};

/// Events of one request for one cell, in request order. The writer stamps their time and assigns
/// their offsets.
#[derive(Debug, Default)]
pub struct AppendEvents {
    partitions: Vec<u32>,
    records: Records,
    /// Ids by event index, ascending: most events carry none.
    ids: Vec<(usize, String)>,
}

impl AppendEvents {
    /// Room for `events` more events of `bytes` encoded bytes in all.
    pub fn reserve(&mut self, events: usize, bytes: usize) {
        self.partitions.reserve(events);
        self.records.reserve(events, bytes);
    }

    /// Adds an event for `partition` (which must be the cell's), with its producer id if it has one.
    pub fn push(&mut self, partition: u32, record: &RecordRef<'_>, id: Option<String>) {
        if let Some(id) = id {
            self.ids.push((self.partitions.len(), id));
        }
        self.partitions.push(partition);
        self.records.push(record);
    }

    /// How many events there are.
    pub fn len(&self) -> usize {
        self.partitions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// The events' partitions, in order.
    pub fn partitions(&self) -> &[u32] {
        &self.partitions
    }

    /// The events in order: partition, encoded record (a slice of the one buffer) and id.
    pub fn into_events(self) -> impl Iterator<Item = (u32, Bytes, Option<String>)> {
        let mut ids = self.ids.into_iter().peekable();
        self.partitions
            .into_iter()
            .zip(self.records.into_shared())
            .enumerate()
            .map(move |(index, (partition, record))| {
                let id = ids.next_if(|(i, _)| *i == index).map(|(_, id)| id);
                (partition, record, id)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::PayloadRef;

    fn record(value: &'static str) -> RecordRef<'static> {
        RecordRef {
            timestamp_ms: 0,
            key: None,
            value: PayloadRef::Json(value.as_bytes()),
            headers: vec![],
            id: None,
        }
    }

    #[test]
    fn events_come_back_in_order_with_their_partitions_and_ids() {
        let mut events = AppendEvents::default();
        events.reserve(2, 16);
        events.push(3, &record("1"), None);
        events.push(1, &record("2"), Some("b".into()));
        events.push(3, &record("3"), None);
        events.push(5, &record("4"), Some("d".into()));
        assert_eq!(events.len(), 4);
        assert_eq!(events.partitions(), &[3, 1, 3, 5]);
        let got: Vec<_> = events.into_events().collect();
        let expected = [
            (3, record("1").encode(), None),
            (1, record("2").encode(), Some("b".to_string())),
            (3, record("3").encode(), None),
            (5, record("4").encode(), Some("d".to_string())),
        ];
        assert_eq!(got.len(), expected.len());
        for ((p, r, id), (ep, er, eid)) in got.into_iter().zip(expected) {
            assert_eq!((p, &r[..], id), (ep, &er[..], eid));
        }
    }
}
