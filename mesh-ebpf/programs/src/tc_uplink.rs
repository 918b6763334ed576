//! Attach point: TC ingress on the uplink. Delivers what `mesh_xdp`
//! rewrote for a local task: the `XdpMeta` in front of the packet says so
//! and names the backend, and the packet goes straight to the task's
//! device with a FIB lookup towards the backend's address and
//! `bpf_redirect`, so it never depends on netfilter's FORWARD chain
//! accepting it. A packet XDP encapsulated for another node but could not
//! send (the next hop's neighbour entry was missing) goes out with
//! `bpf_redirect_neigh`, which resolves it; so does a reply XDP rewrote
//! for a task of this node. A reply XDP rewrote for one of this node's
//! own processes is handed to the node's stack through the loopback
//! device. Everything else goes on into the stack untouched.

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use aya_ebpf::helpers::bpf_redirect_neigh;
use mesh_common::abi::{
    BE_F_LOCAL, DropReason, XDP_META_HOST, XDP_META_MAGIC, XDP_META_NEIGH, XdpMeta,
};
use mesh_common::parse::{ETH_HLEN, IP_HLEN_MIN, IP_SADDR};
use mesh_common::pkt::Pkt;

use crate::fib::{forward, ingress_ifindex};
use crate::maps::{BACKENDS, count_drop};
use crate::skb;

#[classifier]
pub fn mesh_tc_uplink(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: reading the context's own fields.
    let (meta, data, data_end) = unsafe {
        (
            (*skb).data_meta as usize,
            (*skb).data as usize,
            (*skb).data_end as usize,
        )
    };
    if meta + core::mem::size_of::<XdpMeta>() > data {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: bounds checked just above.
    let m = unsafe { core::ptr::read_unaligned(meta as *const XdpMeta) };
    if m.magic == XDP_META_NEIGH {
        // SAFETY: helper call; the kernel resolves the next hop.
        return unsafe { bpf_redirect_neigh(m.backend_id, core::ptr::null_mut(), 0, 0) } as i32;
    }
    if m.magic == XDP_META_HOST {
        // SAFETY: data..data_end is the packet.
        return skb::to_host(&unsafe { Pkt::new(data, data_end) });
    }
    if m.magic != XDP_META_MAGIC {
        return TC_ACT_UNSPEC;
    }
    // The backend XDP chose; user space frees or reuses a slot only once
    // no table names it, so this fails only for a packet caught in between.
    // (A free slot is all zero: no flags.)
    let daddr = match BACKENDS.get(m.backend_id) {
        Some(be) if be.flags & BE_F_LOCAL != 0 => be.addr[0],
        _ => {
            count_drop(DropReason::StaleBackend);
            return TC_ACT_SHOT;
        }
    };
    // SAFETY: data..data_end is the packet.
    let pkt = unsafe { Pkt::new(data, data_end) };
    let Some(ip) = pkt.view::<{ ETH_HLEN + IP_HLEN_MIN }>(0) else {
        return TC_ACT_UNSPEC;
    };
    let saddr: u32 = ip.get(ETH_HLEN + IP_SADDR);
    forward(&ctx, &pkt, saddr, daddr, ingress_ifindex(&ctx))
}
