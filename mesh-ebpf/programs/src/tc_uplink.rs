//! Attach point: TC ingress on the uplink, with `mesh_xdp` (`--intercept
//! xdp`). Delivers what `mesh_xdp` rewrote for a local task: the `XdpMeta`
//! in front of the packet says so and names the backend, and the packet
//! goes straight into the task (`deliver`: the task's recorded link, or a
//! FIB lookup and `bpf_redirect`), so it never depends on netfilter's
//! FORWARD chain accepting it. A packet XDP encapsulated for another node
//! but could not send (the next hop's neighbour entry was missing) goes
//! out with `bpf_redirect_neigh`, which resolves it; so does a reply XDP
//! rewrote for a task of this node. A reply XDP rewrote for one of this
//! node's own processes is handed to the node's stack through the
//! loopback device. Everything else goes on into the stack untouched.

use aya_ebpf::bindings::TC_ACT_UNSPEC;
use aya_ebpf::helpers::bpf_redirect_neigh;
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use mesh_common::abi::{XDP_META_HOST, XDP_META_MAGIC, XDP_META_NEIGH, XdpMeta};

use crate::deliver;
use crate::skb;

#[classifier]
#[inline(always)]
pub fn mesh_tc_uplink(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: reading the context's own fields.
    let (meta, data) = unsafe { ((*skb).data_meta as usize, (*skb).data as usize) };
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
        return skb::to_host(&skb::reread(&ctx));
    }
    if m.magic != XDP_META_MAGIC {
        return TC_ACT_UNSPEC;
    }
    deliver::to_task(&ctx, m.backend_id)
}
