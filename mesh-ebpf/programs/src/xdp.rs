//! Attach point: XDP on the uplink. Runs the shared forward path:
//! - a packet rewritten for a local task leaves with an `XdpMeta` in front
//!   of it for `mesh_tc_uplink`, because only TC can hand a packet to
//!   another device without the stack's forwarding path (and its netfilter
//!   FORWARD chain);
//! - a packet for a task on another node is encapsulated here and sent to
//!   that node (`XDP_TX`, or `XDP_REDIRECT` to another device);
//! - a packet another node encapsulated for this one is stripped here:
//!   a client's packet then goes on as for a local task, a task's reply
//!   goes out to its client (through `mesh_tc_uplink` when the client is a
//!   task of this node or one of its own processes);
//! - a packet too big to encapsulate becomes the ICMP error that says so,
//!   sent back where it came from.

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::{
    bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail,
};
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::debug;
use mesh_common::abi::{
    Counter, DropReason, ENCAP_LEN, XDP_META_HOST, XDP_META_MAGIC,
    XDP_META_NEIGH, XdpMeta,
};
use mesh_common::encap::{self, Outer};
use mesh_common::fwd::{self, Verdict};
use mesh_common::icmp;
use mesh_common::parse::{ETH_HLEN, IP_SADDR};
use mesh_common::pkt::Pkt;

use crate::fib;
use crate::maps::{Maps, count, count_drop};

#[xdp]
#[inline(always)]
pub fn mesh_xdp(ctx: XdpContext) -> u32 {
    let maps = Maps::<false> {
        ctx: ctx.ctx as *mut _,
    };
    // SAFETY: data..data_end is the packet.
    let pkt = unsafe { Pkt::new(ctx.data(), ctx.data_end()) };
    match fwd::process(&pkt, &maps) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop(reason) => drop(&ctx, reason),
        Verdict::Local { backend_id } => deliver(&ctx, backend_id),
        Verdict::Forward { outer, node } => encapsulate(&ctx, &outer, node),
        Verdict::TooBig { from, mtu } => too_big(&ctx, from, mtu),
        Verdict::Decap { info } => {
            let Some(pkt) = strip(&ctx) else {
                return drop(&ctx, DropReason::EncapMalformed);
            };
            match fwd::decap(&pkt, &maps, &info) {
                Verdict::Local { backend_id } => deliver(&ctx, backend_id),
                Verdict::Out { saddr, daddr } => {
                    transmit(&ctx, &pkt, saddr, daddr, false, fib::NO_NODE)
                }
                Verdict::Host => to_tc(&ctx, XDP_META_HOST, 0),
                Verdict::Drop(reason) => drop(&ctx, reason),
                _ => drop(&ctx, DropReason::EncapMalformed),
            }
        }
        Verdict::Out { saddr, daddr } => transmit(&ctx, &pkt, saddr, daddr, false, fib::NO_NODE),
        Verdict::Host => to_tc(&ctx, XDP_META_HOST, 0),
    }
}

#[inline(always)]
fn drop(ctx: &XdpContext, reason: DropReason) -> u32 {
    count_drop(reason);
    // Per packet, so debug level: off unless meshd --bpf-log-level debug.
    debug!(ctx, "xdp drop: reason {}", reason as u32);
    xdp_action::XDP_DROP
}

/// To `mesh_tc_uplink`, which hands the packet to backend `backend_id`.
#[inline(always)]
fn deliver(ctx: &XdpContext, backend_id: u32) -> u32 {
    to_tc(ctx, XDP_META_MAGIC, backend_id)
}

/// To `mesh_tc_uplink`, with metadata saying what it does with the packet.
#[inline(always)]
fn to_tc(ctx: &XdpContext, magic: u32, arg: u32) -> u32 {
    match set_meta(ctx, magic, arg) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(()) => drop(ctx, DropReason::NoMetadata),
    }
}

#[inline(always)]
fn set_meta(ctx: &XdpContext, magic: u32, backend_id: u32) -> Result<(), ()> {
    let len = core::mem::size_of::<XdpMeta>() as i32;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -len) } != 0 {
        return Err(());
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + len as usize > data {
        return Err(());
    }
    // SAFETY: bounds checked against data just above.
    unsafe {
        core::ptr::write_unaligned(meta as *mut XdpMeta, XdpMeta { magic, backend_id });
    }
    Ok(())
}

/// The packet's current bytes (after a helper moved them).
#[inline(always)]
fn packet(ctx: &XdpContext) -> Pkt {
    // SAFETY: data..data_end is the packet.
    unsafe { Pkt::new(ctx.data(), ctx.data_end()) }
}

/// Puts the outer headers in front of the (DNAT'd) datagram and sends it
/// to the node `outer` names (node slot `node`).
#[inline(always)]
fn encapsulate(ctx: &XdpContext, outer: &Outer, node: u32) -> u32 {
    let inner_len = (ctx.data_end() - ctx.data()).saturating_sub(ETH_HLEN);
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ENCAP_LEN as i32)) } != 0 {
        return drop(ctx, DropReason::RewriteFailed);
    }
    let pkt = packet(ctx);
    if encap::write(&pkt, outer, inner_len).is_none() {
        return drop(ctx, DropReason::RewriteFailed);
    }
    transmit(ctx, &pkt, outer.saddr, outer.daddr, true, node)
}

/// Removes the outer headers of an encapsulated packet, keeping its
/// Ethernet addresses; returns the stripped packet.
#[inline(always)]
fn strip(ctx: &XdpContext) -> Option<Pkt> {
    let macs: [u32; 3] = packet(ctx).load(0)?;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ENCAP_LEN as i32) } != 0 {
        return None;
    }
    let pkt = packet(ctx);
    let eth = pkt.view::<ETH_HLEN>(0)?;
    eth.set(0, macs);
    eth.set::<u16>(12, mesh_common::abi::ETH_P_IP.to_be());
    Some(pkt)
}

/// Routes the packet from `saddr` to `daddr` and sends it: back out of
/// the device it came in on, or redirected to another (`redirect`: with
/// XDP, which only devices that take XDP frames do; otherwise through
/// TC). When the next hop's neighbour entry is missing, TC sends it (and
/// the kernel resolves the neighbour). `node`: the destination's node
/// slot, or `fib::NO_NODE`.
#[inline(always)]
fn transmit(
    ctx: &XdpContext,
    pkt: &Pkt,
    saddr: u32,
    daddr: u32,
    redirect: bool,
    node: u32,
) -> u32 {
    // SAFETY: context field read.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let r = fib::route_cached(ctx.ctx as *mut _, saddr, daddr, ingress, node);
    if r.found() && (redirect || r.ifindex == ingress) {
        if r.write_macs(pkt).is_none() {
            return drop(ctx, DropReason::RewriteFailed);
        }
        if r.ifindex == ingress {
            return xdp_action::XDP_TX;
        }
        // SAFETY: helper call.
        return unsafe { bpf_redirect(r.ifindex, 0) } as u32;
    }
    // A bridge (a task of this node is the client) takes no XDP frames.
    if r.found() || r.no_neigh() {
        return to_tc(ctx, XDP_META_NEIGH, r.ifindex);
    }
    drop(ctx, DropReason::NoRouteToNode)
}

/// Turns the client's packet into the "fragmentation needed" that answers
/// it (from `from`, the address the client sent to) and sends it back the
/// way it came. The error quotes the packet's IPv4 header and first eight
/// bytes of TCP/UDP, which must be where the quote goes once the headers
/// are in front: so only a header without options is answered.
#[inline(always)]
fn too_big(ctx: &XdpContext, from: u32, mtu: u16) -> u32 {
    let pkt = packet(ctx);
    let Some(h) = pkt.view::<{ ETH_HLEN + 20 }>(0) else {
        return drop(ctx, DropReason::TooBig);
    };
    let (dst_mac, src_mac): ([u8; 6], [u8; 6]) = (h.get(6), h.get(0));
    let (vihl, client): (u8, u32) = (h.get(ETH_HLEN), h.get(ETH_HLEN + IP_SADDR));
    if vihl != 0x45 {
        count_drop(DropReason::TooBig);
        return xdp_action::XDP_DROP;
    }
    let old = ctx.data_end() - ctx.data();
    let room = (icmp::TOO_BIG_QUOTE_OFF - ETH_HLEN) as i32;
    // SAFETY: plain helper calls on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -room) } != 0 {
        return drop(ctx, DropReason::TooBig);
    }
    let shrink = icmp::TOO_BIG_FRAME as i32 - (old as i32 + room);
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, shrink) } != 0 {
        return drop(ctx, DropReason::TooBig);
    }
    if icmp::write_too_big(&packet(ctx), dst_mac, src_mac, from, client, mtu).is_none() {
        return drop(ctx, DropReason::TooBig);
    }
    count(Counter::TooBig);
    count_drop(DropReason::TooBig);
    xdp_action::XDP_TX
}
