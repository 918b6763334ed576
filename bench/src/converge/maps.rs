//! A running meshd's maps, read from outside the process the way the XDP
//! program reads them: the port's entry, the service it points to, that
//! service's active Maglev table, the backends the table names. meshd does
//! not pin its maps (pinning is the operations issue's), so they are
//! opened by id from the descriptors meshd holds (/proc/PID/fdinfo), as
//! the hardening tests open its conntrack tables.
//!
//! Nothing here goes through meshd: what is measured is what a packet
//! would find, not what meshd says it wrote.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use mesh_common::abi::{
    BE_F_LOCAL, BE_F_REMOTE, Backend, IPPROTO_TCP, MAP_BACKENDS, MAP_LOCAL4, MAP_MAGLEV, MAP_PORTS,
    MAP_SERVICES, ReplyKey4, SvcValue, port_index,
};

use crate::sys::{MmapU32, lookup_batch};

/// What one published TCP port leads to in a node's maps, by task
/// identity (ingress address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortInMaps {
    /// The backends of the port's active Maglev table: where new flows go.
    pub table: BTreeSet<Ipv4Addr>,
    /// Every backend slot in use (the table's, and tasks shutting down
    /// that keep their established flows).
    pub backends: BTreeSet<Ipv4Addr>,
    /// Table entries naming a slot that is free or has no identity, and
    /// local slots without one: never, if the writes keep their order.
    pub dangling: usize,
}

/// One meshd's maps, open.
pub struct NodeMaps {
    ports: MmapU32,
    services: Array<MapData, SvcValue>,
    maglev: MmapU32,
    backends: MapData,
    locals: BpfHashMap<MapData, ReplyKey4, u32>,
    /// Backend slots read each time, from slot 0: the planner takes the
    /// lowest free slot, so the slots in use stay below the most backends
    /// ever held at once.
    scan: usize,
}

impl NodeMaps {
    /// The maps of the meshd with process id `pid`.
    pub fn of(pid: u32, scan: usize) -> Result<NodeMaps> {
        let mut m = mesh_tests::lab::maps_of(pid)?;
        let mut take = |name: &str| {
            m.remove(name)
                .with_context(|| format!("meshd (pid {pid}) holds no map {name}"))
        };
        let mmap = |data: &MapData, name: &str| -> Result<MmapU32> {
            let i = data.info()?;
            ensure!(
                i.value_size() == 8,
                "{name}: values of {} bytes, not u32 pairs",
                i.value_size()
            );
            MmapU32::new(data.fd().as_fd(), 2 * i.max_entries() as usize)
                .with_context(|| format!("mapping {name}"))
        };
        let (ports, maglev) = (take(MAP_PORTS)?, take(MAP_MAGLEV)?);
        Ok(NodeMaps {
            ports: mmap(&ports, MAP_PORTS)?,
            maglev: mmap(&maglev, MAP_MAGLEV)?,
            services: Array::try_from(Map::Array(take(MAP_SERVICES)?))?,
            backends: take(MAP_BACKENDS)?,
            locals: BpfHashMap::try_from(Map::HashMap(take(MAP_LOCAL4)?))?,
            scan,
        })
    }

    /// What TCP port `port` leads to now. The port's entry and its service
    /// are read again at the end: a read that a switch overlapped is made
    /// again.
    pub fn read(&mut self, port: u16) -> Result<PortInMaps> {
        let idx = port_index(IPPROTO_TCP, port.to_be()).context("TCP has a port index")? as usize;
        for _ in 0..5 {
            let entry = self.ports.get(idx).context("port index beyond the map")?;
            let svc = match entry {
                0 => None,
                e => Some(self.services.get(&(e - 1), 0)?),
            };
            let mut table_ids = BTreeSet::new();
            if let Some(s) = &svc {
                for i in s.table_off..s.table_off + s.table_size {
                    table_ids.insert(
                        self.maglev
                            .get(i as usize)
                            .context("a Maglev table beyond the map")?,
                    );
                }
            }
            let slots = self.backend_slots()?;
            let local: BTreeMap<u32, Ipv4Addr> = self
                .locals
                .iter()
                .filter_map(|r| r.ok())
                .map(|(k, slot)| (slot, Ipv4Addr::from(k.addr.to_ne_bytes())))
                .collect();
            let again = self.ports.get(idx) == Some(entry)
                && match (entry, &svc) {
                    (0, _) => true,
                    (e, Some(s)) => self.services.get(&(e - 1), 0)? == *s,
                    _ => false,
                };
            if !again {
                continue;
            }
            let mut out = PortInMaps::default();
            let identity = |slot: u32, b: &Backend| -> Option<Ipv4Addr> {
                if b.flags & BE_F_LOCAL != 0 {
                    local.get(&slot).copied()
                } else if b.flags & BE_F_REMOTE != 0 {
                    Some(Ipv4Addr::from(b.addr[0].to_ne_bytes()))
                } else {
                    None
                }
            };
            for (slot, b) in &slots {
                match identity(*slot, b) {
                    Some(a) => {
                        out.backends.insert(a);
                    }
                    None => out.dangling += 1,
                }
            }
            for id in table_ids {
                match slots.get(&id).and_then(|b| identity(id, b)) {
                    Some(a) => {
                        out.table.insert(a);
                    }
                    None => out.dangling += 1,
                }
            }
            return Ok(out);
        }
        bail!("port {port}'s service kept changing while it was read")
    }

    /// Backend slots in use (`flags != 0`) among the first `scan`.
    fn backend_slots(&self) -> Result<BTreeMap<u32, Backend>> {
        let mut keys = vec![0u32; self.scan];
        let mut values = vec![Backend::default(); self.scan];
        let n = lookup_batch(self.backends.fd().as_fd(), &mut keys, &mut values)? as usize;
        let used: BTreeMap<u32, Backend> = keys[..n]
            .iter()
            .zip(&values[..n])
            .filter(|(_, b)| b.flags != 0)
            .map(|(k, b)| (*k, *b))
            .collect();
        if n == self.scan && used.contains_key(&(self.scan as u32 - 1)) {
            bail!(
                "backend slot {} is in use: more than the {} slots read may be",
                self.scan - 1,
                self.scan
            );
        }
        Ok(used)
    }
}
