//! Flows that start on this node, to a published port on one of its own
//! addresses: from its own processes (`mesh_tc_host`, on the loopback
//! device their packets pass) or from its tasks (`mesh_tc_task`, for a
//! task's packet that is no reply). The shared forward path decides
//! (`fwd::node_origin`: the same conntrack and Maglev pick as a client's
//! packet on the uplink); this rewrites with the skb helpers and sends the
//! packet to the task, here or encapsulated to the task's node. The
//! caller's address stays the source.

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::programs::TcContext;
use mesh_common::abi::DropReason;
use mesh_common::fwd::{self, PLAN_DROP, PLAN_FORWARD, PLAN_PASS};
use mesh_common::pkt::Pkt;

use crate::fib::{NO_NODE, forward, ingress_ifindex};
use crate::maps::{Maps, count_drop};
use crate::skb::{self, DESTINATION};

/// Serves `pkt` if it is a packet of such a flow (`origin`:
/// `fwd::ORIGIN_HOST` or `ORIGIN_TASK`); anything else goes on untouched.
#[inline(always)]
pub fn serve(ctx: &TcContext, pkt: &Pkt, origin: u8) -> i32 {
    let maps = Maps::<true> {
        ctx: ctx.skb.skb as *mut _,
    };
    let plan = fwd::node_origin(pkt, &maps, origin, skb::is_gso(ctx));
    if plan.kind == PLAN_PASS {
        return TC_ACT_UNSPEC;
    }
    if plan.kind == PLAN_DROP {
        count_drop(plan.reason);
        return TC_ACT_SHOT;
    }
    let len = skb::len(ctx);
    let ip = plan.ip;
    if plan.mss != 0 && skb::clamp_mss(ctx, pkt, &ip, plan.mss).is_err() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    if skb::rewrite(
        ctx,
        &ip,
        DESTINATION,
        ip.daddr,
        plan.addr,
        plan.dport_be,
        plan.port_be,
    )
    .is_err()
    {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    let from = ingress_ifindex(ctx);
    if plan.kind == PLAN_FORWARD {
        return skb::encapsulate(
            ctx,
            &plan.outer,
            len,
            from,
            NO_NODE,
            DropReason::FibLookupFailed,
        );
    }
    forward(ctx, &skb::reread(ctx), ip.saddr, plan.addr, from)
}
