//! What the TC programs do to a socket buffer with the kernel's helpers:
//! read its headers (pulled into the linear part when a packet has them
//! elsewhere), rewrite an address and port (the checksum helpers handle
//! the partial checksums of local sockets' packets, which direct writes
//! with incremental updates would break), lower a SYN's MSS, encapsulate,
//! and hand a packet to the node's own stack.
//! (`headers` is the uplink intercept's read: more headers, and the GSO
//! size, which the shared logic needs for a GRO packet.)

use aya_ebpf::bindings::{
    BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_INGRESS,
    TC_ACT_SHOT, bpf_adj_room_mode,
};
use aya_ebpf::helpers::bpf_redirect;
use aya_ebpf::programs::TcContext;
use mesh_common::abi::{
    Counter, DropReason, ENCAP_LEN, EncapHdr, IPPROTO_UDP, LOOPBACK_IFINDEX,
};
use mesh_common::csum::{self, Delta};
use mesh_common::encap::{self, Outer};
use mesh_common::fwd::Tables;
use mesh_common::parse::{
    self, ETH_HLEN, IP_CSUM, IP_DADDR, IP_HLEN_MIN, IP_SADDR, Ip4, L4_DPORT, L4_SPORT,
    TCP_HLEN_MIN,
};
use mesh_common::pkt::Pkt;

use crate::fib::forward_or;
use crate::maps::{Maps, config, count, count_drop};

/// Ethernet + IPv4 + TCP without options (54 bytes): the headers every
/// packet the TC programs translate needs in the linear part. A local
/// socket's packets, GSO ones included, carry all their headers there, so
/// only the odd packet with a shorter linear part is pulled (a pull
/// copies, and may allocate).
const MIN_LINEAR: u32 = (ETH_HLEN + IP_HLEN_MIN + TCP_HLEN_MIN) as u32;

/// How far such a packet is pulled: enough for the headers of an ICMP
/// error about a mesh flow, with options on both IPv4 headers (Ethernet
/// 14 + IPv4 up to 60 + ICMP 8 + quoted IPv4 up to 60 + the quoted TCP
/// header up to its checksum 18 = 160), with room to spare.
const PULL_LEN: u32 = 176;

/// `bpf_skb_adjust_room`'s flags for our encapsulation: an outer IPv4 and
/// UDP header, then the 12-byte mesh header as the "inner L2" (so GSO
/// finds the inner IPv4 header behind it). Without FIXED_GSO: a socket
/// buffer standing for several segments gets its segment size lowered
/// by the room, so each segment still fits the link.
pub const ENCAP_ROOM_FLAGS: u64 = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | ((core::mem::size_of::<EncapHdr>() as u64) << 56);

/// The field size a checksum helper updates for, in the low bits of its
/// flags (`BPF_F_HDR_FIELD_MASK`): a 16-bit field (the MSS).
const CSUM_FIELD_PORT: u64 = 2;

/// The packet's bytes, its headers in the linear part (pulled there when
/// they are not); `None` when the pull fails (the packet goes on
/// untouched).
#[inline(always)]
pub fn packet(ctx: &TcContext) -> Option<Pkt> {
    let skb = ctx.skb.skb;
    // SAFETY: context field reads.
    let (data, data_end, len) =
        unsafe { ((*skb).data as usize, (*skb).data_end as usize, (*skb).len) };
    if data_end - data < MIN_LINEAR as usize && (len as usize) > data_end - data {
        let want = if len < PULL_LEN { len } else { PULL_LEN };
        if ctx.pull_data(want).is_err() {
            return None;
        }
        // SAFETY: re-read after the pull invalidated the pointers; data..data_end
        // is the linear part, `len` the packet's length.
        return Some(unsafe {
            Pkt::with_len((*skb).data as usize, (*skb).data_end as usize, len as usize)
        });
    }
    // SAFETY: as above.
    Some(unsafe { Pkt::with_len(data, data_end, len as usize) })
}

/// The packet as the uplink's intercept reads it: its linear part, its
/// whole length and its segment size (GSO). Up to `want` bytes are made
/// directly readable, but only as many as the packet needs
/// (`parse::readable_needed`): a socket buffer from GRO or from a local
/// socket holds its headers alone in the linear part, and pulling more
/// would copy payload (and often reallocate the head) for every one of
/// them, the mesh's or not. So only the odd packet whose headers are not
/// all there pays a pull. `None`: the pull failed.
#[inline(always)]
pub fn headers(ctx: &TcContext, want: u32) -> Option<Pkt> {
    let skb = ctx.skb.skb;
    // SAFETY: context field reads.
    let (data, data_end, len, gso, segs) = unsafe {
        (
            (*skb).data as usize,
            (*skb).data_end as usize,
            (*skb).len,
            (*skb).gso_size,
            (*skb).gso_segs,
        )
    };
    let want = if len < want { len } else { want };
    // SAFETY: data..data_end is the linear part, `len` the whole length.
    let pkt = unsafe { Pkt::with_len(data, data_end, len as usize) };
    if data_end - data < want as usize {
        let need = parse::readable_needed(&pkt, want as usize, config().encap_port_be);
        if data_end - data < need {
            ctx.pull_data(need as u32).ok()?;
            // SAFETY: re-read after the pull invalidated the pointers.
            let pkt = unsafe {
                Pkt::with_len((*skb).data as usize, (*skb).data_end as usize, len as usize)
            };
            return Some(pkt.with_gso(gso as usize, segs));
        }
    }
    Some(pkt.with_gso(gso as usize, segs))
}

/// The packets on the wire the socket buffer stands for: 1, or its GSO
/// segments.
#[inline(always)]
pub fn segs(ctx: &TcContext) -> u32 {
    // SAFETY: context field read.
    let s = unsafe { (*ctx.skb.skb).gso_segs };
    if s == 0 { 1 } else { s }
}

/// The packet's linear part as it is now: the bytes directly readable,
/// read afresh (after a helper moved or rewrote them, every earlier
/// packet pointer is invalid).
#[inline(always)]
pub fn reread(ctx: &TcContext) -> Pkt {
    // SAFETY: context field reads; data..data_end is the linear part.
    unsafe {
        Pkt::new(
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    }
}

/// The packet's length, all of it.
#[inline(always)]
pub fn len(ctx: &TcContext) -> u32 {
    // SAFETY: context field read.
    unsafe { (*ctx.skb.skb).len }
}

/// Whether the packet is a GSO packet (its segments are cut to
/// `gso_size` when it leaves).
#[inline(always)]
pub fn is_gso(ctx: &TcContext) -> bool {
    // SAFETY: context field read.
    unsafe { (*ctx.skb.skb).gso_size != 0 }
}

/// Which end of the flow [`rewrite`] changes.
pub const SOURCE: bool = false;
pub const DESTINATION: bool = true;

/// Rewrites the source or destination address and port of a TCP/UDP
/// packet (`ip`) from `old_a`:`old_p` to `new_a`:`new_p` (raw, network
/// order). The address, port and IPv4 checksum are written directly (the
/// IPv4 header's checksum is never offloaded), the TCP/UDP checksum with
/// the helpers (see [`Maps::l4_csum`](crate::maps::Maps)): two helper calls
/// where a store per field and an L3 helper took five. Every packet
/// pointer is invalid afterwards.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn rewrite(
    ctx: &TcContext,
    ip: &Ip4,
    end: bool,
    old_a: u32,
    new_a: u32,
    old_p: u16,
    new_p: u16,
) -> Result<(), ()> {
    // Earlier helpers may have moved the packet: read it afresh, and
    // check every bound before the first write (all or nothing).
    let pkt = reread(ctx);
    let (a_off, p_off) = if end == DESTINATION {
        (ETH_HLEN + IP_DADDR, ip.l4_off + L4_DPORT)
    } else {
        (ETH_HLEN + IP_SADDR, ip.l4_off + L4_SPORT)
    };
    let hdr = pkt.view::<{ ETH_HLEN + IP_HLEN_MIN }>(0).ok_or(())?;
    let port = pkt.view::<2>(p_off).ok_or(())?;
    let l4c = parse::l4_csum_off(ip);
    pkt.load::<u16>(l4c).ok_or(())?;
    let ip_check: u16 = hdr.get(ETH_HLEN + IP_CSUM);
    hdr.set(a_off, new_a);
    hdr.set(ETH_HLEN + IP_CSUM, csum::update32(ip_check, old_a, new_a));
    port.set(0, new_p);
    let maps = Maps::<true> {
        ctx: ctx.skb.skb as *mut _,
    };
    maps.l4_csum(
        &pkt,
        l4c,
        ip.proto == IPPROTO_UDP,
        Delta::default().add32(old_a, new_a),
        Delta::default().add16(old_p, new_p),
    )
    .ok_or(())
}

/// Lowers the MSS option of a TCP segment (`ip`, a SYN or SYN-ACK) to
/// `max` if it is above, the checksum with the helpers, counting it.
/// Every packet pointer is invalid afterwards.
#[inline(always)]
pub fn clamp_mss(ctx: &TcContext, pkt: &Pkt, ip: &Ip4, max: u16) -> Result<(), ()> {
    let (off, mss) = parse::tcp_mss(pkt, ip);
    if off == 0 || mss <= max {
        return Ok(());
    }
    let (old, new) = (mss.to_be(), max.to_be());
    let l4c = parse::l4_csum_off(ip);
    ctx.l4_csum_replace(l4c, old as u64, new as u64, CSUM_FIELD_PORT)
        .and_then(|_| ctx.store(off, &new, 0))
        .map_err(|_| ())?;
    count(Counter::MssClamped);
    Ok(())
}

/// Puts the outer headers `outer` in front of the packet's datagram
/// (`len` bytes of frame before it) and routes it to `outer.daddr`
/// (node slot `node`, or `fib::NO_NODE`), looking the route up as
/// arriving on `ifindex`; without a route it is dropped as `no_route`.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    outer: &Outer,
    len: u32,
    ifindex: u32,
    node: u32,
    no_route: DropReason,
) -> i32 {
    let inner_len = (len as usize).saturating_sub(ETH_HLEN);
    if ctx
        .adjust_room(
            ENCAP_LEN as i32,
            bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
            ENCAP_ROOM_FLAGS,
        )
        .is_err()
    {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    let pkt = reread(ctx);
    if encap::write(&pkt, outer, inner_len).is_none() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    forward_or(ctx, &pkt, outer.saddr, outer.daddr, ifindex, node, no_route)
}

/// Hands the packet to this node's own stack, as the loopback device
/// delivers the node's packets to itself: its Ethernet addresses become
/// the loopback's (all zero, or the stack takes it for another host's),
/// and it is redirected to the loopback's ingress. (Its source is an
/// address of this node; meshd sets `accept_local` on the loopback so the
/// stack takes such a packet from there.)
#[inline(always)]
pub fn to_host(pkt: &Pkt) -> i32 {
    let Some(eth) = pkt.view::<12>(0) else {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    };
    eth.set::<u32>(0, 0);
    eth.set::<u32>(4, 0);
    eth.set::<u32>(8, 0);
    // SAFETY: helper call.
    unsafe { bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS as u64) as i32 }
}
