//! Attach point: TC ingress on the uplink. Delivers what `mesh_xdp`
//! rewrote for a local task: the `XdpMeta` in front of the packet says so,
//! and the packet goes straight to the task's device with a FIB lookup and
//! `bpf_redirect`, so it never depends on netfilter's FORWARD chain
//! accepting it. Everything else goes on into the stack untouched.

use aya_ebpf::bindings::TC_ACT_UNSPEC;
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use mesh_common::abi::{XDP_META_MAGIC, XdpMeta};
use mesh_common::parse::{ETH_HLEN, IP_DADDR, IP_HLEN_MIN, IP_SADDR};
use mesh_common::pkt::Pkt;

use crate::fib::{forward, ingress_ifindex};

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
    if m.magic != XDP_META_MAGIC {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: data..data_end is the packet.
    let pkt = unsafe { Pkt::new(data, data_end) };
    let Some(ip) = pkt.view::<{ ETH_HLEN + IP_HLEN_MIN }>(0) else {
        return TC_ACT_UNSPEC;
    };
    let (saddr, daddr): (u32, u32) = (ip.get(ETH_HLEN + IP_SADDR), ip.get(ETH_HLEN + IP_DADDR));
    forward(&ctx, &pkt, saddr, daddr, ingress_ifindex(&ctx))
}
