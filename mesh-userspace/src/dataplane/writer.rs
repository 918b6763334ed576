//! Carries out the planner's [`Op`]s on the kernel's maps. The tables, the
//! published ports and the node addresses are memory-mapped arrays: a
//! table is copied into a region no packet reads, and a port or an address
//! changes with one atomic 32-bit store.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU32, Ordering, fence};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use mesh_common::abi::*;

use super::stats::ServiceIndex;
use crate::desired::Desired;
use crate::plan::{Limits, Op, Planner, Report};

/// The maps user space writes, taken out of the loaded object.
pub struct MapWriter {
    backends: Array<MapData, Backend>,
    services: Array<MapData, SvcValue>,
    nodes: Array<MapData, NodeValue>,
    stats: PerCpuArray<MapData, SvcStats>,
    replies: BpfHashMap<MapData, ReplyKey4, ReplyValue4>,
    maglev: MmapU32,
    ports: MmapU32,
    addrs: MmapU32,
}

impl MapWriter {
    /// Takes the maps it writes out of `ebpf` (the programs keep them).
    pub fn new(ebpf: &mut Ebpf, limits: &Limits) -> Result<Self> {
        let maglev = MmapU32::new(ebpf, MAP_MAGLEV, limits.maglev_entries() as usize)?;
        let ports = MmapU32::new(ebpf, MAP_PORTS, PORT_INDEX_ENTRIES as usize)?;
        let addrs = MmapU32::new(ebpf, MAP_NODE_ADDR4, MAX_NODE_ADDRS as usize)?;
        Ok(Self {
            backends: take(ebpf, MAP_BACKENDS)?.try_into()?,
            services: take(ebpf, MAP_SERVICES)?.try_into()?,
            nodes: take(ebpf, MAP_NODES)?.try_into()?,
            stats: take(ebpf, MAP_SVC_STATS)?.try_into()?,
            replies: take(ebpf, MAP_REPLY4)?.try_into()?,
            maglev,
            ports,
            addrs,
        })
    }

    /// One op. Each is a single map update or a copy into memory no packet
    /// reads, followed by at most one 32-bit store that packets see.
    pub fn exec(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::PutNode(id, n) => self.nodes.set(*id, n, 0)?,
            Op::DelNode(id) => self.nodes.set(*id, NodeValue::default(), 0)?,
            Op::PutBackend(id, be) => self.backends.set(*id, be, 0)?,
            Op::DelBackend(id) => self.backends.set(*id, Backend::default(), 0)?,
            Op::WriteTable { offset, table } => self.maglev.write(*offset as usize, table)?,
            Op::ResetStats(id) => {
                let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
                self.stats.set(
                    *id,
                    PerCpuValues::try_from(vec![SvcStats::default(); n])?,
                    0,
                )?
            }
            Op::PutService { key, slot, value } => {
                self.services.set(*slot, value, 0)?;
                let i =
                    port_index(key.proto, key.port_be).context("service of another protocol")?;
                self.ports.store(i as usize, slot + 1)?;
            }
            Op::DelService(k) => {
                let i = port_index(k.proto, k.port_be).context("service of another protocol")?;
                self.ports.store(i as usize, 0)?;
            }
            Op::PutNodeAddr(a) => {
                if self.addrs.find(*a).is_none() {
                    let free = self
                        .addrs
                        .find(0)
                        .context("no free place for a node address")?;
                    self.addrs.store(free, *a)?;
                }
            }
            Op::DelNodeAddr(a) => {
                if let Some(i) = self.addrs.find(*a) {
                    self.addrs.store(i, 0)?;
                }
            }
            Op::PutReply(k, v) => self.replies.insert(k, v, 0)?,
            Op::DelReply(k) => match self.replies.remove(k) {
                Err(aya::maps::MapError::KeyNotFound) => {}
                r => r?,
            },
        }
        Ok(())
    }
}

/// The planner and the writer: what has been applied, and the maps it was
/// applied to.
pub struct Applier {
    planner: Planner,
    writer: MapWriter,
}

impl Applier {
    pub fn new(limits: Limits, writer: MapWriter) -> Self {
        Self {
            planner: Planner::new(limits),
            writer,
        }
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Makes the maps hold `d`. A state that does not fit is refused
    /// before anything is written. If the kernel fails a write midway, the
    /// applied state stays what it was, so the next apply redoes the rest.
    pub fn apply(&mut self, d: &Desired) -> Result<Report> {
        let mut next = self.planner.clone();
        let (ops, report) = next.plan(d)?;
        for op in &ops {
            self.writer
                .exec(op)
                .with_context(|| format!("applying {op:?}"))?;
        }
        self.planner = next;
        Ok(report)
    }

    /// Deletes reply entries whose grace period ended (call periodically;
    /// does nothing, and copies nothing, while none has).
    pub fn expire(&mut self) -> Result<usize> {
        let ops = self.planner.expire(std::time::Instant::now());
        for op in &ops {
            // A failed delete leaves an entry nothing refers to: harmless,
            // and rewritten if its task address comes back.
            self.writer
                .exec(op)
                .with_context(|| format!("applying {op:?}"))?;
        }
        Ok(ops.len())
    }

    /// The applied services, for the counters' labels.
    pub fn service_index(&self) -> ServiceIndex {
        ServiceIndex(
            self.planner
                .services
                .iter()
                .map(|((proto, port), s)| (s.name.clone(), *proto, *port, s.svc_id))
                .collect(),
        )
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the object"))
}

/// A BPF_F_MMAPABLE array of `u32`, mapped into our memory.
struct MmapU32 {
    ptr: *mut u32,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by its writer and only touched through &mut.
unsafe impl Send for MmapU32 {}

impl Drop for MmapU32 {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.bytes) };
    }
}

impl MmapU32 {
    fn new(ebpf: &Ebpf, name: &str, len: usize) -> Result<Self> {
        let Some(Map::Array(data)) = ebpf.map(name) else {
            bail!("map {name} missing or not an array")
        };
        let bytes = (len * 4).next_multiple_of(4096);
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array of at least `len` u32.
        // The mapping holds its own reference to the map.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap of {name} failed: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: p as *mut u32,
            len,
            bytes,
        })
    }

    fn cell(&self, i: usize) -> &AtomicU32 {
        // SAFETY: callers check `i < len`; the base is page-aligned, so
        // every element is 4-byte aligned.
        unsafe { &*(self.ptr.add(i) as *const AtomicU32) }
    }

    /// Copies `table` to `off`, for a region no packet reads yet.
    fn write(&mut self, off: usize, table: &[u32]) -> Result<()> {
        if off + table.len() > self.len {
            bail!(
                "region {off}+{} outside the map ({})",
                table.len(),
                self.len
            );
        }
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::copy_nonoverlapping(table.as_ptr(), self.ptr.add(off), table.len()) };
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// The first place holding `v`.
    fn find(&self, v: u32) -> Option<usize> {
        (0..self.len).find(|&i| self.cell(i).load(Ordering::SeqCst) == v)
    }

    /// One atomic 32-bit store, after everything written before it.
    fn store(&mut self, i: usize, v: u32) -> Result<()> {
        if i >= self.len {
            bail!("index {i} outside the map ({})", self.len);
        }
        self.cell(i).store(v, Ordering::SeqCst);
        Ok(())
    }
}
