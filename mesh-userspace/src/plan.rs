//! Turns a [`Desired`] state into the ordered map writes that reach it from
//! what was applied before. Pure: the same plan fills the kernel's maps
//! ([`crate::dataplane`]) and the host simulation ([`crate::sim`]), and its
//! ordering is unit-tested here.
//!
//! Order (make-before-break; a packet never sees a half-written table),
//! one method of [`Planner`] each:
//! 1. [`Planner::put_nodes`]: new and changed nodes (backends name them);
//! 2. [`Planner::add_backends`]: new backends, in free slots with a new
//!    generation (nothing refers to them yet);
//!    Then [`Planner::mark_backends`]: backends that stop or start taking
//!    new flows get `BE_F_NO_NEW` set or cleared, before any table
//!    without them is switched to (affinity entries that name them are
//!    not followed from then on);
//! 3. [`Planner::put_replies`]: reply entries of local backends (before any
//!    table can send them a flow);
//! 4. [`Planner::put_services`]: per changed service, its entry and Maglev
//!    table into the one of its two slots no packet reads, then the port
//!    switched to that slot. Each table is sized from the service's
//!    backends (a prime of 100 entries per backend, at most
//!    `--maglev-size`) and each half has a region of the Maglev map of that
//!    size (`regions`);
//! 5. [`Planner::del_services`]: removed services;
//! 6. [`Planner::del_backends`]: backends nothing refers to (their slots
//!    are reused by a later plan, never this one);
//! 7. [`Planner::del_nodes`]: nodes no backend names any more;
//! 8. [`Planner::put_node_addrs`]: this node's addresses (added before
//!    removed);
//! 9. reply entries of removed backends are retired, and deleted
//!    [`REPLY_GRACE`] later ([`Planner::expire`]), so replies already on
//!    their way (or a removed task still answering an open flow) are
//!    still translated.
//!
//! A state that does not fit the maps is refused before any op
//! ([`Planner::check_fits`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mesh_common::abi::*;
use mesh_common::maglev;

use crate::desired::{BackendKey, Desired, DesiredService};
use crate::model::{Cidr4, Proto, ReplyMode};

mod regions;
pub use regions::{Region, table_size};

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Fill node slot `.0`.
    PutNode(u32, NodeValue),
    /// Free node slot `.0` (all zero).
    DelNode(u32),
    /// Fill backend slot `.0`.
    PutBackend(u32, Backend),
    /// Write `table` into the Maglev map at `offset`.
    WriteTable {
        offset: u32,
        table: Vec<u32>,
    },
    /// Zero a (new or reused) service's counters.
    ResetStats(u32),
    /// Write a service into its slot (`svc_id * 2 + half`, one no packet
    /// reads), then switch the port to that slot.
    PutService {
        key: SvcKey,
        slot: u32,
        value: SvcValue,
    },
    DelService(SvcKey),
    /// Free backend slot `.0` (all zero).
    DelBackend(u32),
    PutNodeAddr(u32),
    DelNodeAddr(u32),
    PutReply(ReplyKey4, ReplyValue4),
    DelReply(ReplyKey4),
    /// This node's settings for the programs.
    PutConfig(NodeConfig),
    /// Node address `.0` is node slot `.1` (encapsulated packets come
    /// only from node addresses).
    PutNodeIndex(u32, u32),
    DelNodeIndex(u32),
    /// The local backend slot of a task by its identity.
    PutLocal(ReplyKey4, u32),
    DelLocal(ReplyKey4),
    /// Where local backend slot `.0`'s packets go (its task's link).
    PutLocalDev(u32, LocalDev),
    /// Backend slot `.0`'s packets go by the FIB (all zero).
    DelLocalDev(u32),
    /// The generations handed out may reach these (service, backend,
    /// node): written before any op that uses one, so a restarted meshd
    /// that adopts the maps starts above them.
    PutGens(u32, u32, u32),
    /// The service a published port belongs to (for a restarted meshd).
    PutName(SvcKey, SvcName),
    DelName(SvcKey),
    /// Service id `.0` allows sources in range `.1`.
    PutSrc(u32, Cidr4),
    DelSrc(u32, Cidr4),
    /// Service id `.0`'s affinity timeout, in conntrack time units
    /// (written before a service with `SVC_F_AFFINITY` is switched to).
    PutAffTimeout(u32, u32),
}

/// The Maglev map's default room per service and half: a table for 10
/// backends (1009 entries) fits. Larger services take more of the map,
/// smaller ones less; a state that does not fit is refused, naming
/// `--maglev-entries`.
pub const POOL_TABLE: u32 = 1021;

/// Generations are reserved this many at a time ([`Op::PutGens`]): one
/// extra write per this many slots handed out, not one per plan.
pub const GEN_BLOCK: u32 = 1024;

/// How long the reply entry of a removed backend stays.
pub const REPLY_GRACE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
struct ReplyState {
    value: ReplyValue4,
    retired_at: Option<Instant>,
}

/// Sizes fixed at load time.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Entries of the largest Maglev table (prime): a service's table has
    /// 100 entries per backend (a prime), up to this.
    pub maglev_size: u32,
    /// Entries of the Maglev map, which every service's two tables share;
    /// 0: room for two tables of up to [`POOL_TABLE`] entries per service.
    pub maglev_pool: u32,
    pub max_services: u32,
    pub max_backends: u32,
    /// Entries in the conntrack map of confirmed flows (one per flow).
    pub ct_entries: u32,
    /// Entries in the conntrack map of unconfirmed flows.
    pub ct_new_entries: u32,
    /// How long conntrack entries live past their flow's last packet.
    pub ct_lifetimes: CtLifetimes,
    pub max_nodes: u32,
    /// Source ranges of all services' allow lists together.
    pub max_src_ranges: u32,
    /// Clients the affinity map remembers (all services together).
    pub aff_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            maglev_size: DEFAULT_MAGLEV_SIZE,
            maglev_pool: 0,
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            ct_entries: DEFAULT_CT_ENTRIES,
            ct_new_entries: DEFAULT_CT_NEW_ENTRIES,
            ct_lifetimes: CtLifetimes::default(),
            max_nodes: DEFAULT_MAX_NODES,
            max_src_ranges: DEFAULT_MAX_SRC_RANGES,
            aff_entries: DEFAULT_AFF_ENTRIES,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<()> {
        if !maglev::is_prime(self.maglev_size) || self.maglev_size < 7 {
            bail!(
                "--maglev-size {}: must be a prime of at least 7 (for example 251, 1021, 4093, 16381, 65521)",
                self.maglev_size
            );
        }
        if self.max_services == 0
            || self.max_backends == 0
            || self.ct_entries == 0
            || self.ct_new_entries == 0
            || self.max_nodes == 0
            || self.max_src_ranges == 0
            || self.aff_entries == 0
        {
            bail!("map sizes must be positive");
        }
        let entries = self.maglev_entries_wide();
        if entries > (1 << 30) {
            bail!(
                "a Maglev map of {entries} entries (--maglev-entries, or two tables of up to {} entries per --max-services {}); keep it under 2^30",
                self.maglev_size.min(POOL_TABLE),
                self.max_services,
            );
        }
        if entries < 2 * regions::table_size(1, self.maglev_size) as u64 {
            bail!("--maglev-entries {entries}: too small for one service's two tables");
        }
        Ok(())
    }

    fn maglev_entries_wide(&self) -> u64 {
        if self.maglev_pool > 0 {
            self.maglev_pool as u64
        } else {
            2 * self.max_services as u64 * self.maglev_size.min(POOL_TABLE) as u64
        }
    }

    /// Entries of the Maglev map (4 bytes each), shared by every service's
    /// two tables.
    pub fn maglev_entries(&self) -> u32 {
        self.maglev_entries_wide().min(u32::MAX as u64) as u32
    }

    /// Entries of the reply map: one per local (task, target port,
    /// protocol), so up to two per backend (a task behind a TCP and a UDP
    /// port with the same target shares one backend); reply entries of
    /// removed backends stay for their grace period in whatever room is
    /// left, and the oldest leave early when the room is needed.
    pub fn reply_entries(&self) -> u32 {
        self.max_backends.saturating_mul(2)
    }
}

#[derive(Clone, Debug)]
pub struct SvcSlot {
    pub svc_id: u32,
    /// `SVC_F_*` flags written.
    pub flags: u32,
    /// The service's generation: new whenever the port passes to another
    /// service (or the id is reused), so that its flows are not this one's.
    pub gen_: u32,
    pub half: u32,
    /// The Maglev map regions of the two halves (`half` is the one packets
    /// read).
    pub regions: [Region; 2],
    pub name: String,
    pub target: u16,
    pub backends: Vec<BackendKey>,
    /// Kept in the backend map, left out of the table (see
    /// [`crate::desired::DesiredService::draining`]).
    pub draining: Vec<BackendKey>,
    /// Its allow list (sorted); empty: every source.
    pub source_ranges: Vec<Cidr4>,
    /// Client affinity, and its timeout in seconds.
    pub affinity: Option<u32>,
}

/// A node's slot in the node map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSlot {
    pub slot: u32,
    pub value: NodeValue,
}

/// What one plan changes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub services_added: usize,
    pub services_changed: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "published ports {} added, {} changed, {} removed; backends {} added, {} removed",
            self.services_added,
            self.services_changed,
            self.services_removed,
            self.backends_added,
            self.backends_removed
        )
    }
}

/// Array slots handed out with generations: a freed slot is reused only by
/// a later plan, with the next generation, so whatever still names the old
/// (slot, generation) misses instead of finding the newcomer.
#[derive(Clone, Debug, Default)]
struct Slots {
    gens: HashMap<u32, u32>,
    free: BTreeSet<u32>,
    next: u32,
    /// Every generation handed out before this planner existed (by the
    /// meshd whose maps it adopted) is at most this: slots are taken above.
    floor: u32,
}

impl Slots {
    /// A free slot and its new generation.
    fn take(&mut self) -> (u32, u32) {
        let id = self.free.pop_first().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        let g = self.gens.entry(id).or_insert(0);
        *g = (*g).max(self.floor) + 1;
        (id, *g)
    }

    /// The highest generation handed out (or adopted).
    fn hwm(&self) -> u32 {
        self.gens
            .values()
            .copied()
            .max()
            .unwrap_or(0)
            .max(self.floor)
    }

    /// Slots as adopted from maps: `used` slots with their generations,
    /// every other one below the highest free, generations above `floor`.
    fn adopted(used: impl IntoIterator<Item = (u32, u32)>, floor: u32) -> Slots {
        let mut s = Slots {
            floor,
            ..Slots::default()
        };
        for (id, g) in used {
            s.gens.insert(id, g);
            s.floor = s.floor.max(g);
            s.mark_used(id);
        }
        s
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// `id` holds something (learnt after the fact).
    fn mark_used(&mut self, id: u32) {
        self.free.remove(&id);
        for skipped in self.next..id {
            self.free.insert(skipped);
        }
        self.next = self.next.max(id + 1);
    }

    /// Takes the higher generation of each slot.
    fn merge_gens(&mut self, other: &Slots) {
        for (id, g) in &other.gens {
            let e = self.gens.entry(*id).or_insert(0);
            *e = (*e).max(*g);
        }
        self.floor = self.floor.max(other.floor);
    }

    fn gen_of(&self, id: u32) -> u32 {
        self.gens.get(&id).copied().unwrap_or(0)
    }
}

/// Ops and what they change, as a plan is built.
#[derive(Default)]
struct Plan {
    ops: Vec<Op>,
    report: Report,
}

/// Reply candidates of the local backends: for each, the backend and the
/// (node address, published port) pairs its flows can come through.
type Replies<'a> = BTreeMap<ReplyKey4, (&'a BackendKey, Vec<ReplyCand>)>;

/// What has been applied: slots, generations and table halves. Clone it,
/// plan on the clone, and keep the clone only once every op has been
/// written.
#[derive(Clone, Debug)]
pub struct Planner {
    limits: Limits,
    pub services: BTreeMap<(Proto, u16), SvcSlot>,
    pub backends: HashMap<BackendKey, u32>,
    backend_slots: Slots,
    /// Nodes by name.
    pub nodes: BTreeMap<String, NodeSlot>,
    node_slots: Slots,
    free_svc_ids: Vec<u32>,
    next_svc_id: u32,
    /// The last service generation handed out.
    svc_gen: u32,
    node_addrs: BTreeSet<Ipv4Addr>,
    replies: BTreeMap<ReplyKey4, ReplyState>,
    /// The node settings written.
    config: NodeConfig,
    /// Node addresses written, and their slots.
    node_index: BTreeMap<u32, u32>,
    /// Local backends by identity written, and their slots.
    locals: BTreeMap<ReplyKey4, u32>,
    /// Local backends' links written, by slot.
    local_devs: BTreeMap<u32, LocalDev>,
    /// The Maglev map's regions.
    maglev: regions::Pool,
    /// The generations reserved in the maps ([`Op::PutGens`]).
    gens_reserved: (u32, u32, u32),
    /// The allow-list entries written, by service id.
    src: BTreeMap<u32, BTreeSet<Cidr4>>,
    /// Backend slots written with `BE_F_NO_NEW`.
    no_new: BTreeSet<u32>,
}

/// What pinned maps hold, as a restarted meshd reads them to adopt them
/// ([`Planner::adopt`]): every entry in use, by slot or key.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Published ports and the service slot each points to.
    pub ports: Vec<(SvcKey, u32)>,
    /// Service slots (both halves) that are not all zero.
    pub services: BTreeMap<u32, SvcValue>,
    /// Backend slots in use.
    pub backends: BTreeMap<u32, Backend>,
    /// Node slots in use.
    pub nodes: BTreeMap<u32, NodeValue>,
    pub node_index: BTreeMap<u32, u32>,
    pub locals: BTreeMap<ReplyKey4, u32>,
    pub replies: BTreeMap<ReplyKey4, ReplyValue4>,
    /// This node's addresses (raw).
    pub node_addrs: Vec<u32>,
    pub config: NodeConfig,
    pub names: BTreeMap<SvcKey, SvcName>,
    pub meta: PinMeta,
    /// Allow-list entries: (service id, range).
    pub src: BTreeSet<(u32, Cidr4)>,
    /// Local backends' recorded links, by slot (entries not all zero).
    pub local_devs: BTreeMap<u32, LocalDev>,
}

/// What `op` does to the maps that the planner's record of what it
/// applied and a [`Snapshot`] keep alike: this node's settings, the node
/// index, local tasks and their links (any other op: nothing).
fn apply_plain(
    op: &Op,
    config: &mut NodeConfig,
    node_index: &mut BTreeMap<u32, u32>,
    locals: &mut BTreeMap<ReplyKey4, u32>,
    local_devs: &mut BTreeMap<u32, LocalDev>,
) {
    match op {
        Op::PutConfig(c) => *config = *c,
        Op::PutNodeIndex(a, slot) => {
            node_index.insert(*a, *slot);
        }
        Op::DelNodeIndex(a) => {
            node_index.remove(a);
        }
        Op::PutLocal(k, slot) => {
            locals.insert(*k, *slot);
        }
        Op::DelLocal(k) => {
            locals.remove(k);
        }
        Op::PutLocalDev(id, d) => {
            local_devs.insert(*id, *d);
        }
        Op::DelLocalDev(id) => {
            local_devs.remove(id);
        }
        _ => {}
    }
}

impl Snapshot {
    /// What `op` does to the maps, on this model of them (the planner's
    /// tests, and the simulation of a restart).
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutNode(slot, v) => {
                self.nodes.insert(*slot, *v);
            }
            Op::DelNode(slot) => {
                self.nodes.remove(slot);
            }
            Op::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            Op::DelBackend(id) => {
                self.backends.remove(id);
            }
            Op::WriteTable { .. } | Op::ResetStats(_) => {}
            Op::PutService { key, slot, value } => {
                self.services.insert(*slot, *value);
                self.ports.retain(|(k, _)| k != key);
                self.ports.push((*key, *slot));
            }
            Op::DelService(key) => self.ports.retain(|(k, _)| k != key),
            Op::PutNodeAddr(a) => {
                if !self.node_addrs.contains(a) {
                    self.node_addrs.push(*a);
                }
            }
            Op::DelNodeAddr(a) => self.node_addrs.retain(|x| x != a),
            Op::PutReply(k, v) => {
                self.replies.insert(*k, *v);
            }
            Op::DelReply(k) => {
                self.replies.remove(k);
            }
            Op::PutConfig(_)
            | Op::PutNodeIndex(..)
            | Op::DelNodeIndex(_)
            | Op::PutLocal(..)
            | Op::DelLocal(_)
            | Op::PutLocalDev(..)
            | Op::DelLocalDev(_) => apply_plain(
                op,
                &mut self.config,
                &mut self.node_index,
                &mut self.locals,
                &mut self.local_devs,
            ),
            Op::PutGens(a, b, c) => {
                self.meta = PinMeta {
                    magic: PIN_META_MAGIC,
                    svc_gen: *a,
                    backend_gen: *b,
                    node_gen: *c,
                    object_hash: self.meta.object_hash,
                };
            }
            Op::PutName(k, n) => {
                self.names.insert(*k, *n);
            }
            Op::DelName(k) => {
                self.names.remove(k);
            }
            Op::PutSrc(id, c) => {
                self.src.insert((*id, *c));
            }
            Op::DelSrc(id, c) => {
                self.src.remove(&(*id, *c));
            }
            Op::PutAffTimeout(..) => {}
        }
    }
}

/// What [`Planner::adopt`] found, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Published ports, and those whose service is known by name (their
    /// flows are kept; the others start over).
    pub ports: usize,
    pub named: usize,
    pub backends: usize,
    pub nodes: usize,
    pub replies: usize,
}

/// The name given to what adopted maps hold but the first state does not
/// name (never a valid name: it is removed by the first plan).
fn stray(kind: &str, slot: u32) -> String {
    format!("~{kind}{slot}")
}

/// What `node` would hold for `state`, refused unless a fresh dataplane
/// with `limits` can take it: the one judgement `meshd check` and
/// `meshd run` share.
pub fn vet(
    state: &crate::model::State,
    node: &str,
    node_addrs: &[Ipv4Addr],
    forwarding: &crate::desired::Forwarding,
    limits: &Limits,
) -> Result<Desired> {
    let mut d = Desired::compute(state, node, node_addrs)?;
    d.forwarding = *forwarding;
    Planner::new(limits.clone()).plan(&d)?;
    Ok(d)
}

/// The `SVC_F_*` flags of service `ds` in `d`.
fn svc_flags(d: &Desired, ds: &DesiredService) -> u32 {
    let reply = match ds.reply.unwrap_or(d.forwarding.reply) {
        ReplyMode::Direct => SVC_F_REPLY_DIRECT,
        ReplyMode::ViaIngress => 0,
    };
    let local = if ds.local { SVC_F_LOCAL_ONLY } else { 0 };
    let src = if ds.source_ranges.is_empty() {
        0
    } else {
        SVC_F_SRC_RANGES
    };
    let affinity = if ds.affinity.is_some() {
        SVC_F_AFFINITY
    } else {
        0
    };
    reply | local | src | affinity
}

fn proto_of(n: u8) -> Proto {
    if n == IPPROTO_UDP {
        Proto::Udp
    } else {
        Proto::Tcp
    }
}

pub fn raw4(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl Planner {
    pub fn new(limits: Limits) -> Self {
        Self {
            services: BTreeMap::new(),
            backends: HashMap::new(),
            backend_slots: Slots::default(),
            nodes: BTreeMap::new(),
            node_slots: Slots::default(),
            free_svc_ids: Vec::new(),
            next_svc_id: 0,
            svc_gen: 0,
            node_addrs: BTreeSet::new(),
            replies: BTreeMap::new(),
            config: NodeConfig::default(),
            node_index: BTreeMap::new(),
            locals: BTreeMap::new(),
            local_devs: BTreeMap::new(),
            maglev: regions::Pool::new(limits.maglev_entries()),
            limits,
            gens_reserved: (0, 0, 0),
            src: BTreeMap::new(),
            no_new: BTreeSet::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A planner that knows what the maps in `snap` hold, as a meshd that
    /// wrote them would, for a meshd that adopts them after a restart.
    /// Nodes and backends are matched to `d` (the first state) by what
    /// identifies them (addresses, ports); services by the name kept with
    /// each port. What matches keeps its slot and generation, so
    /// connection tracking entries still name it; the first plan then
    /// writes only the difference (each service's table again, into the
    /// half no packet reads), and removes what `d` does not hold.
    pub fn adopt(limits: Limits, snap: &Snapshot, d: &Desired) -> (Planner, Adoption) {
        let mut p = Planner::new(limits);
        let meta = if snap.meta.magic == PIN_META_MAGIC {
            snap.meta
        } else {
            PinMeta::default()
        };
        p.config = snap.config;
        p.node_addrs = snap
            .node_addrs
            .iter()
            .filter(|a| **a != 0)
            .map(|a| Ipv4Addr::from(a.to_ne_bytes()))
            .collect();
        // Nodes, by address.
        let by_addr: HashMap<u32, &str> = d
            .nodes
            .iter()
            .map(|(n, dn)| (raw4(dn.addr), n.as_str()))
            .collect();
        let mut node_names: HashMap<u32, String> = HashMap::new();
        for (slot, v) in &snap.nodes {
            let name = match by_addr.get(&v.addr[0]) {
                Some(n) if !p.nodes.contains_key(*n) => n.to_string(),
                _ => stray("node", *slot),
            };
            p.nodes.insert(
                name.clone(),
                NodeSlot {
                    slot: *slot,
                    value: *v,
                },
            );
            node_names.insert(*slot, name);
        }
        p.node_slots = Slots::adopted(snap.nodes.iter().map(|(s, v)| (*s, v.gen_)), meta.node_gen);
        p.node_index = snap.node_index.clone();
        p.locals = snap.locals.clone();
        // Links recorded for slots the first plan keeps stay until it
        // records them again (the same, or another); those of slots it
        // frees are removed with them.
        p.local_devs = snap.local_devs.clone();
        // Backends, by what a `BackendKey` holds: a local one's identity
        // is the key its local entry is found by.
        let identity: HashMap<u32, u32> = snap.locals.iter().map(|(k, s)| (*s, k.addr)).collect();
        for (id, b) in &snap.backends {
            let local = b.flags & BE_F_LOCAL != 0;
            let deliver = Ipv4Addr::from(b.addr[0].to_ne_bytes());
            let addr = match identity.get(id) {
                Some(a) if local => Ipv4Addr::from(a.to_ne_bytes()),
                _ => deliver,
            };
            let mut key = BackendKey {
                addr,
                port: u16::from_be(b.port_be),
                node: node_names
                    .get(&b.node_id)
                    .cloned()
                    .unwrap_or_else(|| stray("node", b.node_id)),
                local,
                deliver,
            };
            if p.backends.contains_key(&key) {
                // Two slots for one backend: the second one goes.
                key.node = stray("backend", *id);
            }
            p.backends.insert(key, *id);
        }
        p.no_new = snap
            .backends
            .iter()
            .filter(|(_, b)| b.flags & BE_F_NO_NEW != 0)
            .map(|(id, _)| *id)
            .collect();
        p.backend_slots = Slots::adopted(
            snap.backends.iter().map(|(i, b)| (*i, b.gen_)),
            meta.backend_gen,
        );
        // Services, by the name kept with their port.
        let mut used_ids = BTreeSet::new();
        let mut named = 0;
        for (key, slot) in &snap.ports {
            let v = snap.services.get(slot).copied().unwrap_or_default();
            let name = match snap.names.get(key) {
                Some(n) if n.svc_id == slot / 2 && n.gen_ == v.gen_ && v.gen_ != 0 => {
                    named += 1;
                    n.name().to_string()
                }
                _ => stray("service", *slot),
            };
            p.services.insert(
                (proto_of(key.proto), u16::from_be(key.port_be)),
                SvcSlot {
                    svc_id: slot / 2,
                    flags: v.flags,
                    gen_: v.gen_,
                    half: slot % 2,
                    // The table packets read keeps its region. The other
                    // half's value may be a former service's (an id is
                    // reused without clearing it): its region is not
                    // trusted, and the next table is placed anew.
                    regions: {
                        let mut r = [Region::NONE; 2];
                        r[(slot % 2) as usize] = Region {
                            off: v.table_off,
                            len: v.table_size,
                        };
                        r
                    },
                    name,
                    // Unknown: the first plan writes every table again.
                    target: 0,
                    backends: Vec::new(),
                    draining: Vec::new(),
                    source_ranges: Vec::new(),
                    affinity: None,
                },
            );
            used_ids.insert(slot / 2);
        }
        p.svc_gen = snap
            .services
            .values()
            .map(|v| v.gen_)
            .fold(meta.svc_gen, u32::max);
        p.next_svc_id = used_ids.last().map_or(0, |m| m + 1);
        p.free_svc_ids = (0..p.next_svc_id)
            .rev()
            .filter(|i| !used_ids.contains(i))
            .collect();
        p.replies = snap
            .replies
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    ReplyState {
                        value: *v,
                        retired_at: None,
                    },
                )
            })
            .collect();
        p.maglev = regions::Pool::rebuild(
            p.limits.maglev_entries(),
            p.services.values().flat_map(|s| s.regions),
        );
        p.gens_reserved = (meta.svc_gen, meta.backend_gen, meta.node_gen);
        for (id, c) in &snap.src {
            p.src.entry(*id).or_default().insert(*c);
        }
        let report = Adoption {
            ports: snap.ports.len(),
            named,
            backends: snap.backends.len(),
            nodes: snap.nodes.len(),
            replies: snap.replies.len(),
        };
        (p, report)
    }

    /// The ops that take the maps from the applied state to `d`. Refuses a
    /// state that does not fit the maps before producing any op.
    pub fn plan(&mut self, d: &Desired) -> Result<(Vec<Op>, Report)> {
        self.plan_at(d, Instant::now())
    }

    /// `plan` at a given time (reply entries of removed backends expire).
    pub fn plan_at(&mut self, d: &Desired, now: Instant) -> Result<(Vec<Op>, Report)> {
        let replies = self.check_fits(d)?;
        let wanted: BTreeSet<&BackendKey> = d
            .services
            .values()
            .flat_map(|s| s.backends.iter())
            .collect();
        let mut p = Plan::default();
        self.put_config(d, &mut p);
        self.put_nodes(d, &mut p);
        self.put_node_index(&mut p);
        // Backends no table of theirs takes new flows to: draining in
        // every service that has them (a backend two ports share is the
        // same task, draining for both or neither).
        let no_new: BTreeSet<&BackendKey> = d
            .services
            .values()
            .flat_map(|s| s.draining.iter())
            .collect();
        self.add_backends(&wanted, &no_new, &mut p);
        self.mark_backends(&wanted, &no_new, &mut p);
        let locals = local_backends(d, &self.backends);
        self.put_locals(&locals, &mut p);
        let devs = local_devs(d, &self.backends);
        self.put_local_devs(&devs, &mut p);
        self.make_room_for_replies(&replies, now, &mut p);
        self.put_replies(d, &replies, &mut p);
        self.put_services(d, &mut p)?;
        self.del_services(d, &mut p);
        self.del_locals(&locals, &mut p);
        self.del_local_devs(&devs, &mut p);
        self.del_backends(&wanted, &mut p);
        self.del_node_index(d, &mut p);
        self.del_nodes(d, &mut p);
        self.put_node_addrs(d, &mut p);
        self.retire_replies(&replies, now);
        p.ops.extend(self.expire(now));
        if let Some(op) = self.reserve_gens() {
            // Before any op that uses them.
            p.ops.insert(0, op);
        }
        Ok((p.ops, p.report))
    }

    /// The generations this planner handed out, if they outgrew what the
    /// maps say is reserved: a new reservation, a block above them.
    fn reserve_gens(&mut self) -> Option<Op> {
        let used = (
            self.svc_gen,
            self.backend_slots.hwm(),
            self.node_slots.hwm(),
        );
        let r = self.gens_reserved;
        if used.0 <= r.0 && used.1 <= r.1 && used.2 <= r.2 {
            return None;
        }
        let up = |u: u32, r: u32| {
            if u <= r {
                r
            } else {
                u.saturating_add(GEN_BLOCK)
            }
        };
        self.gens_reserved = (up(used.0, r.0), up(used.1, r.1), up(used.2, r.2));
        let (a, b, c) = self.gens_reserved;
        Some(Op::PutGens(a, b, c))
    }

    /// Refuses a state the maps cannot hold, counting what old and new
    /// share for a moment during the update; returns the reply candidates.
    fn check_fits<'d>(&self, d: &'d Desired) -> Result<Replies<'d>> {
        let lim = &self.limits;
        if d.services.len() > lim.max_services as usize {
            bail!(
                "{} published ports exceed --max-services {}; nothing applied",
                d.services.len(),
                lim.max_services
            );
        }
        let wanted: BTreeSet<&BackendKey> = d
            .services
            .values()
            .flat_map(|s| s.backends.iter())
            .collect();
        // Old and new backends coexist between steps 2 and 6.
        let peak = wanted.len() + self.backends.keys().filter(|k| !wanted.contains(k)).count();
        if peak > lim.max_backends as usize {
            bail!(
                "{peak} backends (old and new during the update) exceed --max-backends {}; nothing applied",
                lim.max_backends
            );
        }
        let peak = d.nodes.len()
            + self
                .nodes
                .keys()
                .filter(|n| !d.nodes.contains_key(*n))
                .count();
        if peak > lim.max_nodes as usize {
            bail!(
                "{peak} nodes (old and new during the update) exceed the node map's {} slots; nothing applied",
                lim.max_nodes
            );
        }
        if d.node_addrs.len() > MAX_NODE_ADDRS as usize {
            bail!("more than {MAX_NODE_ADDRS} node addresses; nothing applied");
        }
        // The tables, sized from their backends, in the halves packets do
        // not read, beside every table packets read: placed as
        // `put_services` will place them.
        let mut pool = self.maglev.clone();
        for (key, ds) in &d.services {
            let Some((half, regions)) = self.table_change(key, ds, svc_flags(d, ds)) else {
                continue;
            };
            let size = table_size(ds.table_backends().len(), lim.maglev_size);
            if regions::place(&mut pool, regions, half, size).is_none() {
                bail!(
                    "the Maglev tables (two per published port, 100 entries per backend up to --maglev-size {}) need more than the Maglev map's {} entries (--maglev-entries); nothing applied",
                    lim.maglev_size,
                    lim.maglev_entries()
                );
            }
        }
        // Old and new ranges of a service coexist while it switches.
        let ranges: usize = self.src.values().map(BTreeSet::len).sum::<usize>()
            + d.services
                .values()
                .map(|s| s.source_ranges.len())
                .sum::<usize>();
        if ranges > lim.max_src_ranges as usize {
            bail!(
                "{ranges} source ranges (old and new during the update) exceed \
                 --max-source-ranges {}; nothing applied",
                lim.max_src_ranges
            );
        }
        if let Some(s) = d.services.get(&(Proto::Udp, d.forwarding.port)) {
            bail!(
                "udp port {} is published by service {:?} and carries forwarded packets between \
                 nodes (--encap-port): choose another for one of them; nothing applied",
                d.forwarding.port,
                s.name
            );
        }
        let replies = reply_candidates(d)?;
        if replies.len() > lim.reply_entries() as usize {
            bail!(
                "{} reply entries (local task, port, protocol) exceed the reply map's {} (2 x --max-backends); nothing applied",
                replies.len(),
                lim.reply_entries()
            );
        }
        Ok(replies)
    }

    /// Step 1: nodes that are new or whose address or role changed.
    fn put_nodes(&mut self, d: &Desired, p: &mut Plan) {
        for (name, n) in &d.nodes {
            let flags = if n.local { NODE_F_SELF } else { 0 };
            let slot = match self.nodes.get(name) {
                Some(s) if s.value.addr[0] == raw4(n.addr) && s.value.flags == flags => continue,
                Some(s) => (s.slot, s.value.gen_),
                None => self.node_slots.take(),
            };
            let value = NodeValue {
                addr: [raw4(n.addr), 0, 0, 0],
                family: FAMILY_V4,
                _pad0: [0; 3],
                flags,
                gen_: slot.1,
                _pad1: 0,
            };
            p.ops.push(Op::PutNode(slot.0, value));
            self.nodes.insert(
                name.clone(),
                NodeSlot {
                    slot: slot.0,
                    value,
                },
            );
        }
    }

    /// Step 0: this node's settings for the programs (its address, the
    /// encapsulation port and MTU).
    fn put_config(&mut self, d: &Desired, p: &mut Plan) {
        let self_addr = d
            .nodes
            .values()
            .find(|n| n.local)
            .map(|n| raw4(n.addr))
            .unwrap_or(0);
        let c = NodeConfig {
            self_addr,
            encap_port_be: d.forwarding.port.to_be(),
            _pad0: 0,
            mtu: d.forwarding.mtu,
        };
        if c != self.config {
            p.ops.push(Op::PutConfig(c));
            self.config = c;
        }
    }

    /// After step 1: every node's address leads to its slot.
    fn put_node_index(&mut self, p: &mut Plan) {
        let want: BTreeMap<u32, u32> = self
            .nodes
            .values()
            .map(|n| (n.value.addr[0], n.slot))
            .collect();
        put_changed(&mut self.node_index, &want, p, Op::PutNodeIndex);
    }

    /// Before step 7: addresses of nodes that left (or moved) lead
    /// nowhere, before their slots are freed.
    fn del_node_index(&mut self, d: &Desired, p: &mut Plan) {
        let live: BTreeSet<u32> = d.nodes.values().map(|n| raw4(n.addr)).collect();
        del_unwanted(
            &mut self.node_index,
            |a| live.contains(a),
            p,
            Op::DelNodeIndex,
        );
    }

    /// After step 2: local backends by identity, for packets other nodes
    /// forward (before any table can send them one).
    fn put_locals(&mut self, locals: &BTreeMap<ReplyKey4, u32>, p: &mut Plan) {
        put_changed(&mut self.locals, locals, p, Op::PutLocal);
    }

    /// Before step 6: identities no local backend has any more.
    fn del_locals(&mut self, locals: &BTreeMap<ReplyKey4, u32>, p: &mut Plan) {
        del_unwanted(
            &mut self.locals,
            |k| locals.contains_key(k),
            p,
            Op::DelLocal,
        );
    }

    /// After step 2: where local backends' packets go, for those whose
    /// task's link is known (delivery without a FIB lookup, before any
    /// table sends them a flow when the link is known already).
    fn put_local_devs(&mut self, devs: &BTreeMap<u32, LocalDev>, p: &mut Plan) {
        put_changed(&mut self.local_devs, devs, p, Op::PutLocalDev);
    }

    /// Before step 6: entries of backends that leave, or whose link is no
    /// longer known (their packets go by the FIB).
    fn del_local_devs(&mut self, devs: &BTreeMap<u32, LocalDev>, p: &mut Plan) {
        del_unwanted(
            &mut self.local_devs,
            |id| devs.contains_key(id),
            p,
            Op::DelLocalDev,
        );
    }

    /// Backend `k` in slot `id`, generation `gen_`, as written.
    fn backend_value(&self, k: &BackendKey, gen_: u32, no_new: bool) -> Backend {
        let place = if k.local { BE_F_LOCAL } else { BE_F_REMOTE };
        Backend {
            // A local task's delivery address: where XDP DNATs to.
            addr: [raw4(k.deliver), 0, 0, 0],
            port_be: k.port.to_be(),
            family: FAMILY_V4,
            _pad0: 0,
            flags: place | if no_new { BE_F_NO_NEW } else { 0 },
            node_id: self.nodes[&k.node].slot,
            gen_,
        }
    }

    /// Step 2: backends that are new, each in a free slot.
    fn add_backends(
        &mut self,
        wanted: &BTreeSet<&BackendKey>,
        no_new: &BTreeSet<&BackendKey>,
        p: &mut Plan,
    ) {
        for k in wanted {
            if self.backends.contains_key(*k) {
                continue;
            }
            let (id, gen_) = self.backend_slots.take();
            let nn = no_new.contains(k);
            p.ops
                .push(Op::PutBackend(id, self.backend_value(k, gen_, nn)));
            if nn {
                self.no_new.insert(id);
            }
            self.backends.insert((*k).clone(), id);
            p.report.backends_added += 1;
        }
    }

    /// After step 2: backends that stop (or start again) taking new flows
    /// are rewritten in place, same slot and generation, with
    /// `BE_F_NO_NEW` set (cleared): before any table is switched, so an
    /// affinity entry never sends a new flow to a task that left every
    /// table. Only the flags word differs from what packets read.
    fn mark_backends(
        &mut self,
        wanted: &BTreeSet<&BackendKey>,
        no_new: &BTreeSet<&BackendKey>,
        p: &mut Plan,
    ) {
        for k in wanted {
            let id = self.backends[*k];
            let nn = no_new.contains(k);
            if nn == self.no_new.contains(&id) {
                continue;
            }
            let gen_ = self.backend_slots.gen_of(id);
            p.ops
                .push(Op::PutBackend(id, self.backend_value(k, gen_, nn)));
            if nn {
                self.no_new.insert(id);
            } else {
                self.no_new.remove(&id);
            }
        }
    }

    /// Before step 3: the reply map holds live and retired entries; when
    /// the entries this plan needs would not fit beside the retired ones,
    /// the oldest retired entries leave before their grace period ends
    /// (they only translate replies of flows to removed tasks).
    fn make_room_for_replies(&mut self, replies: &Replies, now: Instant, p: &mut Plan) {
        let cap = self.limits.reply_entries() as usize;
        let kept = self
            .replies
            .keys()
            .filter(|k| !replies.contains_key(k))
            .count();
        let mut over = (kept + replies.len()).saturating_sub(cap);
        if over == 0 {
            return;
        }
        let mut retired: Vec<(Instant, ReplyKey4)> = self
            .replies
            .iter()
            .filter(|(k, _)| !replies.contains_key(k))
            .map(|(k, r)| (r.retired_at.unwrap_or(now), *k))
            .collect();
        retired.sort();
        for (_, k) in retired {
            if over == 0 {
                break;
            }
            self.replies.remove(&k);
            p.ops.push(Op::DelReply(k));
            over -= 1;
        }
    }

    /// Step 3: reply entries of local tasks, in place before any table
    /// sends them a flow.
    fn put_replies(&mut self, d: &Desired, replies: &Replies, p: &mut Plan) {
        for (key, (backend, cands)) in replies {
            let slot = self.backends[*backend];
            let mut value = ReplyValue4 {
                backend_id: slot,
                backend_gen: self.backend_slots.gen_of(slot),
                count: cands.len() as u32,
                // The port the task sits behind, once known: its replies
                // are trusted only from there. Found by the address it is
                // delivered at (on a swarm node not its identity, the
                // ingress address).
                ifindex: d.task_ports.get(&backend.deliver).copied().unwrap_or(0),
                cands: [ReplyCand::default(); MAX_REPLY_CANDS],
            };
            value.cands[..cands.len()].copy_from_slice(cands);
            match self.replies.get(key) {
                Some(r) if r.value == value && r.retired_at.is_none() => {}
                _ => {
                    p.ops.push(Op::PutReply(*key, value));
                    self.replies.insert(
                        *key,
                        ReplyState {
                            value,
                            retired_at: None,
                        },
                    );
                }
            }
        }
    }

    /// Whether `ds` changes the service on `key`; if so, the half its new
    /// table goes to and the service's regions now.
    fn table_change(
        &self,
        key: &(Proto, u16),
        ds: &DesiredService,
        flags: u32,
    ) -> Option<(usize, [Region; 2])> {
        match self.services.get(key) {
            Some(s)
                if s.name == ds.name
                    && s.backends == ds.backends
                    && s.draining == ds.draining
                    && s.target == ds.target
                    && s.flags == flags
                    && s.affinity == ds.affinity =>
            {
                None
            }
            Some(s) => Some((1 - s.half as usize, s.regions)),
            None => Some((0, [Region::NONE; 2])),
        }
    }

    /// Step 4: each new or changed service into the half of its slots no
    /// packet reads, then its port switched there.
    fn put_services(&mut self, d: &Desired, p: &mut Plan) -> Result<()> {
        let m = self.limits.maglev_size;
        for (key, ds) in &d.services {
            // A port that passes to another service is a new service on an
            // old id: a new generation, so the old one's flows are not its.
            let existed = self.services.contains_key(key);
            let flags = svc_flags(d, ds);
            let (svc_id, gen_, half, is_new) = match self.services.get(key) {
                Some(s)
                    if s.name == ds.name
                        && s.backends == ds.backends
                        && s.draining == ds.draining
                        && s.target == ds.target
                        && s.flags == flags
                        && s.source_ranges == ds.source_ranges
                        && s.affinity == ds.affinity =>
                {
                    continue;
                }
                Some(s) if s.name == ds.name => (s.svc_id, s.gen_, 1 - s.half, false),
                Some(s) => {
                    self.svc_gen += 1;
                    (s.svc_id, self.svc_gen, 1 - s.half, true)
                }
                None => {
                    let id = self.free_svc_ids.pop().unwrap_or_else(|| {
                        self.next_svc_id += 1;
                        self.next_svc_id - 1
                    });
                    self.svc_gen += 1;
                    (id, self.svc_gen, 0, true)
                }
            };
            // Draining backends keep their slots but get no new flows.
            let in_table = ds.table_backends();
            let ids: Vec<u32> = in_table.iter().map(|b| self.backends[b]).collect();
            let keys: Vec<String> = in_table.iter().map(|b| b.maglev_key()).collect();
            let size = table_size(keys.len(), m);
            let table: Vec<u32> = if keys.is_empty() {
                Vec::new()
            } else {
                maglev::table(&keys, size)
                    .into_iter()
                    .map(|i| ids[i as usize])
                    .collect()
            };
            let slot = svc_id * 2 + half;
            let old = self
                .services
                .get(key)
                .map(|s| s.regions)
                .unwrap_or([Region::NONE; 2]);
            let Some(regions) = regions::place(&mut self.maglev, old, half as usize, size) else {
                bail!("internal: no room for a Maglev table check_fits made room for");
            };
            let offset = regions[half as usize].off;
            let table_size = size;
            if !table.is_empty() {
                p.ops.push(Op::WriteTable { offset, table });
            }
            if is_new {
                p.ops.push(Op::ResetStats(svc_id));
            }
            // Its allow list: new ranges before the switch (the half
            // switched to never denies what it allows), gone ones after.
            let want: BTreeSet<Cidr4> = ds.source_ranges.iter().copied().collect();
            let have = self.src.entry(svc_id).or_default();
            for c in want.difference(have) {
                p.ops.push(Op::PutSrc(svc_id, *c));
            }
            let gone: Vec<Cidr4> = have.difference(&want).copied().collect();
            *have = have.union(&want).copied().collect();
            if let Some(secs) = ds.affinity {
                // Before the switch: the slot switched to reads it.
                p.ops.push(Op::PutAffTimeout(svc_id, secs_to_units(secs)));
            }
            let skey = SvcKey::new(key.1, key.0.number());
            p.ops.push(Op::PutService {
                key: skey,
                slot,
                value: SvcValue {
                    svc_id,
                    flags,
                    table_off: offset,
                    table_size,
                    backend_count: ids.len() as u32,
                    gen_,
                },
            });
            if is_new {
                // Which service the port now belongs to, for a meshd that
                // adopts these maps (after the switch: a name never names a
                // service that is not there yet).
                p.ops
                    .push(Op::PutName(skey, SvcName::new(svc_id, gen_, &ds.name)));
            }
            for c in gone {
                p.ops.push(Op::DelSrc(svc_id, c));
                if let Some(h) = self.src.get_mut(&svc_id) {
                    h.remove(&c);
                }
            }
            self.src.retain(|_, h| !h.is_empty());
            self.services.insert(
                *key,
                SvcSlot {
                    svc_id,
                    flags,
                    gen_,
                    half,
                    regions,
                    name: ds.name.clone(),
                    target: ds.target,
                    backends: ds.backends.clone(),
                    draining: ds.draining.clone(),
                    source_ranges: ds.source_ranges.clone(),
                    affinity: ds.affinity,
                },
            );
            if !existed {
                p.report.services_added += 1;
            } else {
                p.report.services_changed += 1;
            }
        }
        Ok(())
    }

    /// Step 5: services that are gone.
    fn del_services(&mut self, d: &Desired, p: &mut Plan) {
        let gone: Vec<(Proto, u16)> = self
            .services
            .keys()
            .filter(|k| !d.services.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            p.ops
                .push(Op::DelService(SvcKey::new(key.1, key.0.number())));
            p.ops.push(Op::DelName(SvcKey::new(key.1, key.0.number())));
            let slot = self.services.remove(&key).expect("listed above");
            for c in self.src.remove(&slot.svc_id).unwrap_or_default() {
                p.ops.push(Op::DelSrc(slot.svc_id, c));
            }
            self.free_svc_ids.push(slot.svc_id);
            // Reused by a later plan, never this one (tables are placed
            // before services are removed).
            for r in slot.regions {
                self.maglev.release(r);
            }
            p.report.services_removed += 1;
        }
    }

    /// Step 6: backends no table names any more.
    fn del_backends(&mut self, wanted: &BTreeSet<&BackendKey>, p: &mut Plan) {
        let mut stale: Vec<(BackendKey, u32)> = self
            .backends
            .iter()
            .filter(|(k, _)| !wanted.contains(k))
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        stale.sort_by_key(|(_, id)| *id);
        for (k, id) in stale {
            p.ops.push(Op::DelBackend(id));
            self.backends.remove(&k);
            self.no_new.remove(&id);
            self.backend_slots.release(id);
            p.report.backends_removed += 1;
        }
    }

    /// Step 7: nodes that left the state (no backend names them now).
    fn del_nodes(&mut self, d: &Desired, p: &mut Plan) {
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !d.nodes.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            let s = self.nodes.remove(&name).expect("listed above");
            p.ops.push(Op::DelNode(s.slot));
            self.node_slots.release(s.slot);
        }
    }

    /// Step 8: the addresses this node answers on.
    fn put_node_addrs(&mut self, d: &Desired, p: &mut Plan) {
        let want: BTreeSet<Ipv4Addr> = d.node_addrs.iter().copied().collect();
        for a in want.difference(&self.node_addrs) {
            p.ops.push(Op::PutNodeAddr(raw4(*a)));
        }
        for a in self.node_addrs.difference(&want) {
            p.ops.push(Op::DelNodeAddr(raw4(*a)));
        }
        self.node_addrs = want;
    }

    /// Step 9: reply entries no local backend needs any more start their
    /// grace period.
    fn retire_replies(&mut self, replies: &Replies, now: Instant) {
        for (key, r) in self.replies.iter_mut() {
            if !replies.contains_key(key) && r.retired_at.is_none() {
                r.retired_at = Some(now);
            }
        }
    }

    /// Deletes the reply entries of backends removed more than
    /// [`REPLY_GRACE`] before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Op> {
        let old: Vec<ReplyKey4> = self
            .replies
            .iter()
            .filter(|(_, r)| {
                r.retired_at
                    .is_some_and(|t| now.duration_since(t) >= REPLY_GRACE)
            })
            .map(|(k, _)| *k)
            .collect();
        old.into_iter()
            .map(|k| {
                self.replies.remove(&k);
                Op::DelReply(k)
            })
            .collect()
    }

    /// After a failed apply: the kernel holds what `self` describes plus
    /// `done`, the ops of a plan made by `next` that were carried out (a
    /// prefix of it). Learns what they changed, names and keys taken from
    /// `next`, so that the next plan starts from what the kernel holds:
    /// above all, it knows which half of each service packets read now, so
    /// it never writes a table there.
    pub fn absorb(&mut self, next: &Planner, done: &[Op]) {
        // No (slot, generation) pair is ever handed out twice.
        self.svc_gen = self.svc_gen.max(next.svc_gen);
        self.backend_slots.merge_gens(&next.backend_slots);
        self.node_slots.merge_gens(&next.node_slots);
        for op in done {
            match op {
                Op::PutNode(slot, value) => {
                    if let Some((name, _)) = next.nodes.iter().find(|(_, n)| n.slot == *slot) {
                        self.nodes.insert(
                            name.clone(),
                            NodeSlot {
                                slot: *slot,
                                value: *value,
                            },
                        );
                        self.node_slots.mark_used(*slot);
                    }
                }
                Op::DelNode(slot) => {
                    self.nodes.retain(|_, n| n.slot != *slot);
                    self.node_slots.release(*slot);
                }
                Op::PutBackend(id, b) => {
                    if let Some((k, _)) = next.backends.iter().find(|(_, i)| **i == *id) {
                        self.backends.insert(k.clone(), *id);
                        self.backend_slots.mark_used(*id);
                    }
                    if b.flags & BE_F_NO_NEW != 0 {
                        self.no_new.insert(*id);
                    } else {
                        self.no_new.remove(id);
                    }
                }
                Op::DelBackend(id) => {
                    self.backends.retain(|_, i| *i != *id);
                    self.no_new.remove(id);
                    self.backend_slots.release(*id);
                }
                Op::PutService { key, .. } => {
                    // Its table was written just before (same plan): the
                    // slot in `next` is what packets read now.
                    let k = (proto_of(key.proto), u16::from_be(key.port_be));
                    if let Some(s) = next.services.get(&k) {
                        self.free_svc_ids.retain(|&id| id != s.svc_id);
                        self.next_svc_id = self.next_svc_id.max(s.svc_id + 1);
                        self.services.insert(k, s.clone());
                    }
                }
                Op::DelService(key) => {
                    let k = (proto_of(key.proto), u16::from_be(key.port_be));
                    if let Some(s) = self.services.remove(&k) {
                        self.free_svc_ids.push(s.svc_id);
                    }
                }
                Op::PutNodeAddr(a) => {
                    self.node_addrs.insert(Ipv4Addr::from(a.to_ne_bytes()));
                }
                Op::DelNodeAddr(a) => {
                    self.node_addrs.remove(&Ipv4Addr::from(a.to_ne_bytes()));
                }
                Op::PutReply(k, value) => {
                    self.replies.insert(
                        *k,
                        ReplyState {
                            value: *value,
                            retired_at: None,
                        },
                    );
                }
                Op::DelReply(k) => {
                    self.replies.remove(k);
                }
                Op::PutConfig(_)
                | Op::PutNodeIndex(..)
                | Op::DelNodeIndex(_)
                | Op::PutLocal(..)
                | Op::DelLocal(_)
                | Op::PutLocalDev(..)
                | Op::DelLocalDev(_) => apply_plain(
                    op,
                    &mut self.config,
                    &mut self.node_index,
                    &mut self.locals,
                    &mut self.local_devs,
                ),
                Op::PutGens(a, b, c) => {
                    let r = &mut self.gens_reserved;
                    *r = (r.0.max(*a), r.1.max(*b), r.2.max(*c));
                }
                Op::PutSrc(id, c) => {
                    self.src.entry(*id).or_default().insert(*c);
                }
                Op::DelSrc(id, c) => {
                    if let Some(h) = self.src.get_mut(id) {
                        h.remove(c);
                    }
                    self.src.retain(|_, h| !h.is_empty());
                }
                Op::WriteTable { .. }
                | Op::ResetStats(_)
                | Op::PutName(..)
                | Op::DelName(_)
                | Op::PutAffTimeout(..) => {}
            }
        }
        // The regions packets may read are those of the services as the
        // kernel holds them now; the rest of the map is free (a table
        // written but never switched to is read by nobody).
        self.maglev = regions::Pool::rebuild(
            self.limits.maglev_entries(),
            self.services.values().flat_map(|s| s.regions),
        );
    }

    /// Reply entries applied (retired ones included).
    pub fn reply_count(&self) -> usize {
        self.replies.len()
    }

    /// Entries of the Maglev map in use by tables, and its size.
    pub fn maglev_use(&self) -> (u32, u32) {
        (self.maglev.used(), self.maglev.cap())
    }

    /// The node settings applied (address, encapsulation port, MTU).
    pub fn config(&self) -> NodeConfig {
        self.config
    }

    /// The backend id of a task address and target port, if applied.
    pub fn backend_id(&self, addr: Ipv4Addr, port: u16) -> Option<u32> {
        self.backends
            .iter()
            .find(|(k, _)| k.addr == addr && k.port == port)
            .map(|(_, id)| *id)
    }
}

/// Each local backend's slot by its identity (the address every node knows
/// it by, target port, protocol): where a packet another node forwards to
/// it is delivered.
fn local_backends(d: &Desired, slots: &HashMap<BackendKey, u32>) -> BTreeMap<ReplyKey4, u32> {
    let mut out = BTreeMap::new();
    for ((proto, _), s) in &d.services {
        for b in s.backends.iter().filter(|b| b.local) {
            if let Some(slot) = slots.get(b) {
                out.insert(
                    ReplyKey4 {
                        addr: raw4(b.addr),
                        port_be: b.port.to_be(),
                        proto: proto.number(),
                        _pad: 0,
                    },
                    *slot,
                );
            }
        }
    }
    out
}

/// Where each local backend with a known link gets its packets, by slot.
fn local_devs(d: &Desired, slots: &HashMap<BackendKey, u32>) -> BTreeMap<u32, LocalDev> {
    let mut out = BTreeMap::new();
    for s in d.services.values() {
        for b in s.backends.iter().filter(|b| b.local) {
            if let (Some(slot), Some(l)) = (slots.get(b), d.task_links.get(&b.deliver)) {
                let mut macs = [0u8; 12];
                macs[..6].copy_from_slice(&l.task_mac);
                macs[6..].copy_from_slice(&l.gateway_mac);
                out.insert(
                    *slot,
                    LocalDev {
                        addr: raw4(b.deliver),
                        ifindex: l.ifindex,
                        flags: if l.peer { LDEV_F_PEER } else { 0 },
                        macs,
                    },
                );
            }
        }
    }
    out
}

/// For each local backend, the (node address, published port) pairs its
/// flows can come through. Refuses more than `MAX_REPLY_CANDS`.
fn reply_candidates(d: &Desired) -> Result<Replies<'_>> {
    let mut out: Replies = BTreeMap::new();
    for ((proto, port), s) in &d.services {
        for b in s.backends.iter().filter(|b| b.local) {
            // Replies come from where the task was delivered.
            let key = ReplyKey4 {
                addr: raw4(b.deliver),
                port_be: b.port.to_be(),
                proto: proto.number(),
                _pad: 0,
            };
            let e = out.entry(key).or_insert_with(|| (b, Vec::new()));
            for a in &d.node_addrs {
                e.1.push(ReplyCand {
                    addr: raw4(*a),
                    port_be: port.to_be(),
                    _pad: 0,
                });
            }
        }
    }
    for (k, (b, cands)) in out.iter_mut() {
        cands.sort();
        cands.dedup();
        if cands.len() > MAX_REPLY_CANDS {
            bail!(
                "task {} port {}/{}: its replies could belong to {} (node address, published port) pairs; \
                 at most {MAX_REPLY_CANDS} are supported; nothing applied",
                b.addr,
                if k.proto == IPPROTO_TCP { "tcp" } else { "udp" },
                b.port,
                cands.len()
            );
        }
    }
    Ok(out)
}

/// Writes (and records in `have`) every entry of `want` that `have` does
/// not hold as it is: the "put" half of keeping a map in step.
fn put_changed<K: Ord + Copy, V: PartialEq + Copy>(
    have: &mut BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    p: &mut Plan,
    put: impl Fn(K, V) -> Op,
) {
    for (k, v) in want {
        if have.get(k) != Some(v) {
            p.ops.push(put(*k, *v));
            have.insert(*k, *v);
        }
    }
}

/// Deletes (and forgets in `have`) every entry whose key `wanted` refuses:
/// the "delete" half.
fn del_unwanted<K: Ord + Copy, V>(
    have: &mut BTreeMap<K, V>,
    wanted: impl Fn(&K) -> bool,
    p: &mut Plan,
    del: impl Fn(K) -> Op,
) {
    let gone: Vec<K> = have.keys().filter(|k| !wanted(k)).copied().collect();
    for k in gone {
        p.ops.push(del(k));
        have.remove(&k);
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StateBuilder;

    const N1: [u8; 4] = [198, 18, 128, 1];
    const N2: [u8; 4] = [198, 18, 128, 2];

    fn task(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 129, i)
    }

    /// The web service (tcp 30080 -> 8080) on tasks `tasks` of n1.
    fn desired(tasks: &[u8]) -> Desired {
        let s = StateBuilder::new()
            .node("n1", N1)
            .node("n2", N2)
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .tasks("web", "n1", tasks.iter().map(|&i| task(i)))
            .build()
            .unwrap();
        Desired::compute(&s, "n1", &[]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            maglev_size: 251,
            ..Limits::default()
        }
    }

    #[test]
    fn first_plan_adds_nodes_and_backends_before_the_service_that_uses_them() {
        let mut p = Planner::new(limits());
        let (ops, r) = p.plan(&desired(&[2, 3])).unwrap();
        assert_eq!(r.services_added, 1);
        assert_eq!(r.backends_added, 2);
        let pos = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).unwrap();
        let svc = pos(&|o| matches!(o, Op::PutService { .. }));
        let table = pos(&|o| matches!(o, Op::WriteTable { .. }));
        let first_backend = pos(&|o| matches!(o, Op::PutBackend(..)));
        let count = |f: &dyn Fn(&Op) -> bool| ops[..table].iter().filter(|o| f(o)).count();
        assert_eq!(count(&|o| matches!(o, Op::PutNode(..))), 2);
        // The generations it hands out are reserved before anything uses
        // them (a restarted meshd starts above them).
        assert!(
            matches!(ops[0], Op::PutGens(s, b, n) if s >= 1 && b >= 2 && n >= 2),
            "{:?}",
            ops[0]
        );
        assert!(
            ops[1..first_backend]
                .iter()
                .all(|o| matches!(o, Op::PutConfig(_) | Op::PutNode(..) | Op::PutNodeIndex(..)))
        );
        // The port's service is named, once it is there.
        assert!(matches!(&ops[svc + 1], Op::PutName(_, n) if n.name() == "web"));
        // The tasks of this node are found by identity, once written.
        assert_eq!(count(&|o| matches!(o, Op::PutLocal(..))), 2);
        assert_eq!(count(&|o| matches!(o, Op::PutBackend(..))), 2);
        assert_eq!(count(&|o| matches!(o, Op::PutReply(..))), 2);
        assert!(table < svc);
        assert!(matches!(ops.last(), Some(Op::PutNodeAddr(_))));
        // This node is flagged as itself in the node map.
        let me = &p.nodes["n1"];
        assert_eq!(me.value.flags, NODE_F_SELF);
        assert_eq!(p.nodes["n2"].value.flags, 0);
    }

    #[test]
    fn a_change_writes_the_other_half_then_switches_then_deletes() {
        let mut p = Planner::new(limits());
        p.plan(&desired(&[2, 3])).unwrap();
        let (ops, r) = p.plan(&desired(&[2, 4])).unwrap();
        assert_eq!(
            (r.services_changed, r.backends_added, r.backends_removed),
            (1, 1, 1)
        );
        match &ops[..] {
            [
                Op::PutBackend(new, _),
                Op::PutLocal(_, local),
                Op::PutReply(_, r),
                Op::WriteTable { offset, table },
                Op::PutService { value: v, .. },
                Op::DelLocal(_),
                Op::DelBackend(old),
            ] => {
                assert_eq!((r.backend_id, *local), (*new, *new));
                // Two tasks: a table of 211 entries (a prime of 100 per
                // task); the second half's region follows the first's.
                assert_eq!(*offset, 211, "second half of service 0's region");
                assert_eq!((v.table_off, v.table_size), (211, 211));
                assert_eq!(table.len(), 211);
                assert!(table.contains(new) && !table.contains(old));
            }
            other => panic!("unexpected plan {other:#?}"),
        }
        // And back: the first half again.
        let (ops, _) = p.plan(&desired(&[2])).unwrap();
        assert!(
            ops.iter()
                .any(|o| matches!(o, Op::WriteTable { offset: 0, .. }))
        );
    }

    /// A table is sized from its service's tasks, in the half no packet
    /// reads: a new size takes a new region there and leaves the region
    /// packets read as it is.
    #[test]
    fn table_sizes_follow_the_tasks_and_only_the_unread_half_moves() {
        let mut p = Planner::new(Limits {
            maglev_size: 1021,
            ..Limits::default()
        });
        let size_off = |ops: &[Op]| {
            ops.iter()
                .find_map(|o| match o {
                    Op::PutService { value, .. } => Some((value.table_size, value.table_off)),
                    _ => None,
                })
                .unwrap()
        };
        let (ops, _) = p.plan(&desired(&[2])).unwrap();
        let (s1, off1) = size_off(&ops);
        assert_eq!(s1, 101);
        let (ops, _) = p.plan(&desired(&[2, 3, 4])).unwrap();
        let (s3, off3) = size_off(&ops);
        assert_eq!(s3, 307);
        assert!(
            off3 >= off1 + s1 || off3 + s3 <= off1,
            "apart from the half packets read"
        );
        // Back to one task: the first half again, resized; the map holds
        // the two tables and nothing else.
        let (ops, _) = p.plan(&desired(&[2])).unwrap();
        let (s, off) = size_off(&ops);
        assert_eq!(s, 101);
        assert!(off + s <= off3 || off >= off3 + s3);
        assert_eq!(p.maglev_use().0, 101 + 307);
        // Eleven tasks need more than the map's default room per service,
        // which other services leave free.
        let tasks: Vec<u8> = (2..13).collect();
        let (ops, _) = p.plan(&desired(&tasks)).unwrap();
        assert_eq!(size_off(&ops).0, 1021, "capped at --maglev-size");
    }

    #[test]
    fn tables_that_do_not_fit_the_maglev_map_are_refused_before_any_op() {
        let mut p = Planner::new(Limits {
            maglev_size: 1021,
            maglev_pool: 700,
            ..Limits::default()
        });
        // 307 entries read by packets; four tasks would need 401 beside them.
        p.plan(&desired(&[2, 3, 4])).unwrap();
        let before = p.maglev_use();
        let e = p.plan(&desired(&[2, 3, 4, 5])).unwrap_err().to_string();
        assert!(e.contains("--maglev-entries"), "{e}");
        assert_eq!(p.maglev_use(), before);
        assert!(p.plan(&desired(&[2])).is_ok(), "a smaller table fits");
    }

    #[test]
    fn every_node_builds_the_same_table_from_the_same_state() {
        let state = StateBuilder::new()
            .node("n1", N1)
            .node("n2", N2)
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .task("web", "n2", task(9))
            .task("web", "n1", task(2))
            .task("web", "n2", task(5))
            .build()
            .unwrap();
        // Node n2 has applied another state before, so its backend ids
        // differ from n1's.
        let mut p2 = Planner::new(limits());
        p2.plan(&desired(&[7, 8])).unwrap();
        let tables = |node: &str, p: &mut Planner| -> Vec<Ipv4Addr> {
            // The table as written to the kernel, ids turned back into tasks.
            let mut fresh = Planner::new(limits());
            if node == "n2" {
                fresh = p.clone();
                fresh.services.clear();
            }
            let (ops, _) = fresh
                .plan(&Desired::compute(&state, node, &[]).unwrap())
                .unwrap();
            let ids: HashMap<u32, Ipv4Addr> =
                fresh.backends.iter().map(|(k, id)| (*id, k.addr)).collect();
            let table = ops
                .iter()
                .find_map(|o| match o {
                    Op::WriteTable { table, .. } => Some(table.clone()),
                    _ => None,
                })
                .unwrap();
            table.into_iter().map(|id| ids[&id]).collect()
        };
        let mut p1 = Planner::new(limits());
        assert_eq!(tables("n1", &mut p1), tables("n2", &mut p2));
    }

    #[test]
    fn an_unchanged_state_plans_nothing() {
        let mut p = Planner::new(limits());
        let d = desired(&[2]);
        p.plan(&d).unwrap();
        assert_eq!(p.plan(&d).unwrap().0, vec![]);
    }

    #[test]
    fn too_many_backends_is_refused_before_any_op() {
        let mut p = Planner::new(Limits {
            max_backends: 2,
            ..limits()
        });
        p.plan(&desired(&[2, 3])).unwrap();
        let before = p.clone();
        // Replacing both needs 4 live backends for a moment.
        let e = p.plan(&desired(&[4, 5])).unwrap_err().to_string();
        assert!(e.contains("exceed --max-backends 2"), "{e}");
        assert_eq!(p.backends, before.backends);
    }

    #[test]
    fn removed_service_frees_its_id_for_reuse_with_reset_counters() {
        let mut p = Planner::new(limits());
        p.plan(&desired(&[2])).unwrap();
        let mut empty = desired(&[]);
        empty.services.clear();
        let (ops, r) = p.plan(&empty).unwrap();
        assert_eq!(r.services_removed, 1);
        assert!(ops.iter().any(|o| matches!(o, Op::DelService(_))));
        let (ops, _) = p.plan(&desired(&[2])).unwrap();
        assert!(ops.contains(&Op::ResetStats(0)));
    }

    /// Node slots are stable: a node added or removed elsewhere in the
    /// state moves no other node and rewrites no backend.
    #[test]
    fn node_slots_stay_put_as_other_nodes_come_and_go() {
        let state = |nodes: &[&str]| {
            let mut b = StateBuilder::new();
            for n in nodes {
                let host = ["a", "a2", "b", "c"].iter().position(|x| x == n).unwrap();
                b = b.node(n, [198, 18, 128, 10 + host as u8]);
            }
            let s = b
                .service("web", &[(Proto::Tcp, 30080, 8080)])
                .task("web", "b", task(2))
                .build()
                .unwrap();
            Desired::compute(&s, nodes[0], &[]).unwrap()
        };
        let mut p = Planner::new(limits());
        p.plan(&state(&["a", "b"])).unwrap();
        let b_slot = p.nodes["b"].slot;
        // A node listed before b: only it is written.
        let (ops, _) = p.plan(&state(&["a", "a2", "b"])).unwrap();
        assert!(
            matches!(&ops[..], [Op::PutNode(s, v), Op::PutNodeIndex(a, i)]
                if *s != b_slot && v.gen_ == 1 && a == &v.addr[0] && i == s),
            "{ops:#?}"
        );
        assert_eq!(p.nodes["b"].slot, b_slot);
        // It leaves again: its slot is freed, last.
        let a2 = p.nodes["a2"].slot;
        let (ops, _) = p.plan(&state(&["a", "b"])).unwrap();
        assert!(
            matches!(&ops[..], [Op::DelNodeIndex(_), Op::DelNode(s)] if *s == a2),
            "{ops:#?}"
        );
        // The next node takes the freed slot with the next generation.
        p.plan(&state(&["a", "b", "c"])).unwrap();
        assert_eq!(p.nodes["c"].slot, a2);
        assert_eq!(p.nodes["c"].value.gen_, 2);
    }

    /// The table of the web service as planned: backend ids turned back
    /// into task identities.
    fn table_of(p: &Planner, ops: &[Op]) -> BTreeSet<Ipv4Addr> {
        let ids: HashMap<u32, Ipv4Addr> = p.backends.iter().map(|(k, id)| (*id, k.addr)).collect();
        ops.iter()
            .filter_map(|o| match o {
                Op::WriteTable { table, .. } => Some(table.iter().map(|id| ids[id])),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Tasks of a drained node keep their backend slots (conntrack entries
    /// of established flows still find them, same slot, same generation)
    /// and leave every table; undrained, they come back to the tables in
    /// the same slots.
    #[test]
    fn a_drained_nodes_backends_stay_in_the_backend_map_and_leave_every_table() {
        use crate::model::Availability;
        let state = |a: Availability| {
            let s = StateBuilder::new()
                .node("n1", N1)
                .node("n2", N2)
                .service(
                    "web",
                    &[(Proto::Tcp, 30080, 8080), (Proto::Udp, 30053, 5353)],
                )
                .task("web", "n1", task(2))
                .task("web", "n2", task(3))
                .task("web", "n2", task(4))
                .availability("n2", a)
                .build()
                .unwrap();
            Desired::compute(&s, "n1", &[]).unwrap()
        };
        let mut p = Planner::new(limits());
        let (ops, _) = p.plan(&state(Availability::Active)).unwrap();
        assert_eq!(table_of(&p, &ops), [task(2), task(3), task(4)].into());
        let before = p.backends.clone();

        let (ops, r) = p.plan(&state(Availability::Drain)).unwrap();
        assert_eq!((r.backends_added, r.backends_removed), (0, 0));
        assert_eq!(r.services_changed, 2, "both ports' tables change");
        // n2's backends are marked in place (same slot, same generation:
        // conntrack still finds them), before any table is switched.
        let first_switch = ops
            .iter()
            .position(|o| matches!(o, Op::PutService { .. }))
            .unwrap();
        let marked: Vec<(usize, u32, Backend)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                Op::PutBackend(id, b) => Some((i, *id, *b)),
                _ => None,
            })
            .collect();
        assert!(!ops.iter().any(|o| matches!(o, Op::DelBackend(_))));
        let n2: BTreeSet<u32> = before
            .iter()
            .filter(|(k, _)| k.node == "n2")
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(
            marked.iter().map(|(_, id, _)| *id).collect::<BTreeSet<_>>(),
            n2
        );
        for (i, id, b) in &marked {
            assert!(*i < first_switch, "marked before the switch: {ops:#?}");
            assert_eq!(b.flags, BE_F_REMOTE | BE_F_NO_NEW);
            assert_eq!(b.gen_, p.backend_slots.gen_of(*id));
        }
        assert_eq!(p.backends, before);
        // Every table (one per published port) holds only n1's task.
        let tables = ops
            .iter()
            .filter(|o| matches!(o, Op::WriteTable { .. }))
            .count();
        assert_eq!(tables, 2);
        assert_eq!(table_of(&p, &ops), [task(2)].into());
        for o in &ops {
            if let Op::PutService { value, .. } = o {
                assert_eq!(value.backend_count, 1);
            }
        }

        let (ops, r) = p.plan(&state(Availability::Active)).unwrap();
        assert_eq!((r.backends_added, r.backends_removed), (0, 0));
        assert_eq!(p.backends, before, "back in the same slots");
        assert!(
            ops.iter()
                .filter_map(|o| match o {
                    Op::PutBackend(_, b) => Some(b),
                    _ => None,
                })
                .all(|b| b.flags == BE_F_REMOTE),
            "unmarked: {ops:#?}"
        );
        assert_eq!(table_of(&p, &ops), [task(2), task(3), task(4)].into());
    }

    /// A service whose every task is draining keeps its port (established
    /// flows go on) with an empty table (new flows: no backend).
    #[test]
    fn a_service_with_only_draining_tasks_has_an_empty_table() {
        let s = StateBuilder::new()
            .node("n1", N1)
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .task("web", "n1", task(2))
            .draining()
            .build()
            .unwrap();
        let mut p = Planner::new(limits());
        let (ops, r) = p.plan(&Desired::compute(&s, "n1", &[]).unwrap()).unwrap();
        assert_eq!((r.services_added, r.backends_added), (1, 1));
        assert!(!ops.iter().any(|o| matches!(o, Op::WriteTable { .. })));
        assert!(ops.iter().any(|o| matches!(
            o,
            Op::PutService { value, .. } if value.table_size == 0 && value.backend_count == 0
        )));
        // Its replies are still translated.
        assert_eq!(p.reply_count(), 1);
    }

    /// A local task's backend entry and reply key hold its delivery
    /// address; its table entry is found by its identity.
    #[test]
    fn a_local_backend_holds_its_delivery_address() {
        let deliver = Ipv4Addr::new(198, 18, 21, 3);
        let s = StateBuilder::new()
            .node("n1", N1)
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .task("web", "n1", task(2))
            .delivered_at(deliver)
            .build()
            .unwrap();
        let mut p = Planner::new(limits());
        let (ops, _) = p.plan(&Desired::compute(&s, "n1", &[]).unwrap()).unwrap();
        assert!(ops.iter().any(
            |o| matches!(o, Op::PutBackend(_, b) if b.addr[0] == raw4(deliver) && b.flags == BE_F_LOCAL)
        ));
        assert!(
            ops.iter()
                .any(|o| matches!(o, Op::PutReply(k, _) if k.addr == raw4(deliver)))
        );
        assert_eq!(table_of(&p, &ops), [task(2)].into());
    }
}

#[cfg(test)]
mod reply_tests {
    use super::*;
    use crate::model::StateBuilder;

    /// The web service on tcp 30080 and 30081 (both -> 8080) on tasks of n1.
    fn desired(tasks: &[&str], extra: &[Ipv4Addr]) -> Desired {
        let s = StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .service(
                "web",
                &[(Proto::Tcp, 30080, 8080), (Proto::Tcp, 30081, 8080)],
            )
            .tasks(
                "web",
                "n1",
                tasks.iter().map(|t| t.parse::<Ipv4Addr>().unwrap()),
            )
            .build()
            .unwrap();
        Desired::compute(&s, "n1", extra).unwrap()
    }

    fn planner() -> Planner {
        Planner::new(Limits {
            maglev_size: 251,
            ..Limits::default()
        })
    }

    #[test]
    fn a_task_behind_two_published_ports_gets_both_candidates() {
        let mut p = planner();
        let (ops, _) = p.plan(&desired(&["198.18.129.2"], &[])).unwrap();
        let r = ops
            .iter()
            .find_map(|o| match o {
                Op::PutReply(_, v) => Some(*v),
                _ => None,
            })
            .unwrap();
        assert_eq!(r.count, 2);
        let ports: Vec<u16> = r.cands[..2]
            .iter()
            .map(|c| u16::from_be(c.port_be))
            .collect();
        assert_eq!(ports, [30080, 30081]);
    }

    #[test]
    fn too_many_candidates_are_refused_before_any_op() {
        let mut p = planner();
        let extra = [
            Ipv4Addr::new(198, 18, 128, 5),
            Ipv4Addr::new(198, 18, 128, 6),
        ];
        let e = p
            .plan(&desired(&["198.18.129.2"], &extra))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("198.18.129.2") && e.contains("6 (node address, published port) pairs"),
            "{e}"
        );
        assert_eq!(p.reply_count(), 0);
    }

    /// Reply entries of removed tasks stay for their grace period only in
    /// the room the live ones leave: the oldest go early, so the reply map
    /// never overflows however fast tasks change.
    #[test]
    fn retired_reply_entries_leave_early_when_room_is_needed() {
        let mut p = Planner::new(Limits {
            maglev_size: 251,
            max_backends: 2,
            ..Limits::default()
        });
        let cap = p.limits().reply_entries() as usize;
        let t0 = Instant::now();
        let mut early = 0;
        for i in 0..10u8 {
            let task = format!("198.18.129.{}", 2 + i);
            let (ops, _) = p
                .plan_at(
                    &desired(&[task.as_str()], &[]),
                    t0 + Duration::from_secs(i.into()),
                )
                .unwrap();
            early += ops.iter().filter(|o| matches!(o, Op::DelReply(_))).count();
            // Deletes come before the insert that needs their room.
            if let Some(put) = ops.iter().position(|o| matches!(o, Op::PutReply(..))) {
                assert!(!ops[put..].iter().any(|o| matches!(o, Op::DelReply(_))));
            }
            assert!(p.reply_count() <= cap, "{} > {cap}", p.reply_count());
        }
        assert!(early > 0, "the oldest retired entries left early");
    }

    #[test]
    fn a_removed_backends_reply_entry_outlives_it_by_the_grace_period() {
        let mut p = planner();
        let t0 = Instant::now();
        p.plan_at(&desired(&["198.18.129.2", "198.18.129.3"], &[]), t0)
            .unwrap();
        let (ops, _) = p.plan_at(&desired(&["198.18.129.2"], &[]), t0).unwrap();
        assert!(ops.iter().any(|o| matches!(o, Op::DelBackend(_))));
        assert!(
            !ops.iter().any(|o| matches!(o, Op::DelReply(_))),
            "kept during the grace period"
        );
        assert!(p.expire(t0 + REPLY_GRACE / 2).is_empty());
        assert!(
            matches!(p.expire(t0 + REPLY_GRACE)[..], [Op::DelReply(k)] if k.addr == raw4(Ipv4Addr::new(198, 18, 129, 3)))
        );
        assert_eq!(p.reply_count(), 1);
    }
}

#[cfg(test)]
mod adopt_tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::{Availability, StateBuilder};

    use crate::test_rng::Rng;

    /// Three nodes (n1 is this one, one of the others sometimes leaves),
    /// up to three services on two ports each, tasks here and there,
    /// some draining, some delivered at an address of their own.
    fn random_state(rng: &mut Rng) -> Desired {
        let mut b = StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .node("n2", [198, 18, 128, 2]);
        let n3 = !rng.one_in(3);
        if n3 {
            b = b.node("n3", [198, 18, 128, 3]);
            if rng.one_in(4) {
                b = b.availability("n3", Availability::Drain);
            }
        }
        for (k, (name, port)) in [("a", 30080u16), ("b", 30081), ("c", 30082)]
            .into_iter()
            .enumerate()
        {
            if rng.one_in(4) {
                continue;
            }
            // Sometimes another service takes the port.
            let name = if rng.one_in(8) {
                format!("{name}2")
            } else {
                name.to_string()
            };
            b = b.service(&name, &[(Proto::Tcp, port, 8080), (Proto::Udp, port, 53)]);
            if rng.one_in(3) {
                let r = |s: &str| crate::model::Cidr4::parse(s).unwrap();
                let ranges = match rng.next() % 3 {
                    0 => vec![r("198.18.0.0/16")],
                    1 => vec![r("198.18.0.0/16"), r("198.20.1.0/24")],
                    _ => vec![r("198.20.1.0/24")],
                };
                b = b.source_ranges(&name, &ranges);
            }
            if rng.one_in(4) {
                b = b.traffic(&name, crate::model::Traffic::Local);
            }
            for t in 0..5u8 {
                if rng.one_in(2) {
                    continue;
                }
                let node = match t % 3 {
                    0 => "n1",
                    1 => "n2",
                    _ if n3 => "n3",
                    _ => "n1",
                };
                b = b.task(&name, node, [198, 19, k as u8, 10 + t]);
                if node == "n1" && rng.one_in(2) {
                    b = b.delivered_at([198, 18, 21, 10 * k as u8 + t]);
                }
                if rng.one_in(6) {
                    b = b.draining();
                }
            }
        }
        Desired::compute(&b.build().unwrap(), "n1", &[]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            maglev_size: 7,
            max_backends: 64,
            max_services: 16,
            max_nodes: 8,
            ..Limits::default()
        }
    }

    /// What connection tracking entries name: each backend's slot and
    /// generation, each port's service id and generation.
    type Identities = (
        BTreeSet<(String, u32, u32)>,
        BTreeSet<((Proto, u16), u32, u32)>,
    );

    fn identities(p: &Planner) -> Identities {
        let backends = p
            .backends
            .iter()
            .map(|(k, id)| (format!("{k:?}"), *id, p.backend_slots.gen_of(*id)))
            .collect();
        let services = p
            .services
            .iter()
            .map(|(k, s)| (*k, s.svc_id, s.gen_))
            .collect();
        (backends, services)
    }

    /// A meshd that restarts adopts the maps its predecessor wrote: every
    /// backend, node and service keeps its slot and generation (so every
    /// conntrack entry still names them), only the tables are written
    /// again (into the halves no packet reads), and no (slot, generation)
    /// pair handed out before the restart is ever handed out again.
    #[test]
    fn an_adopted_planner_keeps_what_conntrack_names_and_never_repeats_a_generation() {
        for seed in 1..=300u64 {
            let mut rng = Rng::seeded(seed);
            let mut p = Planner::new(limits());
            let mut maps = Snapshot::default();
            let mut handed: BTreeSet<(u32, u32)> = BTreeSet::new();
            let mut last = random_state(&mut rng);
            for _ in 0..1 + rng.next() % 8 {
                last = random_state(&mut rng);
                let (ops, _) = p.plan(&last).unwrap();
                for op in &ops {
                    if let Op::PutBackend(id, b) = op {
                        handed.insert((*id, b.gen_));
                    }
                    maps.apply(op);
                }
            }
            // The restart: the planner is gone, the maps stay.
            let (mut q, report) = Planner::adopt(limits(), &maps, &last);
            assert_eq!(
                report.named, report.ports,
                "seed {seed}: every port is named"
            );
            assert_eq!(identities(&q), identities(&p), "seed {seed}");
            assert_eq!(q.src, p.src, "seed {seed}: allow lists");
            // The regions packets read: those of the live halves.
            let live: Vec<Region> = p
                .services
                .values()
                .map(|s| s.regions[s.half as usize])
                .filter(|r| r.len > 0)
                .collect();
            let (ops, r) = q.plan(&last).unwrap();
            assert_eq!(
                (
                    r.backends_added,
                    r.backends_removed,
                    r.services_added,
                    r.services_removed
                ),
                (0, 0, 0, 0),
                "seed {seed}: {ops:#?}"
            );
            for op in &ops {
                match op {
                    Op::WriteTable { offset, table } => {
                        let end = offset + table.len() as u32;
                        assert!(
                            live.iter()
                                .all(|r| end <= r.off || r.off + r.len <= *offset),
                            "seed {seed}: a table packets read ({offset}..{end} over {live:?})"
                        );
                    }
                    Op::PutService { .. } | Op::PutReply(..) | Op::DelReply(_) => {}
                    other => panic!("seed {seed}: adopting rewrote {other:?}"),
                }
                maps.apply(op);
            }
            assert_eq!(identities(&q), identities(&p), "seed {seed}");
            assert_eq!(q.plan(&last).unwrap().0, vec![], "seed {seed}: settled");
            // Life goes on after the restart: new slots never repeat an
            // old (slot, generation) pair, even after another restart.
            for round in 0..6 {
                let d = random_state(&mut rng);
                let (ops, _) = q.plan(&d).unwrap();
                for op in &ops {
                    // (A backend marked in place keeps its pair.)
                    if let Op::PutBackend(id, b) = op
                        && maps.backends.get(id).map(|x| x.gen_) != Some(b.gen_)
                    {
                        assert!(
                            handed.insert((*id, b.gen_)),
                            "seed {seed}: ({id}, {}) handed out twice",
                            b.gen_
                        );
                    }
                    maps.apply(op);
                }
                if round == 2 {
                    q = Planner::adopt(limits(), &maps, &d).0;
                    let (ops, _) = q.plan(&d).unwrap();
                    ops.iter().for_each(|op| maps.apply(op));
                }
            }
        }
    }

    /// A port whose kept name is not its service's (another service took
    /// the port, or the name was never written) is a new service: a new
    /// generation, so the flows of whatever held it are not its.
    #[test]
    fn a_port_without_its_name_starts_over() {
        let s = StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .task("web", "n1", [198, 18, 129, 2])
            .build()
            .unwrap();
        let d = Desired::compute(&s, "n1", &[]).unwrap();
        let mut p = Planner::new(limits());
        let mut maps = Snapshot::default();
        p.plan(&d).unwrap().0.iter().for_each(|o| maps.apply(o));
        maps.names.clear();
        let (mut q, r) = Planner::adopt(limits(), &maps, &d);
        assert_eq!((r.ports, r.named), (1, 0));
        let (ops, _) = q.plan(&d).unwrap();
        let old = p.services[&(Proto::Tcp, 30080)].gen_;
        assert!(
            ops.iter().any(
                |o| matches!(o, Op::PutService { value, .. } if value.gen_ > old && value.svc_id == 0)
            ),
            "{ops:#?}"
        );
        assert!(
            ops.iter()
                .any(|o| matches!(o, Op::PutName(_, n) if n.name() == "web"))
        );
    }
}

#[cfg(test)]
mod src_tests {
    use super::*;
    use crate::model::{Cidr4, StateBuilder};

    fn d(ranges: &[&str]) -> Desired {
        let r: Vec<Cidr4> = ranges.iter().map(|c| Cidr4::parse(c).unwrap()).collect();
        let mut b = StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .task("web", "n1", [198, 18, 129, 2]);
        if !r.is_empty() {
            b = b.source_ranges("web", &r);
        }
        Desired::compute(&b.build().unwrap(), "n1", &[]).unwrap()
    }

    fn planner() -> Planner {
        Planner::new(Limits {
            maglev_size: 7,
            max_src_ranges: 3,
            ..Limits::default()
        })
    }

    /// An allow list switches with its service: ranges it gains are
    /// written before the switch (the half switched to never denies what
    /// it allows), ranges it loses are deleted after; the flag follows.
    #[test]
    fn an_allow_list_changes_make_before_break() {
        let mut p = planner();
        let (ops, _) = p.plan(&d(&["198.18.0.0/16"])).unwrap();
        let put = ops
            .iter()
            .position(|o| matches!(o, Op::PutSrc(0, _)))
            .unwrap();
        let svc = ops
            .iter()
            .position(|o| matches!(o, Op::PutService { value, .. } if value.flags & SVC_F_SRC_RANGES != 0))
            .unwrap();
        assert!(put < svc);
        let (ops, r) = p.plan(&d(&["198.20.1.0/24"])).unwrap();
        assert_eq!(r.services_changed, 1);
        match &ops[..] {
            [
                Op::WriteTable { .. },
                Op::PutSrc(0, new),
                Op::PutService { .. },
                Op::DelSrc(0, old),
            ] => {
                assert_eq!(new.to_string(), "198.20.1.0/24");
                assert_eq!(old.to_string(), "198.18.0.0/16");
            }
            other => panic!("{other:#?}"),
        }
        // No list: the flag goes with the switch, the entries after it.
        let (ops, _) = p.plan(&d(&[])).unwrap();
        assert!(
            matches!(
                &ops[..],
                [Op::WriteTable { .. }, Op::PutService { value, .. }, Op::DelSrc(0, _)]
                    if value.flags & SVC_F_SRC_RANGES == 0
            ),
            "{ops:#?}"
        );
    }

    /// Old and new ranges live side by side for a moment: the map must
    /// hold both, or the state is refused before any op.
    #[test]
    fn too_many_ranges_are_refused_before_any_op() {
        let mut p = planner();
        p.plan(&d(&["198.18.0.0/16", "198.19.0.0/16"])).unwrap();
        let e = p
            .plan(&d(&["198.20.0.0/16", "198.21.0.0/16"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceed --max-source-ranges 3"), "{e}");
    }
}

#[cfg(test)]
mod affinity_tests {
    use super::*;
    use crate::model::StateBuilder;

    fn d(affinity: Option<u32>, draining: bool) -> Desired {
        let mut b = StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .task("web", "n1", [198, 18, 129, 2])
            .task("web", "n1", [198, 18, 129, 3]);
        if draining {
            b = b.draining();
        }
        if let Some(t) = affinity {
            b = b.affinity("web", t);
        }
        Desired::compute(&b.build().unwrap(), "n1", &[]).unwrap()
    }

    /// Affinity reaches the service's flags, its timeout is written before
    /// the switch to the slot that has the flag, and a new timeout alone
    /// switches the service again.
    #[test]
    fn affinity_sets_the_flag_and_its_timeout_goes_before_the_switch() {
        let web = d(Some(600), false);
        assert_eq!(web.services[&(Proto::Tcp, 30080)].affinity, Some(600));
        let mut p = Planner::new(Limits::default());
        let (ops, _) = p.plan(&d(None, false)).unwrap();
        assert!(!ops.iter().any(|o| matches!(o, Op::PutAffTimeout(..))));
        let (ops, r) = p.plan(&web).unwrap();
        assert_eq!(r.services_changed, 1);
        let at = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).unwrap();
        let timeout = at(&|o| matches!(o, Op::PutAffTimeout(0, u) if *u == secs_to_units(600)));
        let switch =
            at(&|o| matches!(o, Op::PutService { value, .. } if value.flags & SVC_F_AFFINITY != 0));
        assert!(timeout < switch, "{ops:#?}");
        assert_eq!(p.plan(&web).unwrap().0, vec![], "settled");
        let (ops, _) = p.plan(&d(Some(60), false)).unwrap();
        assert!(
            ops.contains(&Op::PutAffTimeout(0, secs_to_units(60))),
            "{ops:#?}"
        );
        let (ops, _) = p.plan(&d(None, false)).unwrap();
        assert!(ops.iter().any(
            |o| matches!(o, Op::PutService { value, .. } if value.flags & SVC_F_AFFINITY == 0)
        ));
    }

    /// A task that drains is marked `BE_F_NO_NEW` (in place) before the
    /// table without it is switched to, so that no affinity entry sends it
    /// a new flow; a restarted meshd adopts the mark.
    #[test]
    fn a_draining_backend_is_marked_before_its_table_switch_and_the_mark_is_adopted() {
        let mut p = Planner::new(Limits::default());
        let mut maps = Snapshot::default();
        for op in p.plan(&d(Some(600), false)).unwrap().0 {
            maps.apply(&op);
        }
        let (ops, _) = p.plan(&d(Some(600), true)).unwrap();
        let mark = ops
            .iter()
            .position(|o| matches!(o, Op::PutBackend(_, b) if b.flags & BE_F_NO_NEW != 0))
            .expect("marked");
        let switch = ops
            .iter()
            .position(|o| matches!(o, Op::PutService { .. }))
            .unwrap();
        assert!(mark < switch, "{ops:#?}");
        ops.iter().for_each(|o| maps.apply(o));
        let (mut q, _) = Planner::adopt(Limits::default(), &maps, &d(Some(600), true));
        let (ops, _) = q.plan(&d(Some(600), true)).unwrap();
        assert!(
            !ops.iter().any(|o| matches!(o, Op::PutBackend(..))),
            "the mark is adopted: {ops:#?}"
        );
        let (ops, _) = q.plan(&d(Some(600), false)).unwrap();
        assert!(
            ops.iter()
                .any(|o| matches!(o, Op::PutBackend(_, b) if b.flags == BE_F_LOCAL)),
            "unmarked: {ops:#?}"
        );
    }
}
