//! A bloom filter over the aggregate ids of a closed segment, so an aggregate read or a sequence
//! check skips segments that cannot hold the aggregate.
//!
//! Hand-written on purpose: its bytes are part of our on-disk format and must not change when a
//! dependency is upgraded. FNV-1a gives a stable 64-bit hash; the k probe positions come from
//! double hashing (Kirsch–Mitzenmacher).

/// Target false-positive rate (Axon's default `bloom-index-fpp`).
const FALSE_POSITIVE_RATE: f64 = 0.03;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bloom {
    bits: Vec<u64>,
    hashes: u32,
}

impl Bloom {
    /// A filter sized for `expected` distinct keys.
    pub fn with_capacity(expected: usize) -> Bloom {
        let n = expected.max(1) as f64;
        let ln2 = std::f64::consts::LN_2;
        let m = (-(n * FALSE_POSITIVE_RATE.ln()) / (ln2 * ln2)).ceil().max(64.0) as usize;
        let hashes = ((m as f64 / n) * ln2).round().clamp(1.0, 16.0) as u32;
        Bloom {
            bits: vec![0; m.div_ceil(64)],
            hashes,
        }
    }

    pub fn insert(&mut self, key: &str) {
        let len = self.bits.len() as u64 * 64;
        for bit in probes(key, self.hashes, len) {
            self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    pub fn may_contain(&self, key: &str) -> bool {
        let len = self.bits.len() as u64 * 64;
        probes(key, self.hashes, len).all(|bit| self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// `u32 hashes | u32 words | words as u64`, little-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hashes.to_le_bytes());
        out.extend_from_slice(&(self.bits.len() as u32).to_le_bytes());
        for word in &self.bits {
            out.extend_from_slice(&word.to_le_bytes());
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Bloom> {
        let hashes = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
        let words = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
        let body = bytes.get(8..)?;
        if body.len() != words * 8 || words == 0 || hashes == 0 {
            return None;
        }
        let bits = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Some(Bloom { bits, hashes })
    }
}

fn probes(key: &str, hashes: u32, len: u64) -> impl Iterator<Item = u64> {
    let h = fnv1a(key.as_bytes());
    let h1 = h & 0xffff_ffff;
    let h2 = (h >> 32) | 1;
    (0..hashes as u64).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % len)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut bloom = Bloom::with_capacity(10_000);
        for i in 0..10_000 {
            bloom.insert(&format!("aggregate-{i}"));
        }
        for i in 0..10_000 {
            assert!(bloom.may_contain(&format!("aggregate-{i}")));
        }
        let false_positives = (0..10_000).filter(|i| bloom.may_contain(&format!("other-{i}"))).count();
        assert!(false_positives < 600, "{false_positives} false positives");
        let mut bytes = Vec::new();
        bloom.encode(&mut bytes);
        assert_eq!(Bloom::decode(&bytes), Some(bloom));
        assert_eq!(Bloom::decode(&bytes[..bytes.len() - 1]), None);
    }
}
