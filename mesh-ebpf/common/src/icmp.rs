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
