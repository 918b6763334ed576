//! Ethernet / IPv4 / TCP / UDP parsing.
//!
//! Policy: mesh only touches packets it can prove are service traffic.
//! Anything it cannot parse far enough to know (a cut Ethernet or IPv4
//! header, IHL below 5, a total length that does not fit the frame,
//! non-first fragments, other protocols) goes to the kernel untouched,
//! which applies its own checks. Service traffic that is malformed above
//! IPv4 is dropped with a reason (see `fwd`).

use crate::abi::{ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use crate::pkt::Pkt;

pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType in the Ethernet header.
pub const ETH_TYPE: usize = 12;
/// Offsets inside the IPv4 header (add `ETH_HLEN` for a frame offset).
pub const IP_VER_IHL: usize = 0;
pub const IP_TOT_LEN: usize = 2;
pub const IP_FRAG: usize = 6;
pub const IP_PROTO: usize = 9;
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;
/// An IPv4 header without options.
pub const IP_HLEN_MIN: usize = 20;
/// Offsets inside the TCP/UDP headers.
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;
/// TCP data offset (high nibble, in 32-bit words).
pub const TCP_SEQ: usize = 4;
pub const TCP_ACK_SEQ: usize = 8;
pub const TCP_DOFF: usize = 12;
/// The TCP flags byte, and its bits.
pub const TCP_FLAGS: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_CSUM: usize = 16;
/// A TCP header without options.
pub const TCP_HLEN_MIN: usize = 20;
pub const UDP_LEN: usize = 4;
pub const UDP_CSUM: usize = 6;
pub const UDP_HLEN: usize = 8;

/// What the IPv4 header says, with the L4 ports when they are readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip4 {
    /// Offset of the TCP/UDP header in the frame (14 + IHL * 4).
    pub l4_off: usize,
    /// End of the IPv4 datagram in the frame (14 + total length); bytes
    /// after it are Ethernet padding. May lie past the readable part of a
    /// socket buffer.
    pub l3_end: usize,
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    /// Offset 0 with MF set: the first of several fragments.
    pub first_fragment: bool,
    /// Non-zero fragment offset: carries no L4 header.
    pub later_fragment: bool,
}

/// Parses Ethernet + IPv4 for a TCP or UDP datagram; `None` means "not ours
/// to judge" (pass it to the kernel).
#[inline(always)]
pub fn ipv4(pkt: &Pkt) -> Option<Ip4> {
    let ip = ipv4_any(pkt)?;
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return None;
    }
    Some(ip)
}

/// As [`ipv4`], for any protocol.
#[inline(always)]
pub fn ipv4_any(pkt: &Pkt) -> Option<Ip4> {
    // Ethernet and the fixed IPv4 header, checked once.
    let h = pkt.view::<{ ETH_HLEN + IP_HLEN_MIN }>(0)?;
    if h.get::<u16>(ETH_TYPE) != ETH_P_IP.to_be() {
        return None;
    }
    let vihl: u8 = h.get(ETH_HLEN + IP_VER_IHL);
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = (vihl & 0x0f) as usize;
    if ihl < 5 {
        return None;
    }
    let tot_len = u16::from_be(h.get::<u16>(ETH_HLEN + IP_TOT_LEN)) as usize;
    let l4_off = ETH_HLEN + ihl * 4;
    let l3_end = ETH_HLEN + tot_len;
    // Against the whole length: a socket buffer's readable part can be
    // shorter than its datagram (GSO), and every read is bounds-checked.
    if tot_len < ihl * 4 || l3_end > pkt.wire_len() {
        return None;
    }
    let frag = u16::from_be(h.get::<u16>(ETH_HLEN + IP_FRAG));
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    Some(Ip4 {
        l4_off,
        l3_end,
        saddr: h.get(ETH_HLEN + IP_SADDR),
        daddr: h.get(ETH_HLEN + IP_DADDR),
        proto: h.get(ETH_HLEN + IP_PROTO),
        first_fragment: offset == 0 && more,
        later_fragment: offset != 0,
    })
}

/// The L4 source and destination ports (raw, network order), when the
/// first four bytes of the L4 header lie inside the datagram.
#[inline(always)]
pub fn ports(pkt: &Pkt, ip: &Ip4) -> Option<(u16, u16)> {
    if ip.l4_off + 4 > ip.l3_end {
        return None;
    }
    Some((
        pkt.load(ip.l4_off + L4_SPORT)?,
        pkt.load(ip.l4_off + L4_DPORT)?,
    ))
}

/// Why a service packet's L4 header is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Error {
    Truncated,
    BadLength,
}

/// Checks that the whole TCP/UDP header lies inside the datagram and that
/// its length fields agree with it.
#[inline(always)]
pub fn check_l4(pkt: &Pkt, ip: &Ip4) -> Result<(), L4Error> {
    if ip.proto == IPPROTO_TCP {
        if ip.l4_off + TCP_HLEN_MIN > ip.l3_end {
            return Err(L4Error::Truncated);
        }
        let h = pkt
            .view::<TCP_HLEN_MIN>(ip.l4_off)
            .ok_or(L4Error::Truncated)?;
        let doff = (h.get::<u8>(TCP_DOFF) >> 4) as usize;
        if doff < 5 {
            return Err(L4Error::BadLength);
        }
        if ip.l4_off + doff * 4 > ip.l3_end {
            return Err(L4Error::Truncated);
        }
    } else {
        if ip.l4_off + UDP_HLEN > ip.l3_end {
            return Err(L4Error::Truncated);
        }
        let h = pkt.view::<UDP_HLEN>(ip.l4_off).ok_or(L4Error::Truncated)?;
        let ulen = u16::from_be(h.get::<u16>(UDP_LEN)) as usize;
        if ulen < UDP_HLEN || ip.l4_off + ulen > ip.l3_end {
            return Err(L4Error::BadLength);
        }
    }
    Ok(())
}

/// What the readable start of a frame says before any parse: whether its
/// Ethernet and fixed IPv4 header could be read, whether it is IPv4 with
/// a valid header length, and then where its L4 header starts, its
/// protocol and whether it is a later fragment. Every field is defined
/// whatever the frame (the verifier refuses to read a value left
/// undefined on one path of a join).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub readable: bool,
    pub ipv4: bool,
    pub l4_off: usize,
    pub proto: u8,
    pub later_fragment: bool,
}

/// The [`Head`] of `pkt`, from its readable part alone.
#[inline(always)]
pub fn head(pkt: &Pkt) -> Head {
    let Some(h) = pkt.view::<{ ETH_HLEN + IP_HLEN_MIN }>(0) else {
        return Head {
            readable: false,
            ipv4: false,
            l4_off: 0,
            proto: 0,
            later_fragment: false,
        };
    };
    let vihl: u8 = h.get(ETH_HLEN + IP_VER_IHL);
    let ihl = (vihl & 0x0f) as usize;
    Head {
        readable: true,
        ipv4: h.get::<u16>(ETH_TYPE) == ETH_P_IP.to_be() && vihl >> 4 == 4 && ihl >= 5,
        l4_off: ETH_HLEN + ihl * 4,
        proto: h.get(ETH_HLEN + IP_PROTO),
        later_fragment: u16::from_be(h.get::<u16>(ETH_HLEN + IP_FRAG)) & 0x1fff != 0,
    }
}

/// How many of a frame's first bytes the forward path needs readable to
/// judge it, and to rewrite it when it is the mesh's: `pkt` is what is
/// readable (a socket buffer's linear part; its `wire_len` the whole
/// frame), `all` the most the path ever reads. A plain TCP or UDP
/// datagram needs its Ethernet, IPv4 and TCP/UDP headers (options
/// included); one to the encapsulation port (`encap_port_be`), an ICMP
/// message, or a frame whose deciding bytes are not readable, `all`;
/// another protocol its IPv4 header; a frame that is not IPv4, nothing.
///
/// Socket buffers built by GRO, and a local socket's GSO ones, hold
/// their headers and nothing else in the linear part: pulling `all` into
/// it would copy payload there (and reallocate the head, often) for every
/// such buffer, the mesh's or not.
#[inline(always)]
pub fn readable_needed(pkt: &Pkt, all: usize, encap_port_be: u16) -> usize {
    let h = head(pkt);
    if !h.readable {
        return all;
    }
    if !h.ipv4 {
        return 0;
    }
    let (l4_off, proto) = (h.l4_off, h.proto);
    let need = if proto == IPPROTO_TCP {
        match pkt.load::<u8>(l4_off + TCP_DOFF) {
            Some(d) if (d >> 4) as usize >= 5 => l4_off + (d >> 4) as usize * 4,
            Some(_) => l4_off + TCP_HLEN_MIN,
            None => all,
        }
    } else if proto == IPPROTO_UDP {
        match pkt.load::<u16>(l4_off + L4_DPORT) {
            Some(p) if p != encap_port_be => l4_off + UDP_HLEN,
            _ => all,
        }
    } else if proto == IPPROTO_ICMP {
        all
    } else {
        l4_off
    };
    if need < all { need } else { all }
}

/// Offset of the L4 checksum field.
#[inline(always)]
pub fn l4_csum_off(ip: &Ip4) -> usize {
    if ip.proto == IPPROTO_TCP {
        ip.l4_off + TCP_CSUM
    } else {
        ip.l4_off + UDP_CSUM
    }
}

/// An ICMP error (destination unreachable, time exceeded) and the TCP/UDP
/// datagram it quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpErr {
    pub icmp_off: usize,
    /// Offsets of the quoted IPv4 header and of its TCP/UDP header.
    pub inner_ip: usize,
    pub inner_l4: usize,
    /// The quoted datagram's addresses and ports (raw, network order).
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    pub sport_be: u16,
    pub dport_be: u16,
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_CSUM: usize = 2;
/// The ICMP error header (type, code, checksum, 4 bytes of rest); the
/// quoted datagram follows it.
pub const ICMP_HLEN: usize = 8;
/// The L4 bytes an ICMP error quotes at least (RFC 792): the ports.
pub const ICMP_QUOTED_L4: usize = 8;

/// Parses an ICMP error about a TCP or UDP datagram whose first 8 L4 bytes
/// are quoted; `None` for anything else (echo, other types, fragments,
/// quotes too short to hold the ports).
#[inline(always)]
pub fn icmp_error(pkt: &Pkt, ip: &Ip4) -> Option<IcmpErr> {
    if ip.proto != IPPROTO_ICMP || ip.first_fragment || ip.later_fragment {
        return None;
    }
    let typ: u8 = pkt.load(ip.l4_off)?;
    if typ != ICMP_DEST_UNREACH && typ != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_ip = ip.l4_off + ICMP_HLEN;
    let vihl: u8 = pkt.load(inner_ip + IP_VER_IHL)?;
    let ihl = (vihl & 0x0f) as usize;
    if vihl >> 4 != 4 || ihl < 5 {
        return None;
    }
    let inner_l4 = inner_ip + ihl * 4;
    if inner_l4 + ICMP_QUOTED_L4 > ip.l3_end {
        return None;
    }
    let proto: u8 = pkt.load(inner_ip + IP_PROTO)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    Some(IcmpErr {
        icmp_off: ip.l4_off,
        inner_ip,
        inner_l4,
        saddr: pkt.load(inner_ip + IP_SADDR)?,
        daddr: pkt.load(inner_ip + IP_DADDR)?,
        proto,
        sport_be: pkt.load(inner_l4 + L4_SPORT)?,
        dport_be: pkt.load(inner_l4 + L4_DPORT)?,
    })
}

/// TCP option kinds.
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOLEN_MSS: u8 = 4;

/// The options `tcp_mss` walks at most: a SYN carries four or five
/// (MSS, SACK permitted, timestamps, window scale, NOPs between).
const TCP_OPTS_WALK: usize = 12;

/// The MSS option of a TCP segment whose header `check_l4` validated: the
/// frame offset of its 2-byte value and the value (host order), or
/// `(0, 0)` when it has none (or it is past the first options walked).
#[inline(always)]
pub fn tcp_mss(pkt: &Pkt, ip: &Ip4) -> (usize, u16) {
    let r = tcp_mss_packed(pkt, ip.l4_off);
    ((r >> 16) as usize, r as u16)
}

/// `tcp_mss`, packed in one register (offset << 16 | value), and never
/// inlined: in BPF a subprogram, verified on its own paths, so the walk's
/// branches do not multiply with its callers' (and the verifier's budget
/// with them). (A pair, not an `Option`, crosses no join either: see the
/// note in `fwd::process` on payloads the verifier sees undefined.)
#[inline(never)]
fn tcp_mss_packed(pkt: &Pkt, l4_off: usize) -> u32 {
    let Some(doff) = pkt.load::<u8>(l4_off + TCP_DOFF) else {
        return 0;
    };
    let end = l4_off + (doff >> 4) as usize * 4;
    let mut off = l4_off + TCP_HLEN_MIN;
    for _ in 0..TCP_OPTS_WALK {
        if off >= end || off > 0xff00 {
            break;
        }
        let Some(kind) = pkt.load::<u8>(off) else {
            break;
        };
        if kind == TCPOPT_EOL {
            break;
        }
        if kind == TCPOPT_NOP {
            off += 1;
            continue;
        }
        let Some(len) = pkt.load::<u8>(off + 1) else {
            break;
        };
        if len < 2 {
            break;
        }
        if kind == TCPOPT_MSS && len == TCPOLEN_MSS {
            if off + 4 > end {
                break;
            }
            let Some(v) = pkt.load::<u16>(off + 2) else {
                break;
            };
            return (((off + 2) as u32) << 16) | u16::from_be(v) as u32;
        }
        off += len as usize;
    }
    0
}
