//! Attach point: TC ingress on the loopback device. A process of this
//! node that sends to a published port on one of the node's own addresses
//! sends through the loopback device, never the uplink (so XDP never sees
//! it). Such a packet is served here as a client's packet would be on the
//! uplink: DNAT to the task Maglev picks, then straight to the task's
//! device, or encapsulated to the task's node (`origin`). Everything else
//! on the loopback (other ports, other addresses, the replies handed to
//! the node's processes) goes on untouched after one port lookup.

use aya_ebpf::bindings::TC_ACT_UNSPEC;
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use mesh_common::fwd::ORIGIN_HOST;

use crate::origin;
use crate::skb;

#[classifier]
#[inline(always)]
pub fn mesh_tc_host(ctx: TcContext) -> i32 {
    match skb::packet(&ctx) {
        Some(pkt) => origin::serve(&ctx, &pkt, ORIGIN_HOST),
        None => TC_ACT_UNSPEC,
    }
}
