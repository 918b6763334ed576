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
}

impl StatsReader {
    /// A reader of `ebpf`'s counter maps (whoever holds them).
    pub fn new(ebpf: &Ebpf) -> Result<Self> {
        Ok(Self {
            services: PerCpuArray::try_from(Map::PerCpuArray(dup(ebpf, MAP_SVC_STATS)?))?,
            drops: PerCpuArray::try_from(Map::PerCpuArray(dup(ebpf, MAP_DROPS)?))?,
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
