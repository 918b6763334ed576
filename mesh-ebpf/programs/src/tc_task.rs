//! Attach point: TC ingress on the interfaces leading to local tasks (a
//! bridge's ports, or a task's veth). Reverse NAT of the replies to mesh
//! flows (source back to the address and published port the client used),
//! then straight out of the uplink with a FIB lookup and `bpf_redirect`,
//! before the bridge and its netfilter hooks see them. A reply of a flow
//! another node forwarded here goes back to that node encapsulated, or
//! (direct mode) straight to the client with that node's address as its
//! source; a SYN-ACK of such a flow gets its MSS lowered to what fits
//! encapsulated, so the client's segments fit too.

use aya_ebpf::bindings::{
    BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode,
};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use mesh_common::abi::{Counter, DropReason, ENCAP_LEN, IPPROTO_TCP, IPPROTO_UDP};
use mesh_common::encap;
use mesh_common::parse::{self, ETH_HLEN, IP_CSUM, IP_HLEN_MIN, IP_SADDR, L4_SPORT, TCP_HLEN_MIN};
use mesh_common::pkt::Pkt;
use mesh_common::rev;

use crate::fib::{forward, ingress_ifindex};
use crate::maps::{Maps, config, count, count_drop, count_n};
use crate::skb::ENCAP_ROOM_FLAGS;

/// Ethernet + IPv4 + TCP without options (54 bytes): the headers every
/// reply needs in the linear part. A local socket's packets, GSO ones
/// included, carry all their headers there, so only the odd packet with a
/// shorter linear part is pulled (a pull copies, and may allocate).
const MIN_LINEAR: u32 = (ETH_HLEN + IP_HLEN_MIN + TCP_HLEN_MIN) as u32;

/// How far such a packet is pulled: enough for the headers of an ICMP
/// error about a mesh flow, with options on both IPv4 headers (Ethernet
/// 14 + IPv4 up to 60 + ICMP 8 + quoted IPv4 up to 60 + the quoted TCP
/// header up to its checksum 18 = 160), with room to spare.
const PULL_LEN: u32 = 176;

/// The field size a checksum helper updates for, in the low bits of its
/// flags (`BPF_F_HDR_FIELD_MASK`): an IPv4 address, a port.
const CSUM_FIELD_ADDR: u64 = 4;
const CSUM_FIELD_PORT: u64 = 2;

#[classifier]
pub fn mesh_tc_task(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: context field read.
    let (data, data_end, len) =
        unsafe { ((*skb).data as usize, (*skb).data_end as usize, (*skb).len) };
    let (data, data_end) =
        if data_end - data < MIN_LINEAR as usize && (len as usize) > data_end - data {
            let want = if len < PULL_LEN { len } else { PULL_LEN };
            if ctx.pull_data(want).is_err() {
                return TC_ACT_UNSPEC;
            }
            // SAFETY: re-read after the pull invalidated the pointers.
            unsafe { ((*skb).data as usize, (*skb).data_end as usize) }
        } else {
            (data, data_end)
        };
    // SAFETY: data..data_end is the packet's linear part, `len` its length.
    let pkt = unsafe { Pkt::with_len(data, data_end, len as usize) };
    let maps = Maps::<true> {
        ctx: skb as *mut _,
    };
    let r = match rev::lookup(&pkt, &maps, ingress_ifindex(&ctx)) {
        Ok(Some(r)) => r,
        Ok(None) => return TC_ACT_UNSPEC,
        Err(reason) => {
            count_drop(reason);
            return TC_ACT_SHOT;
        }
    };
    if r.icmp.is_some() {
        if rev::rewrite_icmp(&pkt, &r).is_none() {
            count_drop(DropReason::RewriteFailed);
            return TC_ACT_SHOT;
        }
        return send(&ctx, &pkt, &r, len);
    }
    if r.fwd.ingress != 0 && r.ip.proto == IPPROTO_TCP && clamp_synack(&ctx, &pkt, &r).is_err() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    let l4c = parse::l4_csum_off(&r.ip) as u32;
    let mangle = if r.ip.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let (old_a, new_a) = (r.ip.saddr, r.addr);
    let (old_p, new_p) = (r.sport_be, r.port_be);
    let ok = ctx
        .l4_csum_replace(
            l4c as usize,
            old_a as u64,
            new_a as u64,
            BPF_F_PSEUDO_HDR as u64 | mangle | CSUM_FIELD_ADDR,
        )
        .and_then(|_| {
            ctx.l4_csum_replace(
                l4c as usize,
                old_p as u64,
                new_p as u64,
                mangle | CSUM_FIELD_PORT,
            )
        })
        .and_then(|_| {
            ctx.l3_csum_replace(
                ETH_HLEN + IP_CSUM,
                old_a as u64,
                new_a as u64,
                CSUM_FIELD_ADDR,
            )
        })
        .and_then(|_| ctx.store(ETH_HLEN + IP_SADDR, &new_a, 0))
        .and_then(|_| ctx.store(r.ip.l4_off + L4_SPORT, &new_p, 0));
    if ok.is_err() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    // The helpers invalidated packet pointers: re-read them.
    // SAFETY: context field reads.
    let pkt = unsafe { Pkt::new((*skb).data as usize, (*skb).data_end as usize) };
    send(&ctx, &pkt, &r, len)
}

/// Sends a rewritten reply: to the client from here (a local flow, or a
/// forwarded flow in direct mode), or back to the flow's ingress node.
#[inline(always)]
fn send(ctx: &TcContext, pkt: &Pkt, r: &rev::Reply, len: u32) -> i32 {
    if !rev::via_ingress(r) {
        if r.fwd.ingress != 0 {
            count_n(Counter::RepliesDirect, segs(ctx));
        }
        return forward(ctx, pkt, r.addr, r.ip.daddr, ingress_ifindex(ctx));
    }
    let cfg = config();
    let inner_len = (len as usize).saturating_sub(ETH_HLEN);
    if ctx
        .adjust_room(
            ENCAP_LEN as i32,
            bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
            ENCAP_ROOM_FLAGS,
        )
        .is_err()
    {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    // SAFETY: context field reads after the helper moved the data.
    let pkt = unsafe {
        Pkt::new(
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    };
    let outer = rev::reply_outer(r, &cfg);
    if encap::write(&pkt, &outer, inner_len).is_none() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    count_n(Counter::RepliesToIngress, segs(ctx));
    forward(ctx, &pkt, cfg.self_addr, r.fwd.ingress, ingress_ifindex(ctx))
}

/// The packets on the wire a reply stands for: 1, or its GSO segments.
#[inline(always)]
fn segs(ctx: &TcContext) -> u32 {
    // SAFETY: context field read.
    let s = unsafe { (*ctx.skb.skb).gso_segs };
    if s == 0 { 1 } else { s }
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
    let (off, mss) = parse::tcp_mss(pkt, &r.ip);
    let max = encap::mss(config().mtu);
    if off == 0 || mss <= max {
        return Ok(());
    }
    let (old, new) = (mss.to_be(), max.to_be());
    let l4c = parse::l4_csum_off(&r.ip);
    ctx.l4_csum_replace(l4c, old as u64, new as u64, CSUM_FIELD_PORT)
        .and_then(|_| ctx.store(off, &new, 0))
        .map_err(|_| ())?;
    count(Counter::MssClamped);
    Ok(())
}
