//! On-disk key encoding and keyspace naming. This is an on-disk contract: changing it breaks existing data.
//!
//! A partition's log lives in its own keyspace `log-<topic>-<partition>` whose keys are the event offsets
//! as big-endian `u64`, so byte order equals offset order and appends are sequential (no compaction
//! rewrites). The dedup window of that partition lives beside it in `dedup-<topic>-<partition>`, keyed the
//! same way.

/// Length of an encoded offset key.
pub const OFFSET_KEY_LEN: usize = 8;

/// Encodes an offset as a key whose byte order is the offset order.
pub fn offset_key(offset: u64) -> [u8; OFFSET_KEY_LEN] {
    offset.to_be_bytes()
}

/// Decodes a key written by [`offset_key`]; `None` if it is not one.
pub fn decode_offset_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; OFFSET_KEY_LEN] = key.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Keyspace holding the events of one topic partition.
pub fn log_keyspace(topic: &str, partition: u32) -> String {
    format!("log-{topic}-{partition}")
}

/// Keyspace holding the dedup window (event ids by offset) of one topic partition.
pub fn dedup_keyspace(topic: &str, partition: u32) -> String {
    format!("dedup-{topic}-{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_keys_are_fixed_big_endian() {
        assert_eq!(offset_key(0), [0; 8]);
        assert_eq!(offset_key(1), [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(offset_key(0x0102_0304_0506_0708), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_offset_key(&offset_key(u64::MAX)), Some(u64::MAX));
        assert_eq!(decode_offset_key(&[1, 2, 3]), None);
    }

    #[test]
    fn byte_order_equals_offset_order() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let (a, b) = (rng.u64(..), rng.u64(..));
            assert_eq!(a.cmp(&b), offset_key(a).cmp(&offset_key(b)), "{a} vs {b}");
        }
    }

    #[test]
    fn keyspace_names_are_stable() {
        assert_eq!(log_keyspace("orders", 3), "log-orders-3");
        assert_eq!(dedup_keyspace("a.b_c-d", 0), "dedup-a.b_c-d-0");
    }
}
