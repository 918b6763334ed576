//! Ethernet / IPv4 / TCP / UDP / ICMP frames for tests, with every
//! checksum computed from scratch (never incrementally), so that they can
//! judge the dataplane's incremental updates: a rewritten frame must equal
//! the frame rebuilt with the new addresses and ports.
//!
//! A frame is built in layers: [`Spec::segment`] (TCP/UDP header and
//! payload), [`Spec::datagram`] (IPv4 header in front), [`Spec::build`]
//! (Ethernet header in front, padding after). An encapsulated frame is one
//! more layer: a UDP `Spec` whose payload is the inner `Spec`'s
//! `datagram()` (or `build()`, for Ethernet inside).

use core::net::Ipv4Addr;
use std::vec;
use std::vec::Vec;

use crate::abi::{ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use crate::csum::{checksum, pseudo4};
use crate::parse::{
    ETH_HLEN, ICMP_CSUM, IP_CSUM, IP_DADDR, IP_FRAG, IP_HLEN_MIN, IP_PROTO, IP_SADDR, IP_TOT_LEN,
    IP_VER_IHL, L4_DPORT, L4_SPORT, TCP_CSUM, UDP_CSUM,
};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// The MACs of every built frame unless a test sets others.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The ACK number of a TCP segment with the ACK flag.
const ACK_SEQ: u32 = 0x0a0b_0c0d;
const TCP_WINDOW: u16 = 64240;
/// IPv4 flags and fragment offset: Don't Fragment.
pub const IP_DF: u16 = 0x4000;
/// Bytes appended as Ethernet padding: a checksum that wrongly covered
/// them would break.
const PAD_BYTE: u8 = 0xa5;

/// UDP checksum handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpCsum {
    /// Computed; a computed zero is sent as 0xffff.
    Computed,
    /// 0: "no checksum" (RFC 768).
    None,
}

/// Everything a test frame is made of. Fields are host-order values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    /// TCP or UDP; anything else gets `payload` as the whole L4 part.
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (length a multiple of 4, at most 40).
    pub ip_opts: Vec<u8>,
    /// TCP options (length a multiple of 4, at most 40).
    pub tcp_opts: Vec<u8>,
    /// Flags and fragment offset field (host order), e.g. [`IP_DF`].
    pub frag: u16,
    pub udp_csum: UdpCsum,
    /// Ethernet padding appended after the datagram (not covered by any
    /// length or checksum).
    pub pad: usize,
    pub ident: u16,
    pub ttl: u8,
    pub seq: u32,
}

impl Spec {
    /// A datagram of protocol `proto`: DF set, TCP flags PSH|ACK, no
    /// payload.
    pub fn new(
        proto: u8,
        saddr: impl Into<Ipv4Addr>,
        sport: u16,
        daddr: impl Into<Ipv4Addr>,
        dport: u16,
    ) -> Self {
        Spec {
            dst_mac: DST_MAC,
            src_mac: SRC_MAC,
            saddr: saddr.into(),
            daddr: daddr.into(),
            proto,
            sport,
            dport,
            tcp_flags: TCP_PSH | TCP_ACK,
            payload: Vec::new(),
            ip_opts: Vec::new(),
            tcp_opts: Vec::new(),
            frag: IP_DF,
            udp_csum: UdpCsum::Computed,
            pad: 0,
            ident: 0x1234,
            ttl: 64,
            seq: 0x0102_0304,
        }
    }

    /// A TCP segment with `flags` (`TCP_*`), DF set, no payload.
    pub fn tcp(
        saddr: impl Into<Ipv4Addr>,
        sport: u16,
        daddr: impl Into<Ipv4Addr>,
        dport: u16,
        flags: u8,
    ) -> Self {
        Spec {
            tcp_flags: flags,
            ..Self::new(IPPROTO_TCP, saddr, sport, daddr, dport)
        }
    }

    /// A UDP datagram carrying `payload`, DF clear.
    pub fn udp(
        saddr: impl Into<Ipv4Addr>,
        sport: u16,
        daddr: impl Into<Ipv4Addr>,
        dport: u16,
        payload: &[u8],
    ) -> Self {
        Spec {
            payload: payload.to_vec(),
            frag: 0,
            tcp_flags: 0,
            ..Self::new(IPPROTO_UDP, saddr, sport, daddr, dport)
        }
    }

    pub fn payload(mut self, p: Vec<u8>) -> Self {
        self.payload = p;
        self
    }

    /// A random TCP or UDP frame (random addresses, ports, payload of odd
    /// or even length, sometimes IP/TCP options, UDP with or without a
    /// checksum).
    pub fn random(rng: &mut super::Rng) -> Self {
        let proto = if rng.bool() { IPPROTO_TCP } else { IPPROTO_UDP };
        let mut s = Self::new(
            proto,
            rng.addr(),
            rng.next_u16(),
            rng.addr(),
            rng.next_u16(),
        );
        let plen = rng.range(0, 1472);
        s.payload = rng.bytes(plen);
        if rng.below(4) == 0 {
            s.ip_opts = ip_options(rng.range(1, 10) * 4);
        }
        if proto == IPPROTO_TCP && rng.below(4) == 0 {
            s.tcp_opts = tcp_options(rng.range(1, 10) * 4);
        }
        if proto == IPPROTO_UDP && rng.below(8) == 0 {
            s.udp_csum = UdpCsum::None;
        }
        s.ident = rng.next_u16();
        s.ttl = rng.next_u8() | 1;
        s.seq = rng.next_u32();
        s
    }

    /// The whole frame: Ethernet header, [`Spec::datagram`], padding.
    pub fn build(&self) -> Vec<u8> {
        let mut f = ethernet(self.dst_mac, self.src_mac, ETH_P_IP, &self.datagram());
        f.extend(core::iter::repeat_n(PAD_BYTE, self.pad));
        f
    }

    /// The IPv4 datagram: header (checksum computed), then
    /// [`Spec::segment`].
    pub fn datagram(&self) -> Vec<u8> {
        assert!(self.ip_opts.len().is_multiple_of(4) && self.ip_opts.len() <= 40);
        let l4 = self.segment();
        let hlen = IP_HLEN_MIN + self.ip_opts.len();
        let mut ip = vec![0u8; IP_HLEN_MIN];
        ip[IP_VER_IHL] = 0x40 | (hlen / 4) as u8;
        ip[IP_TOT_LEN..IP_TOT_LEN + 2].copy_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&self.ident.to_be_bytes()); // identification
        ip[IP_FRAG..IP_FRAG + 2].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl; // time to live
        ip[IP_PROTO] = self.proto;
        ip[IP_SADDR..IP_SADDR + 4].copy_from_slice(&self.saddr.octets());
        ip[IP_DADDR..IP_DADDR + 4].copy_from_slice(&self.daddr.octets());
        ip.extend_from_slice(&self.ip_opts);
        let c = checksum(&ip, 0);
        ip[IP_CSUM..IP_CSUM + 2].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    /// The TCP or UDP header and payload, checksum computed (UDP: unless
    /// `udp_csum` says none); for another protocol, the payload.
    pub fn segment(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.proto {
            IPPROTO_TCP => {
                assert!(self.tcp_opts.len().is_multiple_of(4) && self.tcp_opts.len() <= 40);
                let doff = 5 + self.tcp_opts.len() / 4;
                let ack = if self.tcp_flags & TCP_ACK != 0 {
                    ACK_SEQ
                } else {
                    0
                };
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&self.seq.to_be_bytes());
                l4.extend_from_slice(&ack.to_be_bytes());
                l4.push((doff as u8) << 4);
                l4.push(self.tcp_flags);
                l4.extend_from_slice(&TCP_WINDOW.to_be_bytes());
                l4.extend_from_slice(&[0, 0]); // checksum
                l4.extend_from_slice(&[0, 0]); // urgent pointer
                l4.extend_from_slice(&self.tcp_opts);
            }
            IPPROTO_UDP => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]); // checksum
            }
            _ => return self.payload.clone(),
        }
        l4.extend_from_slice(&self.payload);
        let c = match (self.proto, self.udp_csum) {
            (IPPROTO_UDP, UdpCsum::None) => 0,
            _ => l4_csum(&l4, self.saddr, self.daddr, self.proto),
        };
        let off = l4_csum_field(self.proto);
        l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }
}

/// An Ethernet frame around `payload`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 options of `len` bytes: NOPs then End of Option List.
pub fn ip_options(len: usize) -> Vec<u8> {
    let mut v = vec![1u8; len];
    if len > 0 {
        v[len - 1] = 0;
    }
    v
}

/// TCP options of `len` bytes: NOPs.
pub fn tcp_options(len: usize) -> Vec<u8> {
    vec![1u8; len]
}

fn l4_csum_field(proto: u8) -> usize {
    if proto == IPPROTO_TCP {
        TCP_CSUM
    } else {
        UDP_CSUM
    }
}

/// The checksum a sender puts in a TCP/UDP header, recomputed from
/// scratch over `seg` (whose checksum field is ignored). UDP sends a
/// computed zero as 0xffff.
pub fn l4_csum(seg: &[u8], saddr: Ipv4Addr, daddr: Ipv4Addr, proto: u8) -> u16 {
    let off = l4_csum_field(proto);
    let mut seg = seg.to_vec();
    seg[off] = 0;
    seg[off + 1] = 0;
    let c = checksum(
        &seg,
        pseudo4(saddr.octets(), daddr.octets(), proto, seg.len() as u16),
    );
    if proto == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// Checks a frame's IPv4 header and TCP/UDP checksums from scratch (they
/// sum to zero; a UDP checksum of 0 means none and passes).
pub fn checksums_ok(frame: &[u8]) -> bool {
    let v = View(frame);
    if !v.ip_csum_valid() {
        return false;
    }
    let l4 = v.l4();
    match v.proto() {
        IPPROTO_UDP if v.l4_csum() == 0 => true,
        p @ (IPPROTO_TCP | IPPROTO_UDP) => {
            checksum(
                l4,
                pseudo4(v.saddr().octets(), v.daddr().octets(), p, l4.len() as u16),
            ) == 0
        }
        _ => true,
    }
}

/// A parsed view of a built frame (no padding knowledge needed: lengths
/// come from the headers).
pub struct View<'a>(pub &'a [u8]);

impl View<'_> {
    pub fn ihl(&self) -> usize {
        (self.0[ETH_HLEN + IP_VER_IHL] & 0x0f) as usize
    }
    pub fn l4_off(&self) -> usize {
        ETH_HLEN + self.ihl() * 4
    }
    pub fn tot_len(&self) -> usize {
        self.be16(ETH_HLEN + IP_TOT_LEN) as usize
    }
    pub fn proto(&self) -> u8 {
        self.0[ETH_HLEN + IP_PROTO]
    }
    pub fn saddr(&self) -> Ipv4Addr {
        self.addr(ETH_HLEN + IP_SADDR)
    }
    pub fn daddr(&self) -> Ipv4Addr {
        self.addr(ETH_HLEN + IP_DADDR)
    }
    pub fn sport(&self) -> u16 {
        self.be16(self.l4_off() + L4_SPORT)
    }
    pub fn dport(&self) -> u16 {
        self.be16(self.l4_off() + L4_DPORT)
    }
    pub fn ip_csum(&self) -> u16 {
        self.be16(ETH_HLEN + IP_CSUM)
    }
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off() + l4_csum_field(self.proto())
    }
    pub fn l4_csum(&self) -> u16 {
        self.be16(self.l4_csum_off())
    }
    pub fn l4(&self) -> &[u8] {
        &self.0[self.l4_off()..ETH_HLEN + self.tot_len()]
    }

    /// The IPv4 header sums to -0 (checksum verifies).
    pub fn ip_csum_valid(&self) -> bool {
        checksum(&self.0[ETH_HLEN..self.l4_off()], 0) == 0
    }

    /// The TCP/UDP checksum field holds exactly what a sender would
    /// compute from scratch (UDP "no checksum" counts as valid only if
    /// `allow_udp_none`).
    pub fn l4_csum_valid(&self, allow_udp_none: bool) -> bool {
        if self.proto() == IPPROTO_UDP && self.l4_csum() == 0 {
            return allow_udp_none;
        }
        self.l4_csum() == l4_csum(self.l4(), self.saddr(), self.daddr(), self.proto())
    }

    fn be16(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }

    fn addr(&self, off: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            self.0[off],
            self.0[off + 1],
            self.0[off + 2],
            self.0[off + 3],
        )
    }
}

/// An ICMP error quoting `quoted` (its IPv4 datagram, cut to `quote_len`
/// bytes when given), sent from `from` to `to`.
#[derive(Clone, Debug)]
pub struct IcmpErrSpec {
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    pub typ: u8,
    pub code: u8,
    /// Next-hop MTU (fragmentation needed).
    pub mtu: u16,
    pub quoted: Spec,
    pub quote_len: Option<usize>,
}

impl IcmpErrSpec {
    /// "Fragmentation needed" (type 3 code 4).
    pub fn frag_needed(from: Ipv4Addr, to: Ipv4Addr, mtu: u16, quoted: Spec) -> Self {
        Self {
            from,
            to,
            typ: 3,
            code: 4,
            mtu,
            quoted,
            quote_len: None,
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut quote = self.quoted.datagram();
        if let Some(n) = self.quote_len {
            quote.truncate(n);
        }
        let mut icmp = vec![self.typ, self.code, 0, 0, 0, 0];
        icmp.extend_from_slice(&self.mtu.to_be_bytes());
        icmp.extend_from_slice(&quote);
        let c = checksum(&icmp, 0);
        icmp[ICMP_CSUM..ICMP_CSUM + 2].copy_from_slice(&c.to_be_bytes());
        Spec {
            payload: icmp,
            frag: 0,
            ..Spec::new(IPPROTO_ICMP, self.from, 0, self.to, 0)
        }
        .build()
    }
}

/// The outer headers of a packet one node carries to another (see
/// `crate::encap`), from scratch: IPv4 (DF, identification 0, TTL 64)
/// and UDP without a checksum, then the 12-byte mesh header.
#[derive(Clone, Debug)]
pub struct EncapSpec {
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub version: u8,
    pub kind: u8,
    pub flags: u8,
    /// The address and published port the client sent to.
    pub orig: (Ipv4Addr, u16),
}

impl EncapSpec {
    /// `inner`'s datagram behind these headers, in an Ethernet frame with
    /// `inner`'s MACs.
    pub fn build(&self, inner: &Spec) -> Vec<u8> {
        let mut payload = vec![self.version, self.kind, self.flags, 0];
        payload.extend_from_slice(&self.orig.0.octets());
        payload.extend_from_slice(&self.orig.1.to_be_bytes());
        payload.extend_from_slice(&[0, 0]);
        payload.extend_from_slice(&inner.datagram());
        Spec {
            dst_mac: inner.dst_mac,
            src_mac: inner.src_mac,
            ident: 0,
            frag: IP_DF,
            ttl: 64,
            udp_csum: UdpCsum::None,
            payload,
            ..Spec::new(IPPROTO_UDP, self.from, self.sport, self.to, self.dport)
        }
        .build()
    }
}
