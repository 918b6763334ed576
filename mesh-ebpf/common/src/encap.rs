//! Carrying a packet from one node to another: the inner IPv4 datagram
//! behind an outer IPv4 header, a UDP header and an [`EncapHdr`] (40
//! bytes in all; no inner Ethernet header).
//!
//! UDP, not IP-in-IP: clouds such as Azure drop IP-in-IP, and many kernels
//! (this one) have no ipip module; a UDP source port taken from the flow
//! hash spreads flows over the receiving node's queues. Our own 12-byte
//! header rather than VXLAN (8 bytes plus an inner Ethernet header) or
//! Geneve (8 plus options): it carries exactly what the backend's node
//! needs, the address and published port the client used.
//!
//! The programs make room (`bpf_xdp_adjust_head`, `bpf_skb_adjust_room`)
//! and strip it; the header bytes are written and read here, so the host
//! runs the same code.

use crate::abi::{ENCAP_LEN, ENCAP_VERSION, ETH_P_IP, EncapHdr, IPPROTO_UDP};
use crate::csum;
use crate::parse::{self, ETH_HLEN, IP_HLEN_MIN, Ip4, UDP_HLEN};
use crate::pkt::Pkt;

/// Offsets in a frame whose Ethernet header is followed by the outer
/// headers.
const OUTER_IP: usize = ETH_HLEN;
const OUTER_UDP: usize = OUTER_IP + IP_HLEN_MIN;
const HDR: usize = OUTER_UDP + UDP_HLEN;
/// Where the inner datagram starts.
pub const INNER: usize = ETH_HLEN + ENCAP_LEN;

/// Don't fragment, in the IPv4 flags field.
const IP_DF: u16 = 0x4000;
const TTL: u8 = 64;

/// The outer headers of one encapsulated packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outer {
    /// From this node to the other (raw addresses).
    pub saddr: u32,
    pub daddr: u32,
    /// The flow's hash spread over the upper half of the ports.
    pub sport_be: u16,
    pub dport_be: u16,
    pub hdr: EncapHdr,
}

impl Outer {
    /// All zero: no headers (a placeholder where none are needed).
    pub const NONE: Outer = Outer {
        saddr: 0,
        daddr: 0,
        sport_be: 0,
        dport_be: 0,
        hdr: EncapHdr {
            version: 0,
            kind: 0,
            flags: 0,
            _pad0: 0,
            orig_daddr: 0,
            orig_dport_be: 0,
            _pad1: 0,
        },
    };
}

/// The UDP source port for a flow hash: 49152 + the hash's low 14 bits,
/// so the receiving node's RSS spreads flows over its queues.
#[inline(always)]
pub fn source_port(hash: u32) -> u16 {
    (0xc000 | (hash & 0x3fff) as u16).to_be()
}

/// Writes the outer IPv4, UDP and mesh headers behind the Ethernet header
/// of `pkt`, whose inner datagram (`inner_len` bytes) starts at [`INNER`];
/// sets the ethertype (the MACs are the caller's). All bounds are checked
/// before the first write.
#[inline(always)]
pub fn write(pkt: &Pkt, o: &Outer, inner_len: usize) -> Option<()> {
    let h = pkt.view::<INNER>(0)?;
    let tot = (ENCAP_LEN + inner_len) as u16;
    let udp_len = tot - IP_HLEN_MIN as u16;
    // The outer IPv4 header, its checksum over the words it is made of.
    let w0 = 0x4500u16.to_be();
    let w1 = tot.to_be();
    let w3 = IP_DF.to_be();
    let w4 = u16::from_be_bytes([TTL, IPPROTO_UDP]).to_be();
    let mut sum = w0 as u64 + w1 as u64 + w3 as u64 + w4 as u64;
    sum += (o.saddr & 0xffff) as u64 + (o.saddr >> 16) as u64;
    sum += (o.daddr & 0xffff) as u64 + (o.daddr >> 16) as u64;
    let check = !csum::fold(sum);
    h.set::<u16>(12, ETH_P_IP.to_be());
    h.set::<u16>(OUTER_IP, w0);
    h.set::<u16>(OUTER_IP + 2, w1);
    h.set::<u16>(OUTER_IP + 4, 0);
    h.set::<u16>(OUTER_IP + 6, w3);
    h.set::<u16>(OUTER_IP + 8, w4);
    h.set::<u16>(OUTER_IP + 10, check);
    h.set::<u32>(OUTER_IP + 12, o.saddr);
    h.set::<u32>(OUTER_IP + 16, o.daddr);
    h.set::<u16>(OUTER_UDP, o.sport_be);
    h.set::<u16>(OUTER_UDP + 2, o.dport_be);
    h.set::<u16>(OUTER_UDP + 4, udp_len.to_be());
    // No UDP checksum (allowed over IPv4): the inner datagram has its own.
    h.set::<u16>(OUTER_UDP + 6, 0);
    h.set::<EncapHdr>(HDR, o.hdr);
    Some(())
}

/// What an encapsulated packet says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encapsulated {
    /// The node that sent it (the outer source).
    pub from: u32,
    pub hdr: EncapHdr,
    /// The inner datagram's length, by the outer headers.
    pub inner_len: usize,
}

/// Reads the outer headers of `pkt` (whose outer IPv4 header `ip` parsed)
/// if it is UDP to `port_be`: `None` if it is not encapsulation at all,
/// `Some(Err(()))` if it is but cannot be read (version, kind, lengths).
#[inline(always)]
pub fn read(pkt: &Pkt, ip: &Ip4, port_be: u16) -> Option<Result<Encapsulated, ()>> {
    if ip.proto != IPPROTO_UDP || ip.first_fragment || ip.later_fragment {
        return None;
    }
    let (_, dport) = parse::ports(pkt, ip)?;
    if dport != port_be {
        return None;
    }
    // Only an outer header without options is ours.
    if ip.l4_off != OUTER_UDP || ip.l3_end < INNER {
        return Some(Err(()));
    }
    let h = match pkt.view::<INNER>(0) {
        Some(h) => h,
        None => return Some(Err(())),
    };
    let hdr: EncapHdr = h.get(HDR);
    if hdr.version != ENCAP_VERSION {
        return Some(Err(()));
    }
    Some(Ok(Encapsulated {
        from: ip.saddr,
        hdr,
        inner_len: ip.l3_end - INNER,
    }))
}

/// Whether a datagram of `len` bytes still fits an `mtu` once
/// encapsulated.
#[inline(always)]
pub fn fits(len: usize, mtu: u32) -> bool {
    len + ENCAP_LEN <= mtu as usize
}

/// The largest TCP segment payload that fits an `mtu` once encapsulated
/// (IPv4 and TCP headers without options).
#[inline(always)]
pub fn mss(mtu: u32) -> u16 {
    (mtu as usize).saturating_sub(ENCAP_LEN + IP_HLEN_MIN + parse::TCP_HLEN_MIN) as u16
}
