//! Attach points: TC ingress on the uplink (deliver what XDP rewrote) and
//! TC ingress on the interfaces leading to local tasks (reverse NAT of the
//! replies, straight back out of the uplink). Both forward with a FIB
//! lookup and `bpf_redirect`, so neither depends on netfilter's FORWARD
//! chain accepting the packet.

use aya_ebpf::bindings::{
    BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup as FibParams,
};
use aya_ebpf::helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh};
use aya_ebpf::macros::classifier;
use aya_ebpf::programs::TcContext;
use aya_log_ebpf::debug;
use mesh_common::abi::{DropReason, IPPROTO_UDP, XDP_META_MAGIC, XdpMeta};
use mesh_common::parse::{self, ETH_HLEN, IP_CSUM, IP_DADDR, IP_SADDR, L4_SPORT};
use mesh_common::pkt::Pkt;
use mesh_common::rev;

use crate::maps::{Maps, count_drop};

const AF_INET: u8 = 2;

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
    let Some(ip) = pkt.view::<{ ETH_HLEN + 20 }>(0) else {
        return TC_ACT_UNSPEC;
    };
    let (saddr, daddr): (u32, u32) = (ip.get(ETH_HLEN + IP_SADDR), ip.get(ETH_HLEN + IP_DADDR));
    // SAFETY: context field read.
    let ifindex = unsafe { (*skb).ingress_ifindex };
    forward(&ctx, &pkt, saddr, daddr, ifindex)
}

#[classifier]
pub fn mesh_tc_task(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // A local socket's packets, GSO ones included, carry all their headers
    // in the linear part, so pulling (a copy, maybe an allocation, per
    // packet) is needed only for the odd packet whose linear part is
    // shorter than Ethernet + IPv4 + a TCP header; then up to what an ICMP
    // error quoting headers with options can need.
    // SAFETY: context field read.
    let (data, data_end, len) =
        unsafe { ((*skb).data as usize, (*skb).data_end as usize, (*skb).len) };
    let (data, data_end) = if data_end - data < 54 && (len as usize) > data_end - data {
        let want = if len < 176 { len } else { 176 };
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
    let Some(r) = rev::lookup(&pkt, &Maps) else {
        return TC_ACT_UNSPEC;
    };
    if r.icmp.is_some() {
        if rev::rewrite_icmp(&pkt, &r).is_none() {
            count_drop(DropReason::RewriteFailed);
            return TC_ACT_SHOT;
        }
        return forward(&ctx, &pkt, r.addr, r.ip.daddr, ifindex_of(&ctx));
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
            BPF_F_PSEUDO_HDR as u64 | mangle | 4,
        )
        .and_then(|_| ctx.l4_csum_replace(l4c as usize, old_p as u64, new_p as u64, mangle | 2))
        .and_then(|_| ctx.l3_csum_replace(ETH_HLEN + IP_CSUM, old_a as u64, new_a as u64, 4))
        .and_then(|_| ctx.store(ETH_HLEN + IP_SADDR, &new_a, 0))
        .and_then(|_| ctx.store(r.ip.l4_off + L4_SPORT, &new_p, 0));
    if ok.is_err() {
        count_drop(DropReason::RewriteFailed);
        return TC_ACT_SHOT;
    }
    // The helpers invalidated packet pointers: re-read them.
    // SAFETY: context field reads.
    let pkt = unsafe { Pkt::new((*skb).data as usize, (*skb).data_end as usize) };
    forward(&ctx, &pkt, new_a, r.ip.daddr, ifindex_of(&ctx))
}

#[inline(always)]
fn ifindex_of(ctx: &TcContext) -> u32 {
    // SAFETY: context field read.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// Routes the (rewritten) packet as the kernel would forward it, writes
/// the Ethernet addresses and redirects it to the egress device.
#[inline(always)]
fn forward(ctx: &TcContext, pkt: &Pkt, saddr: u32, daddr: u32, ifindex: u32) -> i32 {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: helper call with a valid context and parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let Some(eth) = pkt.view::<12>(0) else {
            count_drop(DropReason::RewriteFailed);
            return TC_ACT_SHOT;
        };
        let (d, s) = (mac(&p.dmac), mac(&p.smac));
        eth.set(0, d.0);
        eth.set(4, d.1);
        eth.set(6, s.0);
        eth.set(10, s.1);
        // SAFETY: helper call.
        return unsafe { bpf_redirect(p.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The kernel resolves the neighbour (ARP) and transmits.
        // SAFETY: helper call; no explicit next hop.
        return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    count_drop(DropReason::FibLookupFailed);
    debug!(
        ctx,
        "no route {:i} -> {:i} (fib lookup {})",
        u32::from_be(saddr),
        u32::from_be(daddr),
        rc
    );
    TC_ACT_SHOT
}

/// A MAC address out of the FIB result, byte by byte: the objects are built
/// with misaligned access allowed (single loads for packet fields), which
/// the verifier permits on packet memory but not on the stack, where these
/// six-byte fields sit at two-byte offsets.
#[inline(always)]
fn mac(m: &[u8; 6]) -> (u32, u16) {
    // SAFETY: reads of bytes of a live stack object.
    let b = |i: usize| unsafe { core::ptr::read_volatile(&m[i]) };
    (
        u32::from_ne_bytes([b(0), b(1), b(2), b(3)]),
        u16::from_ne_bytes([b(4), b(5)]),
    )
}
