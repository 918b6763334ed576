//! Loads the BPF object, attaches its programs, and keeps its maps equal to
//! a [`Desired`] state.
//!
//! The order of the writes comes from [`crate::plan`]; this module carries
//! them out. The tables, the published ports and the node addresses are
//! memory-mapped arrays: a table is copied into a region no packet reads,
//! and a port or an address changes with one atomic 32-bit store.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, PerCpuArray, PerCpuValues};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use mesh_common::abi::*;
use tracing::{debug, info, warn};

use crate::desired::Desired;
use crate::plan::{Limits, Op, Planner, Report};
use crate::state::Proto;

/// The compiled BPF object.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_BPF_OBJ"));
/// The benchmark's floor programs (their own object; meshd never loads it).
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_FLOOR_OBJ"));

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// Native (driver) mode, falling back to generic where the driver has none.
    Auto,
    /// Native (driver) mode only; fail where the driver has none.
    Native,
    /// Generic (skb) mode: any device, at the cost of an skb per packet.
    Generic,
}

pub struct Dataplane {
    bpf: Ebpf,
    maglev: MmapU32,
    ports: MmapU32,
    addrs: MmapU32,
    planner: Planner,
    /// Interfaces with the reply program, and their ifindex then.
    tc_ifaces: BTreeMap<String, u32>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// A BPF_F_MMAPABLE array of `u32`, mapped into our memory.
struct MmapU32 {
    ptr: *mut u32,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by the Dataplane and only touched through &mut.
unsafe impl Send for MmapU32 {}

impl Drop for MmapU32 {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.bytes) };
    }
}

impl Dataplane {
    /// Loads the object and its programs (the verifier runs here) with the
    /// given map sizes. Nothing is attached yet. `bpf_log_level` is the
    /// most verbose aya-log level the programs emit (0 = off, 3 = info,
    /// 4 = debug).
    pub fn load(limits: Limits, bpf_log_level: u8) -> Result<Self> {
        if BPF_OBJECT.is_empty() {
            bail!(
                "this meshd has no BPF programs: it was built with MESH_BPF_SKIP=1 (for editors \
                 and linters only); rebuild without MESH_BPF_SKIP"
            );
        }
        limits.validate()?;
        raise_memlock();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_SERVICES, 2 * limits.max_services)
            .map_max_entries(MAP_SVC_STATS, limits.max_services)
            .map_max_entries(MAP_BACKENDS, limits.max_backends)
            .map_max_entries(MAP_MAGLEV, limits.maglev_entries().div_ceil(2))
            .map_max_entries(MAP_CT4, limits.ct_entries)
            .map_max_entries(MAP_REPLY4, limits.max_backends)
            .override_global("AYA_LOG_LEVEL", &bpf_log_level, false);
        let mut bpf = loader.load(BPF_OBJECT).context("loading the BPF object")?;
        let logger = match aya_log::EbpfLogger::init(&mut bpf) {
            Ok(l) => Some(l),
            Err(e) => {
                debug!("no aya-log map in the object: {e}");
                None
            }
        };
        let xdp: &mut Xdp = bpf
            .program_mut(PROG_XDP)
            .with_context(|| format!("program {PROG_XDP} missing"))?
            .try_into()?;
        xdp.load()
            .with_context(|| format!("the verifier refused {PROG_XDP}"))?;
        for name in [PROG_TC_UPLINK, PROG_TC_TASK] {
            let p: &mut SchedClassifier = bpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            p.load()
                .with_context(|| format!("the verifier refused {name}"))?;
        }
        let maglev = MmapU32::new(&bpf, MAP_MAGLEV, limits.maglev_entries() as usize)?;
        let ports = MmapU32::new(&bpf, MAP_PORTS, PORT_INDEX_ENTRIES as usize)?;
        let addrs = MmapU32::new(&bpf, MAP_NODE_ADDR4, MAX_NODE_ADDRS as usize)?;
        Ok(Self {
            bpf,
            maglev,
            ports,
            addrs,
            planner: Planner::new(limits),
            tc_ifaces: BTreeMap::new(),
            logger,
        })
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.bpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.bpf
    }

    pub fn limits(&self) -> &Limits {
        self.planner.limits()
    }

    /// Drains the programs' aya-log records into `log`/tracing.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    pub fn log_fd(&self) -> Option<std::os::fd::RawFd> {
        self.logger.as_ref().map(|l| l.as_raw_fd())
    }

    /// Attaches XDP and the delivery TC program to the uplink.
    pub fn attach_uplink(&mut self, iface: &str, mode: XdpAttach) -> Result<()> {
        let prog: &mut Xdp = self.bpf.program_mut(PROG_XDP).unwrap().try_into()?;
        match mode {
            XdpAttach::Native => {
                prog.attach(iface, XdpMode::Driver)
                    .with_context(|| format!("attaching XDP (native) to {iface}"))?;
            }
            XdpAttach::Generic => {
                prog.attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
            }
            XdpAttach::Auto => {
                if let Err(e) = prog.attach(iface, XdpMode::Driver) {
                    warn!(%iface, "native XDP unavailable ({e}); using generic XDP");
                    prog.attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP to {iface}"))?;
                }
            }
        }
        let tc: &mut SchedClassifier = self.bpf.program_mut(PROG_TC_UPLINK).unwrap().try_into()?;
        tc.attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching TC ingress to {iface}"))?;
        info!(%iface, "attached XDP and TC to the uplink");
        Ok(())
    }

    /// Attaches the reply program to every interface in `ifaces` (name and
    /// ifindex) that does not have it yet, or got a new ifindex since.
    /// Failures are logged, not fatal: one broken port must not stop the
    /// others from being served.
    pub fn attach_task_ifaces(&mut self, ifaces: &BTreeMap<String, u32>) {
        for (iface, ifindex) in ifaces {
            if self.tc_ifaces.get(iface) == Some(ifindex) {
                continue;
            }
            if let Err(e) = crate::net::check_forwarding(iface) {
                warn!("{e:#}: replies from tasks behind it will be dropped");
            }
            let r = self
                .bpf
                .program_mut(PROG_TC_TASK)
                .context("program missing")
                .and_then(|p| {
                    let tc: &mut SchedClassifier = p.try_into()?;
                    tc.attach(iface, TcAttachType::Ingress)
                        .with_context(|| format!("attaching TC ingress (replies) to {iface}"))?;
                    Ok(())
                });
            match r {
                Ok(()) => {
                    info!(%iface, "attached the reply program");
                    self.tc_ifaces.insert(iface.clone(), *ifindex);
                }
                Err(e) => warn!("{e:#}"),
            }
        }
    }

    /// Makes the maps hold `d`. A state that does not fit is refused
    /// before anything is written. If the kernel fails a write midway, the
    /// applied state stays what it was, so the next apply redoes the rest.
    pub fn apply(&mut self, d: &Desired) -> Result<Report> {
        let mut next = self.planner.clone();
        let (ops, report) = next.plan(d)?;
        for op in &ops {
            self.exec(op).with_context(|| format!("applying {op:?}"))?;
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
            self.exec(op).with_context(|| format!("applying {op:?}"))?;
        }
        Ok(ops.len())
    }

    fn exec(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::PutBackend(id, be) => {
                Array::<_, Backend>::try_from(map(&mut self.bpf, MAP_BACKENDS)?)?.set(*id, be, 0)?
            }
            Op::DelBackend(id) => Array::<_, Backend>::try_from(map(&mut self.bpf, MAP_BACKENDS)?)?
                .set(*id, Backend::default(), 0)?,
            Op::WriteTable { offset, table } => self.maglev.write(*offset as usize, table)?,
            Op::ResetStats(id) => {
                let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
                PerCpuArray::<_, SvcStats>::try_from(map(&mut self.bpf, MAP_SVC_STATS)?)?.set(
                    *id,
                    PerCpuValues::try_from(vec![SvcStats::default(); n])?,
                    0,
                )?
            }
            Op::PutService { key, slot, value } => {
                Array::<_, SvcValue>::try_from(map(&mut self.bpf, MAP_SERVICES)?)?
                    .set(*slot, value, 0)?;
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
            Op::PutReply(k, v) => {
                BpfHashMap::<_, ReplyKey4, ReplyValue4>::try_from(map(&mut self.bpf, MAP_REPLY4)?)?
                    .insert(k, v, 0)?
            }
            Op::DelReply(k) => ignore_missing(
                BpfHashMap::<_, ReplyKey4, ReplyValue4>::try_from(map(&mut self.bpf, MAP_REPLY4)?)?
                    .remove(k),
            )?,
            Op::PutNode(slot, n) => {
                Array::<_, NodeValue>::try_from(map(&mut self.bpf, MAP_NODES)?)?.set(*slot, n, 0)?
            }
            Op::DelNode(slot) => Array::<_, NodeValue>::try_from(map(&mut self.bpf, MAP_NODES)?)?
                .set(*slot, NodeValue::default(), 0)?,
        }
        Ok(())
    }

    /// Per service (name, protocol, published port) counters, summed over CPUs.
    pub fn service_stats(&self) -> Result<Vec<(String, Proto, u16, SvcStats)>> {
        let stats: PerCpuArray<_, SvcStats> =
            PerCpuArray::try_from(self.bpf.map(MAP_SVC_STATS).unwrap())?;
        let mut out = Vec::new();
        for ((proto, port), slot) in &self.planner.services {
            let per_cpu = stats.get(&slot.svc_id, 0)?;
            let mut sum = SvcStats::default();
            for s in per_cpu.iter() {
                sum.packets += s.packets;
                sum.bytes += s.bytes;
                sum.new_flows += s.new_flows;
            }
            out.push((slot.name.clone(), *proto, *port, sum));
        }
        Ok(out)
    }

    /// Drop counters by reason, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>> {
        let drops: PerCpuArray<_, u64> = PerCpuArray::try_from(self.bpf.map(MAP_DROPS).unwrap())?;
        let mut out = Vec::new();
        for r in DropReason::ALL {
            let v = drops.get(&(r as u32), 0)?;
            out.push((r, v.iter().sum()));
        }
        Ok(out)
    }
}

impl MmapU32 {
    fn new(bpf: &Ebpf, name: &str, len: usize) -> Result<Self> {
        let Some(Map::Array(data)) = bpf.map(name) else {
            bail!("map {name} missing or not an array")
        };
        let bytes = (len * 4).next_multiple_of(4096);
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array of at least `len` u32.
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
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The first place holding `v`.
    fn find(&self, v: u32) -> Option<usize> {
        // SAFETY: in bounds; aligned 32-bit reads of shared memory.
        (0..self.len).find(|&i| unsafe { (*(self.ptr.add(i) as *const std::sync::atomic::AtomicU32)).load(std::sync::atomic::Ordering::SeqCst) } == v)
    }

    /// One atomic 32-bit store, after everything written before it.
    fn store(&mut self, i: usize, v: u32) -> Result<()> {
        if i >= self.len {
            bail!("index {i} outside the map ({})", self.len);
        }
        // SAFETY: in bounds and 4-byte aligned (page-aligned base).
        let a = unsafe { &*(self.ptr.add(i) as *const std::sync::atomic::AtomicU32) };
        a.store(v, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<()> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        r => Ok(r?),
    }
}

fn map<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    bpf.map_mut(name)
        .with_context(|| format!("map {name} missing"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
