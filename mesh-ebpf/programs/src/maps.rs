//! The BPF maps, and the [`Tables`] implementation the shared logic runs on.
//! Sizes here are defaults; the daemon sets them at load time.

use aya_ebpf::bindings::{
    __sk_buff, BPF_F_CURRENT_NETNS, BPF_F_MARK_MANGLED_0, BPF_F_MMAPABLE, BPF_F_PSEUDO_HDR,
    bpf_sock_tuple,
};
use aya_ebpf::helpers::{
    bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_l4_csum_replace, bpf_sk_release, bpf_skc_lookup_tcp,
};
use aya_ebpf::macros::map;
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use mesh_common::abi::*;
use mesh_common::csum::{self, Delta};
use mesh_common::fwd::Tables;
use mesh_common::pkt::Pkt;
use mesh_common::rev::RevTables;

/// Memory-mappable: user space switches a port with one 32-bit store.
/// Pairs per element, as in `MAGLEV`.
#[map(name = "MESH_PORTS_V1")]
pub static PORTS: Array<[u32; 2]> = Array::with_max_entries(PORT_INDEX_ENTRIES / 2, BPF_F_MMAPABLE);

#[map(name = "MESH_SVC_V2")]
pub static SERVICES: Array<SvcValue> = Array::with_max_entries(2 * DEFAULT_MAX_SERVICES, 0);

#[map(name = "MESH_ADDR4_V1")]
pub static NODE_ADDR4: Array<[u32; MAX_NODE_ADDRS as usize]> =
    Array::with_max_entries(1, BPF_F_MMAPABLE);

/// An array: the lookup is inlined, and costs the same however many
/// backends there are.
#[map(name = "MESH_BE_V1")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Memory-mappable, so user space writes whole tables with a memcpy. Array
/// elements are 8-byte aligned, so entries are stored in pairs: entry `i`
/// is `MAGLEV[i / 2][i % 2]`, and the mapping is a flat `u32` array.
/// The size in the object (two tables of 1021 entries per service, in
/// pairs) is a placeholder: the daemon sizes it for `--maglev-size`.
#[map(name = "MESH_MAGLEV_V1")]
pub static MAGLEV: Array<[u32; 2]> =
    Array::with_max_entries(DEFAULT_MAX_SERVICES * 1021, BPF_F_MMAPABLE);

/// Confirmed TCP flows. One LRU list for all CPUs: per-CPU lists would
/// split the table by the number of possible CPUs, however few are online.
#[map(name = "MESH_CT4_V2")]
pub static CT4: LruHashMap<FlowKey4, CtValue> =
    LruHashMap::with_max_entries(DEFAULT_CT_ENTRIES, 0);

/// Confirmed UDP flows, likewise.
#[map(name = "MESH_CTU4_V1")]
pub static CT4_UDP: LruHashMap<FlowKey4, CtValue> =
    LruHashMap::with_max_entries(DEFAULT_CT_ENTRIES, 0);

/// Runs `$body` with `$m` bound to the confirmed table of `$key`'s
/// protocol. Each table at a call site of its own: the verifier inlines a
/// lookup (and calls an update directly) only where one map reaches the
/// call, and a map pointer chosen at run time costs the generic helper and
/// an indirect call on every packet.
macro_rules! with_confirmed {
    ($key:expr, |$m:ident| $body:expr) => {
        if $key.proto == IPPROTO_TCP {
            let $m = &CT4;
            $body
        } else {
            let $m = &CT4_UDP;
            let r = $body;
            // Keeps LLVM from sinking both calls into one after the
            // branch, with the map pointer chosen by a phi.
            // SAFETY: an empty instruction sequence.
            unsafe { core::arch::asm!("", options(nostack, preserves_flags)) };
            r
        }
    };
}

/// Unconfirmed flows (see `MAP_CT4_NEW`).
#[map(name = "MESH_CTNEW4_V1")]
pub static CT4_NEW: LruHashMap<FlowKey4, CtValue> =
    LruHashMap::with_max_entries(DEFAULT_CT_NEW_ENTRIES, 0);

/// Conntrack lifetimes, set by user space at load time (read-only data:
/// the verifier knows the values).
#[unsafe(no_mangle)]
static CT_LIFETIMES: CtLifetimes = CtLifetimes::from_secs(DEFAULT_CT_LIFETIME_SECS);

/// Conntrack's clock: the kernel's tick (read-only data set by user space
/// at load time; all zero: the coarse clock helper). See `JiffyClock`.
#[unsafe(no_mangle)]
static CT_CLOCK: JiffyClock = JiffyClock {
    initial: 0,
    ns_per_jiffy: 0,
};

/// `TCP_LISTEN` in the kernel's socket states.
const TCP_LISTEN: u32 = 10;

#[map(name = "MESH_REPLY4_V2")]
pub static REPLY4: HashMap<ReplyKey4, ReplyValue4> =
    HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "MESH_SVCST_V1")]
pub static SVC_STATS: PerCpuArray<SvcStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "MESH_DROPS_V1")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_DROP_REASONS, 0);

/// The swarm's nodes by slot (`Backend::node_id`): where forwarded flows go.
#[map(name = "MESH_NODES_V1")]
pub static NODES: Array<NodeValue> = Array::with_max_entries(DEFAULT_MAX_NODES, 0);

/// Node addresses: encapsulated packets come only from these.
#[map(name = "MESH_NODEIP4_V1")]
pub static NODE_BY_ADDR4: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_MAX_NODES, 0);

/// Local backends by identity.
#[map(name = "MESH_LOCAL4_V1")]
pub static LOCAL4: HashMap<ReplyKey4, u32> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Flows other nodes forwarded to local tasks.
#[map(name = "MESH_FWD4_V1")]
pub static FWD4: LruHashMap<FlowKey4, FwdValue> =
    LruHashMap::with_max_entries(DEFAULT_CT_ENTRIES, 0);

#[map(name = "MESH_CNT_V1")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_COUNTERS, 0);

/// This node's settings: one element.
#[map(name = "MESH_CFG_V1")]
pub static CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

/// Local backends' links and Ethernet addresses, by backend slot: an
/// array, so the lookup is inlined.
#[map(name = "MESH_LDEV_V1")]
pub static LOCAL_DEV: Array<LocalDev> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
/// The FIB's answers of the last second (see `MAP_ROUTE4`).
#[map(name = "MESH_ROUTE4_V1")]
pub static ROUTE4: LruHashMap<RouteKey4, RouteValue4> =
    LruHashMap::with_max_entries(DEFAULT_ROUTE_ENTRIES, 0);

/// Each node's next hop, per CPU (see `MAP_NODE_HOP`).
#[map(name = "MESH_NHOP_V1")]
pub static NODE_HOP: PerCpuArray<NodeHop> = PerCpuArray::with_max_entries(DEFAULT_MAX_NODES, 0);

/// User space only: what a restarted meshd needs to adopt the pinned
/// maps (no program reads it; it lives here so it is pinned with them).
#[map(name = "MESH_META_V1")]
pub static META: Array<PinMeta> = Array::with_max_entries(1, 0);

/// User space only: the service each published port belongs to.
#[map(name = "MESH_NAMES_V1")]
pub static NAMES: HashMap<SvcKey, SvcName> = HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Per-service source-range allow lists (see `MAP_SRC4`).
#[map(name = "MESH_SRC4_V1")]
pub static SRC4: LpmTrie<[u32; 2], u32> = LpmTrie::with_max_entries(DEFAULT_MAX_SRC_RANGES, 0);

/// Client-address affinity (see `MAP_AFF4`). One LRU list for all CPUs,
/// as conntrack.
#[map(name = "MESH_AFF4_V1")]
pub static AFF4: LruHashMap<AffKey4, AffValue4> =
    LruHashMap::with_max_entries(DEFAULT_AFF_ENTRIES, 0);

/// Affinity timeouts by svc id (see `MAP_AFF_TIMEOUT`).
#[map(name = "MESH_AFFTO_V1")]
pub static AFF_TIMEOUT: Array<u32> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[inline(always)]
pub fn count(c: Counter) {
    count_n(c, 1)
}

#[inline(always)]
pub fn count_n(c: Counter, n: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += n as u64 };
    }
}

/// Conntrack time now (see `Tables::now`).
#[inline(always)]
pub fn now() -> u32 {
    // SAFETY: read of a static the loader may have set; volatile so the
    // compiler does not fold in the default (the verifier does: read-only
    // data, so one branch below is dead code to it).
    let clock = unsafe { core::ptr::read_volatile(&CT_CLOCK) };
    if clock.ns_per_jiffy != 0 {
        // SAFETY: helper without arguments (inlined by the verifier).
        clock.units(unsafe { bpf_jiffies64() })
    } else {
        // SAFETY: as above.
        now_units(unsafe { bpf_ktime_get_coarse_ns() })
    }
}

/// The service slot (from 1) `key`'s port is published as, if any.
#[inline(always)]
fn port_slot(key: &SvcKey) -> Option<u32> {
    let i = port_index(key.proto, key.port_be)?;
    let slot = PORTS.get(i >> 1)?[(i & 1) as usize];
    if slot == 0 { None } else { Some(slot) }
}

#[inline(always)]
pub fn config() -> NodeConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(p) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// A copy of a conntrack value, read as four 8-byte words. A plain copy
/// becomes, on the reply path, a call to a `memmove` that copies a byte
/// per loop turn (the BPF backend expands `memcpy` inline, never
/// `memmove`); volatile loads are never merged into one. The words are
/// defined on both paths (0 without a value) and pass a register move
/// the optimiser cannot see through: an `Option` payload left undefined
/// on the `None` path is spilled anyway, and the verifier refuses to
/// read it.
#[inline(always)]
fn load_ct(v: Option<&CtValue>) -> Option<CtValue> {
    const { assert!(size_of::<CtValue>() == 32 && align_of::<CtValue>() == 8) };
    let (found, mut w) = match v {
        Some(v) => {
            let p = v as *const CtValue as *const u64;
            // SAFETY: four aligned words inside `v`.
            unsafe {
                (
                    true,
                    [
                        p.read_volatile(),
                        p.add(1).read_volatile(),
                        p.add(2).read_volatile(),
                        p.add(3).read_volatile(),
                    ],
                )
            }
        }
        None => (false, [0u64; 4]),
    };
    for x in w.iter_mut() {
        // SAFETY: a register-to-itself move.
        unsafe {
            core::arch::asm!("{0} = {0}", inout(reg) *x, options(nomem, nostack, preserves_flags));
        }
    }
    // SAFETY: any bytes are a valid `CtValue` (integers only).
    found.then(|| unsafe { core::mem::transmute::<[u64; 4], CtValue>(w) })
}

/// Zeroes `v` (8-aligned, a multiple of 8 bytes: checked at compile
/// time) with 8-byte stores and returns it. `mem::zeroed` becomes a call
/// to a `memset` that stores a byte per loop turn here (64 turns for a
/// FIB lookup's parameters); volatile stores are never merged into one.
///
/// # Safety
/// All-zero bytes must be a valid `T`.
#[inline(always)]
pub unsafe fn zeroed8<T>(v: &mut core::mem::MaybeUninit<T>) -> &mut T {
    const { assert!(size_of::<T>() % 8 == 0 && align_of::<T>() >= 8) };
    let w = v.as_mut_ptr() as *mut u64;
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: inside `v`, 8-aligned.
        unsafe { w.add(i).write_volatile(0) };
    }
    // SAFETY: every byte written; the caller vouches for all-zero.
    unsafe { v.assume_init_mut() }
}

/// The maps, as the shared packet logic sees them, and the program's
/// context (for the helpers that need one). `SKB`: the context is a
/// socket buffer (a TC program), whose TCP/UDP checksums are updated with
/// its helpers (see [`Tables::l4_csum`]); otherwise an XDP buffer.
pub struct Maps<const SKB: bool> {
    pub ctx: *mut core::ffi::c_void,
}

impl<const SKB: bool> Tables for Maps<SKB> {
    #[inline(always)]
    fn l4_csum(&self, pkt: &Pkt, off: usize, udp: bool, pseudo: Delta, seg: Delta) -> Option<()> {
        if !SKB {
            return csum::fix_l4(pkt, off, udp, pseudo, seg);
        }
        // Field size 0: `to` is the difference to add. The pseudo-header's
        // part with BPF_F_PSEUDO_HDR (a partial checksum takes only that
        // part; a device's sum of the packet, CHECKSUM_COMPLETE, follows
        // it), the segment's part without.
        let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let skb = self.ctx as *mut __sk_buff;
        for (d, pseudo_flag) in [(pseudo, BPF_F_PSEUDO_HDR as u64), (seg, 0)] {
            if d.is_empty() {
                continue;
            }
            // SAFETY: helper call on the program's own socket buffer.
            let r = unsafe {
                bpf_l4_csum_replace(skb, off as u32, 0, d.folded() as u64, pseudo_flag | mangled)
            };
            if r != 0 {
                return None;
            }
        }
        Some(())
    }

    #[inline(always)]
    fn service(&self, key: &SvcKey) -> Option<SvcValue> {
        let slot = port_slot(key)?;
        SERVICES.get(slot - 1).copied()
    }

    #[inline(always)]
    fn published(&self, key: &SvcKey) -> bool {
        port_slot(key).is_some()
    }

    #[inline(always)]
    fn source_allowed(&self, svc_id: u32, saddr: u32) -> bool {
        // aya's key is packed: look it up from an 8-aligned copy (the
        // verifier refuses misaligned stack access).
        let k = SrcKey4 {
            prefix_len: 64,
            svc_id,
            addr: saddr,
        };
        // SAFETY: `SrcKey4` starts with the 12 bytes of a `Key<[u32; 2]>`
        // (prefix length, service id, address), which is packed.
        let key = unsafe { &*(&k as *const SrcKey4 as *const Key<[u32; 2]>) };
        SRC4.get(key).is_some()
    }

    #[inline(always)]
    fn aff_get(&self, key: &AffKey4) -> Option<AffValue4> {
        // SAFETY: copied at once, as conntrack entries.
        unsafe { AFF4.get(key) }.copied()
    }

    #[inline(always)]
    fn aff_put(&self, key: &AffKey4, v: &AffValue4) {
        // LRU: evicts instead of failing; a lost entry costs the client
        // its remembered task, not its flow.
        let _ = AFF4.insert(key, v, 0);
    }

    #[inline(always)]
    fn affinity_timeout(&self, svc_id: u32) -> u32 {
        AFF_TIMEOUT.get(svc_id).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn is_node_addr4(&self, addr: u32) -> bool {
        // Sixteen compares beat a hash lookup. Free places hold 0.
        match NODE_ADDR4.get(0) {
            Some(set) => addr != 0 && set.iter().any(|&a| a == addr),
            None => false,
        }
    }

    #[inline(always)]
    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue> {
        // SAFETY: the value is copied at once; an entry another CPU
        // replaces meanwhile yields the old or the new value.
        with_confirmed!(key, |m| load_ct(unsafe { m.get(key) }))
    }

    #[inline(always)]
    fn ct_confirm(&self, key: &FlowKey4, ct: &CtValue) {
        confirm(key, ct)
    }

    #[inline(always)]
    fn ct_new_get(&self, key: &FlowKey4) -> Option<CtValue> {
        // SAFETY: as above.
        load_ct(unsafe { CT4_NEW.get(key) })
    }

    #[inline(always)]
    fn ct_forget(&self, key: &FlowKey4) {
        with_confirmed!(key, |m| {
            let _ = m.remove(key);
        })
    }

    #[inline(always)]
    fn ct_new_forget(&self, key: &FlowKey4) {
        let _ = CT4_NEW.remove(key);
    }

    #[inline(always)]
    fn ct_new_put(&self, key: &FlowKey4, ct: &CtValue) {
        // An LRU map evicts instead of failing; an error here can only be
        // -ENOMEM, and the flow's next packet hashes to the same backend.
        let _ = CT4_NEW.insert(key, ct, 0);
    }

    #[inline(always)]
    fn ct_touch(&self, key: &FlowKey4, confirmed: bool, seen: u32, state: u8) {
        let p = if confirmed {
            with_confirmed!(key, |m| m.get_ptr_mut(key))
        } else {
            CT4_NEW.get_ptr_mut(key)
        };
        if let Some(p) = p {
            // SAFETY: a live map value; plain word stores (another CPU may
            // store the same fields: either write is as good).
            unsafe {
                (*p).seen = seen;
                (*p).state = state;
            }
        }
    }

    #[inline(always)]
    fn now(&self) -> u32 {
        now()
    }

    #[inline(always)]
    fn lifetimes(&self) -> CtLifetimes {
        // SAFETY: read of a static the loader may have set; volatile so
        // the compiler does not fold in the default.
        unsafe { core::ptr::read_volatile(&CT_LIFETIMES) }
    }

    #[inline(always)]
    fn ct_answered(&self, key: &FlowKey4, ack_be: u32) {
        RevTables::ct_answered(self, key, ack_be)
    }

    #[inline(always)]
    fn config(&self) -> NodeConfig {
        config()
    }

    #[inline(always)]
    fn node(&self, slot: u32) -> Option<NodeValue> {
        NODES.get(slot).filter(|n| n.gen_ != 0).copied()
    }

    #[inline(always)]
    fn is_node(&self, addr: u32) -> bool {
        // SAFETY: only presence is read.
        unsafe { NODE_BY_ADDR4.get(&addr) }.is_some()
    }

    #[inline(always)]
    fn local_backend(&self, key: &ReplyKey4) -> Option<u32> {
        // SAFETY: copied at once.
        unsafe { LOCAL4.get(key) }.copied()
    }

    #[inline(always)]
    fn fwd_get(&self, key: &FlowKey4) -> Option<FwdValue> {
        // SAFETY: copied at once.
        unsafe { FWD4.get(key) }.copied()
    }

    #[inline(always)]
    fn fwd_put(&self, key: &FlowKey4, v: &FwdValue) {
        let _ = FWD4.insert(key, v, 0);
    }

    #[inline(always)]
    fn count_n(&self, c: Counter, n: u32) {
        count_n(c, n)
    }

    #[inline(always)]
    fn host_socket(&self, key: &FlowKey4) -> bool {
        #[repr(C, align(8))]
        struct Tuple(bpf_sock_tuple);
        let mut t = core::mem::MaybeUninit::<Tuple>::uninit();
        // SAFETY: an all-zero tuple is valid; filled below.
        let tuple = unsafe { &mut zeroed8(&mut t).0 };
        tuple.__bindgen_anon_1.ipv4.saddr = key.saddr;
        tuple.__bindgen_anon_1.ipv4.daddr = key.daddr;
        tuple.__bindgen_anon_1.ipv4.sport = key.sport_be;
        tuple.__bindgen_anon_1.ipv4.dport = key.dport_be;
        // SAFETY: helper call with the program's context and a tuple on
        // the stack; the socket is released before returning.
        unsafe {
            let sk = bpf_skc_lookup_tcp(
                self.ctx,
                tuple,
                core::mem::size_of::<[u32; 3]>() as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            );
            if sk.is_null() {
                return false;
            }
            // A listener takes new connections: a mesh flow's segment
            // that found only the listener is not the node's.
            let listening = (*sk).state == TCP_LISTEN;
            bpf_sk_release(sk as *mut _);
            !listening
        }
    }

    #[inline(always)]
    fn maglev(&self, index: u32) -> Option<u32> {
        MAGLEV
            .get(index >> 1)
            .map(|pair| pair[(index & 1) as usize])
    }

    #[inline(always)]
    fn backend(&self, id: u32) -> Option<Backend> {
        // A slot is rewritten only when no table names it: a reader coming
        // from a stale conntrack entry may see it change, and then either
        // a free slot or another generation (and moves the flow).
        BACKENDS.get(id).filter(|b| b.flags != 0).copied()
    }

    #[inline(always)]
    fn account(&self, svc_id: u32, packets: u32, bytes: u64, new_flow: bool) {
        if let Some(s) = SVC_STATS.get_ptr_mut(svc_id) {
            // SAFETY: per-CPU slot.
            unsafe {
                (*s).packets += packets as u64;
                (*s).bytes += bytes;
                if new_flow {
                    (*s).new_flows += 1;
                }
            }
        }
    }
}

impl<const SKB: bool> RevTables for Maps<SKB> {
    #[inline(always)]
    fn reply(&self, key: &ReplyKey4) -> Option<ReplyValue4> {
        // SAFETY: replaced whole by user space; copied at once.
        unsafe { REPLY4.get(key) }.copied()
    }

    #[inline(always)]
    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue> {
        Tables::ct_get(self, key)
    }

    #[inline(always)]
    fn ct_new_get(&self, key: &FlowKey4) -> Option<CtValue> {
        Tables::ct_new_get(self, key)
    }

    #[inline(always)]
    fn ct_confirm(&self, key: &FlowKey4, ct: &CtValue) {
        confirm(key, ct)
    }

    #[inline(always)]
    fn ct_answered(&self, key: &FlowKey4, ack_be: u32) {
        if let Some(p) = CT4_NEW.get_ptr_mut(key) {
            // SAFETY: a live map value; one word store.
            unsafe { (*p).ack_be = ack_be };
        }
    }

    #[inline(always)]
    fn fwd_get(&self, key: &FlowKey4) -> Option<FwdValue> {
        Tables::fwd_get(self, key)
    }

    #[inline(always)]
    fn is_own_addr4(&self, addr: u32) -> bool {
        Tables::is_node_addr4(self, addr)
    }
}

/// Moves a flow's entry to the confirmed table: there first, then gone
/// from the unconfirmed one, so a packet in between finds it in one.
#[inline(always)]
fn confirm(key: &FlowKey4, ct: &CtValue) {
    with_confirmed!(key, |m| {
        let _ = m.insert(key, ct, 0);
    });
    let _ = CT4_NEW.remove(key);
}
