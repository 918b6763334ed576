//! Attach point: TC ingress on the interfaces leading to local tasks (a
//! bridge's ports, or a task's veth). Reverse NAT of the replies to mesh
//! flows (source back to the address and published port the client used),
//! then straight out of the uplink with a FIB lookup and `bpf_redirect`,
//! before the bridge and its netfilter hooks see them. A reply of a flow
//! another node forwarded here goes back to that node encapsulated, or
//! (direct mode) straight to the client with that node's address as its
//! source; a SYN-ACK of such a flow gets its MSS lowered to what fits
//! encapsulated, so the client's segments fit too. A reply to one of this
//! node's own processes is handed to the node's stack.
//!
//! A task's packet that is no reply may be a request of its own: to a
//! published port on one of this node's addresses (a task calling a
//! service through the node, as Docker's routing mesh allows). It is
//! served as a client's packet on the uplink would be (`origin`).

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use mesh_common::abi::{Counter, DropReason, IPPROTO_TCP};
use mesh_common::encap;
use mesh_common::fwd::ORIGIN_TASK;
use mesh_common::parse;
use mesh_common::pkt::Pkt;
use mesh_common::rev;

use crate::fib::{NO_NODE, forward, ingress_ifindex};
use crate::maps::{Maps, config, count, count_drop, count_n};
use crate::origin;
use crate::skb::{self, SOURCE};

#[classifier]
#[inline(always)]
pub fn mesh_tc_task(ctx: TcContext) -> i32 {
    let Some(pkt) = skb::packet(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    let maps = Maps::<true> {
        ctx: ctx.skb.skb as *mut _,
    };
    let r = match rev::lookup(&pkt, &maps, ingress_ifindex(&ctx)) {
        Ok(Some(r)) => r,
        Ok(None) => return origin::serve(&ctx, &pkt, ORIGIN_TASK),
        Err(reason) => {
            count_drop(reason);
            return TC_ACT_SHOT;
        }
    };
    let len = skb::len(&ctx);
    if r.icmp.is_some() {
        if rev::rewrite_icmp(&pkt, &r).is_none() {
            count_drop(DropReason::RewriteFailed);
            return TC_ACT_SHOT;
        }
        count(Counter::RepliesRewritten);
        return send(&ctx, &pkt, &r, &maps, len);
    }
    if r.fwd.ingress != 0 && r.ip.proto == IPPROTO_TCP && clamp_synack(&ctx, &pkt, &r).is_err() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    if skb::rewrite(
        &ctx,
        &r.ip,
        SOURCE,
        r.ip.saddr,
        r.addr,
        r.sport_be,
        r.port_be,
    )
    .is_err()
    {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    count(Counter::RepliesRewritten);
    // The helpers invalidated packet pointers: re-read them.
    send(&ctx, &skb::reread(&ctx), &r, &maps, len)
}

/// Sends a rewritten reply: to the client from here (a local flow, or a
/// forwarded flow in direct mode), to this node's own stack (a flow one of
/// its processes started), or back to the flow's ingress node.
#[inline(always)]
fn send(ctx: &TcContext, pkt: &Pkt, r: &rev::Reply, maps: &Maps<true>, len: u32) -> i32 {
    if !rev::via_ingress(r) {
        if rev::to_host(r, maps) {
            count(Counter::RepliesToHost);
            return skb::to_host(pkt);
        }
        if r.fwd.ingress != 0 {
            count_n(Counter::RepliesDirect, skb::segs(ctx));
        }
        return forward(ctx, pkt, r.addr, r.ip.daddr, ingress_ifindex(ctx));
    }
    let cfg = config();
    count_n(Counter::RepliesToIngress, skb::segs(ctx));
    skb::encapsulate(
        ctx,
        &rev::reply_outer(r, &cfg),
        len,
        ingress_ifindex(ctx),
        NO_NODE,
        DropReason::FibLookupFailed,
    )
}

/// A SYN-ACK of a forwarded flow: its MSS lowered to what fits
/// encapsulated, so the client's segments towards the task fit the tunnel.
#[inline(always)]
fn clamp_synack(ctx: &TcContext, pkt: &Pkt, r: &rev::Reply) -> Result<(), ()> {
    let Some(flags) = pkt.load::<u8>(r.ip.l4_off + parse::TCP_FLAGS) else {
        return Ok(());
    };
    if flags & parse::TCP_SYN == 0 {
        return Ok(());
    }
    skb::clamp_mss(ctx, pkt, &r.ip, encap::mss(config().mtu))
}
