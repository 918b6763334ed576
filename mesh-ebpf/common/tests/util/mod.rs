//! Helpers shared by the integration tests: a deterministic PRNG (no
//! dev-dependencies), a frame builder that computes every checksum from
//! scratch, and checks that recompute them on a rewritten frame.
//!
//! Each test binary uses a different subset.
#![allow(dead_code)]

use mesh_common::abi::{IPPROTO_TCP, IPPROTO_UDP};
use mesh_common::csum;

/// xorshift64* (Vigna): small, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Mix the seed so that small seeds do not start in a weak state.
        Rng(mesh_common::hash::fmix64(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn next_u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }

    pub fn next_u8(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Uniform-enough integer in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    pub fn range(&mut self, lo: usize, hi_inclusive: usize) -> usize {
        lo + self.below((hi_inclusive - lo + 1) as u64) as usize
    }

    pub fn bool(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u8()).collect()
    }

    pub fn addr(&mut self) -> [u8; 4] {
        self.next_u32().to_be_bytes()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// UDP checksum handling in [`build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpCsum {
    /// Computed; a computed zero is sent as 0xffff.
    Computed,
    /// 0: "no checksum" (RFC 768).
    None,
}

/// Everything a test frame is made of. Fields are host-order values.
#[derive(Clone, Debug)]
pub struct Spec {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// IPv4 options (length a multiple of 4, at most 40).
    pub ip_opts: Vec<u8>,
    /// TCP options (length a multiple of 4, at most 40).
    pub tcp_opts: Vec<u8>,
    /// Flags + fragment offset word (host order).
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
    pub fn new(proto: u8, saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Self {
        Spec {
            saddr,
            daddr,
            proto,
            sport,
            dport,
            payload: Vec::new(),
            ip_opts: Vec::new(),
            tcp_opts: Vec::new(),
            frag: 0x4000, // DF
            udp_csum: UdpCsum::Computed,
            pad: 0,
            ident: 0x1234,
            ttl: 64,
            seq: 0x0102_0304,
        }
    }

    pub fn tcp(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Self {
        Self::new(IPPROTO_TCP, saddr, sport, daddr, dport)
    }

    pub fn udp(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Self {
        Self::new(IPPROTO_UDP, saddr, sport, daddr, dport)
    }

    pub fn payload(mut self, p: Vec<u8>) -> Self {
        self.payload = p;
        self
    }

    /// A random TCP or UDP frame (random addresses, ports, payload of odd
    /// or even length, sometimes IP/TCP options, UDP with or without a
    /// checksum).
    pub fn random(rng: &mut Rng) -> Self {
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

pub const ETH: usize = 14;

/// Builds Ethernet + IPv4 + TCP/UDP with correct checksums.
pub fn build(s: &Spec) -> Vec<u8> {
    assert!(s.ip_opts.len().is_multiple_of(4) && s.ip_opts.len() <= 40);
    assert!(s.tcp_opts.len().is_multiple_of(4) && s.tcp_opts.len() <= 40);
    let ihl = 5 + s.ip_opts.len() / 4;
    let l4 = l4_segment(s);
    let tot_len = ihl * 4 + l4.len();

    let mut f = Vec::with_capacity(ETH + tot_len + s.pad);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
    f.extend_from_slice(&0x0800u16.to_be_bytes());

    let mut ip = Vec::with_capacity(ihl * 4);
    ip.push(0x40 | ihl as u8);
    ip.push(0); // DSCP/ECN
    ip.extend_from_slice(&(tot_len as u16).to_be_bytes());
    ip.extend_from_slice(&s.ident.to_be_bytes());
    ip.extend_from_slice(&s.frag.to_be_bytes());
    ip.push(s.ttl);
    ip.push(s.proto);
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&s.saddr);
    ip.extend_from_slice(&s.daddr);
    ip.extend_from_slice(&s.ip_opts);
    let c = csum::checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    // Padding bytes that would break any checksum that wrongly covered them.
    f.extend(std::iter::repeat_n(0xa5, s.pad));
    f
}

fn l4_segment(s: &Spec) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&s.sport.to_be_bytes());
    l4.extend_from_slice(&s.dport.to_be_bytes());
    let csum_off = if s.proto == IPPROTO_TCP {
        let doff = 5 + s.tcp_opts.len() / 4;
        l4.extend_from_slice(&s.seq.to_be_bytes());
        l4.extend_from_slice(&0x0a0b_0c0du32.to_be_bytes()); // ack
        l4.push((doff as u8) << 4);
        l4.push(0x18); // PSH|ACK
        l4.extend_from_slice(&0xfaf0u16.to_be_bytes()); // window
        l4.extend_from_slice(&[0, 0]); // checksum
        l4.extend_from_slice(&[0, 0]); // urgent pointer
        l4.extend_from_slice(&s.tcp_opts);
        16
    } else {
        let len = 8 + s.payload.len();
        l4.extend_from_slice(&(len as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        6
    };
    l4.extend_from_slice(&s.payload);
    let c = l4_csum(&l4, s.saddr, s.daddr, s.proto);
    let c = match (s.proto, s.udp_csum) {
        (IPPROTO_UDP, UdpCsum::None) => 0,
        _ => c,
    };
    l4[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
    l4
}

/// The checksum a sender puts in a TCP/UDP header, recomputed from
/// scratch over `seg` (whose checksum field is ignored). UDP sends a
/// computed zero as 0xffff.
pub fn l4_csum(seg: &[u8], saddr: [u8; 4], daddr: [u8; 4], proto: u8) -> u16 {
    let off = if proto == IPPROTO_TCP { 16 } else { 6 };
    let mut seg = seg.to_vec();
    seg[off] = 0;
    seg[off + 1] = 0;
    let c = csum::checksum(&seg, csum::pseudo4(saddr, daddr, proto, seg.len() as u16));
    if proto == IPPROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// A parsed view of a frame built by [`build`] (no padding knowledge
/// needed: lengths come from the headers).
pub struct View<'a>(pub &'a [u8]);

impl View<'_> {
    pub fn ihl(&self) -> usize {
        (self.0[ETH] & 0x0f) as usize
    }
    pub fn l4_off(&self) -> usize {
        ETH + self.ihl() * 4
    }
    pub fn tot_len(&self) -> usize {
        u16::from_be_bytes([self.0[ETH + 2], self.0[ETH + 3]]) as usize
    }
    pub fn proto(&self) -> u8 {
        self.0[ETH + 9]
    }
    pub fn saddr(&self) -> [u8; 4] {
        self.0[ETH + 12..ETH + 16].try_into().unwrap()
    }
    pub fn daddr(&self) -> [u8; 4] {
        self.0[ETH + 16..ETH + 20].try_into().unwrap()
    }
    pub fn sport(&self) -> u16 {
        let o = self.l4_off();
        u16::from_be_bytes([self.0[o], self.0[o + 1]])
    }
    pub fn dport(&self) -> u16 {
        let o = self.l4_off();
        u16::from_be_bytes([self.0[o + 2], self.0[o + 3]])
    }
    pub fn ip_csum(&self) -> u16 {
        u16::from_be_bytes([self.0[ETH + 10], self.0[ETH + 11]])
    }
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off() + if self.proto() == IPPROTO_TCP { 16 } else { 6 }
    }
    pub fn l4_csum(&self) -> u16 {
        let o = self.l4_csum_off();
        u16::from_be_bytes([self.0[o], self.0[o + 1]])
    }
    pub fn l4(&self) -> &[u8] {
        &self.0[self.l4_off()..ETH + self.tot_len()]
    }

    /// The IPv4 header sums to -0 (checksum verifies).
    pub fn ip_csum_valid(&self) -> bool {
        csum::checksum(&self.0[ETH..self.l4_off()], 0) == 0
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
}
