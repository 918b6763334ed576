//! Reads the counter maps through file descriptors of its own: metrics
//! never wait for the writer, and the same reader works on pinned maps from
//! another process.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use aya::Ebpf;
use aya::maps::{Map, MapData, PerCpuArray};
use mesh_common::abi::*;

use crate::model::Proto;

/// The applied services: name, protocol, published port, service id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceIndex(pub Vec<(String, Proto, u16, u32)>);

pub struct StatsReader {
    services: PerCpuArray<MapData, SvcStats>,
    drops: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    /// The conntrack tables, by the label `/metrics` gives them.
    conntrack: Vec<(&'static str, MapData)>,
}

/// A conntrack table's use: entries held, entries it can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableUse {
    pub table: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

impl StatsReader {
    /// A reader of `ebpf`'s counter maps (whoever holds them).
    pub fn new(ebpf: &Ebpf) -> Result<Self> {
        Ok(Self {
            services: PerCpuArray::try_from(Map::PerCpuArray(dup(ebpf, MAP_SVC_STATS)?))?,
            drops: PerCpuArray::try_from(Map::PerCpuArray(dup(ebpf, MAP_DROPS)?))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(dup(ebpf, MAP_COUNTERS)?))?,
            conntrack: vec![
                ("tcp", dup(ebpf, MAP_CT4)?),
                ("udp", dup(ebpf, MAP_CT4_UDP)?),
                ("unconfirmed", dup(ebpf, MAP_CT4_NEW)?),
                ("forwarded", dup(ebpf, MAP_FWD4)?),
            ],
        })
    }

    /// A reader of the maps pinned under `root` (`<bpffs>/mesh`), for a
    /// process that did not load them.
    pub fn from_pins(root: &std::path::Path) -> Result<Self> {
        let map = |name: &str| {
            let p = root.join("maps").join(name);
            MapData::from_pin(&p).with_context(|| format!("opening {}", p.display()))
        };
        Ok(Self {
            services: PerCpuArray::try_from(Map::PerCpuArray(map(MAP_SVC_STATS)?))?,
            drops: PerCpuArray::try_from(Map::PerCpuArray(map(MAP_DROPS)?))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(map(MAP_COUNTERS)?))?,
            conntrack: vec![
                ("tcp", map(MAP_CT4)?),
                ("udp", map(MAP_CT4_UDP)?),
                ("unconfirmed", map(MAP_CT4_NEW)?),
                ("forwarded", map(MAP_FWD4)?),
            ],
        })
    }

    /// Per service (name, protocol, published port) counters, summed over CPUs.
    pub fn services(&self, index: &ServiceIndex) -> Result<Vec<(String, Proto, u16, SvcStats)>> {
        let mut out = Vec::new();
        for (name, proto, port, svc_id) in &index.0 {
            let per_cpu = self.services.get(svc_id, 0)?;
            let mut sum = SvcStats::default();
            for s in per_cpu.iter() {
                sum.packets += s.packets;
                sum.bytes += s.bytes;
                sum.new_flows += s.new_flows;
            }
            out.push((name.clone(), *proto, *port, sum));
        }
        Ok(out)
    }

    /// The forwarding counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let mut out = Vec::new();
        for c in Counter::ALL {
            let v = self.counters.get(&(c as u32), 0)?;
            out.push((c, v.iter().sum()));
        }
        Ok(out)
    }

    /// Drop counters by reason, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>> {
        let mut out = Vec::new();
        for r in DropReason::ALL {
            let v = self.drops.get(&(r as u32), 0)?;
            out.push((r, v.iter().sum()));
        }
        Ok(out)
    }
}

impl StatsReader {
    /// A sweeper of the conntrack tables this reader reads (handles of
    /// its own), removing entries whose `lifetimes` ended.
    pub fn sweeper(&self, lifetimes: CtLifetimes) -> Result<super::sweep::Sweeper> {
        let mut tables = Vec::new();
        for (label, m) in &self.conntrack {
            if super::sweep::TABLES.contains(label) {
                let fd = m.fd().as_fd().try_clone_to_owned()?;
                tables.push((*label, MapData::from_fd(fd)?));
            }
        }
        super::sweep::Sweeper::new(tables, lifetimes)
    }

    /// Each conntrack table's entries against its capacity. Counted with
    /// batched lookups: a few system calls for hundreds of thousands of
    /// entries.
    pub fn conntrack(&self) -> Result<Vec<TableUse>> {
        self.conntrack
            .iter()
            .map(|(table, m)| {
                Ok(TableUse {
                    table,
                    entries: count_entries(m)?,
                    capacity: m.info()?.max_entries() as u64,
                })
            })
            .collect()
    }
}

/// The entries of a hash map, counted by BPF_MAP_LOOKUP_BATCH.
fn count_entries(m: &MapData) -> Result<u64> {
    for_each_entry(m, |_, _| {})
}

/// Calls `f` with each entry (key and value bytes) of hash map `m`
/// (`bpfsys::for_each_entry`); returns how many there were.
pub(crate) fn for_each_entry(m: &MapData, f: impl FnMut(&[u8], &[u8])) -> Result<u64> {
    let info = m.info()?;
    crate::bpfsys::for_each_entry(
        m.fd().as_fd(),
        info.key_size() as usize,
        info.value_size() as usize,
        f,
    )
}

/// A second handle on a map of `ebpf` (or of a map taken out of it before:
/// then this fails, so readers are made first).
fn dup(ebpf: &Ebpf, name: &str) -> Result<MapData> {
    let map = ebpf
        .map(name)
        .with_context(|| format!("map {name} missing from the object"))?;
    let data = match map {
        Map::PerCpuArray(d) | Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) => d,
        _ => anyhow::bail!("map {name}: unexpected type"),
    };
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    Ok(MapData::from_fd(fd)?)
}
