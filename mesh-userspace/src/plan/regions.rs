//! Where the Maglev tables live in the one Maglev map: each service's
//! table is sized from its backends ([`table_size`]), and each of its two
//! halves (the table packets read, the one the next change writes) has a
//! region of the map of that size, allocated from a [`Pool`].
//!
//! A region is resized only in the half no packet reads, and only freed
//! regions of that kind (or of removed services) are handed out again, so
//! the two-half switch stays hitless.

use std::collections::BTreeMap;

use mesh_common::maglev;

/// A region of the Maglev map: `len` entries from `off`. `len == 0`: none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Region {
    pub off: u32,
    pub len: u32,
}

impl Region {
    pub const NONE: Region = Region { off: 0, len: 0 };
}

/// Imbalance of a Maglev table of `size` entries over `n` backends is at
/// most about `n / size`: 100 entries per backend keeps it within 1%.
pub const ENTRIES_PER_BACKEND: u32 = 100;

/// The table size for a service with `backends` backends in its table:
/// the smallest prime of at least 100 entries per backend, at most `max`
/// (the `--maglev-size` prime); 0 without backends. The same on every
/// node for the same state.
pub fn table_size(backends: usize, max: u32) -> u32 {
    if backends == 0 {
        return 0;
    }
    let want = (backends as u64 * ENTRIES_PER_BACKEND as u64).min(max as u64) as u32;
    let mut n = want.max(7);
    while n < max && !maglev::is_prime(n) {
        n += 1;
    }
    n.min(max)
}

/// The Maglev map's entries: a bump pointer and the freed regions below it
/// (first fit, neighbours merged).
#[derive(Clone, Debug)]
pub struct Pool {
    cap: u32,
    top: u32,
    /// Free regions below `top`, by offset.
    free: BTreeMap<u32, u32>,
}

impl Pool {
    pub fn new(cap: u32) -> Pool {
        Pool {
            cap,
            top: 0,
            free: BTreeMap::new(),
        }
    }

    /// The pool that holds exactly `used` (after a failed apply, from the
    /// regions the planner knows packets may read).
    pub fn rebuild(cap: u32, used: impl IntoIterator<Item = Region>) -> Pool {
        let mut v: Vec<Region> = used.into_iter().filter(|r| r.len > 0).collect();
        v.sort_by_key(|r| r.off);
        let mut p = Pool::new(cap);
        for r in v {
            if r.off > p.top {
                p.free.insert(p.top, r.off - p.top);
            }
            p.top = p.top.max(r.off + r.len);
        }
        p
    }

    /// A region of `len` entries, or `None` when the map has no room.
    pub fn alloc(&mut self, len: u32) -> Option<Region> {
        if len == 0 {
            return Some(Region::NONE);
        }
        if let Some((&off, &l)) = self.free.iter().find(|(_, l)| **l >= len) {
            self.free.remove(&off);
            if l > len {
                self.free.insert(off + len, l - len);
            }
            return Some(Region { off, len });
        }
        if self.cap - self.top >= len {
            self.top += len;
            return Some(Region {
                off: self.top - len,
                len,
            });
        }
        None
    }

    /// Gives `r` back.
    pub fn release(&mut self, r: Region) {
        if r.len == 0 {
            return;
        }
        let (mut off, mut len) = (r.off, r.len);
        if let Some((&prev, &plen)) = self.free.range(..off).next_back()
            && prev + plen == off
        {
            self.free.remove(&prev);
            off = prev;
            len += plen;
        }
        if let Some(&nlen) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len += nlen;
        }
        if off + len == self.top {
            self.top = off;
        } else {
            self.free.insert(off, len);
        }
    }

    /// Entries in regions handed out.
    pub fn used(&self) -> u32 {
        self.top - self.free.values().sum::<u32>()
    }

    pub fn cap(&self) -> u32 {
        self.cap
    }
}

/// A service's regions once half `half` holds a table of `size` entries:
/// that half's region is kept if it has that size, else given back and a
/// new one taken (the other half, the one packets read, is never touched).
/// `None` when the map has no room.
pub fn place(
    pool: &mut Pool,
    mut regions: [Region; 2],
    half: usize,
    size: u32,
) -> Option<[Region; 2]> {
    if regions[half].len != size {
        pool.release(regions[half]);
        regions[half] = pool.alloc(size)?;
    }
    Some(regions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sizes_are_primes_of_100_entries_per_backend_capped() {
        assert_eq!(table_size(0, 16381), 0);
        assert_eq!(table_size(1, 16381), 101);
        assert_eq!(table_size(3, 16381), 307);
        assert_eq!(table_size(10, 16381), 1009);
        assert_eq!(table_size(500, 16381), 16381);
        assert_eq!(table_size(2, 251), 211);
        assert_eq!(table_size(5, 7), 7);
        for n in 1..300 {
            let s = table_size(n, 65521);
            assert!(maglev::is_prime(s) && s >= 100 * n as u32, "{n}: {s}");
        }
    }

    #[test]
    fn freed_regions_are_reused_and_merged() {
        let mut p = Pool::new(100);
        let a = p.alloc(30).unwrap();
        let b = p.alloc(30).unwrap();
        let c = p.alloc(30).unwrap();
        assert_eq!((a.off, b.off, c.off), (0, 30, 60));
        assert_eq!(p.alloc(20), None, "10 left");
        p.release(a);
        p.release(b);
        // a and b merged: 60 entries from 0.
        assert_eq!(p.alloc(50), Some(Region { off: 0, len: 50 }));
        p.release(c);
        assert_eq!(p.used(), 50);
        assert_eq!(p.alloc(50), Some(Region { off: 50, len: 50 }));
    }

    #[test]
    fn a_rebuilt_pool_holds_what_was_used() {
        let used = [Region { off: 10, len: 5 }, Region { off: 40, len: 10 }];
        let mut p = Pool::rebuild(64, used);
        assert_eq!(p.used(), 15);
        assert_eq!(p.alloc(10), Some(Region { off: 0, len: 10 }));
        assert_eq!(p.alloc(20), Some(Region { off: 15, len: 20 }));
        assert_eq!(p.alloc(14), Some(Region { off: 50, len: 14 }));
        assert_eq!(p.alloc(1), Some(Region { off: 35, len: 1 }));
    }

    #[test]
    fn only_the_half_written_changes() {
        let mut p = Pool::new(1000);
        let r = place(&mut p, [Region::NONE; 2], 0, 101).unwrap();
        let r = place(&mut p, r, 1, 211).unwrap();
        let r2 = place(&mut p, r, 0, 307).unwrap();
        assert_eq!(r2[1], r[1], "the half packets read stays");
        assert_eq!(r2[0].len, 307);
        assert_eq!(
            place(&mut p, r2, 1, 211).unwrap(),
            r2,
            "same size, same region"
        );
    }
}
