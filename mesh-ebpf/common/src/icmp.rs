//! ICMP errors about mesh flows. A router's "fragmentation needed" about a
//! reply quotes the reply as the client saw it (from the node address and
//! published port), so it reaches the node, not the task whose TCP must
//! lower its MSS; a task's "port unreachable" quotes the request as the
//! task saw it. Both are translated like the flow itself, quoted datagram
//! included, or path MTU discovery and connection refusal break for every
//! mesh flow.

use crate::abi::IPPROTO_UDP;
use crate::csum::{self, Delta};
use crate::parse::{
    ETH_HLEN, ICMP_CSUM, IP_CSUM, IP_DADDR, IP_SADDR, IcmpErr, Ip4, L4_DPORT, L4_SPORT, TCP_CSUM,
    UDP_CSUM,
};
use crate::pkt::Pkt;

/// Which side of the quoted datagram is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quoted {
    /// The quoted source (a reply: node -> task) together with the outer
    /// destination.
    Src,
    /// The quoted destination (a request: task -> node) together with the
    /// outer source.
    Dst,
}

/// Rewrites an ICMP error: the outer destination (`Src`) or source (`Dst`)
/// and the matching quoted address become `addr`, the quoted port becomes
/// `port_be`. The outer IPv4 checksum, the quoted IPv4 checksum, the quoted
/// TCP/UDP checksum (when the quote holds it) and the ICMP checksum follow.
#[inline(always)]
pub fn rewrite(
    pkt: &Pkt,
    ip: &Ip4,
    e: &IcmpErr,
    side: Quoted,
    addr: u32,
    port_be: u16,
) -> Option<()> {
    let (outer_off, old_outer, in_addr_off, in_port_off) = match side {
        Quoted::Src => (
            ETH_HLEN + IP_DADDR,
            ip.daddr,
            e.inner_ip + IP_SADDR,
            e.inner_l4 + L4_SPORT,
        ),
        Quoted::Dst => (
            ETH_HLEN + IP_SADDR,
            ip.saddr,
            e.inner_ip + IP_DADDR,
            e.inner_l4 + L4_DPORT,
        ),
    };
    let old_in_addr: u32 = pkt.load(in_addr_off)?;
    let old_port: u16 = pkt.load(in_port_off)?;
    let old_in_csum: u16 = pkt.load(e.inner_ip + IP_CSUM)?;
    let new_in_csum = csum::update32(old_in_csum, old_in_addr, addr);
    let mut icmp = Delta::default()
        .add32(old_in_addr, addr)
        .add16(old_in_csum, new_in_csum)
        .add16(old_port, port_be);

    let l4c_off = e.inner_l4
        + if e.proto == IPPROTO_UDP {
            UDP_CSUM
        } else {
            TCP_CSUM
        };
    if l4c_off + 2 <= ip.l3_end {
        let old_l4c: u16 = pkt.load(l4c_off)?;
        let new = csum::update48(old_l4c, old_in_addr, addr, old_port, port_be);
        let new = if e.proto == IPPROTO_UDP {
            csum::udp_fixup(old_l4c, new)
        } else {
            new
        };
        icmp = icmp.add16(old_l4c, new);
        pkt.store(l4c_off, new)?;
    }
    let old_icmp: u16 = pkt.load(e.icmp_off + ICMP_CSUM)?;
    let old_ip_csum: u16 = pkt.load(ETH_HLEN + IP_CSUM)?;

    pkt.store(in_addr_off, addr)?;
    pkt.store(in_port_off, port_be)?;
    pkt.store(e.inner_ip + IP_CSUM, new_in_csum)?;
    pkt.store(e.icmp_off + ICMP_CSUM, icmp.apply(old_icmp))?;
    pkt.store(outer_off, addr)?;
    pkt.store(
        ETH_HLEN + IP_CSUM,
        csum::update32(old_ip_csum, old_outer, addr),
    )
}

/// What an ICMP "fragmentation needed" about a client's packet quotes: its
/// IPv4 header (without options) and the first 8 bytes of its TCP/UDP
/// header, which is all a client needs to find its socket.
pub const TOO_BIG_QUOTE: usize = crate::parse::IP_HLEN_MIN + 8;
/// The whole frame of such an error: Ethernet, IPv4, ICMP, the quote.
pub const TOO_BIG_FRAME: usize = ETH_HLEN + crate::parse::IP_HLEN_MIN + 8 + TOO_BIG_QUOTE;
/// Where the quote sits in it.
pub const TOO_BIG_QUOTE_OFF: usize = TOO_BIG_FRAME - TOO_BIG_QUOTE;

/// Writes "fragmentation needed" (next-hop MTU `mtu`) from `from` to
/// `to`, Ethernet `src_mac` to `dst_mac`, into `pkt`: a frame of
/// [`TOO_BIG_FRAME`] bytes whose quote (the client's packet) is already in
/// place at [`TOO_BIG_QUOTE_OFF`].
#[inline(always)]
pub fn write_too_big(
    pkt: &Pkt,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    from: u32,
    to: u32,
    mtu: u16,
) -> Option<()> {
    let f = pkt.view::<TOO_BIG_FRAME>(0)?;
    for i in 0..6 {
        f.set::<u8>(i, dst_mac[i]);
        f.set::<u8>(6 + i, src_mac[i]);
    }
    f.set::<u16>(12, crate::abi::ETH_P_IP.to_be());
    let ip = ETH_HLEN;
    let tot = (TOO_BIG_FRAME - ETH_HLEN) as u16;
    let w0 = 0x45c0u16.to_be(); // TOS: internetwork control, as Linux sends ICMP errors
    let w1 = tot.to_be();
    let w4 = u16::from_be_bytes([64, crate::abi::IPPROTO_ICMP]).to_be();
    let sum = w0 as u64
        + w1 as u64
        + w4 as u64
        + (from & 0xffff) as u64
        + (from >> 16) as u64
        + (to & 0xffff) as u64
        + (to >> 16) as u64;
    f.set::<u16>(ip, w0);
    f.set::<u16>(ip + 2, w1);
    f.set::<u32>(ip + 4, 0);
    f.set::<u16>(ip + 8, w4);
    f.set::<u16>(ip + IP_CSUM, !csum::fold(sum));
    f.set::<u32>(ip + IP_SADDR, from);
    f.set::<u32>(ip + IP_DADDR, to);
    let icmp = ip + crate::parse::IP_HLEN_MIN;
    f.set::<u16>(
        icmp,
        u16::from_be_bytes([crate::parse::ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED]).to_be(),
    );
    f.set::<u16>(icmp + ICMP_CSUM, 0);
    f.set::<u16>(icmp + 4, 0);
    f.set::<u16>(icmp + 6, mtu.to_be());
    // The ICMP checksum covers its header and the quote: 18 words (a
    // loop of constant bounds, unrolled: every offset is known).
    let mut s = 0u64;
    for i in 0..(TOO_BIG_FRAME - ETH_HLEN - crate::parse::IP_HLEN_MIN) / 2 {
        s += f.get::<u16>(icmp + 2 * i) as u64;
    }
    f.set::<u16>(icmp + ICMP_CSUM, !csum::fold(s));
    Some(())
}

/// Destination unreachable, code: fragmentation needed and DF set.
pub const ICMP_FRAG_NEEDED: u8 = 4;
