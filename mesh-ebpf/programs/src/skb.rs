//! What the TC programs share about socket buffers: the packet's current
//! bytes, making headers readable, the room encapsulation takes.

use aya_ebpf::bindings::{BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP};
use aya_ebpf::programs::TcContext;
use mesh_common::abi::EncapHdr;
use mesh_common::pkt::Pkt;

/// The packet's directly readable bytes as they are now (after a helper
/// that moves or copies them, pointers from before are void).
#[inline(always)]
pub fn packet(ctx: &TcContext) -> Pkt {
    let skb = ctx.skb.skb;
    // SAFETY: data..data_end is the packet's linear part.
    unsafe { Pkt::new((*skb).data as usize, (*skb).data_end as usize) }
}

/// The packet as the shared logic reads it: its linear part, its whole
/// length and its segment size (GSO). When fewer than `want` bytes (or
/// the whole packet, if shorter) are directly readable, that much is
/// pulled into the linear part first (a copy: only the odd packet whose
/// headers are not all there pays it). `None`: the pull failed.
#[inline(always)]
pub fn headers(ctx: &TcContext, want: u32) -> Option<Pkt> {
    let skb = ctx.skb.skb;
    // SAFETY: context field reads.
    let (data, data_end, len, gso, segs) = unsafe {
        (
            (*skb).data as usize,
            (*skb).data_end as usize,
            (*skb).len,
            (*skb).gso_size,
            (*skb).gso_segs,
        )
    };
    let want = if len < want { len } else { want };
    let (data, data_end) = if data_end - data < want as usize {
        ctx.pull_data(want).ok()?;
        // SAFETY: re-read after the pull invalidated the pointers.
        unsafe { ((*skb).data as usize, (*skb).data_end as usize) }
    } else {
        (data, data_end)
    };
    // SAFETY: data..data_end is the linear part, `len` the whole length.
    let pkt = unsafe { Pkt::with_len(data, data_end, len as usize) };
    Some(pkt.with_gso(gso as usize, segs))
}

/// `bpf_skb_adjust_room`'s flags for our encapsulation: an outer IPv4 and
/// UDP header, then the 12-byte mesh header as the "inner L2" (so GSO
/// finds the inner IPv4 header behind it). Without FIXED_GSO: a socket
/// buffer standing for several segments gets its segment size lowered
/// by the room, so each segment still fits the link.
pub const ENCAP_ROOM_FLAGS: u64 = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | ((core::mem::size_of::<EncapHdr>() as u64) << 56);
