//! What both TC programs end with: a FIB lookup for the (rewritten)
//! packet, the Ethernet addresses it gives, and `bpf_redirect` to the
//! egress device. The kernel's forwarding path (and netfilter's FORWARD
//! chain, DROP on Docker hosts) is never involved.

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT,
    bpf_fib_lookup as FibParams,
};
use aya_ebpf::helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh};
use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use mesh_common::abi::{DropReason, NodeHop, RouteKey4, RouteValue4};
use mesh_common::parse::ETH_HLEN;
use mesh_common::pkt::Pkt;

use crate::maps::{NODE_HOP, ROUTE4, config, count_drop, now, zeroed8};

/// `bpf_fib_lookup`'s address family for IPv4 (`AF_INET` in socket.h).
const AF_INET: u8 = 2;

/// The destination and source MACs open the Ethernet header, six bytes
/// each (written as 4 + 2).
const ETH_DST: usize = 0;
const ETH_SRC: usize = 6;
const ETH_MACS: usize = 12;

/// The device the packet arrived on: where the FIB lookup starts.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: context field read.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// Where the FIB sends a packet: the lookup's result code, the egress
/// device, and (on success) the Ethernet addresses to write.
pub struct Route {
    pub rc: i64,
    pub ifindex: u32,
    dmac: (u32, u16),
    smac: (u32, u16),
}

impl Route {
    pub fn found(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_SUCCESS as i64
    }

    /// The route exists but the next hop's neighbour entry does not yet.
    pub fn no_neigh(&self) -> bool {
        self.rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64
    }

    /// A route the programs kept (`RouteValue4`), as found.
    #[inline(always)]
    fn kept(v: &RouteValue4) -> Self {
        Route {
            rc: BPF_FIB_LKUP_RET_SUCCESS as i64,
            ifindex: v.ifindex,
            dmac: (v.dmac_hi, v.dmac_lo),
            smac: (v.smac_hi, v.smac_lo),
        }
    }

    /// This (found) route, to keep for conntrack time unit `at`.
    #[inline(always)]
    fn to_keep(&self, at: u32) -> RouteValue4 {
        RouteValue4 {
            ifindex: self.ifindex,
            at,
            dmac_hi: self.dmac.0,
            smac_hi: self.smac.0,
            dmac_lo: self.dmac.1,
            smac_lo: self.smac.1,
        }
    }

    /// Writes the route's Ethernet addresses into `pkt`.
    #[inline(always)]
    pub fn write_macs(&self, pkt: &Pkt) -> Option<()> {
        let eth = pkt.view::<ETH_MACS>(0)?;
        eth.set(ETH_DST, self.dmac.0);
        eth.set(ETH_DST + 4, self.dmac.1);
        eth.set(ETH_SRC, self.smac.0);
        eth.set(ETH_SRC + 4, self.smac.1);
        Some(())
    }
}

/// Looks up the route of a packet from `saddr` to `daddr` arriving on
/// `ifindex`, as the kernel would forward it. `ctx` is the program's
/// context (XDP or TC).
#[inline(always)]
pub fn route(ctx: *mut core::ffi::c_void, saddr: u32, daddr: u32, ifindex: u32) -> Route {
    #[repr(C, align(8))]
    struct Params(FibParams);
    let mut p = core::mem::MaybeUninit::<Params>::uninit();
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let p = unsafe { &mut zeroed8(&mut p).0 };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: helper call with a valid context and parameter block.
    let rc = unsafe {
        bpf_fib_lookup(ctx, p, core::mem::size_of::<FibParams>() as i32, 0)
    };
    Route {
        rc,
        ifindex: p.ifindex,
        dmac: mac(&p.dmac),
        smac: mac(&p.smac),
    }
}

/// Not a node's address: a lookup without a node slot.
pub const NO_NODE: u32 = u32::MAX;

/// As [`route`], answered from what the programs kept of the FIB's answers
/// when it was asked the same within the current conntrack time unit: the
/// next hop of node slot `node` (`MAP_NODE_HOP`), or for any other
/// destination (`node` is [`NO_NODE`]) the route cache (`MAP_ROUTE4`). A
/// successful answer is kept there.
#[inline(always)]
pub fn route_cached(
    ctx: *mut core::ffi::c_void,
    saddr: u32,
    daddr: u32,
    ifindex: u32,
    node: u32,
) -> Route {
    // 8-aligned: LLVM may store two fields at once, and the verifier
    // refuses a misaligned stack access.
    #[repr(C, align(8))]
    struct Key(RouteKey4);
    let key = Key(RouteKey4 {
        saddr,
        daddr,
        ifindex,
    });
    if node != NO_NODE {
        return route_to_node(ctx, &key.0, node);
    }
    let now = now();
    if let Some(p) = ROUTE4.get_ptr(&key.0) {
        // SAFETY: a live map value, copied at once.
        let v = unsafe { *p };
        if v.at == now {
            return Route::kept(&v);
        }
    }
    let r = route(ctx, saddr, daddr, ifindex);
    if r.found() {
        #[repr(C, align(8))]
        struct Value(RouteValue4);
        let v = Value(r.to_keep(now));
        // LRU: evicts instead of failing; a lost entry costs a lookup.
        let _ = ROUTE4.insert(&key.0, &v.0, 0);
    }
    r
}

/// [`route_cached`] of `key` for node slot `node`: an inlined per-CPU
/// array read.
#[inline(always)]
fn route_to_node(ctx: *mut core::ffi::c_void, key: &RouteKey4, node: u32) -> Route {
    let Some(p) = NODE_HOP.get_ptr_mut(node) else {
        return route(ctx, key.saddr, key.daddr, key.ifindex);
    };
    let now = now();
    // SAFETY: this CPU's own copy of a live map value, read in place.
    let h = unsafe { &mut *p };
    if h.route.at == now && h.key == *key && h.route.ifindex != 0 {
        return Route::kept(&h.route);
    }
    let r = route(ctx, key.saddr, key.daddr, key.ifindex);
    if r.found() {
        // Only this CPU writes its copy, and programs on one CPU do not
        // interleave (on a PREEMPT_RT kernel one may preempt another: a
        // copy written half by each would misroute until the next unit).
        *h = NodeHop {
            key: *key,
            route: r.to_keep(now),
        };
    }
    r
}

/// Routes the (rewritten) packet as the kernel would forward it, writes
/// the Ethernet addresses and redirects it to the egress device.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Pkt, saddr: u32, daddr: u32, ifindex: u32) -> i32 {
    forward_or(
        ctx,
        pkt,
        saddr,
        daddr,
        ifindex,
        NO_NODE,
        DropReason::FibLookupFailed,
    )
}

/// As [`forward`], to node slot `node` (or [`NO_NODE`]); a packet without
/// a route is dropped as `no_route`.
#[inline(always)]
pub fn forward_or(
    ctx: &TcContext,
    pkt: &Pkt,
    saddr: u32,
    daddr: u32,
    ifindex: u32,
    node: u32,
    no_route: DropReason,
) -> i32 {
    // The FIB checks a packet that is no GSO packet against the egress
    // device's MTU; the cache does not: a frame larger than the uplink's
    // (a datagram of the node's own over the loopback's MTU) asks the FIB.
    // SAFETY: context field reads.
    let (len, gso) = unsafe { ((*ctx.skb.skb).len, (*ctx.skb.skb).gso_size) };
    let r = if gso == 0 && len > ETH_HLEN as u32 + config().mtu {
        route(ctx.skb.skb as *mut _, saddr, daddr, ifindex)
    } else {
        route_cached(ctx.skb.skb as *mut _, saddr, daddr, ifindex, node)
    };
    let p = &r;
    let rc = r.rc;
    if r.found() {
        if r.write_macs(pkt).is_none() {
            count_drop(DropReason::RewriteFailed);
            return TC_ACT_SHOT;
        }
        // SAFETY: helper call.
        return unsafe { bpf_redirect(p.ifindex, 0) } as i32;
    }
    if r.no_neigh() {
        // The kernel resolves the neighbour (ARP) and transmits.
        // SAFETY: helper call; no explicit next hop.
        return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // The skb's lookup checks the egress device's MTU: a packet that
        // is not GSO and longer (a datagram of the node's own process,
        // sent over the loopback's 64 KiB MTU) cannot go there whole.
        count_drop(DropReason::TooBig);
        return TC_ACT_SHOT;
    }
    count_drop(no_route);
    debug!(
        ctx,
        "no route {:i} -> {:i} (fib lookup {})",
        u32::from_be(saddr),
        u32::from_be(daddr),
        rc
    );
    TC_ACT_SHOT
}

/// A MAC address out of the FIB result, byte by byte: the objects are built
/// with misaligned access allowed (single loads for packet fields), which
/// the verifier permits on packet memory but not on the stack, where these
/// six-byte fields sit at two-byte offsets.
#[inline(always)]
fn mac(m: &[u8; 6]) -> (u32, u16) {
    // SAFETY: reads of bytes of a live stack object.
    let b = |i: usize| unsafe { core::ptr::read_volatile(&m[i]) };
    (
        u32::from_ne_bytes([b(0), b(1), b(2), b(3)]),
        u16::from_ne_bytes([b(4), b(5)]),
    )
}
