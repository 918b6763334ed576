//! Benchmark floors, measured in the same run as the real program so that
//! only the mesh's own cost is reported: an XDP program that only passes,
//! and one that parses and does one hash lookup, then transmits. And the
//! floor of a tracked new flow: what its conntrack work costs in the
//! kernel's maps alone (`floor_track`); and the floor of a TC intercept's
//! established flow: what a DNAT with the socket buffer's checksum
//! helpers and the hand-over into a task cost alone (`floor_tc_nat`); and
//! the floor of a packet another node forwarded to a task here: its
//! lookups and the helpers that strip it and hand it on (`floor_decap`);
//! and the floor of a task's reply another node carried back to this one
//! (`floor_reply`).
//!
//! Their own object (`mesh-floor`), not part of the dataplane: meshd never
//! loads them; the benchmark and the tests do (`mesh_tests::fixtures::Floors`).
#![no_std]
#![no_main]

use aya_ebpf::bindings::{BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action};
use aya_ebpf::helpers::{
    bpf_l4_csum_replace, bpf_redirect_peer, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
};
use aya_ebpf::macros::{classifier, map, xdp};
use aya_ebpf::maps::{HashMap, LruHashMap};
use aya_ebpf::programs::{TcContext, XdpContext};
use mesh_common::abi::{
    CtValue, ENCAP_LEN, ETH_P_IP, FlowKey4, FwdValue, ReplyKey4, RouteKey4, RouteValue4,
    XDP_META_MAGIC, XdpMeta,
};
use mesh_common::csum::{self, Delta};
use mesh_common::parse::{ETH_HLEN, IP_CSUM, IP_DADDR, IP_HLEN_MIN, L4_DPORT};
use mesh_common::parse::{self, Ip4};
use mesh_common::pkt::Pkt;

#[map(name = "MESH_FLOOR")]
static FLOOR: HashMap<u32, u32> = HashMap::with_max_entries(16, 0);

#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn floor_lookup(ctx: XdpContext) -> u32 {
    // SAFETY: data..data_end is the packet.
    let pkt = unsafe { Pkt::new(ctx.data(), ctx.data_end()) };
    let Some((_, _, dport)) = flow_of(&pkt) else {
        return xdp_action::XDP_PASS;
    };
    match FLOOR.get_ptr(dport as u32) {
        Some(_) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}

/// `floor_track`'s tables, of the sizes of the benchmark's new-flow
/// world: the confirmed flows, and the unconfirmed ones new flows go to
/// (the benchmark empties it after every batch, as that world's).
#[map(name = "MESH_FLOOR_CT")]
static FLOOR_CT: LruHashMap<FlowKey4, CtValue> = LruHashMap::with_max_entries(65536, 0);
#[map(name = "MESH_FLOOR_CTNEW")]
static FLOOR_CT_NEW: LruHashMap<FlowKey4, CtValue> = LruHashMap::with_max_entries(65536, 0);

/// The map work every tracked new flow of `mesh_xdp` does, and nothing
/// else: parse, the flow's key, a lookup in the confirmed and in the
/// unconfirmed table (both miss), one insert into the unconfirmed one.
/// XDP_TX when the flow was new and its insert succeeded.
#[xdp]
pub fn floor_track(ctx: XdpContext) -> u32 {
    // SAFETY: data..data_end is the packet.
    let pkt = unsafe { Pkt::new(ctx.data(), ctx.data_end()) };
    let Some((ip, sport, dport)) = flow_of(&pkt) else {
        return xdp_action::XDP_PASS;
    };
    let key = FlowKey4::new(ip.saddr, ip.daddr, sport, dport, ip.proto);
    // SAFETY: only presence is read.
    if unsafe { FLOOR_CT.get(&key).is_some() || FLOOR_CT_NEW.get(&key).is_some() } {
        return xdp_action::XDP_PASS;
    }
    let v = CtValue {
        svc_id: dport as u32,
        ..CtValue::default()
    };
    match FLOOR_CT_NEW.insert(&key, &v, 0) {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_PASS,
    }
}

/// `floor_tc_nat`'s flows: the client's flow to where it goes, as eight
/// words: the task's address, its port (network order, low half), the
/// link's ifindex, 0, then the 12 bytes of the Ethernet addresses to
/// write (destination, source), 0.
#[map(name = "MESH_FLOOR_NAT")]
static FLOOR_NAT: LruHashMap<FlowKey4, [u32; 8]> = LruHashMap::with_max_entries(65536, 0);

/// What the TC intercept's established flow needs from the kernel, and
/// nothing else: parse, one lookup of the flow (a hit), the destination
/// rewritten (address and IPv4 checksum written directly, the TCP/UDP
/// checksum through `bpf_l4_csum_replace`, once for the pseudo-header's
/// part and once for the port's, as a partial checksum requires), the
/// link's Ethernet addresses, `bpf_redirect_peer`. A flow it does not
/// hold: TC_ACT_UNSPEC.
#[classifier]
pub fn floor_tc_nat(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: context field reads; data..data_end is the linear part.
    let pkt = unsafe { Pkt::new((*skb).data as usize, (*skb).data_end as usize) };
    let Some((ip, sport, dport)) = flow_of(&pkt) else {
        return TC_ACT_UNSPEC;
    };
    let key = FlowKey4::new(ip.saddr, ip.daddr, sport, dport, ip.proto);
    // SAFETY: copied at once.
    let Some(v) = (unsafe { FLOOR_NAT.get(&key) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    let (addr, port) = (v[0], v[1] as u16);
    let (Some(h), Some(p)) = (
        pkt.view::<{ ETH_HLEN + IP_HLEN_MIN }>(0),
        pkt.view::<2>(ip.l4_off + L4_DPORT),
    ) else {
        return TC_ACT_SHOT;
    };
    let l4c = parse::l4_csum_off(&ip);
    if pkt.load::<u16>(l4c).is_none() {
        return TC_ACT_SHOT;
    }
    let check: u16 = h.get(ETH_HLEN + IP_CSUM);
    h.set(ETH_HLEN + IP_DADDR, addr);
    h.set(ETH_HLEN + IP_CSUM, csum::update32(check, ip.daddr, addr));
    p.set(0, port);
    let parts = [
        (Delta::default().add32(ip.daddr, addr), BPF_F_PSEUDO_HDR as u64),
        (Delta::default().add16(dport, port), 0),
    ];
    for (d, flags) in parts {
        // SAFETY: helper call on the program's own socket buffer.
        if unsafe { bpf_l4_csum_replace(skb, l4c as u32, 0, d.folded() as u64, flags) } != 0 {
            return TC_ACT_SHOT;
        }
    }
    // SAFETY: as above; the helper moved nothing (it rewrote in place).
    let pkt = unsafe { Pkt::new((*skb).data as usize, (*skb).data_end as usize) };
    let Some(eth) = pkt.view::<12>(0) else {
        return TC_ACT_SHOT;
    };
    eth.set::<u32>(0, v[4]);
    eth.set::<u32>(4, v[5]);
    eth.set::<u32>(8, v[6]);
    // SAFETY: helper call.
    unsafe { bpf_redirect_peer(v[2], 0) as i32 }
}

/// `floor_decap`'s tables: the nodes by address, the local tasks by
/// identity (their slot), the flows other nodes forwarded here.
#[map(name = "MESH_FLOOR_NODE")]
static FLOOR_NODE: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);
#[map(name = "MESH_FLOOR_LOCAL")]
static FLOOR_LOCAL: HashMap<ReplyKey4, u32> = HashMap::with_max_entries(65536, 0);
#[map(name = "MESH_FLOOR_FWD")]
static FLOOR_FWD: LruHashMap<FlowKey4, FwdValue> = LruHashMap::with_max_entries(65536, 0);

/// The part `floor_decap` and `floor_reply` share: the outer headers
/// parsed, the sender looked up among the nodes, the outer headers
/// stripped (`bpf_xdp_adjust_head`, the Ethernet addresses kept), the
/// inner headers parsed: the inner packet, its IPv4 header and ports.
/// `Err`: the action to return (XDP_PASS untouched when the sender is no
/// node, XDP_DROP when the strip went wrong).
#[inline(always)]
fn strip_from_node(ctx: &XdpContext) -> Result<(Pkt, Ip4, u16, u16), u32> {
    // SAFETY: data..data_end is the packet.
    let pkt = unsafe { Pkt::new(ctx.data(), ctx.data_end()) };
    let ip = parse::ipv4(&pkt).ok_or(xdp_action::XDP_PASS)?;
    // SAFETY: only presence is read.
    if unsafe { FLOOR_NODE.get(&ip.saddr) }.is_none() {
        return Err(xdp_action::XDP_PASS);
    }
    let macs = pkt.load::<[u32; 3]>(0).ok_or(xdp_action::XDP_PASS)?;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ENCAP_LEN as i32) } != 0 {
        return Err(xdp_action::XDP_DROP);
    }
    // SAFETY: as above, after the helper moved the packet's start.
    let pkt = unsafe { Pkt::new(ctx.data(), ctx.data_end()) };
    let eth = pkt.view::<ETH_HLEN>(0).ok_or(xdp_action::XDP_DROP)?;
    eth.set(0, macs);
    eth.set::<u16>(12, ETH_P_IP.to_be());
    let (ip, sport, dport) = flow_of(&pkt).ok_or(xdp_action::XDP_DROP)?;
    Ok((pkt, ip, sport, dport))
}

/// A TCP or UDP frame's IPv4 header and ports (raw), as every floor
/// parses it.
#[inline(always)]
fn flow_of(pkt: &Pkt) -> Option<(Ip4, u16, u16)> {
    let ip = parse::ipv4(pkt)?;
    let (sport, dport) = parse::ports(pkt, &ip)?;
    Some((ip, sport, dport))
}

/// What a packet another node forwarded to a task of this node needs
/// from the kernel at XDP, and nothing else: the outer headers parsed,
/// the sender looked up among the nodes, the outer headers stripped
/// (`bpf_xdp_adjust_head`, the Ethernet addresses kept), the inner
/// headers parsed, the task looked up by identity and the flow's record
/// by its key, and the metadata that names the task for TC
/// (`bpf_xdp_adjust_meta`). XDP_PASS with the metadata; without it when
/// a lookup misses.
#[xdp]
pub fn floor_decap(ctx: XdpContext) -> u32 {
    let (_, ip, sport, dport) = match strip_from_node(&ctx) {
        Ok(inner) => inner,
        Err(action) => return action,
    };
    let task = ReplyKey4 {
        addr: ip.daddr,
        port_be: dport,
        proto: ip.proto,
        _pad: 0,
    };
    // SAFETY: copied at once.
    let Some(slot) = (unsafe { FLOOR_LOCAL.get(&task) }).copied() else {
        return xdp_action::XDP_DROP;
    };
    let flow = FlowKey4::new(ip.saddr, ip.daddr, sport, dport, ip.proto);
    // SAFETY: only presence is read.
    if unsafe { FLOOR_FWD.get(&flow) }.is_none() {
        return xdp_action::XDP_DROP;
    }
    let len = core::mem::size_of::<XdpMeta>();
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(len as i32)) } != 0 {
        return xdp_action::XDP_DROP;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + len > data {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: bounds checked against data just above.
    unsafe {
        core::ptr::write_unaligned(
            meta as *mut XdpMeta,
            XdpMeta {
                magic: XDP_META_MAGIC,
                backend_id: slot,
            },
        );
    }
    xdp_action::XDP_PASS
}

/// `floor_reply`'s route cache.
#[map(name = "MESH_FLOOR_ROUTE")]
static FLOOR_ROUTE: LruHashMap<RouteKey4, RouteValue4> = LruHashMap::with_max_entries(4096, 0);

/// What a task's reply another node carried back needs from the kernel
/// at XDP, and nothing else: the outer headers parsed, the sender looked
/// up among the nodes (`MESH_FLOOR_NODE`), the outer headers stripped
/// (the Ethernet addresses kept), the inner headers parsed, the flow
/// looked up among the unconfirmed ones (`MESH_FLOOR_CTNEW`: a reply may
/// confirm its flow; a miss here), the route to the client in the route
/// cache, its Ethernet addresses written, XDP_TX. XDP_PASS untouched when
/// the node lookup misses, XDP_DROP when the route's does.
#[xdp]
pub fn floor_reply(ctx: XdpContext) -> u32 {
    let (pkt, ip, sport, dport) = match strip_from_node(&ctx) {
        Ok(inner) => inner,
        Err(action) => return action,
    };
    let flow = FlowKey4::new(ip.daddr, ip.saddr, dport, sport, ip.proto);
    // SAFETY: only presence is read.
    if unsafe { FLOOR_CT_NEW.get(&flow) }.is_some() {
        return xdp_action::XDP_DROP;
    }
    // 8-aligned, as the dataplane's route key.
    #[repr(C, align(8))]
    struct Key(RouteKey4);
    let key = Key(RouteKey4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        // SAFETY: context field read.
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
    });
    // SAFETY: copied at once.
    let Some(r) = (unsafe { FLOOR_ROUTE.get(&key.0) }).copied() else {
        return xdp_action::XDP_DROP;
    };
    let Some(eth) = pkt.view::<12>(0) else {
        return xdp_action::XDP_DROP;
    };
    eth.set(0, r.dmac_hi);
    eth.set(4, r.dmac_lo);
    eth.set(6, r.smac_hi);
    eth.set(10, r.smac_lo);
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
