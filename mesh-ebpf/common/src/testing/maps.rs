//! The BPF maps on the host: plain collections in the kernel maps' shapes
//! (the port array, service, backend and node slots, one flat Maglev
//! array, the node-address set), implementing [`Tables`] and [`RevTables`] the way
//! `mesh-ebpf/programs/src/maps.rs` does. Host tests, fixtures and the
//! simulation therefore exercise the lookups the kernel makes, not a
//! friendlier model of them.
//!
//! The write methods are what user space does to the kernel maps, and fail
//! where the kernel would (an index past the map, a full set).

use core::cell::{Cell, Ref, RefCell};
use core::fmt;
use std::collections::{HashMap, HashSet};
use std::vec;
use std::vec::Vec;

use crate::abi::*;
use crate::fwd::Tables;
use crate::rev::RevTables;

/// Map sizes, as the loader sets them (`max_entries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Services; `MAP_SERVICES` holds two slots per service,
    /// `MAP_SVC_STATS` one entry.
    pub max_services: u32,
    /// Backend slots.
    pub max_backends: u32,
    /// Entries of `MAP_REPLY4`.
    pub reply_entries: u32,
    /// Entries of `MAP_MAGLEV` (rounded up to a pair, as the kernel's
    /// array of pairs is).
    pub maglev_entries: u32,
    /// Node slots (`MAP_NODES`).
    pub max_nodes: u32,
}

/// A write the kernel would refuse too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Index `index` (or a region ending there) is past the end of `map`.
    OutOfRange { map: &'static str, index: u64 },
    /// `map` has no room for another entry.
    Full { map: &'static str },
    /// A service key of a protocol `MAP_PORTS` has no place for.
    Protocol { proto: u8 },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::OutOfRange { map, index } => write!(f, "{map}: index {index} out of range"),
            MapError::Full { map } => write!(f, "{map}: full"),
            MapError::Protocol { proto } => write!(f, "no published ports of protocol {proto}"),
        }
    }
}

impl std::error::Error for MapError {}

pub struct HostMaps {
    sizes: Sizes,
    /// `MAP_PORTS`: (protocol, port) -> service slot + 1, 0 = none.
    ports: Vec<u32>,
    /// `MAP_SERVICES`, by slot (`svc_id * 2 + half`).
    services: Vec<SvcValue>,
    /// `MAP_NODE_ADDR4`: 0 marks a free place.
    node_addrs: [u32; MAX_NODE_ADDRS as usize],
    /// `MAP_BACKENDS`, by slot; a free slot is all zero.
    backends: Vec<Backend>,
    /// `MAP_MAGLEV`, flat.
    maglev: Vec<u32>,
    /// `MAP_CT4` (confirmed flows). Unbounded: the kernel's is an LRU
    /// map, which evicts instead of failing.
    ct: RefCell<HashMap<FlowKey4, CtValue>>,
    /// `MAP_CT4_UDP` (confirmed UDP flows), likewise.
    ct_udp: RefCell<HashMap<FlowKey4, CtValue>>,
    /// `MAP_CT4_NEW` (unconfirmed flows), likewise.
    ct_new: RefCell<HashMap<FlowKey4, CtValue>>,
    /// The coarse clock, in conntrack units; moved by the tests.
    now: Cell<u32>,
    /// `CT_LIFETIMES`.
    lifetimes: CtLifetimes,
    /// TCP sockets of "the node", as a packet to them carries the 4-tuple.
    host_sockets: HashSet<FlowKey4>,
    /// `MAP_CONFIG`.
    config: NodeConfig,
    /// `MAP_NODE_BY_ADDR4`.
    node_by_addr: HashMap<u32, u32>,
    /// `MAP_LOCAL4`.
    local: HashMap<ReplyKey4, u32>,
    /// `MAP_FWD4`. Unbounded, as conntrack.
    fwd: RefCell<HashMap<FlowKey4, FwdValue>>,
    /// `MAP_COUNTERS` (one CPU).
    counters: RefCell<[u64; MAX_COUNTERS as usize]>,
    /// `MAP_REPLY4`.
    replies: HashMap<ReplyKey4, ReplyValue4>,
    /// `MAP_SVC_STATS`, by svc id (one CPU).
    stats: RefCell<Vec<SvcStats>>,
    /// `MAP_NODES`, by slot; a free slot is all zero.
    nodes: Vec<NodeValue>,
    /// Calls of `is_node_addr4`, for tests of which lookups a path makes.
    node_addr_lookups: Cell<u64>,
    /// `MAP_LOCAL_DEV`, by backend slot; an unused entry is all zero.
    local_devs: Vec<LocalDev>,
    /// `MAP_SRC4`: (svc id, range address in host order, prefix length).
    src: Vec<(u32, u32, u8)>,
    /// `MAP_AFF4`. Unbounded, as conntrack.
    aff: RefCell<HashMap<AffKey4, AffValue4>>,
    /// `MAP_AFF_TIMEOUT`, by svc id.
    aff_timeout: Vec<u32>,
}

impl HostMaps {
    /// Empty maps of the given sizes, as a fresh load leaves them.
    pub fn new(sizes: Sizes) -> Self {
        Self {
            sizes,
            ports: vec![0; PORT_INDEX_ENTRIES as usize],
            services: vec![SvcValue::default(); 2 * sizes.max_services as usize],
            node_addrs: [0; MAX_NODE_ADDRS as usize],
            backends: vec![Backend::default(); sizes.max_backends as usize],
            maglev: vec![0; sizes.maglev_entries.next_multiple_of(2) as usize],
            ct: RefCell::default(),
            ct_udp: RefCell::default(),
            ct_new: RefCell::default(),
            now: Cell::new(1000),
            lifetimes: CtLifetimes::default(),
            host_sockets: HashSet::new(),
            config: NodeConfig {
                encap_port_be: DEFAULT_ENCAP_PORT.to_be(),
                mtu: 1500,
                ..Default::default()
            },
            node_by_addr: HashMap::new(),
            local: HashMap::new(),
            fwd: RefCell::default(),
            counters: RefCell::new([0; MAX_COUNTERS as usize]),
            replies: HashMap::new(),
            stats: RefCell::new(vec![SvcStats::default(); sizes.max_services as usize]),
            nodes: vec![NodeValue::default(); sizes.max_nodes as usize],
            node_addr_lookups: Cell::new(0),
            local_devs: vec![LocalDev::default(); sizes.max_backends as usize],
            src: Vec::new(),
            aff: RefCell::default(),
            aff_timeout: vec![0; sizes.max_services as usize],
        }
    }

    /// Sets service `svc_id`'s affinity timeout (conntrack units).
    pub fn put_aff_timeout(&mut self, svc_id: u32, units: u32) -> Result<(), MapError> {
        *at(&mut self.aff_timeout, MAP_AFF_TIMEOUT, svc_id)? = units;
        Ok(())
    }

    /// What this node remembers of clients of services with affinity.
    pub fn aff(&self) -> Ref<'_, HashMap<AffKey4, AffValue4>> {
        self.aff.borrow()
    }

    /// Forgets every client (as a restart with a fresh affinity map).
    pub fn clear_aff(&mut self) {
        self.aff.get_mut().clear();
    }

    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    // Writes, as user space makes them to the kernel maps.

    /// Writes service slot `slot` (one no packet reads: see
    /// [`HostMaps::switch_port`]).
    pub fn put_service(&mut self, slot: u32, value: SvcValue) -> Result<(), MapError> {
        *at(&mut self.services, MAP_SERVICES, slot)? = value;
        Ok(())
    }

    /// Points the port of `key` at service slot `slot` (the kernel's one
    /// 32-bit store into the memory-mapped port array).
    pub fn switch_port(&mut self, key: &SvcKey, slot: u32) -> Result<(), MapError> {
        if slot >= self.services.len() as u32 {
            return Err(MapError::OutOfRange {
                map: MAP_SERVICES,
                index: slot as u64,
            });
        }
        *self.port_mut(key)? = slot + 1;
        Ok(())
    }

    /// Unpublishes the port of `key` (its service slots stay as they are,
    /// unread).
    pub fn del_port(&mut self, key: &SvcKey) -> Result<(), MapError> {
        *self.port_mut(key)? = 0;
        Ok(())
    }

    pub fn put_backend(&mut self, id: u32, b: Backend) -> Result<(), MapError> {
        *at(&mut self.backends, MAP_BACKENDS, id)? = b;
        Ok(())
    }

    /// Frees backend slot `id` (all zero).
    pub fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.put_backend(id, Backend::default())
    }

    /// Copies `table` into the Maglev array at `offset`.
    pub fn write_table(&mut self, offset: u32, table: &[u32]) -> Result<(), MapError> {
        let (o, end) = (offset as usize, offset as usize + table.len());
        if end > self.maglev.len() {
            return Err(MapError::OutOfRange {
                map: MAP_MAGLEV,
                index: end as u64,
            });
        }
        self.maglev[o..end].copy_from_slice(table);
        Ok(())
    }

    /// Adds `addr` to the node-address set (in the first free place),
    /// unless it is there already.
    pub fn put_node_addr(&mut self, addr: u32) -> Result<(), MapError> {
        if self.node_addrs.contains(&addr) {
            return Ok(());
        }
        let free = self
            .node_addrs
            .iter_mut()
            .find(|a| **a == 0)
            .ok_or(MapError::Full {
                map: MAP_NODE_ADDR4,
            })?;
        *free = addr;
        Ok(())
    }

    pub fn del_node_addr(&mut self, addr: u32) {
        if let Some(a) = self.node_addrs.iter_mut().find(|a| **a == addr) {
            *a = 0;
        }
    }

    pub fn put_reply(&mut self, key: ReplyKey4, value: ReplyValue4) -> Result<(), MapError> {
        if !self.replies.contains_key(&key)
            && self.replies.len() >= self.sizes.reply_entries as usize
        {
            return Err(MapError::Full { map: MAP_REPLY4 });
        }
        self.replies.insert(key, value);
        Ok(())
    }

    pub fn del_reply(&mut self, key: &ReplyKey4) {
        self.replies.remove(key);
    }

    /// Zeroes a service's counters.
    pub fn reset_stats(&mut self, svc_id: u32) -> Result<(), MapError> {
        *at(self.stats.get_mut(), MAP_SVC_STATS, svc_id)? = SvcStats::default();
        Ok(())
    }

    pub fn put_node(&mut self, slot: u32, node: NodeValue) -> Result<(), MapError> {
        *at(&mut self.nodes, MAP_NODES, slot)? = node;
        Ok(())
    }

    /// Frees node slot `slot` (all zero).
    pub fn del_node(&mut self, slot: u32) -> Result<(), MapError> {
        self.put_node(slot, NodeValue::default())
    }

    /// Empties conntrack (both tables).
    pub fn clear_ct(&mut self) {
        self.ct.get_mut().clear();
        self.ct_udp.get_mut().clear();
        self.ct_new.get_mut().clear();
    }

    /// Allows `addr/len` (raw address) to service `svc_id`.
    pub fn put_src(&mut self, svc_id: u32, addr: u32, len: u8) {
        let e = (svc_id, u32::from_be(addr), len);
        if !self.src.contains(&e) {
            self.src.push(e);
        }
    }

    pub fn del_src(&mut self, svc_id: u32, addr: u32, len: u8) {
        let e = (svc_id, u32::from_be(addr), len);
        self.src.retain(|x| *x != e);
    }

    pub fn put_config(&mut self, c: NodeConfig) {
        self.config = c;
    }

    pub fn put_node_index(&mut self, addr: u32, slot: u32) {
        self.node_by_addr.insert(addr, slot);
    }

    pub fn del_node_index(&mut self, addr: u32) {
        self.node_by_addr.remove(&addr);
    }

    pub fn put_local(&mut self, key: ReplyKey4, slot: u32) {
        self.local.insert(key, slot);
    }

    pub fn del_local(&mut self, key: &ReplyKey4) {
        self.local.remove(key);
    }

    /// Where local backend `id`'s packets go.
    pub fn put_local_dev(&mut self, id: u32, d: LocalDev) -> Result<(), MapError> {
        *at(&mut self.local_devs, MAP_LOCAL_DEV, id)? = d;
        Ok(())
    }

    /// Clears backend slot `id`'s entry (all zero: delivery by the FIB).
    pub fn del_local_dev(&mut self, id: u32) -> Result<(), MapError> {
        self.put_local_dev(id, LocalDev::default())
    }

    /// The entry of backend slot `id`, as the programs read it.
    pub fn local_dev(&self, id: u32) -> Option<LocalDev> {
        self.local_devs.get(id as usize).copied()
    }

    /// What this node keeps of forwarded flows.
    pub fn fwd(&self) -> Ref<'_, HashMap<FlowKey4, FwdValue>> {
        self.fwd.borrow()
    }

    /// A forwarding counter.
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.borrow()[c as usize]
    }

    /// Moves the clock on by `secs`.
    pub fn advance(&self, secs: u32) {
        self.now.set(self.now.get() + secs_to_units(secs));
    }

    pub fn set_lifetimes(&mut self, lt: CtLifetimes) {
        self.lifetimes = lt;
    }

    /// A TCP socket of the node's own: packets with this 4-tuple (as they
    /// arrive: source is the remote end) are its.
    pub fn add_host_socket(&mut self, key: FlowKey4) {
        self.host_sockets.insert(key);
    }

    // Reads, beyond the traits.

    /// The service slot the port of `key` points at.
    pub fn port(&self, key: &SvcKey) -> Option<u32> {
        let i = port_index(key.proto, key.port_be)?;
        self.ports[i as usize].checked_sub(1)
    }

    /// Service slot `slot`, read or not.
    pub fn service_slot(&self, slot: u32) -> Option<SvcValue> {
        self.services.get(slot as usize).copied()
    }

    /// Backend slot `id` as stored, free or not.
    pub fn backend_slot(&self, id: u32) -> Option<Backend> {
        self.backends.get(id as usize).copied()
    }

    /// Node slot `slot` as stored, free or not.
    pub fn node(&self, slot: u32) -> Option<NodeValue> {
        self.nodes.get(slot as usize).copied()
    }

    pub fn node_addrs(&self) -> &[u32; MAX_NODE_ADDRS as usize] {
        &self.node_addrs
    }

    pub fn reply(&self, key: &ReplyKey4) -> Option<ReplyValue4> {
        self.replies.get(key).copied()
    }

    pub fn replies(&self) -> &HashMap<ReplyKey4, ReplyValue4> {
        &self.replies
    }

    /// The confirmed TCP flows' entries.
    pub fn ct(&self) -> Ref<'_, HashMap<FlowKey4, CtValue>> {
        self.ct.borrow()
    }

    /// The confirmed UDP flows' entries.
    pub fn ct_udp(&self) -> Ref<'_, HashMap<FlowKey4, CtValue>> {
        self.ct_udp.borrow()
    }

    fn confirmed(&self, key: &FlowKey4) -> &RefCell<HashMap<FlowKey4, CtValue>> {
        if key.proto == IPPROTO_TCP {
            &self.ct
        } else {
            &self.ct_udp
        }
    }

    /// The unconfirmed flows' entries.
    pub fn ct_new(&self) -> Ref<'_, HashMap<FlowKey4, CtValue>> {
        self.ct_new.borrow()
    }

    /// A flow's entry, wherever it is, and whether it is confirmed.
    pub fn ct_any(&self, key: &FlowKey4) -> Option<(CtValue, bool)> {
        if let Some(c) = self.confirmed(key).borrow().get(key) {
            return Some((*c, true));
        }
        self.ct_new.borrow().get(key).map(|c| (*c, false))
    }

    /// A service's counters (zero for an id past the map).
    pub fn stats(&self, svc_id: u32) -> SvcStats {
        self.stats
            .borrow()
            .get(svc_id as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Every service's counters, by svc id.
    pub fn all_stats(&self) -> Ref<'_, [SvcStats]> {
        Ref::map(self.stats.borrow(), |v| v.as_slice())
    }

    /// How many times the forward path asked whether an address is the
    /// node's.
    pub fn node_addr_lookups(&self) -> u64 {
        self.node_addr_lookups.get()
    }

    fn port_mut(&mut self, key: &SvcKey) -> Result<&mut u32, MapError> {
        let i =
            port_index(key.proto, key.port_be).ok_or(MapError::Protocol { proto: key.proto })?;
        Ok(&mut self.ports[i as usize])
    }
}

fn at<'a, T>(v: &'a mut [T], map: &'static str, i: u32) -> Result<&'a mut T, MapError> {
    v.get_mut(i as usize).ok_or(MapError::OutOfRange {
        map,
        index: i as u64,
    })
}

/// The kernel's lookups (`mesh-ebpf/programs/src/maps.rs`), step for step.
impl Tables for HostMaps {
    fn source_allowed(&self, svc_id: u32, saddr: u32) -> bool {
        let a = u32::from_be(saddr);
        self.src.iter().any(|&(id, net, len)| {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len as u32)
            };
            id == svc_id && a & mask == net & mask
        })
    }

    fn service(&self, key: &SvcKey) -> Option<SvcValue> {
        let slot = self.ports[port_index(key.proto, key.port_be)? as usize];
        if slot == 0 {
            return None;
        }
        self.services.get(slot as usize - 1).copied()
    }

    fn is_node_addr4(&self, addr: u32) -> bool {
        self.node_addr_lookups.set(self.node_addr_lookups.get() + 1);
        addr != 0 && self.node_addrs.contains(&addr)
    }

    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue> {
        self.confirmed(key).borrow().get(key).copied()
    }

    fn ct_confirm(&self, key: &FlowKey4, ct: &CtValue) {
        self.confirmed(key).borrow_mut().insert(*key, *ct);
        self.ct_new.borrow_mut().remove(key);
    }

    fn ct_new_get(&self, key: &FlowKey4) -> Option<CtValue> {
        self.ct_new.borrow().get(key).copied()
    }

    fn ct_new_put(&self, key: &FlowKey4, ct: &CtValue) {
        self.ct_new.borrow_mut().insert(*key, *ct);
    }

    fn ct_forget(&self, key: &FlowKey4) {
        self.confirmed(key).borrow_mut().remove(key);
    }

    fn ct_new_forget(&self, key: &FlowKey4) {
        self.ct_new.borrow_mut().remove(key);
    }

    fn ct_touch(&self, key: &FlowKey4, confirmed: bool, seen: u32, state: u8) {
        let mut t = if confirmed {
            self.confirmed(key).borrow_mut()
        } else {
            self.ct_new.borrow_mut()
        };
        if let Some(c) = t.get_mut(key) {
            c.seen = seen;
            c.state = state;
        }
    }

    fn now(&self) -> u32 {
        self.now.get()
    }

    fn lifetimes(&self) -> CtLifetimes {
        self.lifetimes
    }

    fn host_socket(&self, key: &FlowKey4) -> bool {
        self.host_sockets.contains(key)
    }

    fn ct_answered(&self, key: &FlowKey4, ack_be: u32) {
        RevTables::ct_answered(self, key, ack_be)
    }

    fn config(&self) -> NodeConfig {
        self.config
    }

    fn node(&self, slot: u32) -> Option<NodeValue> {
        self.nodes
            .get(slot as usize)
            .filter(|n| n.gen_ != 0)
            .copied()
    }

    fn is_node(&self, addr: u32) -> bool {
        self.node_by_addr.contains_key(&addr)
    }

    fn local_backend(&self, key: &ReplyKey4) -> Option<u32> {
        self.local.get(key).copied()
    }

    fn fwd_get(&self, key: &FlowKey4) -> Option<FwdValue> {
        self.fwd.borrow().get(key).copied()
    }

    fn fwd_put(&self, key: &FlowKey4, v: &FwdValue) {
        self.fwd.borrow_mut().insert(*key, *v);
    }

    fn count_n(&self, c: Counter, n: u32) {
        self.counters.borrow_mut()[c as usize] += n as u64;
    }

    fn maglev(&self, index: u32) -> Option<u32> {
        self.maglev.get(index as usize).copied()
    }

    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends
            .get(id as usize)
            .filter(|b| b.flags != 0)
            .copied()
    }

    fn aff_get(&self, key: &AffKey4) -> Option<AffValue4> {
        self.aff.borrow().get(key).copied()
    }

    fn aff_put(&self, key: &AffKey4, v: &AffValue4) {
        self.aff.borrow_mut().insert(*key, *v);
    }

    fn affinity_timeout(&self, svc_id: u32) -> u32 {
        self.aff_timeout.get(svc_id as usize).copied().unwrap_or(0)
    }

    fn account(&self, svc_id: u32, packets: u32, bytes: u64, new_flow: bool) {
        if let Some(s) = self.stats.borrow_mut().get_mut(svc_id as usize) {
            s.packets += packets as u64;
            s.bytes += bytes;
            s.new_flows += new_flow as u64;
        }
    }
}

impl RevTables for HostMaps {
    fn reply(&self, key: &ReplyKey4) -> Option<ReplyValue4> {
        HostMaps::reply(self, key)
    }

    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue> {
        Tables::ct_get(self, key)
    }

    fn ct_new_get(&self, key: &FlowKey4) -> Option<CtValue> {
        Tables::ct_new_get(self, key)
    }

    fn ct_confirm(&self, key: &FlowKey4, ct: &CtValue) {
        Tables::ct_confirm(self, key, ct)
    }

    fn ct_answered(&self, key: &FlowKey4, ack_be: u32) {
        if let Some(c) = self.ct_new.borrow_mut().get_mut(key) {
            c.ack_be = ack_be;
        }
    }

    fn fwd_get(&self, key: &FlowKey4) -> Option<FwdValue> {
        Tables::fwd_get(self, key)
    }

    fn is_own_addr4(&self, addr: u32) -> bool {
        Tables::is_node_addr4(self, addr)
    }
}
