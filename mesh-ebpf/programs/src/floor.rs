//! Benchmark floors, measured in the same run as the real program so that
//! only the mesh's own cost is reported: an XDP program that only passes,
//! and one that parses and does one hash lookup, then transmits. And the
//! floor of a tracked new flow: what its conntrack work costs in the
//! kernel's maps alone (`floor_track`); and the floor of a TC intercept's
//! established flow: what a DNAT with the socket buffer's checksum
//! helpers and the hand-over into a task cost alone (`floor_tc_nat`).
//!
//! Their own object (`mesh-floor`), not part of the dataplane: meshd never
//! loads them; the benchmark and the tests do (`mesh_tests::fixtures::Floors`).
#![no_std]
#![no_main]

use aya_ebpf::bindings::{BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action};
use aya_ebpf::helpers::{bpf_l4_csum_replace, bpf_redirect_peer};
use aya_ebpf::macros::{classifier, map, xdp};
use aya_ebpf::maps::{HashMap, LruHashMap};
use aya_ebpf::programs::{TcContext, XdpContext};
use mesh_common::abi::{CtValue, FlowKey4};
use mesh_common::csum::{self, Delta};
use mesh_common::parse::{ETH_HLEN, IP_CSUM, IP_DADDR, IP_HLEN_MIN, L4_DPORT};
use mesh_common::parse;
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
    let Some(ip) = parse::ipv4(&pkt) else {
        return xdp_action::XDP_PASS;
    };
    let Some((_, dport)) = parse::ports(&pkt, &ip) else {
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
    let Some(ip) = parse::ipv4(&pkt) else {
        return xdp_action::XDP_PASS;
    };
    let Some((sport, dport)) = parse::ports(&pkt, &ip) else {
        return xdp_action::XDP_PASS;
    };
    let key = FlowKey4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport_be: sport,
        dport_be: dport,
        proto: ip.proto,
        _pad0: 0,
        _pad1: 0,
    };
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
    let Some(ip) = parse::ipv4(&pkt) else {
        return TC_ACT_UNSPEC;
    };
    let Some((sport, dport)) = parse::ports(&pkt, &ip) else {
        return TC_ACT_UNSPEC;
    };
    let key = FlowKey4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport_be: sport,
        dport_be: dport,
        proto: ip.proto,
        _pad0: 0,
        _pad1: 0,
    };
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
