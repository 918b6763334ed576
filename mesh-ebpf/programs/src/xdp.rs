//! Attach point: XDP on the uplink. Runs the shared forward path; a packet
//! rewritten for a local task leaves with an `XdpMeta` in front of it for
//! `mesh_tc_uplink`, because only TC can hand a packet to another device
//! without the stack's forwarding path (and its netfilter FORWARD chain).

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::helpers::bpf_xdp_adjust_meta;
use aya_ebpf::macros::xdp;
use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::debug;
use mesh_common::abi::{DropReason, XDP_META_MAGIC, XdpMeta};
use mesh_common::fwd::{self, Verdict};
use mesh_common::pkt::Pkt;

use crate::maps::{Maps, count_drop};

#[xdp]
pub fn mesh_xdp(ctx: XdpContext) -> u32 {
    // SAFETY: data..data_end is the packet.
    let pkt = unsafe { Pkt::new(ctx.data(), ctx.data_end()) };
    let maps = Maps {
        ctx: ctx.ctx as *mut _,
    };
    match fwd::process(&pkt, &maps) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop(reason) => {
            count_drop(reason);
            // Per packet, so debug level: off unless meshd --bpf-log-level debug.
            debug!(&ctx, "xdp drop: reason {}", reason as u32);
            xdp_action::XDP_DROP
        }
        Verdict::Local { backend_id } => match set_meta(&ctx, backend_id) {
            Ok(()) => xdp_action::XDP_PASS,
            Err(()) => {
                count_drop(DropReason::NoMetadata);
                xdp_action::XDP_DROP
            }
        },
    }
}

#[inline(always)]
fn set_meta(ctx: &XdpContext, backend_id: u32) -> Result<(), ()> {
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
        core::ptr::write_unaligned(
            meta as *mut XdpMeta,
            XdpMeta {
                magic: XDP_META_MAGIC,
                backend_id,
            },
        );
    }
    Ok(())
}
