//! The two conversions around a handler call: stored records laid out column-wise for the guest (the
//! WIT `batch`), and the guest's columnar outputs turned back into encoded records.
//!
//! Both sit on the processor's per-event path, so neither allocates per event: records are decoded
//! borrowed and copied once into the columns, and an output that forwards an input value (the WIT's
//! `value-sources`) is encoded from the input column, with the input's kind, without a JSON check.
//!
//! The values column is not part of the WIT `batch`: the guest fetches it (`input.values`) only if it
//! reads a value. It lives in a shared buffer ([`InputBatch::values`]) that the instance clones for the
//! duration of a call and that refills reuse once it is unshared again.

use std::sync::Arc;

use crate::catalog::HandlerVersion;
use crate::log::record::DecodeError;
use crate::log::{PayloadRef, RecordRef, Records};
use crate::runtime::{Batch, OutputBatch};

/// Encoded output records grouped by the output topic they go to, in emission order within each, in
/// one buffer per topic (the writer then looks each topic up once per batch, not once per record).
pub(crate) type EncodedOutputs = Vec<(Arc<str>, Records)>;

/// A stored record at `offset` did not decode.
#[derive(Debug, thiserror::Error)]
#[error("input offset {offset}: {source}")]
pub(crate) struct BadRecord {
    pub offset: u64,
    #[source]
    pub source: DecodeError,
}

/// One batch of input events of one partition: the columns handed to the guest, its values, and per
/// event whether its value is JSON (which an output forwarding that value inherits).
#[derive(Debug)]
pub(crate) struct InputBatch {
    /// The WIT `batch`.
    pub batch: Batch,
    /// All values, concatenated, split by `batch.value_ends`: what `input.values` hands the guest.
    values: Arc<Vec<u8>>,
    json: Vec<bool>,
}

impl InputBatch {
    /// An empty batch of `partition`.
    pub fn new(partition: u32) -> Self {
        Self {
            batch: Batch {
                partition,
                offsets: Vec::new(),
                timestamps_ms: Vec::new(),
                keys: Vec::new(),
                key_ends: Vec::new(),
                value_ends: Vec::new(),
                headers: Vec::new(),
                header_ends: Vec::new(),
            },
            values: Arc::new(Vec::new()),
            json: Vec::new(),
        }
    }

    /// Decodes stored `(offset, record)` pairs into a new batch.
    pub fn decode<B: AsRef<[u8]>>(partition: u32, events: &[(u64, B)]) -> Result<Self, BadRecord> {
        let mut batch = Self::new(partition);
        batch.refill(partition, events)?;
        Ok(batch)
    }

    /// Empties the batch and decodes `events` into it, keeping its buffers (the processor reuses one).
    pub fn refill<B: AsRef<[u8]>>(
        &mut self,
        partition: u32,
        events: &[(u64, B)],
    ) -> Result<(), BadRecord> {
        self.clear(partition);
        let bytes: usize = events.iter().map(|(_, b)| b.as_ref().len()).sum();
        let values = unshared(&mut self.values);
        values.clear();
        values.reserve(bytes);
        for (offset, bytes) in events {
            let record = RecordRef::decode(bytes.as_ref()).map_err(|source| BadRecord {
                offset: *offset,
                source,
            })?;
            let b = &mut self.batch;
            b.offsets.push(*offset);
            b.timestamps_ms.push(record.timestamp_ms);
            b.keys.extend_from_slice(record.key.unwrap_or_default());
            b.key_ends.push(end_u32(b.keys.len()));
            values.extend_from_slice(record.value.as_bytes());
            b.value_ends.push(end_u32(values.len()));
            for (name, value) in &record.headers {
                b.headers
                    .extend_from_slice(&end_u32(name.len()).to_le_bytes());
                b.headers.extend_from_slice(name.as_bytes());
                b.headers
                    .extend_from_slice(&end_u32(value.len()).to_le_bytes());
                b.headers.extend_from_slice(value.as_bytes());
            }
            b.header_ends.push(end_u32(b.headers.len()));
            self.json.push(record.value.is_json());
        }
        Ok(())
    }

    fn clear(&mut self, partition: u32) {
        let b = &mut self.batch;
        b.partition = partition;
        b.offsets.clear();
        b.timestamps_ms.clear();
        b.keys.clear();
        b.key_ends.clear();
        b.value_ends.clear();
        b.headers.clear();
        b.header_ends.clear();
        self.json.clear();
    }

    /// All values, concatenated, split by `batch.value_ends`, for
    /// [`Instance::handle`](crate::runtime::Instance::handle).
    pub fn values(&self) -> &Arc<Vec<u8>> {
        &self.values
    }

    /// How many events the batch holds.
    pub fn len(&self) -> usize {
        self.batch.offsets.len()
    }

    /// Event `i`'s key (empty for none).
    fn key(&self, i: usize) -> Option<&[u8]> {
        let b = &self.batch;
        let start = match i.checked_sub(1) {
            Some(prev) => *b.key_ends.get(prev)? as usize,
            None => 0,
        };
        b.keys.get(start..*b.key_ends.get(i)? as usize)
    }

    /// Event `i`'s value, with its kind.
    fn value(&self, i: usize) -> Option<PayloadRef<'_>> {
        let b = &self.batch;
        let start = match i.checked_sub(1) {
            Some(prev) => *b.value_ends.get(prev)? as usize,
            None => 0,
        };
        let bytes = self.values.get(start..*b.value_ends.get(i)? as usize)?;
        Some(if *self.json.get(i)? {
            PayloadRef::Json(bytes)
        } else {
            PayloadRef::Bytes(bytes)
        })
    }
}

/// Turns a handler's columnar outputs for `input` into encoded records per output topic. A forwarded
/// value keeps its input's kind; any other value that is valid JSON is stored as JSON (so it reads back
/// as a JSON value), anything else as bytes.
pub(crate) fn to_records(
    outputs: &OutputBatch,
    input: &InputBatch,
    version: &HandlerVersion,
) -> Result<EncodedOutputs, String> {
    let mut by_topic: Vec<Records> = vec![Records::default(); version.outputs.len()];
    encode_outputs(outputs, input, version, |topic, record| {
        if let Some(records) = by_topic.get_mut(topic) {
            records.push(record);
        }
    })?;
    Ok(version
        .outputs
        .iter()
        .zip(by_topic)
        .filter(|(_, records)| !records.is_empty())
        .map(|(topic, records)| (Arc::from(topic.as_str()), records))
        .collect())
}

/// Encodes a handler's columnar outputs for `input` in emission order, handing each record with the
/// index of its output topic (checked against `version.outputs`) to `sink`.
pub(crate) fn encode_outputs(
    outputs: &OutputBatch,
    input: &InputBatch,
    version: &HandlerVersion,
    mut sink: impl FnMut(usize, &RecordRef<'_>),
) -> Result<(), String> {
    let n = outputs.topics.len();
    let (sources, key_sources) = (&outputs.value_sources, &outputs.key_sources);
    if outputs.key_ends.len() != n
        || outputs.value_ends.len() != n
        || !(sources.is_empty() || sources.len() == n)
        || !(key_sources.is_empty() || key_sources.len() == n)
    {
        return Err(format!(
            "output columns disagree: {n} topics, {} keys, {} values, {} key sources, {} value sources",
            outputs.key_ends.len(),
            outputs.value_ends.len(),
            key_sources.len(),
            sources.len()
        ));
    }
    let forwarded = |what: &str, i: usize, event: u32| {
        format!(
            "output {i} forwards the {what} of input event {event}, but the batch holds {} events",
            input.len()
        )
    };
    let (mut key_start, mut value_start) = (0usize, 0usize);
    for i in 0..n {
        let topic = usize::from(outputs.topics[i]);
        if topic >= version.outputs.len() {
            return Err(format!(
                "output topic index {topic} is not declared (outputs: {:?})",
                version.outputs
            ));
        }
        let (key_end, value_end) = (outputs.key_ends[i] as usize, outputs.value_ends[i] as usize);
        let own_key = outputs
            .keys
            .get(key_start..key_end)
            .ok_or("output key offsets are out of range")?;
        let key = match key_sources.get(i).copied().unwrap_or(0).checked_sub(1) {
            None => own_key,
            Some(event) => input
                .key(event as usize)
                .ok_or_else(|| forwarded("key", i, event))?,
        };
        let own = outputs
            .values
            .get(value_start..value_end)
            .ok_or("output value offsets are out of range")?;
        (key_start, value_start) = (key_end, value_end);
        let value = match sources.get(i).copied().unwrap_or(0).checked_sub(1) {
            None => classify(own),
            Some(event) => input
                .value(event as usize)
                .ok_or_else(|| forwarded("value", i, event))?,
        };
        let record = RecordRef {
            timestamp_ms: 0,
            key: (!key.is_empty()).then_some(key),
            value,
            headers: vec![],
            id: None,
        };
        sink(topic, &record);
    }
    Ok(())
}

/// JSON if the bytes are one valid JSON value, else raw bytes.
fn classify(value: &[u8]) -> PayloadRef<'_> {
    match std::str::from_utf8(value) {
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            PayloadRef::Json(text.as_bytes())
        }
        _ => PayloadRef::Bytes(value),
    }
}

/// The values buffer, to write: unshared between calls (the instance drops its clone when a call
/// returns), so this reuses it. Should a clone outlive a call anyway, the batch moves to a new buffer
/// rather than change values someone may still read.
fn unshared(values: &mut Arc<Vec<u8>>) -> &mut Vec<u8> {
    if Arc::get_mut(values).is_none() {
        *values = Arc::new(Vec::new());
    }
    // Unique by now, so this never clones.
    Arc::make_mut(values)
}

fn end_u32(len: usize) -> u32 {
    // Batches are bounded by MAX_BATCH_BYTES (4 MiB), far below u32::MAX.
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Payload, Record};

    fn stored(value: Payload, key: &str) -> Vec<u8> {
        Record {
            timestamp_ms: 5,
            key: Some(key.as_bytes().to_vec()),
            value,
            headers: vec![("h".into(), "v".into())],
            id: None,
        }
        .encode()
    }

    fn version(outputs: &[&str]) -> HandlerVersion {
        HandlerVersion {
            version: 1,
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            config: vec![],
            size_bytes: 0,
            sha256: String::new(),
            created_ms: 0,
            limits: Default::default(),
        }
    }

    #[test]
    fn columns_hold_every_field_and_forwarded_values_keep_their_kind() -> anyhow::Result<()> {
        let events = vec![
            (10u64, stored(Payload::Json(r#"{"a":1}"#.into()), "k1")),
            (11, stored(Payload::Bytes(b"[1".to_vec()), "k2")),
        ];
        let input = InputBatch::decode(3, &events)?;
        let b = &input.batch;
        assert_eq!((b.partition, &b.offsets[..]), (3, &[10, 11][..]));
        assert_eq!(b.keys, b"k1k2");
        assert_eq!(input.values().as_slice(), br#"{"a":1}[1"#);
        assert_eq!(b.value_ends, [7, 9]);
        assert_eq!(&b.headers[..4], &1u32.to_le_bytes());

        // Output 0 forwards event 1 (raw bytes that happen to look like broken JSON), output 1 forwards
        // event 0 (JSON), output 2 brings its own JSON, output 3 its own non-JSON bytes.
        let outputs = OutputBatch {
            topics: vec![0, 0, 0, 0],
            keys: b"acd".to_vec(),
            key_ends: vec![1, 1, 2, 3],
            values: b"7{x".to_vec(),
            value_ends: vec![0, 0, 1, 3],
            value_sources: vec![2, 1, 0, 0],
            key_sources: vec![0, 2, 0, 0],
        };
        let grouped =
            to_records(&outputs, &input, &version(&["out"])).map_err(anyhow::Error::msg)?;
        let records = match &grouped[..] {
            [(topic, records)] if &**topic == "out" => records,
            other => anyhow::bail!("expected one group for \"out\", got {other:?}"),
        };
        let keys: Vec<Option<Vec<u8>>> = records
            .iter()
            .map(|bytes| Record::decode(bytes).map(|r| r.key))
            .collect::<Result<_, _>>()?;
        let keys: Vec<Option<&[u8]>> = keys.iter().map(Option::as_deref).collect();
        assert_eq!(
            keys,
            [
                Some(&b"a"[..]),
                Some(&b"k2"[..]),
                Some(&b"c"[..]),
                Some(&b"d"[..])
            ],
            "output 1 forwards event 1's key"
        );
        let values: Vec<Payload> = records
            .iter()
            .map(|bytes| Record::decode(bytes).map(|r| r.value))
            .collect::<Result<_, _>>()?;
        assert_eq!(
            values,
            [
                Payload::Bytes(b"[1".to_vec()),
                Payload::Json(r#"{"a":1}"#.into()),
                Payload::Json("7".into()),
                Payload::Bytes(b"{x".to_vec()),
            ]
        );
        Ok(())
    }

    #[test]
    fn outputs_are_grouped_by_topic_in_emission_order() -> anyhow::Result<()> {
        let events = vec![(0u64, stored(Payload::Json("1".into()), "k"))];
        let input = InputBatch::decode(0, &events)?;
        // Own values 1..=4 to topics b, a, b, b (declared a, b, c: c gets nothing).
        let outputs = OutputBatch {
            topics: vec![1, 0, 1, 1],
            keys: vec![],
            key_ends: vec![0; 4],
            values: b"1234".to_vec(),
            value_ends: vec![1, 2, 3, 4],
            value_sources: vec![],
            key_sources: vec![],
        };
        let grouped =
            to_records(&outputs, &input, &version(&["a", "b", "c"])).map_err(anyhow::Error::msg)?;
        let values: Vec<(String, Vec<Payload>)> = grouped
            .iter()
            .map(|(topic, records)| {
                let values = records.iter().map(|r| Record::decode(r).map(|r| r.value));
                Ok((topic.to_string(), values.collect::<Result<_, _>>()?))
            })
            .collect::<anyhow::Result<_>>()?;
        let json = |v: &str| Payload::Json(v.into());
        assert_eq!(
            values,
            [
                ("a".to_string(), vec![json("2")]),
                ("b".to_string(), vec![json("1"), json("3"), json("4")]),
            ]
        );
        Ok(())
    }

    #[test]
    fn bad_outputs_are_refused_with_a_reason() -> anyhow::Result<()> {
        let events = vec![(0u64, stored(Payload::Json("1".into()), "k"))];
        let input = InputBatch::decode(0, &events)?;
        let forward_missing = OutputBatch {
            topics: vec![0],
            keys: vec![],
            key_ends: vec![0],
            values: vec![],
            value_ends: vec![0],
            value_sources: vec![5],
            key_sources: vec![],
        };
        let err = to_records(&forward_missing, &input, &version(&["out"])).err();
        assert!(err.is_some_and(|e| e.contains("input event 4")));
        let undeclared = OutputBatch {
            topics: vec![1],
            value_sources: vec![],
            ..forward_missing
        };
        let err = to_records(&undeclared, &input, &version(&["out"])).err();
        assert!(err.is_some_and(|e| e.contains("not declared")));
        Ok(())
    }

    #[test]
    fn refills_reuse_the_values_buffer_unless_a_clone_is_still_held() -> anyhow::Result<()> {
        let long = vec![(0u64, stored(Payload::Json("22".into()), "k"))];
        let short = vec![(1u64, stored(Payload::Json("1".into()), "k"))];
        let mut input = InputBatch::decode(0, &long)?;
        let buffer = input.values().as_ptr();
        input.refill(0, &short)?;
        assert_eq!(input.values().as_slice(), b"1");
        assert_eq!(
            input.values().as_ptr(),
            buffer,
            "an unshared buffer is reused"
        );

        // A clone that outlives a call keeps its values; the batch moves on to a new buffer.
        let held = Arc::clone(input.values());
        input.refill(0, &long)?;
        assert_eq!(held.as_slice(), b"1");
        assert_eq!(input.values().as_slice(), b"22");
        assert!(!Arc::ptr_eq(&held, input.values()));
        Ok(())
    }

    #[test]
    fn a_corrupt_record_names_its_offset() {
        let events = vec![(7u64, vec![1u8, 0])];
        let err = InputBatch::decode(0, &events).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.starts_with("input offset 7")));
    }
}
