//! Removes conntrack entries whose lifetime ended.
//!
//! The programs judge an entry by its age (`CtValue::expired`) and never
//! delete one that merely ended: an LRU table forgets its least recently
//! used entry only when it is full. Left alone, a node's tables fill with
//! ended flows (closed connections stay ten seconds past their end,
//! unanswered SYNs and UDP datagrams a minute, and then stay on), and from
//! then on every new flow's entry is written by evicting another: about
//! twice what an insert into a table with room costs (the benchmark's
//! `new_flow_full` against `new_flow`), on the new flow's packet. Swept
//! every few seconds, the tables hold the flows that are alive, and the
//! least-recently-used eviction is left for what it is for: a table too
//! small for the live flows, or a flood.
//!
//! An entry goes only once it ended [`MARGIN_UNITS`] ago: meshd reads the
//! monotonic clock, the programs the kernel's tick (the same time, a tick
//! apart at most), and a unit's end may fall between the two. Each entry
//! the scan found ended is looked up again just before it is deleted, so
//! a flow that sent meanwhile keeps it; one whose packet lands between
//! that lookup and the delete loses it, and is picked up again by its
//! next packet, to the same task while the service is unchanged (as after
//! an eviction; tested in netns_hardening).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::{HashMap, IterableMap, Map, MapData, MapError};
use mesh_common::abi::{CtLifetimes, CtValue, FlowKey4};
use prometheus::IntCounterVec;
use tracing::{debug, warn};

/// The conntrack tables swept, by their `/metrics` label (the forwarded
/// flows' table is not: its entries are the way back of flows another
/// node tracks).
pub const TABLES: [&str; 3] = ["tcp", "udp", "unconfirmed"];

/// Conntrack time units an entry must have ended before it goes.
pub const MARGIN_UNITS: u32 = 2;

/// Whether flow `k`'s entry `v` ended at least [`MARGIN_UNITS`] before
/// `now` (conntrack units), with lifetimes `lt`.
pub fn ended(k: &FlowKey4, v: &CtValue, now: u32, lt: &CtLifetimes) -> bool {
    v.expired(k.proto, now.wrapping_sub(MARGIN_UNITS), lt)
}

/// One table's sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swept {
    pub table: &'static str,
    /// Entries the table held.
    pub scanned: u64,
    /// Entries removed (ended, and still ended when looked at again).
    pub removed: u64,
}

/// A conntrack table (an LRU hash map).
type CtTable = HashMap<MapData, FlowKey4, CtValue>;

pub struct Sweeper {
    tables: Vec<(&'static str, CtTable)>,
    lifetimes: CtLifetimes,
}

impl Sweeper {
    /// A sweeper of `tables` (conntrack tables: `FlowKey4` -> `CtValue`,
    /// by label), whose entries live as `lifetimes` says (the programs').
    pub fn new(tables: Vec<(&'static str, MapData)>, lifetimes: CtLifetimes) -> Result<Self> {
        let tables = tables
            .into_iter()
            .map(|(table, m)| {
                let t = CtTable::try_from(Map::LruHashMap(m))
                    .with_context(|| format!("the {table} conntrack table"))?;
                Ok((table, t))
            })
            .collect::<Result<_>>()?;
        Ok(Self { tables, lifetimes })
    }

    /// Removes from every table the entries that ended by `now`.
    pub fn sweep(&mut self, now: u32) -> Result<Vec<Swept>> {
        let lt = &self.lifetimes;
        self.tables
            .iter_mut()
            .map(|(table, m)| {
                let mut gone = Vec::new();
                let scanned = super::stats::for_each_entry(m.map(), |k, v| {
                    let (k, v) = (read::<FlowKey4>(k), read::<CtValue>(v));
                    if ended(&k, &v, now, lt) {
                        gone.push(k);
                    }
                })
                .with_context(|| format!("reading the {table} conntrack table"))?;
                let mut removed = 0;
                for k in gone {
                    let still = match m.get(&k, 0) {
                        Ok(v) => ended(&k, &v, now, lt),
                        Err(MapError::KeyNotFound) => false,
                        Err(e) => return Err(e).context("looking up a conntrack entry"),
                    };
                    if !still {
                        continue;
                    }
                    match m.remove(&k) {
                        Ok(()) => removed += 1,
                        // Gone meanwhile: not counted.
                        Err(MapError::SyscallError(e))
                            if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => return Err(e).context("deleting a conntrack entry"),
                    }
                }
                Ok(Swept {
                    table,
                    scanned,
                    removed,
                })
            })
            .collect()
    }

    /// Sweeps every `every`, for good (on a thread of its own), counting
    /// what it removes in `swept` (by table).
    pub fn run(mut self, every: Duration, swept: IntCounterVec) {
        loop {
            std::thread::sleep(every);
            let t = Instant::now();
            match self.sweep(crate::clock::ct_now_monotonic()) {
                Ok(v) => {
                    for s in &v {
                        swept.with_label_values(&[s.table]).inc_by(s.removed);
                    }
                    debug!(
                        "conntrack swept in {:.1} ms: {}",
                        t.elapsed().as_secs_f64() * 1e3,
                        v.iter()
                            .map(|s| format!("{} {} of {}", s.table, s.removed, s.scanned))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Err(e) => warn!("sweeping conntrack: {e:#}"),
            }
        }
    }
}

/// A plain value out of the bytes a batch lookup returned.
fn read<T: Copy>(b: &[u8]) -> T {
    assert!(b.len() >= std::mem::size_of::<T>(), "a short map entry");
    // SAFETY: `b` holds at least a `T`'s bytes; `T` is a plain C struct of
    // integers (any bytes are a valid value), read unaligned.
    unsafe { std::ptr::read_unaligned(b.as_ptr() as *const T) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::abi::{CT_CLOSING, CT_OPEN, CT_SYN, IPPROTO_TCP, IPPROTO_UDP, secs_to_units};

    fn flow(proto: u8) -> FlowKey4 {
        FlowKey4 {
            proto,
            ..FlowKey4::default()
        }
    }

    fn entry(state: u8, seen: u32) -> CtValue {
        CtValue {
            state,
            seen,
            ..CtValue::default()
        }
    }

    #[test]
    fn an_entry_goes_only_once_it_ended_the_margin_ago() {
        let lt = CtLifetimes::from_secs([60, 6 * 3600, 10, 60]);
        let now = 1_000_000;
        let closing = secs_to_units(10);
        let tcp = flow(IPPROTO_TCP);
        // Its lifetime just over: not yet.
        assert!(!ended(
            &tcp,
            &entry(CT_CLOSING, now - closing - 1),
            now,
            &lt
        ));
        // Over by more than the margin: gone.
        let seen = now - closing - MARGIN_UNITS - 1;
        assert!(ended(&tcp, &entry(CT_CLOSING, seen), now, &lt));
        // The same age, open: alive for hours.
        assert!(!ended(&tcp, &entry(CT_OPEN, seen), now, &lt));
        // A SYN and a UDP flow live a minute.
        let minute = secs_to_units(60);
        let old = now - minute - MARGIN_UNITS - 1;
        assert!(ended(&tcp, &entry(CT_SYN, old), now, &lt));
        assert!(ended(&flow(IPPROTO_UDP), &entry(CT_OPEN, old), now, &lt));
        assert!(!ended(
            &flow(IPPROTO_UDP),
            &entry(CT_OPEN, old + 2),
            now,
            &lt
        ));
    }

    #[test]
    fn an_entry_seen_a_little_ahead_of_meshds_clock_is_alive() {
        // The programs' tick may run a unit ahead of the monotonic clock
        // meshd reads.
        let lt = CtLifetimes::from_secs([60, 6 * 3600, 10, 60]);
        let now = 1_000_000;
        assert!(!ended(
            &flow(IPPROTO_TCP),
            &entry(CT_CLOSING, now + 1),
            now,
            &lt
        ));
    }
}
