//! Handing a packet rewritten for a local task to the task: what both
//! delivering programs end with (`mesh_tc_uplink` after `mesh_xdp`, and
//! `mesh_tc_ingress`).
//!
//! User space records each local backend's link and Ethernet addresses
//! (`MESH_LDEV_V1`): the packet gets the task's MACs and goes straight to
//! the ingress of the task's end of its veth, in the task's namespace
//! (`bpf_redirect_peer`), past the host end's transmit, the bridge and
//! the backlog queue, with no FIB lookup. Where nothing is recorded (a
//! task whose link is not found yet) the FIB routes it, as the kernel
//! would forward it.

use aya_ebpf::bindings::TC_ACT_SHOT;
use aya_ebpf::helpers::{bpf_redirect, bpf_redirect_peer};
use aya_ebpf::programs::TcContext;
use mesh_common::abi::{BE_F_LOCAL, DropReason, LDEV_F_PEER};
use mesh_common::parse::{ETH_HLEN, IP_DADDR, IP_HLEN_MIN, IP_SADDR};

use crate::fib::{forward, ingress_ifindex};
use crate::maps::{BACKENDS, LOCAL_DEV, count_drop};
use crate::skb;

/// Delivers the packet, rewritten for local backend `id`, to its task.
#[inline(always)]
pub fn to_task(ctx: &TcContext, id: u32) -> i32 {
    let pkt = skb::reread(ctx);
    let Some(h) = pkt.view::<{ ETH_HLEN + IP_HLEN_MIN }>(0) else {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    };
    let daddr: u32 = h.get(ETH_HLEN + IP_DADDR);
    if let Some(d) = LOCAL_DEV.get_ptr(id) {
        // SAFETY: a live map value, read in place (its MACs sit at an
        // offset the stack would refuse an 8-byte access at).
        let (addr, ifindex, flags, dst, src) = unsafe {
            let m = (&raw const (*d).macs) as *const u8;
            (
                (*d).addr,
                (*d).ifindex,
                (*d).flags,
                core::ptr::read_unaligned(m as *const u64),
                core::ptr::read_unaligned(m.add(8) as *const u32),
            )
        };
        if addr == daddr && addr != 0 && ifindex != 0 {
            h.set::<u64>(0, dst);
            h.set::<u32>(8, src);
            // SAFETY: helper calls.
            return unsafe {
                if flags & LDEV_F_PEER != 0 {
                    bpf_redirect_peer(ifindex, 0)
                } else {
                    bpf_redirect(ifindex, 0)
                }
            } as i32;
        }
    }
    // Not recorded: by the FIB, towards the backend's address. User space
    // frees or reuses a slot only once no table names it, so this fails
    // only for a packet caught in between (a free slot is all zero: no
    // flags).
    let daddr = match BACKENDS.get(id) {
        Some(be) if be.flags & BE_F_LOCAL != 0 => be.addr[0],
        _ => {
            count_drop(DropReason::StaleBackend);
            return TC_ACT_SHOT;
        }
    };
    let saddr: u32 = h.get(ETH_HLEN + IP_SADDR);
    forward(ctx, &pkt, saddr, daddr, ingress_ifindex(ctx))
}
