//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), computed in
//! user space; the kernel only indexes the table.
//!
//! Each backend gets a permutation of the table's slots from two hashes of
//! its key; backends take turns claiming their next free preferred slot.
//! Every backend ends with `M/N` or `M/N + 1` slots, so the imbalance is at
//! most `N/M` (1% once `M >= 100 N`). The result depends only on the set
//! of keys and `M`, not on their order: every node computes the same table.

use alloc::vec;
use alloc::vec::Vec;

/// Builds a table of `m` slots (prime) over backends named by `keys`;
/// entry `i` is an index into `keys`. Empty when there is no backend.
pub fn table<K: AsRef<[u8]>>(keys: &[K], m: u32) -> Vec<u32> {
    let n = keys.len();
    if n == 0 || m == 0 {
        return Vec::new();
    }
    // Visit backends in key order so the result ignores input order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| keys[a].as_ref().cmp(keys[b].as_ref()));
    let m64 = m as u64;
    let perm: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let k = keys[i].as_ref();
            let offset = hash(k, 0x6f66_6673_6574) % m64;
            let skip = if m > 1 {
                hash(k, 0x736b_6970) % (m64 - 1) + 1
            } else {
                1
            };
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (rank, &i) in order.iter().enumerate() {
            let (offset, skip) = perm[rank];
            let mut c = (offset + next[rank] * skip) % m64;
            while entry[c as usize] != u32::MAX {
                next[rank] += 1;
                c = (offset + next[rank] * skip) % m64;
            }
            entry[c as usize] = i as u32;
            next[rank] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

/// FNV-1a over the key, then the Murmur3 finaliser with a seed.
fn hash(key: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in key {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    crate::hash::fmix64(h ^ seed.rotate_left(29))
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}
