//! Hash maps that work inside a handler.
//!
//! `std::collections::HashMap::new()` seeds its hasher from the operating system's randomness, and a
//! handler has none: on wasm that call traps. These aliases use [`FixedState`], a fast hasher with a fixed
//! seed, which also keeps iteration order the same from run to run (handlers must be deterministic).
//! Create them with `HashMap::default()`. A fixed seed means crafted keys can collide: keep such maps
//! bounded (per batch, or by a limit of your own), or use `BTreeMap`.

use std::hash::{BuildHasher, Hasher};

/// A `std::collections::HashMap` with the fixed-seed [`FixedState`] hasher. Create it with `default()`.
pub type HashMap<K, V> = std::collections::HashMap<K, V, FixedState>;

/// A `std::collections::HashSet` with the fixed-seed [`FixedState`] hasher. Create it with `default()`.
pub type HashSet<T> = std::collections::HashSet<T, FixedState>;

/// Builds [`FixedHasher`]s: deterministic, no randomness needed.
#[derive(Clone, Copy, Debug, Default)]
pub struct FixedState;

impl BuildHasher for FixedState {
    type Hasher = FixedHasher;

    fn build_hasher(&self) -> FixedHasher {
        FixedHasher { hash: 0 }
    }
}

/// A multiply-rotate hasher in the style of rustc's `FxHasher`, eight bytes at a time. Fast on short
/// keys; not collision-resistant.
#[derive(Clone, Debug)]
pub struct FixedHasher {
    hash: u64,
}

// The multiplier of rustc-hash 2: odd, with well-spread bits.
const MULTIPLIER: u64 = 0xf135_7aea_2e62_a9c5;

impl FixedHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = self.hash.wrapping_add(word).wrapping_mul(MULTIPLIER);
    }
}

impl Hasher for FixedHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // The zero-padded little-endian word of the last bytes, built without a loop or a copy of
            // unknown length (see `bytes::tail_word`).
            self.add(crate::bytes::tail_word(rest));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves the best-mixed bits at the top; hashbrown picks buckets with the low
        // bits, so bring the top ones down.
        self.hash.rotate_left(26)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_fixed_and_distinguish_lengths() {
        let hash = |bytes: &[u8]| FixedState.hash_one(bytes);
        assert_eq!(hash(b"abc"), hash(b"abc"));
        assert_ne!(hash(b"abc"), hash(b"abd"));
        // `[u8]`'s `Hash` writes the length first, so zero padding does not collide.
        assert_ne!(hash(b"a"), hash(b"a\0"));
        // The tail word is the zero-padded little-endian one, as it always was: hashes (and so the
        // iteration order of these maps) do not change between SDK versions.
        assert_eq!(hash(b"key-000042"), 0x0d5c_ed0d_6642_23d5);
        assert_eq!(hash(b"abcdefghi"), 0xabef_fa21_adef_09e1);
        let mut map: HashMap<Vec<u8>, u32> = HashMap::default();
        map.insert(b"k".to_vec(), 1);
        assert_eq!(map.get(b"k".as_slice()), Some(&1));
    }
}
