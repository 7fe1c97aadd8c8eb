//! Kafka's default partitioner: `toPositive(murmur2(key)) % partitions`, so a key lands in the same
//! partition number it would in Kafka with the same partition count.
//!
//! Keyless events are spread round-robin from a per-thread cursor (no shared counter on the hot path);
//! a keyless event that carries an `id` is placed by its id instead, so a retry of it lands in the same
//! partition and is recognised as a duplicate there.

use std::cell::Cell;

/// Kafka's `Utils.murmur2` (MurmurHash2, seed `0x9747b28c`), returned as the same 32 bits.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka takes the length as a Java int; payloads never approach 2 GiB (the body limit is far lower).
    let mut h = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of a key: `toPositive(murmur2(key)) % partitions`.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

thread_local! {
    static ROUND_ROBIN: Cell<u32> = Cell::new(std::process::id());
}

/// Where an event goes: by key, else by id, else round-robin.
pub fn route(key: Option<&[u8]>, id: Option<&str>, partitions: u32) -> u32 {
    match (key, id) {
        (Some(key), _) => partition_for_key(key, partitions),
        (None, Some(id)) => partition_for_key(id.as_bytes(), partitions),
        (None, None) => ROUND_ROBIN.with(|c| {
            let next = c.get().wrapping_add(1);
            c.set(next);
            next % partitions.max(1)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Apache Kafka's `UtilsTest.testMurmur2` vectors (Java signed ints).
    #[test]
    fn murmur2_matches_kafka_vectors() {
        let cases: [(&[u8], i32); 7] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
            (b"", 275_646_681),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input) as i32,
                expected,
                "murmur2({:?})",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn partition_uses_to_positive_like_kafka() {
        // Kafka: Utils.toPositive(Utils.murmur2("foobar".getBytes())) % 50 == 16
        assert_eq!(partition_for_key(b"foobar", 50), 16);
        assert!((0..1000).all(|i| partition_for_key(format!("k{i}").as_bytes(), 7) < 7));
    }

    #[test]
    fn keyless_events_spread_and_ids_are_sticky() {
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            seen[route(None, None, 4) as usize] += 1;
        }
        assert_eq!(seen, [100; 4]);
        let p = route(None, Some("req-1"), 16);
        assert!((0..10).all(|_| route(None, Some("req-1"), 16) == p));
    }
}
