//! The kernel ABI: map names, key and value layouts, drop reasons.
//!
//! Every key and value is `#[repr(C)]` with explicit padding and a size
//! assertion, so a layout change breaks the build instead of a pinned map.
//! Byte order: fields named `*_be` (and addresses, stored as the raw bytes
//! of the packet) are in network order; everything else is host order.
//! A layout change bumps the `_Vn` suffix of the map name.

use core::mem::size_of;

/// Published ports: a flat `u32` array (mmap, stored as `[u32; 2]`
/// elements) indexed by [`port_index`]; 0, or a service slot + 1.
pub const MAP_PORTS: &str = "MESH_PORTS_V1";
/// Services by slot (`svc_id * 2 + half`): an array of `SvcValue`. The
/// entry of the half in use is never written; an update fills the other
/// half, then switches the port to it with one 32-bit store.
pub const MAP_SERVICES: &str = "MESH_SVC_V2";
/// A memory-mapped array of `MAX_NODE_ADDRS` raw IPv4 addresses (one
/// element); 0 marks a free place. Places never move: adding or removing
/// an address is one 32-bit store, and a packet never sees a torn set.
pub const MAP_NODE_ADDR4: &str = "MESH_ADDR4_V1";
/// Backends by slot: an array; a free slot is all zero (`flags == 0`).
pub const MAP_BACKENDS: &str = "MESH_BE_V1";
/// All Maglev tables, back to back: a flat array of backend ids (`u32`),
/// stored as `[u32; 2]` elements (array elements are 8-byte aligned).
pub const MAP_MAGLEV: &str = "MESH_MAGLEV_V1";
/// Connection tracking, client side: `FlowKey4` (as the client sent it) ->
/// `CtValue`, for confirmed TCP flows: the client's ACK acknowledged the
/// backend's SYN-ACK (a spoofed source never sees it), or a flow picked up
/// again after its entry was lost got an answer from its backend that is
/// not a reset. LRU, one list for all CPUs.
pub const MAP_CT4: &str = "MESH_CT4_V2";
/// Confirmed UDP flows (the backend answered), as `MAP_CT4`: apart, so a
/// flood of spoofed requests a UDP service answers never displaces TCP
/// flows.
pub const MAP_CT4_UDP: &str = "MESH_CTU4_V1";
/// Unconfirmed flows, as `MAP_CT4`: a TCP handshake not completed, a UDP
/// datagram not answered yet, a flow picked up again after its entry was
/// lost. A flood of spoofed packets churns this table, never the confirmed
/// ones. LRU, one list for all CPUs.
pub const MAP_CT4_NEW: &str = "MESH_CTNEW4_V1";
/// Reverse NAT, task side: `ReplyKey4` (a local task's address, target
/// port, protocol) -> `ReplyValue4` (the node addresses and published ports
/// its flows can have come through). Per backend, not per flow: a reply
/// finds its flow's conntrack entry by trying these few candidates, so a
/// new flow costs one map insert, not two.
pub const MAP_REPLY4: &str = "MESH_REPLY4_V2";
/// Per-service counters, per CPU: svc id -> `SvcStats`.
pub const MAP_SVC_STATS: &str = "MESH_SVCST_V1";
/// Drop counters, per CPU: `DropReason` -> `u64`.
pub const MAP_DROPS: &str = "MESH_DROPS_V1";
/// The swarm's nodes by slot: an array of `NodeValue`; a free slot is all
/// zero (`gen_ == 0`). `Backend::node_id` is a slot here: forwarding reads
/// the address of the node a remote backend runs on.
pub const MAP_NODES: &str = "MESH_NODES_V1";
/// Nodes by address: raw IPv4 address -> node slot. Encapsulated packets
/// are taken only from these addresses (no open relay).
pub const MAP_NODE_BY_ADDR4: &str = "MESH_NODEIP4_V1";
/// Local backends by their identity in the swarm: `ReplyKey4` (the
/// address every node knows the task by, target port, protocol) -> the
/// local backend slot (whose `Backend::addr` is where this node delivers).
/// An encapsulated packet names its backend by identity.
pub const MAP_LOCAL4: &str = "MESH_LOCAL4_V1";
/// Flows other nodes forwarded to this node's tasks: `FlowKey4` as the
/// task sees the flow (client address and port, the task's delivery
/// address and target port) -> `FwdValue` (the ingress node, and the
/// address and published port the client used), for the task's replies.
/// LRU, one list for all CPUs.
pub const MAP_FWD4: &str = "MESH_FWD4_V1";
/// Per-CPU counters of the forwarding paths: `Counter` -> `u64`.
pub const MAP_COUNTERS: &str = "MESH_CNT_V1";
/// This node's settings for the programs: one `NodeConfig` (an array of
/// one, written by user space whenever they change).
pub const MAP_CONFIG: &str = "MESH_CFG_V1";
/// Where this node hands each local backend its packets: an array of
/// `LocalDev` by backend slot (the task's link and Ethernet addresses,
/// which user space finds and follows as containers come and go), so that
/// delivery needs no FIB lookup and goes straight into the task's network
/// namespace. An all-zero entry (a remote backend, a free slot, a task
/// whose link is not found yet) leaves delivery to the FIB.
pub const MAP_LOCAL_DEV: &str = "MESH_LDEV_V1";
/// Per-service source-range allow lists: an LPM trie keyed by
/// `[svc_id, raw IPv4 source]` with prefix length 32 + the range's (the
/// service id always matches whole) -> 1. Read only for services with
/// `SVC_F_SRC_RANGES`: a source no range of its service holds is dropped
/// (`DropReason::SourceDenied`), in XDP, before conntrack.
pub const MAP_SRC4: &str = "MESH_SRC4_V1";
/// Client-address affinity, per node: `AffKey4` (service id, raw client
/// address) -> `AffValue4` (the backend slot and generation the client's
/// last new flow went to, and when). Read and written only for services
/// with `SVC_F_AFFINITY`, on new flows: an entry is followed while it is
/// younger than its service's timeout (`MAP_AFF_TIMEOUT`), its service
/// and backend slot keep their generations and the backend still takes
/// new flows (no `BE_F_NO_NEW`). LRU, one list for all CPUs.
pub const MAP_AFF4: &str = "MESH_AFF4_V1";
/// The affinity timeout of each service, by svc id: a `u32` in conntrack
/// time units ([`now_units`]); read only for services with
/// `SVC_F_AFFINITY` (written before the service is switched to a slot
/// that has the flag).
pub const MAP_AFF_TIMEOUT: &str = "MESH_AFFTO_V1";
/// User space only (no program reads it): one `PinMeta`, what a restarted
/// meshd needs to adopt the pinned maps safely: the generations handed
/// out so far (written before any op that uses a higher one).
pub const MAP_META: &str = "MESH_META_V1";
/// User space only: `SvcKey` -> `SvcName`, the name of the service each
/// published port belongs to, so that a restarted meshd knows which
/// service owns a port (and keeps its flows) without guessing.
pub const MAP_SVC_NAMES: &str = "MESH_NAMES_V1";

/// The programs' route cache: `RouteKey4` (source, destination, the device
/// the lookup starts from) -> `RouteValue4` (egress device and Ethernet
/// addresses, and when the FIB said so). A FIB lookup costs more than the
/// rest of a reply's path; its answer is taken from here for the rest of
/// the conntrack time unit it was made in (about a second), so a route or
/// neighbour change reaches the packets within two seconds. Only
/// successful lookups are kept. LRU, one list for all CPUs.
pub const MAP_ROUTE4: &str = "MESH_ROUTE4_V1";

/// The next hop to each node, as the programs last asked the FIB: a
/// per-CPU array of `NodeHop` by node slot (`MAP_NODES`), so that
/// forwarding to a node finds it with an inlined array read instead of
/// the route cache's hash lookup. An entry answers only the lookup it was
/// made for (source, destination, device) and only within its conntrack
/// time unit, as the route cache's.
pub const MAP_NODE_HOP: &str = "MESH_NHOP_V1";

/// Every map of the dataplane's object. The build checks the object
/// against this list (mesh-userspace/build.rs): each name is in it, and it
/// has no other map (but aya-log's, [`LOG_MAP_NAMES`]).
pub const MAP_NAMES: &[&str] = &[
    MAP_PORTS,
    MAP_SERVICES,
    MAP_NODE_ADDR4,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_CT4,
    MAP_CT4_UDP,
    MAP_CT4_NEW,
    MAP_REPLY4,
    MAP_SVC_STATS,
    MAP_DROPS,
    MAP_NODES,
    MAP_NODE_BY_ADDR4,
    MAP_LOCAL4,
    MAP_FWD4,
    MAP_COUNTERS,
    MAP_CONFIG,
    MAP_LOCAL_DEV,
    MAP_META,
    MAP_SVC_NAMES,
    MAP_SRC4,
    MAP_AFF4,
    MAP_AFF_TIMEOUT,
    MAP_ROUTE4,
    MAP_NODE_HOP,
];

/// What a pinned map holds, which decides whether a restarted meshd may
/// adopt it (see mesh-userspace/src/dataplane/pin.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapRole {
    /// Derived from the swarm's state by user space: services, tables,
    /// backends, nodes, reply entries, settings. Adopted together or not
    /// at all (the planner is rebuilt from all of them).
    State,
    /// Per flow, written by the programs: connection tracking. Entries
    /// name service and backend slots and generations, so they are adopted
    /// only together with the state maps.
    Flows,
    /// Counters: adopted on their own (so totals go on across restarts).
    Counters,
}

/// The role of map `name` of [`MAP_NAMES`] (`None` for any other name).
pub fn map_role(name: &str) -> Option<MapRole> {
    Some(match name {
        MAP_PORTS | MAP_SERVICES | MAP_NODE_ADDR4 | MAP_BACKENDS | MAP_MAGLEV | MAP_REPLY4
        | MAP_NODES | MAP_NODE_BY_ADDR4 | MAP_LOCAL4 | MAP_CONFIG | MAP_META | MAP_SVC_NAMES
        | MAP_SRC4 | MAP_AFF_TIMEOUT | MAP_LOCAL_DEV => MapRole::State,
        // Affinity entries name backend slots and generations, as
        // conntrack entries do.
        MAP_CT4 | MAP_CT4_UDP | MAP_CT4_NEW | MAP_FWD4 | MAP_AFF4 => MapRole::Flows,
        // Written by the programs, and worth keeping no longer than a
        // second: adopted or not, as the flows are.
        MAP_ROUTE4 | MAP_NODE_HOP => MapRole::Flows,
        MAP_SVC_STATS | MAP_DROPS | MAP_COUNTERS => MapRole::Counters,
        _ => return None,
    })
}

// The kernel keeps 15 bytes of a map's name (BPF_OBJ_NAME_LEN, with the
// NUL): a longer name would be cut and no longer found by its full name.
const _: () = {
    let mut i = 0;
    while i < MAP_NAMES.len() {
        assert!(MAP_NAMES[i].len() <= 15, "a map name longer than 15 bytes");
        i += 1;
    }
};

/// Maps aya-log adds to an object that logs.
pub const LOG_MAP_NAMES: &[&str] = &["AYA_LOGS"];

/// Program names in the object.
pub const PROG_XDP: &str = "mesh_xdp";
pub const PROG_TC_UPLINK: &str = "mesh_tc_uplink";
pub const PROG_TC_TASK: &str = "mesh_tc_task";
/// The intercept at TC ingress on the uplink (`--intercept tc`): what
/// `mesh_xdp` and `mesh_tc_uplink` do together, in one TC program, so that
/// no XDP program sits on the uplink.
pub const PROG_TC_INGRESS: &str = "mesh_tc_ingress";
pub const PROG_TC_HOST: &str = "mesh_tc_host";
/// Every program of the dataplane's object (checked like [`MAP_NAMES`]).
pub const PROG_NAMES: &[&str] = &[
    PROG_XDP,
    PROG_TC_UPLINK,
    PROG_TC_TASK,
    PROG_TC_INGRESS,
    PROG_TC_HOST,
];

/// The loopback device's index, in every network namespace
/// (`LOOPBACK_IFINDEX`): where the node's own packets to its own
/// addresses pass, and where replies to them are handed in.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The benchmark's floor programs, in their own object (`mesh-floor`, not
/// the dataplane's): one that only passes, one that parses and does one
/// lookup in `MAP_FLOOR`, one that does a new flow's conntrack work in
/// `MAP_FLOOR_CT` and `MAP_FLOOR_CT_NEW` and nothing else, and a TC one
/// that does what an established flow's DNAT at TC needs from the kernel
/// (its flows in `MAP_FLOOR_NAT`), and one that does what a packet another
/// node forwarded to a local task needs at XDP (`MAP_FLOOR_NODE`,
/// `MAP_FLOOR_LOCAL`, `MAP_FLOOR_FWD`), and what a reply another node
/// carried back needs (`MAP_FLOOR_NODE`, `MAP_FLOOR_CT_NEW`,
/// `MAP_FLOOR_ROUTE`).
pub const PROG_FLOOR_PASS: &str = "floor_pass";
pub const PROG_FLOOR_LOOKUP: &str = "floor_lookup";
pub const PROG_FLOOR_TRACK: &str = "floor_track";
pub const PROG_FLOOR_TC_NAT: &str = "floor_tc_nat";
pub const PROG_FLOOR_DECAP: &str = "floor_decap";
pub const PROG_FLOOR_REPLY: &str = "floor_reply";
pub const MAP_FLOOR: &str = "MESH_FLOOR";
pub const MAP_FLOOR_CT: &str = "MESH_FLOOR_CT";
pub const MAP_FLOOR_CT_NEW: &str = "MESH_FLOOR_CTNEW";
pub const MAP_FLOOR_NAT: &str = "MESH_FLOOR_NAT";
pub const MAP_FLOOR_NODE: &str = "MESH_FLOOR_NODE";
pub const MAP_FLOOR_LOCAL: &str = "MESH_FLOOR_LOCAL";
pub const MAP_FLOOR_FWD: &str = "MESH_FLOOR_FWD";
pub const MAP_FLOOR_ROUTE: &str = "MESH_FLOOR_ROUTE";
pub const FLOOR_PROG_NAMES: &[&str] = &[
    PROG_FLOOR_PASS,
    PROG_FLOOR_LOOKUP,
    PROG_FLOOR_TRACK,
    PROG_FLOOR_TC_NAT,
    PROG_FLOOR_DECAP,
    PROG_FLOOR_REPLY,
];
pub const FLOOR_MAP_NAMES: &[&str] = &[
    MAP_FLOOR,
    MAP_FLOOR_CT,
    MAP_FLOOR_CT_NEW,
    MAP_FLOOR_NAT,
    MAP_FLOOR_NODE,
    MAP_FLOOR_LOCAL,
    MAP_FLOOR_FWD,
    MAP_FLOOR_ROUTE,
];

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ETH_P_IP: u16 = 0x0800;

/// Default map sizes; the daemon sets them at load. Maglev memory is
/// `8 * max_services * maglev_size` bytes (two tables per service): 32 MiB
/// with these defaults.
pub const DEFAULT_MAX_SERVICES: u32 = 256;
pub const DEFAULT_MAX_BACKENDS: u32 = 65536;
pub const DEFAULT_CT_ENTRIES: u32 = 262_144;
pub const DEFAULT_CT_NEW_ENTRIES: u32 = 65_536;
pub const DEFAULT_MAGLEV_SIZE: u32 = 16381;
pub const MAX_NODE_ADDRS: u32 = 16;
pub const DEFAULT_MAX_NODES: u32 = 1024;
pub const MAX_DROP_REASONS: u32 = 64;
/// Source ranges all services' allow lists can hold together.
pub const DEFAULT_MAX_SRC_RANGES: u32 = 4096;
/// Clients the affinity map remembers (all services together).
pub const DEFAULT_AFF_ENTRIES: u32 = 65_536;
/// The affinity timeout when a service does not say (kube-proxy's
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default: 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;
/// The longest affinity timeout (Kubernetes' bound too: one day).
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;

/// A published port and protocol. Docker publishes a port on every node
/// address, so the address is checked separately (`MAP_NODE_ADDR4`), and
/// only for packets whose port matched: traffic to other ports costs one
/// inlined array read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SvcKey {
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<SvcKey>() == 4);

impl SvcKey {
    pub fn new(port: u16, proto: u8) -> Self {
        Self {
            port_be: port.to_be(),
            proto,
            _pad: 0,
        }
    }
}

/// Entries of `MAP_PORTS`: every TCP port, then every UDP port.
pub const PORT_INDEX_ENTRIES: u32 = 2 * 65536;

/// Where a (protocol, port) sits in `MAP_PORTS`; `None` for protocols
/// other than TCP and UDP.
#[inline(always)]
pub fn port_index(proto: u8, port_be: u16) -> Option<u32> {
    let base = match proto {
        IPPROTO_TCP => 0,
        IPPROTO_UDP => 65536,
        _ => return None,
    };
    Some(base + u16::from_be(port_be) as u32)
}

/// A service (one published port). Never written while packets can read
/// it: user space writes the new value and the new Maglev table into the
/// half of the service's slots that no packet reads, then switches the
/// port's entry in `MAP_PORTS` to it (one 32-bit store). A packet sees the
/// old service and table or the new ones, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcValue {
    /// Stable index of the service: counters, Maglev region.
    pub svc_id: u32,
    /// `SVC_F_*` flags.
    pub flags: u32,
    /// First entry of the active Maglev table in `MAP_MAGLEV`.
    pub table_off: u32,
    /// Entries in the table (prime); 0 when the service has no backend.
    pub table_size: u32,
    /// Backends in the table (informational; the kernel does not need it).
    pub backend_count: u32,
    /// Which service owns the port: a conntrack entry of the port is the
    /// service's only while it holds the same `svc_id` and generation
    /// (user space gives a port a new generation when another service
    /// takes it, or its id is reused).
    pub gen_: u32,
}
const _: () = assert!(size_of::<SvcValue>() == 24);

/// The service is served only by tasks on the receiving node (traffic
/// mode `local`): its table holds only local tasks. Informational for the
/// programs (user space builds the table so).
pub const SVC_F_LOCAL_ONLY: u32 = 1 << 0;
/// Replies of flows forwarded to another node go straight to the client
/// from the backend's node (source: the address and port the client used)
/// instead of back through the ingress node.
pub const SVC_F_REPLY_DIRECT: u32 = 1 << 1;
/// The service has a source-range allow list (`MAP_SRC4`): sources none
/// of its ranges holds are dropped.
pub const SVC_F_SRC_RANGES: u32 = 1 << 2;
/// Client-address affinity: Maglev picks a new flow's task by the client's
/// address alone (every node picks the same one for a client), and the
/// node remembers each client's task in `MAP_AFF4` for the service's
/// timeout, so that it keeps it when the backend set changes.
pub const SVC_F_AFFINITY: u32 = 1 << 3;

/// Key of `MAP_AFF4`: a service and a client. 8-aligned on the stack (see
/// `FlowKey4`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct AffKey4 {
    pub svc_id: u32,
    /// The client's address, raw.
    pub addr: u32,
}
const _: () = assert!(size_of::<AffKey4>() == 8);

/// Value of `MAP_AFF4`: where the client's last new flow went.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffValue4 {
    /// Slot and generation of the backend.
    pub backend_id: u32,
    pub backend_gen: u32,
    /// The service's generation (`SvcValue::gen_`): an entry of a port
    /// that passed to another service on the same id is no entry.
    pub svc_gen: u32,
    /// The client's last new flow, in [`now_units`].
    pub seen: u32,
}
const _: () = assert!(size_of::<AffValue4>() == 16);

/// The LPM trie key of `MAP_SRC4` (as aya's `Key<[u32; 2]>`): prefix
/// length (32 + the range's), then the service id and the raw address.
/// 8-aligned on the stack (see `FlowKey4`); the map's key is its first 12
/// bytes.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SrcKey4 {
    pub prefix_len: u32,
    pub svc_id: u32,
    pub addr: u32,
}
const _: () = assert!(size_of::<SrcKey4>() == 16);
/// Bytes of `SrcKey4` the map's key holds.
pub const SRC_KEY4_LEN: usize = 12;

/// A backend (a task's address and target port), in an array slot. Slots
/// are reused, each time with the next generation: a conntrack entry
/// naming a removed backend (freed slot, or another generation) misses and
/// the flow moves (a TCP flow ends with the new task's RST).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Address as raw network-order bytes; IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    pub port_be: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad0: u8,
    /// `BE_F_*` flags.
    pub flags: u32,
    /// The node the task runs on: its slot in `MAP_NODES`, stable while
    /// the node stays in the swarm (user space allocates node slots with
    /// generations, as it does backend slots).
    pub node_id: u32,
    /// Generation of the slot (from 1; 0 in a free slot).
    pub gen_: u32,
}
const _: () = assert!(size_of::<Backend>() == 32);

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
/// The task runs on this node: DNAT and deliver locally.
pub const BE_F_LOCAL: u32 = 1 << 0;
/// The task runs on another node: forward to it.
pub const BE_F_REMOTE: u32 = 1 << 1;
/// The backend gets no new flows (a draining task, a task on a paused or
/// drained node, another node's task of a `local` service): it is in no
/// table, and affinity entries that name it are not followed. Its
/// established flows go on. Set before the table without it is switched
/// to.
pub const BE_F_NO_NEW: u32 = 1 << 2;

/// A node of the swarm, in its slot of `MAP_NODES`. Slots are reused,
/// each time with the next generation, as backend slots are.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeValue {
    /// The node's address as raw network-order bytes; IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad0: [u8; 3],
    /// `NODE_F_*` flags.
    pub flags: u32,
    /// Generation of the slot (from 1; 0 in a free slot).
    pub gen_: u32,
    pub _pad1: u32,
}
const _: () = assert!(size_of::<NodeValue>() == 32);

/// This node (the one the programs run on). Other bits are reserved for
/// later flags.
pub const NODE_F_SELF: u32 = 1 << 0;

/// What a backend's node keeps of a flow another node forwarded to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FwdValue {
    /// The node the flow came in through (raw address): replies go back
    /// to it, or take its address as their source.
    pub ingress: u32,
    /// The address and published port the client sent to (raw).
    pub orig_daddr: u32,
    pub orig_dport_be: u16,
    /// `ENCAP_F_*` flags of the flow's last packet.
    pub flags: u8,
    pub _pad0: u8,
    /// When the flow's last packet came, in conntrack units.
    pub seen: u32,
}
const _: () = assert!(size_of::<FwdValue>() == 16);

impl FwdValue {
    /// Whether both records send replies the same way (same ingress node,
    /// original destination and flags), whenever they were seen.
    #[inline(always)]
    pub fn same_way(&self, other: &FwdValue) -> bool {
        self.ingress == other.ingress
            && self.orig_daddr == other.orig_daddr
            && self.orig_dport_be == other.orig_dport_be
            && self.flags == other.flags
    }
}

/// The header after the outer UDP header of a packet one node carries to
/// another (GUE-like, without an inner Ethernet header: 12 bytes). The
/// inner IPv4 datagram follows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EncapHdr {
    /// `ENCAP_VERSION`.
    pub version: u8,
    /// `ENCAP_K_*`.
    pub kind: u8,
    /// `ENCAP_F_*`.
    pub flags: u8,
    pub _pad0: u8,
    /// The address and published port the client sent to (raw), for the
    /// backend's node to reply as.
    pub orig_daddr: u32,
    pub orig_dport_be: u16,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<EncapHdr>() == 12);

pub const ENCAP_VERSION: u8 = 1;
/// A client's packet for a task on the receiving node (already DNAT'd to
/// the task's identity and target port).
pub const ENCAP_K_REQUEST: u8 = 1;
/// A task's reply, already SNAT'd to what the client sent to, for the
/// receiving (ingress) node to send to the client.
pub const ENCAP_K_REPLY: u8 = 2;
/// The flow's replies go straight to the client (`SVC_F_REPLY_DIRECT`).
pub const ENCAP_F_DIRECT: u8 = 1 << 0;

/// Outer IPv4 (20) + UDP (8) + `EncapHdr` (12): what encapsulation adds.
pub const ENCAP_LEN: usize = 40;
/// The default UDP port of encapsulated packets: clear of Docker's (2377
/// raft, 4789 VXLAN, 7946 gossip) and of the published range.
pub const DEFAULT_ENCAP_PORT: u16 = 6090;

/// Per-CPU counters (`MAP_COUNTERS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Client packets this node encapsulated to another node.
    Forwarded = 0,
    /// Encapsulated client packets this node received for its tasks.
    Decapsulated = 1,
    /// Replies of forwarded flows this node sent back to the ingress node.
    RepliesToIngress = 2,
    /// Replies other nodes sent back through this node to clients.
    RepliesFromBackends = 3,
    /// Replies of forwarded flows this node sent straight to clients.
    RepliesDirect = 4,
    /// TCP SYNs (and SYN-ACKs) whose MSS was lowered to fit encapsulation.
    MssClamped = 5,
    /// ICMP "fragmentation needed" sent for packets too big to encapsulate.
    TooBig = 6,
    /// Packets of this node's own processes to a published port on one of
    /// its addresses, sent to a task (here or on another node).
    HostOrigin = 7,
    /// Packets of this node's tasks to a published port on one of its
    /// addresses, sent to a task (here or on another node).
    TaskOrigin = 8,
    /// Replies handed to this node's own processes (flows they started).
    RepliesToHost = 9,
    /// Task replies (and ICMP errors of tasks) rewritten to come from the
    /// address and port the client used.
    RepliesRewritten = 10,
    /// New flows of services with client affinity sent to the task their
    /// client had (`MAP_AFF4`) rather than to Maglev's pick.
    AffinityFollowed = 11,
}

pub const MAX_COUNTERS: u32 = 16;

impl Counter {
    pub const ALL: [Counter; 12] = [
        Counter::Forwarded,
        Counter::Decapsulated,
        Counter::RepliesToIngress,
        Counter::RepliesFromBackends,
        Counter::RepliesDirect,
        Counter::MssClamped,
        Counter::TooBig,
        Counter::HostOrigin,
        Counter::TaskOrigin,
        Counter::RepliesToHost,
        Counter::RepliesRewritten,
        Counter::AffinityFollowed,
    ];

    /// The Prometheus metric name.
    pub const fn metric(self) -> &'static str {
        match self {
            Counter::Forwarded => "mesh_forwarded_packets_total",
            Counter::Decapsulated => "mesh_decapsulated_packets_total",
            Counter::RepliesToIngress => "mesh_replies_to_ingress_total",
            Counter::RepliesFromBackends => "mesh_replies_from_backends_total",
            Counter::RepliesDirect => "mesh_replies_direct_total",
            Counter::MssClamped => "mesh_mss_clamped_total",
            Counter::TooBig => "mesh_too_big_total",
            Counter::HostOrigin => "mesh_host_origin_packets_total",
            Counter::TaskOrigin => "mesh_task_origin_packets_total",
            Counter::RepliesToHost => "mesh_replies_to_host_total",
            Counter::RepliesRewritten => "mesh_replies_rewritten_total",
            Counter::AffinityFollowed => "mesh_affinity_followed_total",
        }
    }

    pub const fn help(self) -> &'static str {
        match self {
            Counter::Forwarded => "Client packets encapsulated to the node that runs their task.",
            Counter::Decapsulated => "Encapsulated client packets received for this node's tasks.",
            Counter::RepliesToIngress => {
                "Replies of forwarded flows sent back to their ingress node."
            }
            Counter::RepliesFromBackends => {
                "Replies other nodes sent back through this node to clients."
            }
            Counter::RepliesDirect => "Replies of forwarded flows sent straight to clients.",
            Counter::MssClamped => "TCP handshakes whose MSS was lowered to fit encapsulation.",
            Counter::TooBig => "ICMP fragmentation-needed sent for packets too big to encapsulate.",
            Counter::HostOrigin => {
                "Packets of this node's own processes to a published port on its addresses, sent to a task."
            }
            Counter::TaskOrigin => {
                "Packets of this node's tasks to a published port on its addresses, sent to a task."
            }
            Counter::RepliesToHost => "Replies handed to this node's own processes.",
            Counter::RepliesRewritten => {
                "Task replies rewritten to come from the address and port the client used."
            }
            Counter::AffinityFollowed => {
                "New flows sent to the task their client had (client affinity), not Maglev's pick."
            }
        }
    }
}

/// Where a local backend's packets go (`MAP_LOCAL_DEV`): the task's link
/// on this node and the Ethernet addresses its packets carry. An entry
/// holds only for a packet rewritten to its `addr` (a slot reused by
/// another task meanwhile sends that packet by the FIB instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalDev {
    /// The task's delivery address (raw); 0 in an unused entry.
    pub addr: u32,
    /// The host's end of the task's link (a bridge port, or the link
    /// itself).
    pub ifindex: u32,
    /// `LDEV_F_*`.
    pub flags: u32,
    /// The Ethernet header's two addresses as its packets carry them: the
    /// task's own, then its gateway's (the bridge's, or the host end's).
    pub macs: [u8; 12],
}
const _: () = assert!(size_of::<LocalDev>() == 24);

/// Key of the route cache (`MAP_ROUTE4`): what a FIB lookup is asked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RouteKey4 {
    pub saddr: u32,
    pub daddr: u32,
    /// The device the lookup starts from (the packet's ingress).
    pub ifindex: u32,
}
const _: () = assert!(size_of::<RouteKey4>() == 12);

/// What the FIB answered (`MAP_ROUTE4`): the egress device and the
/// Ethernet addresses to write, as four and two bytes each.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RouteValue4 {
    pub ifindex: u32,
    /// The conntrack time unit of the lookup: the answer holds while the
    /// clock reads the same.
    pub at: u32,
    pub dmac_hi: u32,
    pub smac_hi: u32,
    pub dmac_lo: u16,
    pub smac_lo: u16,
}
const _: () = assert!(size_of::<RouteValue4>() == 20);

/// A node's next hop (`MAP_NODE_HOP`): the lookup it answers and the
/// answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeHop {
    pub key: RouteKey4,
    pub route: RouteValue4,
}
const _: () = assert!(size_of::<NodeHop>() == 32);

/// Entries of the route cache: destinations replied to or forwarded to
/// within a second, per source and device.
pub const DEFAULT_ROUTE_ENTRIES: u32 = 65_536;

/// `LocalDev::ifindex` is a veth whose other end (the task's) lies in
/// another network namespace: packets go straight to that end's ingress
/// (`bpf_redirect_peer`), past the host end's transmit, the bridge and the
/// backlog queue.
pub const LDEV_F_PEER: u32 = 1 << 0;

/// What user space tells the programs of this node (`MAP_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// This node's address (raw): the outer source of what it encapsulates.
    pub self_addr: u32,
    /// The UDP port of encapsulated packets (network order).
    pub encap_port_be: u16,
    pub _pad0: u16,
    /// The uplink's MTU: an encapsulated packet must fit in it.
    pub mtu: u32,
}
const _: () = assert!(size_of::<NodeConfig>() == 12);

/// What a restarted meshd needs to adopt pinned maps (`MAP_META`). The
/// generations are high-water marks: every (slot, generation) pair handed
/// out so far has a generation at most these, so slots taken after a
/// restart start above them and never repeat a pair a conntrack entry
/// may still hold.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PinMeta {
    /// `PIN_META_MAGIC` once written.
    pub magic: u32,
    /// The last service generation handed out.
    pub svc_gen: u32,
    /// The highest backend slot generation handed out.
    pub backend_gen: u32,
    /// The highest node slot generation handed out.
    pub node_gen: u32,
    /// FNV-1a of the BPF object that was last attached (to tell a restart
    /// of the same programs from an upgrade, in the log).
    pub object_hash: u64,
}
const _: () = assert!(size_of::<PinMeta>() == 24);
pub const PIN_META_MAGIC: u32 = 0x6d65_7461; // "meta"

/// The longest service name (as Docker's and the state file's).
pub const MAX_SVC_NAME: usize = 63;

/// The service a published port belongs to (`MAP_NAMES`), as of the
/// service slot and generation it names: a name whose `svc_id` and
/// generation are not the port's service's any more is no name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcName {
    pub svc_id: u32,
    pub gen_: u32,
    /// Bytes of `name` in use.
    pub len: u32,
    pub name: [u8; MAX_SVC_NAME + 1],
    pub _pad: u32,
}
const _: () = assert!(size_of::<SvcName>() == 80);

impl Default for SvcName {
    fn default() -> Self {
        Self {
            svc_id: 0,
            gen_: 0,
            len: 0,
            name: [0; MAX_SVC_NAME + 1],
            _pad: 0,
        }
    }
}

impl SvcName {
    /// `name` cut to `MAX_SVC_NAME` bytes.
    pub fn new(svc_id: u32, gen_: u32, name: &str) -> Self {
        let b = name.as_bytes();
        let n = b.len().min(MAX_SVC_NAME);
        let mut v = Self {
            svc_id,
            gen_,
            len: n as u32,
            ..Self::default()
        };
        v.name[..n].copy_from_slice(&b[..n]);
        v
    }

    pub fn name(&self) -> &str {
        let n = (self.len as usize).min(MAX_SVC_NAME);
        core::str::from_utf8(&self.name[..n]).unwrap_or("")
    }
}

/// A flow as seen in one direction, IPv4. Addresses and ports are the
/// packet's raw bytes (network order). 8-aligned (its size is 16 either
/// way): LLVM, allowed misaligned accesses, merges the two addresses into
/// one 8-byte load, which the verifier refuses on a 4-aligned stack slot.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    // Two fields, not `[u8; 3]`: LLVM zeroes three bytes with a call to
    // `memset` (a BPF-to-BPF call and return on every packet).
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<FlowKey4>() == 16);

impl FlowKey4 {
    /// The flow from `saddr`:`sport_be` to `daddr`:`dport_be` (raw,
    /// network order) of protocol `proto`.
    #[inline(always)]
    pub const fn new(saddr: u32, daddr: u32, sport_be: u16, dport_be: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport_be,
            dport_be,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Conntrack value: which backend a client flow is pinned to, for which
/// service, and how alive the flow is. 8-aligned (the same bytes as at
/// 4): the programs copy it with four 8-byte loads and stores, where at 4
/// LLVM calls a `memmove` that copies a byte per loop turn.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// Slot and generation of the backend the flow is pinned to.
    pub backend_id: u32,
    pub backend_gen: u32,
    /// The service (`SvcValue::svc_id` and `gen_`) the flow belongs to:
    /// an entry whose port now belongs to another service is no entry.
    pub svc_id: u32,
    pub svc_gen: u32,
    /// When the client last sent, in [`now_units`] of the coarse clock.
    pub seen: u32,
    /// TCP, unconfirmed: the acknowledgment number that completes the
    /// handshake (the backend's SYN-ACK sequence + 1, raw network order),
    /// 0 until the backend answered.
    pub ack_be: u32,
    /// `CT_*` state: how long the entry lives past `seen`.
    pub state: u8,
    /// `CTF_*` flags.
    pub flags: u8,
    // Naturally aligned padding: an array of bytes here lets LLVM merge
    // its stores into misaligned words, which the verifier refuses on the
    // stack.
    pub _pad0: u16,
    pub _pad1: u32,
}
const _: () = assert!(size_of::<CtValue>() == 32);

/// TCP: a SYN, not answered yet (half-open).
pub const CT_SYN: u8 = 1;
/// TCP past its handshake, or a UDP flow.
pub const CT_OPEN: u8 = 2;
/// TCP: the client sent a FIN or a RST.
pub const CT_CLOSING: u8 = 3;

/// Picked up again from a packet that cannot start a flow (its entry was
/// lost): not confirmed until the backend answers.
pub const CTF_RECOVERED: u8 = 1 << 0;

/// Conntrack time: the kernel's monotonic clock (see [`JiffyClock`]) in
/// units of 2^30 ns (1.07 s), which a `u32` holds for 146 years (and
/// [`age`] tells past from future for half of that).
pub const CT_UNIT_SHIFT: u32 = 30;

/// Nanoseconds to conntrack time units.
#[inline(always)]
pub const fn now_units(ns: u64) -> u32 {
    (ns >> CT_UNIT_SHIFT) as u32
}

/// The kernel's tick, read by the programs for conntrack time instead of
/// a clock helper: `bpf_jiffies64` is one load once the verifier inlines
/// it, where `bpf_ktime_get_coarse_ns` is a helper call, a seqlock and a
/// timespec conversion on every packet. User space sets it at load time
/// from the kernel's tick rate; all zero, the programs read the coarse
/// clock instead.
///
/// The same clock as [`now_units`] of the coarse monotonic clock, give or
/// take the moment the tick started counting at boot (a fraction of a
/// second: so a time in the past can read as up to a unit in the future,
/// which [`CtValue::expired`] and affinity take as "now").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JiffyClock {
    /// `INITIAL_JIFFIES`: the tick count at boot on a 64-bit kernel,
    /// `2^32 - 300 * HZ` (the kernel starts it so that it wraps a 32-bit
    /// count five minutes after boot).
    pub initial: u64,
    /// Nanoseconds per tick (`TICK_NSEC`); 0: use the coarse clock.
    pub ns_per_jiffy: u64,
}

impl JiffyClock {
    /// The clock of a kernel ticking `hz` times a second.
    pub const fn for_hz(hz: u32) -> Self {
        let hz = hz as u64;
        Self {
            initial: (1 << 32) - 300 * hz,
            ns_per_jiffy: (1_000_000_000 + hz / 2) / hz,
        }
    }

    /// Conntrack time units at tick count `jiffies`.
    #[inline(always)]
    pub const fn units(&self, jiffies: u64) -> u32 {
        now_units(
            jiffies
                .wrapping_sub(self.initial)
                .wrapping_mul(self.ns_per_jiffy),
        )
    }
}

/// How long ago `then` was at `now`, in conntrack units; a time up to half
/// the clock's range ahead of `now` (a clock read elsewhere, a little
/// ahead) is "now".
#[inline(always)]
pub const fn age(now: u32, then: u32) -> u32 {
    let d = now.wrapping_sub(then);
    if (d as i32) < 0 { 0 } else { d }
}

/// Seconds to conntrack time units, rounded up.
pub const fn secs_to_units(secs: u32) -> u32 {
    ((secs as u64 * 1_000_000_000).div_ceil(1 << CT_UNIT_SHIFT)) as u32
}

/// How long conntrack entries live past their flow's last packet, in
/// conntrack time units (user space sets them at load time).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtLifetimes {
    /// TCP, a SYN not answered yet.
    pub tcp_syn: u32,
    /// TCP, open.
    pub tcp_open: u32,
    /// TCP, after a FIN or RST from the client.
    pub tcp_closing: u32,
    /// UDP.
    pub udp: u32,
}

/// The defaults, in seconds: half-open TCP 60 (Linux 120 for SYN_SENT,
/// Cilium 60), open TCP 6 hours (Linux 5 days, Cilium 6 hours), closing
/// TCP 10 (Linux 10 for CLOSE, Cilium 10), UDP 60 (Linux 30 unanswered and
/// 120 answered, Cilium 60).
pub const DEFAULT_CT_LIFETIME_SECS: [u32; 4] = [60, 6 * 3600, 10, 60];

impl CtLifetimes {
    pub const fn from_secs(s: [u32; 4]) -> Self {
        Self {
            tcp_syn: secs_to_units(s[0]),
            tcp_open: secs_to_units(s[1]),
            tcp_closing: secs_to_units(s[2]),
            udp: secs_to_units(s[3]),
        }
    }

    /// How long an entry in `state` for `proto` lives past its last packet.
    #[inline(always)]
    pub fn of(&self, proto: u8, state: u8) -> u32 {
        if proto != IPPROTO_TCP {
            self.udp
        } else if state == CT_SYN {
            self.tcp_syn
        } else if state == CT_CLOSING {
            self.tcp_closing
        } else {
            self.tcp_open
        }
    }
}

impl Default for CtLifetimes {
    fn default() -> Self {
        Self::from_secs(DEFAULT_CT_LIFETIME_SECS)
    }
}

impl CtValue {
    /// Whether the entry has outlived its state's lifetime at `now`.
    #[inline(always)]
    pub fn expired(&self, proto: u8, now: u32, lt: &CtLifetimes) -> bool {
        age(now, self.seen) > lt.of(proto, self.state)
    }
}

/// Key of the reply table: where a local task's replies come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ReplyKey4 {
    pub addr: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ReplyKey4>() == 8);

/// An address and published port a client may have connected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct ReplyCand {
    pub addr: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ReplyCand>() == 8);

/// Node addresses x published ports that lead to one backend. User space
/// refuses a state that needs more than `MAX_REPLY_CANDS`.
pub const MAX_REPLY_CANDS: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct ReplyValue4 {
    /// The backend whose flows these are (a conntrack entry must name this
    /// slot and generation).
    pub backend_id: u32,
    pub backend_gen: u32,
    /// Valid entries in `cands`.
    pub count: u32,
    /// The interface the task sits behind (a bridge port, or its own
    /// link): its replies are trusted only from there. 0 while user space
    /// has not found it yet.
    pub ifindex: u32,
    pub cands: [ReplyCand; MAX_REPLY_CANDS],
}
const _: () = assert!(size_of::<ReplyValue4>() == 16 + 8 * MAX_REPLY_CANDS);

/// Per-service counters (per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(size_of::<SvcStats>() == 24);

/// What the XDP program leaves in front of a packet it rewrote for local
/// delivery (XDP metadata), for the TC program on the same device, which
/// redirects it into the task (XDP cannot enter a container's namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XdpMeta {
    pub magic: u32,
    /// The backend slot XDP picked: TC routes to its address (and drops
    /// the packet if the slot is no longer a local backend).
    pub backend_id: u32,
}
const _: () = assert!(size_of::<XdpMeta>() == 8);
pub const XDP_META_MAGIC: u32 = 0x6d65_7368; // "mesh"
/// `XdpMeta` of an encapsulated packet XDP could not send because the next
/// hop's neighbour entry was missing: `backend_id` holds the egress
/// ifindex, and TC sends it with `bpf_redirect_neigh` (which resolves it).
pub const XDP_META_NEIGH: u32 = 0x6e65_6967; // "neig"
/// `XdpMeta` of a reply XDP rewrote for this node itself (a task on
/// another node answered a flow one of this node's processes started):
/// TC hands it to the node's own stack through the loopback device.
pub const XDP_META_HOST: u32 = 0x686f_7374; // "host"

/// Why a packet was dropped. Index into `MAP_DROPS`. Never renumber:
/// retire a variant by renaming it `UnusedN`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Unused0 = 0,
    /// Service traffic whose TCP/UDP header is cut short (by the frame or
    /// by the IPv4 total length).
    L4Truncated = 1,
    /// TCP data offset below 5, or a UDP length that does not fit.
    L4BadLength = 2,
    /// First fragment of a fragmented datagram to a service: reassembly
    /// is not supported on the mesh path.
    Fragment = 3,
    /// The service has no backend.
    NoBackend = 4,
    /// The Maglev table names a backend that is not in the backend map
    /// (a transient user-space inconsistency).
    BackendMissing = 5,
    /// The backend runs on another node that the node map does not hold
    /// (a transient user-space inconsistency).
    RemoteBackend = 6,
    /// bpf_xdp_adjust_meta failed: the device cannot carry XDP metadata.
    NoMetadata = 7,
    /// TC: no route (or no usable device) towards the task or the client.
    FibLookupFailed = 8,
    /// TC: bpf_skb_store_bytes or a checksum helper failed.
    RewriteFailed = 9,
    /// Maglev table offset outside the map (user-space bug).
    TableOutOfRange = 10,
    /// TC: the backend XDP delivered the packet to (`XdpMeta`) is no
    /// longer a local backend: its slot was freed or reused between the
    /// two programs.
    StaleBackend = 11,
    /// TC: a packet from a task's port carries the source address of a
    /// task behind another port (spoofed).
    SpoofedReply = 12,
    /// An encapsulated packet from an address that is not a node of the
    /// swarm (no open relay).
    EncapFromNonNode = 13,
    /// An encapsulated packet this node cannot read (version, kind, a cut
    /// inner datagram), or a reply for an address that is not this node's.
    EncapMalformed = 14,
    /// An encapsulated packet for a task that is not on this node (any
    /// more): never re-forwarded.
    NotLocal = 15,
    /// A packet too big to encapsulate (ICMP fragmentation-needed was sent
    /// back when it could be), or (TC) for the device the FIB routes it to.
    TooBig = 16,
    /// XDP: no route or neighbour towards the node a flow is forwarded to.
    NoRouteToNode = 17,
    /// A task's new flow to a published port of its own service, for
    /// which no task but itself could be found: delivering a packet to
    /// the address it came from would need SNAT.
    Hairpin = 18,
    /// The service has a source-range allow list, and no range of it
    /// holds the packet's source.
    SourceDenied = 19,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        DropReason::Unused0,
        DropReason::L4Truncated,
        DropReason::L4BadLength,
        DropReason::Fragment,
        DropReason::NoBackend,
        DropReason::BackendMissing,
        DropReason::RemoteBackend,
        DropReason::NoMetadata,
        DropReason::FibLookupFailed,
        DropReason::RewriteFailed,
        DropReason::TableOutOfRange,
        DropReason::StaleBackend,
        DropReason::SpoofedReply,
        DropReason::EncapFromNonNode,
        DropReason::EncapMalformed,
        DropReason::NotLocal,
        DropReason::TooBig,
        DropReason::NoRouteToNode,
        DropReason::Hairpin,
        DropReason::SourceDenied,
    ];

    /// The Prometheus label value.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Unused0 => "unused0",
            DropReason::L4Truncated => "l4_truncated",
            DropReason::L4BadLength => "l4_bad_length",
            DropReason::Fragment => "fragment",
            DropReason::NoBackend => "no_backend",
            DropReason::BackendMissing => "backend_missing",
            DropReason::RemoteBackend => "remote_backend",
            DropReason::NoMetadata => "no_metadata",
            DropReason::FibLookupFailed => "fib_lookup_failed",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::TableOutOfRange => "table_out_of_range",
            DropReason::StaleBackend => "stale_backend",
            DropReason::SpoofedReply => "spoofed_reply",
            DropReason::EncapFromNonNode => "encap_from_non_node",
            DropReason::EncapMalformed => "encap_malformed",
            DropReason::NotLocal => "not_local",
            DropReason::TooBig => "too_big",
            DropReason::NoRouteToNode => "no_route_to_node",
            DropReason::Hairpin => "hairpin",
            DropReason::SourceDenied => "source_denied",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), have no implicit padding (asserted
    // sizes above) and are valid for any bit pattern.
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for ReplyKey4 {}
    unsafe impl aya::Pod for ReplyValue4 {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for NodeValue {}
    unsafe impl aya::Pod for CtLifetimes {}
    unsafe impl aya::Pod for JiffyClock {}
    unsafe impl aya::Pod for AffKey4 {}
    unsafe impl aya::Pod for AffValue4 {}
    unsafe impl aya::Pod for FwdValue {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for LocalDev {}
    unsafe impl aya::Pod for RouteKey4 {}
    unsafe impl aya::Pod for RouteValue4 {}
    unsafe impl aya::Pod for NodeHop {}
    unsafe impl aya::Pod for PinMeta {}
    unsafe impl aya::Pod for SvcName {}
}
