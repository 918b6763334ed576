//! Builds Ethernet/IPv4/TCP/UDP frames with correct checksums, computed
//! from scratch (never incrementally), so they can judge the dataplane's
//! incremental updates.

use std::net::Ipv4Addr;

use mesh_common::csum::{checksum, pseudo4};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub struct Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    /// 6 (TCP) or 17 (UDP); anything else gets `payload` as the whole L4.
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    pub ttl: u8,
    /// Flags and fragment offset field (host order), e.g. 0x4000 = DF.
    pub frag: u16,
    /// UDP: send a zero checksum ("none").
    pub udp_no_csum: bool,
}

impl Spec {
    pub fn tcp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, flags: u8) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            saddr,
            daddr,
            proto: 6,
            sport,
            dport,
            tcp_flags: flags,
            payload: Vec::new(),
            ip_options: Vec::new(),
            ttl: 64,
            frag: 0x4000,
            udp_no_csum: false,
        }
    }

    pub fn udp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, payload: &[u8]) -> Self {
        Self {
            proto: 17,
            tcp_flags: 0,
            payload: payload.to_vec(),
            frag: 0,
            ..Self::tcp(saddr, sport, daddr, dport, 0)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let l4 = match self.proto {
            6 => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&self.sport.to_be_bytes());
                t[2..4].copy_from_slice(&self.dport.to_be_bytes());
                t[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
                t[8..12].copy_from_slice(
                    &(if self.tcp_flags & TCP_ACK != 0 {
                        0x0a0b_0c0du32
                    } else {
                        0
                    })
                    .to_be_bytes(),
                );
                t[12] = 5 << 4;
                t[13] = self.tcp_flags;
                t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&self.payload);
                let c = checksum(
                    &t,
                    pseudo4(self.saddr.octets(), self.daddr.octets(), 6, t.len() as u16),
                );
                t[16..18].copy_from_slice(&c.to_be_bytes());
                t
            }
            17 => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&self.sport.to_be_bytes());
                u[2..4].copy_from_slice(&self.dport.to_be_bytes());
                u[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u.extend_from_slice(&self.payload);
                if !self.udp_no_csum {
                    let mut c = checksum(
                        &u,
                        pseudo4(self.saddr.octets(), self.daddr.octets(), 17, u.len() as u16),
                    );
                    if c == 0 {
                        c = 0xffff;
                    }
                    u[6..8].copy_from_slice(&c.to_be_bytes());
                }
                u
            }
            _ => self.payload.clone(),
        };
        let ihl = 5 + self.ip_options.len() / 4;
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | ihl as u8;
        ip[2..4].copy_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.saddr.octets());
        ip[16..20].copy_from_slice(&self.daddr.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = Vec::with_capacity(14 + ip.len() + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// Checks a frame's IPv4 header and TCP/UDP checksums from scratch.
pub fn checksums_ok(frame: &[u8]) -> bool {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    let ip = &frame[14..14 + ihl];
    if checksum(ip, 0) != 0 {
        return false;
    }
    let l4 = &frame[14 + ihl..14 + tot];
    let (s, d) = (
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    );
    match ip[9] {
        17 if l4[6] == 0 && l4[7] == 0 => true,
        p @ (6 | 17) => checksum(l4, pseudo4(s, d, p, l4.len() as u16)) == 0,
        _ => true,
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
        let inner = self.quoted.build();
        let mut quote = inner[14..].to_vec();
        if let Some(n) = self.quote_len {
            quote.truncate(n);
        }
        let mut icmp = vec![self.typ, self.code, 0, 0, 0, 0];
        icmp.extend_from_slice(&self.mtu.to_be_bytes());
        icmp.extend_from_slice(&quote);
        let c = checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        Spec {
            proto: 1,
            payload: icmp,
            frag: 0,
            ..Spec::tcp(self.from, 0, self.to, 0, 0)
        }
        .build()
    }
}
