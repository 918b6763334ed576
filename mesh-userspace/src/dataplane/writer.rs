//! Carries out the planner's [`Op`]s on the kernel's maps. The tables, the
//! published ports and the node addresses are memory-mapped arrays: a
//! table is copied into a region no packet reads, and a port or an address
//! changes with one atomic 32-bit store.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU32, Ordering, fence};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use mesh_common::abi::*;

use super::stats::ServiceIndex;
use crate::desired::Desired;
use crate::plan::{Limits, Op, Planner, Report, Snapshot};

/// Carries out ops on some maps: the kernel's ([`MapWriter`]), or a test's.
pub trait Writer {
    fn exec(&mut self, op: &Op) -> Result<()>;
}

/// The maps user space writes, taken out of the loaded object.
pub struct MapWriter {
    backends: Array<MapData, Backend>,
    services: Array<MapData, SvcValue>,
    nodes: Array<MapData, NodeValue>,
    stats: PerCpuArray<MapData, SvcStats>,
    replies: BpfHashMap<MapData, ReplyKey4, ReplyValue4>,
    node_index: BpfHashMap<MapData, u32, u32>,
    locals: BpfHashMap<MapData, ReplyKey4, u32>,
    config: Array<MapData, NodeConfig>,
    local_devs: Array<MapData, LocalDev>,
    meta: Array<MapData, PinMeta>,
    names: BpfHashMap<MapData, SvcKey, SvcName>,
    src: LpmTrie<MapData, [u32; 2], u32>,
    aff_timeout: Array<MapData, u32>,
    maglev: MmapU32,
    ports: MmapU32,
    addrs: MmapU32,
    /// FNV-1a of the loaded object, kept in `meta`.
    object_hash: u64,
}

impl MapWriter {
    /// The node map, as written (for tests and tools).
    pub fn nodes(&self) -> &Array<MapData, NodeValue> {
        &self.nodes
    }

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
            node_index: take(ebpf, MAP_NODE_BY_ADDR4)?.try_into()?,
            locals: take(ebpf, MAP_LOCAL4)?.try_into()?,
            config: take(ebpf, MAP_CONFIG)?.try_into()?,
            local_devs: take(ebpf, MAP_LOCAL_DEV)?.try_into()?,
            meta: take(ebpf, MAP_META)?.try_into()?,
            names: take(ebpf, MAP_SVC_NAMES)?.try_into()?,
            src: take(ebpf, MAP_SRC4)?.try_into()?,
            aff_timeout: take(ebpf, MAP_AFF_TIMEOUT)?.try_into()?,
            maglev,
            ports,
            addrs,
            object_hash: super::load::object_hash(),
        })
    }

    /// What the maps hold, entry by entry (what a restarted meshd adopts).
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut s = Snapshot::default();
        for i in 0..PORT_INDEX_ENTRIES as usize {
            let v = self.ports.cell(i).load(Ordering::SeqCst);
            if v != 0 {
                let (proto, port) = if i < 65536 {
                    (IPPROTO_TCP, i as u16)
                } else {
                    (IPPROTO_UDP, (i - 65536) as u16)
                };
                s.ports.push((SvcKey::new(port, proto), v - 1));
            }
        }
        for slot in 0..self.services.len() {
            let v = self.services.get(&slot, 0)?;
            if v != SvcValue::default() {
                s.services.insert(slot, v);
            }
        }
        for id in 0..self.backends.len() {
            let b = self.backends.get(&id, 0)?;
            if b.flags != 0 {
                s.backends.insert(id, b);
            }
        }
        for slot in 0..self.nodes.len() {
            let n = self.nodes.get(&slot, 0)?;
            if n.gen_ != 0 {
                s.nodes.insert(slot, n);
            }
        }
        for r in self.node_index.iter() {
            let (a, slot) = r?;
            s.node_index.insert(a, slot);
        }
        for r in self.locals.iter() {
            let (k, slot) = r?;
            s.locals.insert(k, slot);
        }
        for id in 0..self.local_devs.len() {
            let d = self.local_devs.get(&id, 0)?;
            if d != LocalDev::default() {
                s.local_devs.insert(id, d);
            }
        }
        for r in self.replies.iter() {
            let (k, v) = r?;
            s.replies.insert(k, v);
        }
        for r in self.names.iter() {
            let (k, v) = r?;
            s.names.insert(k, v);
        }
        s.node_addrs = (0..MAX_NODE_ADDRS as usize)
            .map(|i| self.addrs.cell(i).load(Ordering::SeqCst))
            .filter(|a| *a != 0)
            .collect();
        for k in self.src.keys() {
            let k = k?;
            let [svc_id, addr] = k.data();
            s.src.insert((
                svc_id,
                crate::model::Cidr4 {
                    addr: std::net::Ipv4Addr::from(addr.to_ne_bytes()),
                    len: k.prefix_len().saturating_sub(32).min(32) as u8,
                },
            ));
        }
        s.config = self.config.get(&0, 0)?;
        s.meta = self.meta.get(&0, 0)?;
        Ok(s)
    }

    /// Records the loaded object in the maps' metadata (a restarted meshd
    /// logs whether it runs the same programs).
    pub fn record_object(&mut self) -> Result<()> {
        let mut m = self.meta.get(&0, 0)?;
        m.object_hash = self.object_hash;
        self.meta.set(0, m, 0)?;
        Ok(())
    }
}

impl Writer for MapWriter {
    /// One op. Each is a single map update or a copy into memory no packet
    /// reads, followed by at most one 32-bit store that packets see.
    fn exec(&mut self, op: &Op) -> Result<()> {
        #[cfg(debug_assertions)]
        failpoint::check()?;
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
            Op::DelReply(k) => ignore_missing(self.replies.remove(k))?,
            Op::PutConfig(c) => self.config.set(0, c, 0)?,
            Op::PutNodeIndex(a, slot) => self.node_index.insert(a, slot, 0)?,
            Op::DelNodeIndex(a) => ignore_missing(self.node_index.remove(a))?,
            Op::PutLocal(k, slot) => self.locals.insert(k, slot, 0)?,
            Op::DelLocal(k) => ignore_missing(self.locals.remove(k))?,
            Op::PutLocalDev(id, d) => self.local_devs.set(*id, d, 0)?,
            Op::DelLocalDev(id) => self.local_devs.set(*id, LocalDev::default(), 0)?,
            Op::PutGens(svc, backend, node) => self.meta.set(
                0,
                PinMeta {
                    magic: PIN_META_MAGIC,
                    svc_gen: *svc,
                    backend_gen: *backend,
                    node_gen: *node,
                    object_hash: self.object_hash,
                },
                0,
            )?,
            Op::PutName(k, n) => self.names.insert(k, n, 0)?,
            Op::DelName(k) => ignore_missing(self.names.remove(k))?,
            Op::PutSrc(id, c) => self.src.insert(&src_key(*id, c), 1, 0)?,
            Op::DelSrc(id, c) => ignore_missing(self.src.remove(&src_key(*id, c)))?,
            Op::PutAffTimeout(id, units) => self.aff_timeout.set(*id, units, 0)?,
        }
        Ok(())
    }
}

/// Why an apply did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The state does not fit (or is not for this node): nothing was
    /// written. Refused until the state changes.
    #[error("{0:#}")]
    Refused(anyhow::Error),
    /// The kernel failed a write: what was written before it stays, and
    /// the planner knows it. Worth retrying.
    #[error("{0:#}")]
    Kernel(anyhow::Error),
}

/// The planner and the writer: what has been applied, and the maps it was
/// applied to.
pub struct Applier<W: Writer = MapWriter> {
    planner: Planner,
    writer: W,
}

impl<W: Writer> Applier<W> {
    pub fn new(limits: Limits, writer: W) -> Self {
        Self {
            planner: Planner::new(limits),
            writer,
        }
    }

    /// Plans from `planner` from now on (one that adopted the maps
    /// `writer` writes, after a restart).
    pub fn with_planner(planner: Planner, writer: W) -> Self {
        Self { planner, writer }
    }

    pub fn into_writer(self) -> W {
        self.writer
    }

    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.writer
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    pub fn writer(&self) -> &W {
        &self.writer
    }

    /// Makes the maps hold `d`. A state that does not fit is refused
    /// before anything is written. If the kernel fails a write midway, the
    /// planner learns which writes were made ([`Planner::absorb`]): the
    /// next apply (a retry, or a newer state) starts from what the kernel
    /// holds and writes the rest.
    pub fn apply(&mut self, d: &Desired) -> Result<Report, ApplyError> {
        let mut next = self.planner.clone();
        let (ops, report) = next.plan(d).map_err(ApplyError::Refused)?;
        for (i, op) in ops.iter().enumerate() {
            if let Err(e) = self.writer.exec(op) {
                self.planner.absorb(&next, &ops[..i]);
                return Err(ApplyError::Kernel(e.context(format!(
                    "applying {op:?} ({i} of {} writes made)",
                    ops.len()
                ))));
            }
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

/// Test builds only (debug assertions on, as `cargo build` makes them):
/// `MESH_TEST_FAIL_WRITE=N` makes map write number N of the process
/// (counted from one) fail once, so that the end-to-end tests can see a
/// kernel failure retried. Release builds have no such switch.
#[cfg(debug_assertions)]
mod failpoint {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static WRITES: AtomicU64 = AtomicU64::new(0);
    static FAIL_AT: OnceLock<Option<u64>> = OnceLock::new();

    pub fn check() -> anyhow::Result<()> {
        let at = FAIL_AT.get_or_init(|| {
            std::env::var("MESH_TEST_FAIL_WRITE")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        let n = WRITES.fetch_add(1, Ordering::Relaxed) + 1;
        if *at == Some(n) {
            anyhow::bail!("injected failure of map write {n} (MESH_TEST_FAIL_WRITE)");
        }
        Ok(())
    }
}

/// The key of range `c` of service `id` in `MAP_SRC4`.
fn src_key(id: u32, c: &crate::model::Cidr4) -> Key<[u32; 2]> {
    Key::new(32 + c.len as u32, [id, crate::plan::raw4(c.addr)])
}

/// A delete of what is gone already is done.
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<()> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        r => Ok(r?),
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{Proto, StateBuilder};

    /// Maps as the kernel holds them, checked on every write against what
    /// a packet could see at that moment; fails the `fail_at`-th write.
    #[derive(Default)]
    struct Checked {
        ports: HashMap<SvcKey, u32>,
        services: HashMap<u32, SvcValue>,
        /// Tables by their offset in the Maglev map.
        maglev: HashMap<u32, Vec<u32>>,
        backends: HashMap<u32, Backend>,
        writes: usize,
        fail_at: Option<usize>,
    }

    impl Checked {
        /// Table regions packets read now, (offset, size): those of the
        /// services ports point to, when they have a table.
        fn live_regions(&self) -> BTreeSet<(u32, u32)> {
            self.ports
                .values()
                .map(|s| &self.services[s])
                .filter(|v| v.table_size > 0)
                .map(|v| (v.table_off, v.table_size))
                .collect()
        }

        fn live_ids(&self) -> BTreeSet<u32> {
            self.live_regions()
                .iter()
                .flat_map(|(off, _)| self.maglev.get(off).cloned().unwrap_or_default())
                .collect()
        }
    }

    impl Writer for Checked {
        fn exec(&mut self, op: &Op) -> Result<()> {
            self.writes += 1;
            if self.fail_at == Some(self.writes) {
                anyhow::bail!("injected");
            }
            match op {
                Op::WriteTable { offset, table } => {
                    let end = offset + table.len() as u32;
                    for (off, size) in self.live_regions() {
                        if *offset < off + size && off < end {
                            assert!(
                                off == *offset && self.maglev.get(&off) == Some(table),
                                "a table packets read was overwritten"
                            );
                        }
                    }
                    // A table written over others' (freed) regions ends them.
                    self.maglev
                        .retain(|off, t| *off + t.len() as u32 <= *offset || *off >= end);
                    self.maglev.insert(*offset, table.clone());
                }
                Op::PutService { key, slot, value } => {
                    if value.table_size > 0 {
                        let t = &self.maglev[&value.table_off];
                        assert_eq!(t.len() as u32, value.table_size, "a table of another size");
                        assert!(
                            t.iter().all(|id| self.backends.contains_key(id)),
                            "switched to a table naming a missing backend"
                        );
                    }
                    self.services.insert(*slot, *value);
                    self.ports.insert(*key, *slot);
                }
                Op::DelService(k) => {
                    self.ports.remove(k);
                }
                Op::PutBackend(id, b) => {
                    if self.live_ids().contains(id) {
                        assert_eq!(
                            self.backends.get(id),
                            Some(b),
                            "a backend a live table names was replaced"
                        );
                    }
                    self.backends.insert(*id, *b);
                }
                Op::DelBackend(id) => {
                    assert!(
                        !self.live_ids().contains(id),
                        "a backend a live table names was deleted"
                    );
                    self.backends.remove(id);
                }
                _ => {}
            }
            Ok(())
        }
    }

    use crate::test_rng::Rng;

    fn random_state(rng: &mut Rng) -> Desired {
        let mut b = StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .node("n2", [198, 18, 128, 2]);
        let services = [("a", 30080), ("b", 30081), ("c", 30082)];
        for (name, port) in services {
            if !rng.next().is_multiple_of(4) {
                b = b.service(name, &[(Proto::Tcp, port, 8080), (Proto::Udp, port, 53)]);
                for t in 0..6u8 {
                    if rng.next().is_multiple_of(2) {
                        let node = if t % 2 == 0 { "n1" } else { "n2" };
                        let addr = Ipv4Addr::new(198, 18, 129, 10 * (port as u8 % 10) + t);
                        b = b.task(name, node, addr);
                    }
                }
            }
        }
        Desired::compute(&b.build().unwrap(), "n1", &[]).unwrap()
    }

    /// What packets would reach per published port: the live table's
    /// backends as (address, port).
    fn served(c: &Checked) -> BTreeSet<((u16, u8), Ipv4Addr, u16)> {
        let mut out = BTreeSet::new();
        for (k, slot) in &c.ports {
            if c.services[slot].table_size == 0 {
                continue;
            }
            for id in c
                .maglev
                .get(&c.services[slot].table_off)
                .cloned()
                .unwrap_or_default()
            {
                let b = c.backends[&id];
                out.insert((
                    (k.port_be, k.proto),
                    Ipv4Addr::from(b.addr[0].to_ne_bytes()),
                    u16::from_be(b.port_be),
                ));
            }
        }
        out
    }

    fn wanted(d: &Desired) -> BTreeSet<((u16, u8), Ipv4Addr, u16)> {
        d.services
            .iter()
            .flat_map(|((p, port), s)| {
                s.backends
                    .iter()
                    .map(move |b| ((port.to_be(), p.number()), b.addr, b.port))
            })
            .collect()
    }

    /// Writes fail at random points of random changes; whatever failed,
    /// no write ever changes what packets read in place, and the next
    /// apply brings the maps to the state asked for.
    #[test]
    fn failed_writes_are_absorbed_and_never_touch_what_packets_read() {
        let limits = Limits {
            maglev_size: 7,
            max_backends: 64,
            ..Limits::default()
        };
        for seed in 1..=300u64 {
            let mut rng = Rng::seeded(seed);
            let mut a = Applier::new(limits.clone(), Checked::default());
            let mut last = None;
            for _ in 0..12 {
                let d = random_state(&mut rng);
                let at = a.writer.writes + 1 + (rng.next() % 12) as usize;
                a.writer.fail_at = rng.next().is_multiple_of(2).then_some(at);
                match a.apply(&d) {
                    Ok(_) => assert_eq!(served(&a.writer), wanted(&d), "seed {seed}"),
                    Err(ApplyError::Kernel(_)) => {}
                    Err(ApplyError::Refused(e)) => panic!("seed {seed}: refused: {e:#}"),
                }
                last = Some(d);
            }
            // A last apply with nothing failing: the maps converge.
            a.writer.fail_at = None;
            let d = last.unwrap();
            a.apply(&d).unwrap();
            assert_eq!(served(&a.writer), wanted(&d), "seed {seed}");
            // And the planner agrees with them: nothing more to write.
            let mut p = a.planner().clone();
            assert_eq!(p.plan(&d).unwrap().0, vec![], "seed {seed}");
        }
    }
}
