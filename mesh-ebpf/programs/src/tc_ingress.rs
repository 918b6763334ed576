//! Attach point: TC ingress on the uplink, the intercept of `--intercept
//! tc`. Runs the shared forward path as `mesh_xdp` does, and then does
//! itself what `mesh_xdp` leaves to `mesh_tc_uplink` or to the driver:
//! - a packet rewritten for a local task goes straight into the task
//!   (`deliver`);
//! - a packet for a task on another node is encapsulated
//!   (`bpf_skb_adjust_room`) and sent to that node out of the device the
//!   FIB names;
//! - a packet another node encapsulated for this one is stripped, then
//!   delivered (a client's packet), sent on to its client (a task's
//!   reply), or handed to this node's own stack (a reply to a flow one of
//!   its processes started);
//! - a packet too big to encapsulate becomes the ICMP error that says so,
//!   sent back where it came from.
//!
//! Why offer it: an XDP program on a device changes what the kernel does
//! with all of that device's traffic, not only the mesh's (on a veth, the
//! peer's TSO is turned off; on virtio-net, the guest's receive offloads).
//! At TC, socket buffers stay as large as GRO made them (one program run
//! for many segments), and checksums may be partial (offloaded) or summed
//! by the device: every TCP/UDP checksum update goes through the skb's
//! helpers (`Maps<true>`).

use aya_ebpf::bindings::{
    BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_SHOT, TC_ACT_UNSPEC,
    bpf_adj_room_mode,
};
use aya_ebpf::helpers::{bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use mesh_common::abi::{Counter, DropReason, ENCAP_LEN};
use mesh_common::fwd::{self, Verdict};
use mesh_common::icmp;
use mesh_common::parse::{ETH_HLEN, IP_SADDR};

use crate::deliver;
use crate::fib::{NO_NODE, forward_or, ingress_ifindex};
use crate::maps::{Maps, count, count_drop};
use crate::skb;

/// The bytes the forward path reads at most: an encapsulated packet's
/// outer headers (54 with Ethernet), the inner IPv4 header and a TCP
/// header with options up to its MSS (54 more); an ICMP error's quote. A
/// packet is pulled only as far as it needs (`skb::headers`): socket
/// buffers from a local socket or from GRO hold all their headers in the
/// linear part already, and nothing more.
const HEADERS: u32 = 128;

#[classifier]
#[inline(always)]
pub fn mesh_tc_ingress(ctx: TcContext) -> i32 {
    let maps = Maps::<true> {
        ctx: ctx.skb.skb as *mut _,
    };
    // The node's other traffic leaves here, judged from the linear part
    // before the buffer's length and segment fields are read or anything
    // is pulled.
    if !fwd::may_be_mesh(&skb::reread(&ctx), &maps) {
        return TC_ACT_UNSPEC;
    }
    let Some(pkt) = skb::headers(&ctx, HEADERS) else {
        return TC_ACT_UNSPEC;
    };
    match fwd::process(&pkt, &maps) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop(reason) => drop(&ctx, reason),
        Verdict::Local { backend_id } => deliver::to_task(&ctx, backend_id),
        Verdict::Forward { outer, node } => skb::encapsulate(
            &ctx,
            &outer,
            skb::len(&ctx),
            ingress_ifindex(&ctx),
            node,
            DropReason::NoRouteToNode,
        ),
        Verdict::TooBig { from, mtu } => too_big(&ctx, from, mtu),
        Verdict::Decap { info } => {
            // The inner datagram's headers lay in the readable part
            // already (HEADERS covers them), and stay there.
            let Some(pkt) = strip(&ctx).ok().and_then(|()| skb::headers(&ctx, 0)) else {
                return drop(&ctx, DropReason::EncapMalformed);
            };
            match fwd::decap(&pkt, &maps, &info) {
                Verdict::Local { backend_id } => deliver::to_task(&ctx, backend_id),
                Verdict::Out { saddr, daddr } => transmit(&ctx, saddr, daddr, NO_NODE),
                Verdict::Host => skb::to_host(&skb::reread(&ctx)),
                Verdict::Drop(reason) => drop(&ctx, reason),
                _ => drop(&ctx, DropReason::EncapMalformed),
            }
        }
        Verdict::Out { saddr, daddr } => transmit(&ctx, saddr, daddr, NO_NODE),
        Verdict::Host => skb::to_host(&skb::reread(&ctx)),
    }
}

#[inline(always)]
fn drop(ctx: &TcContext, reason: DropReason) -> i32 {
    count_drop(reason);
    // Per packet, so debug level: off unless meshd --bpf-log-level debug.
    debug!(ctx, "tc drop: reason {}", reason as u32);
    TC_ACT_SHOT
}

/// Removes the outer headers of an encapsulated packet (the Ethernet
/// header stays where it is). The segment size of a socket buffer that
/// stands for several segments stays: it counts the inner payload.
#[inline(always)]
fn strip(ctx: &TcContext) -> Result<(), ()> {
    ctx.adjust_room(
        -(ENCAP_LEN as i32),
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64,
    )
    .map(|_| ())
    .map_err(|_| ())
}

/// Routes the packet from `saddr` to `daddr` and sends it out of the
/// device the FIB names (the kernel resolves a missing neighbour).
/// Without a route: dropped, as `mesh_xdp` drops it. `node`: the
/// destination's node slot, or `NO_NODE`.
#[inline(always)]
fn transmit(ctx: &TcContext, saddr: u32, daddr: u32, node: u32) -> i32 {
    let pkt = skb::reread(ctx);
    forward_or(
        ctx,
        &pkt,
        saddr,
        daddr,
        ingress_ifindex(ctx),
        node,
        DropReason::NoRouteToNode,
    )
}

/// Turns the client's packet into the "fragmentation needed" that answers
/// it (from `from`, the address the client sent to) and sends it back out
/// of the device it came in on. The error quotes the packet's IPv4 header
/// and first eight bytes of TCP/UDP: the packet is cut behind them, and
/// room for the error's headers made in front (`mesh_xdp` does the same
/// with its own helpers). Only a header without options is answered.
#[inline(always)]
fn too_big(ctx: &TcContext, from: u32, mtu: u16) -> i32 {
    let pkt = skb::reread(ctx);
    let Some(h) = pkt.view::<{ ETH_HLEN + 20 }>(0) else {
        return drop(ctx, DropReason::TooBig);
    };
    let (dst_mac, src_mac): ([u8; 6], [u8; 6]) = (h.get(6), h.get(0));
    let (vihl, client): (u8, u32) = (h.get(ETH_HLEN), h.get(ETH_HLEN + IP_SADDR));
    if vihl != 0x45 {
        return drop(ctx, DropReason::TooBig);
    }
    let skb = ctx.skb.skb;
    let keep = (ETH_HLEN + icmp::TOO_BIG_QUOTE) as u32;
    let room = (icmp::TOO_BIG_QUOTE_OFF - ETH_HLEN) as u32;
    // SAFETY: helper calls on the program's own socket buffer.
    if unsafe { bpf_skb_change_tail(skb, keep, 0) } != 0
        || unsafe { bpf_skb_change_head(skb, room, 0) } != 0
    {
        return drop(ctx, DropReason::TooBig);
    }
    if icmp::write_too_big(&skb::reread(ctx), dst_mac, src_mac, from, client, mtu).is_none() {
        return drop(ctx, DropReason::TooBig);
    }
    count(Counter::TooBig);
    count_drop(DropReason::TooBig);
    // SAFETY: helper call.
    unsafe { bpf_redirect(ingress_ifindex(ctx), 0) as i32 }
}
