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

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::MapData;
use mesh_common::abi::{CtLifetimes, CtValue, FlowKey4};
use prometheus::IntCounterVec;
use tracing::{debug, warn};

use crate::bpfsys::{bpf_cmd, sys_bpf, zeroed_attr};

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

pub struct Sweeper {
    tables: Vec<(&'static str, MapData)>,
    lifetimes: CtLifetimes,
}

impl Sweeper {
    /// A sweeper of `tables` (conntrack tables: `FlowKey4` -> `CtValue`,
    /// by label), whose entries live as `lifetimes` says (the programs').
    pub fn new(tables: Vec<(&'static str, MapData)>, lifetimes: CtLifetimes) -> Self {
        Self { tables, lifetimes }
    }

    /// Removes from every table the entries that ended by `now`.
    pub fn sweep(&self, now: u32) -> Result<Vec<Swept>> {
        let lt = &self.lifetimes;
        self.tables
            .iter()
            .map(|(table, m)| {
                let mut gone = Vec::new();
                let scanned = super::stats::for_each_entry(m, |k, v| {
                    let (k, v) = (read::<FlowKey4>(k), read::<CtValue>(v));
                    if ended(&k, &v, now, lt) {
                        gone.push(k);
                    }
                })
                .with_context(|| format!("reading the {table} conntrack table"))?;
                let mut removed = 0;
                for k in gone {
                    if lookup(m, &k)?.is_some_and(|v| ended(&k, &v, now, lt)) && delete(m, &k)? {
                        removed += 1;
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
    pub fn run(self, every: Duration, swept: IntCounterVec) {
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

/// Flow `k`'s entry in `m` now, if it has one.
fn lookup(m: &MapData, k: &FlowKey4) -> Result<Option<CtValue>> {
    let mut v = CtValue::default();
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = m.fd().as_fd().as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = k as *const FlowKey4 as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = &mut v as *mut CtValue as u64;
    match sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(v)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context("looking up a conntrack entry")),
    }
}

/// Deletes flow `k`'s entry from `m`; false if it was gone already.
fn delete(m: &MapData, k: &FlowKey4) -> Result<bool> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = m.fd().as_fd().as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = k as *const FlowKey4 as u64;
    match sys_bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("deleting a conntrack entry")),
    }
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
