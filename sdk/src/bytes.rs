//! Comparing and loading short byte strings without `memcmp` or loops.
//!
//! In a component, `memcmp` is wasi-libc's byte-at-a-time loop, called out of line. The state cache
//! compares keys on every look-up, so for short keys it compares whole words instead (measured on a
//! `counter`-like handler: 75 to 100 fewer instructions per event than `memcmp`), and up to 16 bytes
//! with two overlapping word loads and no loop (each loop's back edge is also an epoch check: about 3 %
//! fewer instructions in `counter`'s batch again, measured with callgrind). The hasher builds its last
//! partial word the same way. Copies are left to `memcpy` (`memory.copy`): a word-by-word copy measured
//! slower.

/// Up to this many bytes, compare word by word.
const SHORT: usize = 32;

/// Whether `a` and `b` hold the same bytes.
#[inline(always)]
pub(crate) fn eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    match a.len() {
        // Up to 16 bytes: the first and the last word (overlapping when shorter), no loop. Loops cost
        // more than their bodies here: each back edge is also an epoch check in a component.
        0..=16 => head_tail(a) == head_tail(b),
        17..=SHORT => {
            let n = a.len();
            head_tail(&a[..16]) == head_tail(&b[..16])
                && head_tail(&a[16..n]) == head_tail(&b[16..n])
        }
        _ => a == b,
    }
}

/// The first and the last eight bytes of `bytes` (at most 16 long) as two words; shorter slices give
/// zero-padded words. Two slices of the same length are equal iff their pairs are.
#[inline(always)]
fn head_tail(bytes: &[u8]) -> (u64, u64) {
    match bytes.len() {
        8..=16 => (word_at(bytes, 0), word_at(bytes, bytes.len() - 8)),
        _ => (tail_word(bytes), 0),
    }
}

/// The eight bytes of `bytes` from `at` (which has at least that many) as a little-endian word.
#[inline(always)]
fn word_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// `bytes` (at most 7 long) as a little-endian word padded with zeros, the same as copying them into
/// `[0; 8]`, built from overlapping loads: no loop, and no copy of unknown length (in a component, a
/// `memory.copy` is a call into the host).
#[inline(always)]
pub(crate) fn tail_word(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    let le4 = |at: usize| {
        u64::from(u32::from_le_bytes([
            bytes[at],
            bytes[at + 1],
            bytes[at + 2],
            bytes[at + 3],
        ]))
    };
    let le2 = |at: usize| u64::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
    match n {
        0 => 0,
        1 => u64::from(bytes[0]),
        2..=3 => le2(0) | (le2(n - 2) << (8 * (n - 2))),
        4..=7 => le4(0) | (le4(n - 4) << (8 * (n - 4))),
        // Callers pass at most 7 bytes; a longer slice gives its first 8.
        _ => word_at(bytes, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_words_are_the_zero_padded_little_endian_bytes() {
        let src: Vec<u8> = (1..=8).map(|i| i * 17).collect();
        for len in 0..8 {
            let mut padded = [0u8; 8];
            padded[..len].copy_from_slice(&src[..len]);
            assert_eq!(
                tail_word(&src[..len]),
                u64::from_le_bytes(padded),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn compares_every_length() {
        let src: Vec<u8> = (0..80).collect();
        for len in 0..src.len() {
            let part = &src[..len];
            let copy = part.to_vec();
            assert!(eq(part, &copy));
            if len > 0 {
                let mut other = part.to_vec();
                other[len - 1] ^= 1;
                assert!(!eq(part, &other), "differ in the last byte at {len}");
                other[len - 1] ^= 1;
                other[0] ^= 1;
                assert!(!eq(part, &other), "differ in the first byte at {len}");
            }
            assert!(!eq(part, &src[..len + 1]));
        }
    }
}
