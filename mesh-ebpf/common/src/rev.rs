//! The task-to-client path, run by the TC program on the interfaces that
//! lead to local tasks: a reply whose flow the forward path recorded gets
//! the node address and published port back as its source.
//!
//! The lookup is shared; the kernel rewrites with the skb checksum helpers
//! (replies from a local task usually carry a partial checksum that only
//! they handle right), the host with [`snat_full`], which is what those
//! helpers do to a packet with a complete checksum.

use crate::abi::{FlowKey4, IPPROTO_UDP, RevValue};
use crate::csum;
use crate::parse::{self, ETH_HLEN, IP_CSUM, IP_SADDR, Ip4, L4_SPORT};
use crate::pkt::Pkt;

pub trait RevTables {
    fn rev_get(&self, key: &FlowKey4) -> Option<&RevValue>;
}

/// A reply that must be rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub ip: Ip4,
    pub sport_be: u16,
    pub rev: RevValue,
}

/// Finds the reverse-NAT entry of a task's reply, if it belongs to a
/// mesh flow. Malformed or unknown packets are not ours: `None`.
#[inline(always)]
pub fn lookup<T: RevTables>(pkt: &Pkt, t: &T) -> Option<Reply> {
    let ip = parse::ipv4(pkt)?;
    if ip.later_fragment {
        return None;
    }
    let (sport, dport) = parse::ports(pkt, &ip)?;
    let key = FlowKey4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport_be: sport,
        dport_be: dport,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let rev = *t.rev_get(&key)?;
    parse::check_l4(pkt, &ip).ok()?;
    Some(Reply { ip, sport_be: sport, rev })
}

/// Host-side rewrite of a reply with a complete checksum.
pub fn snat_full(pkt: &Pkt, r: &Reply) -> Option<()> {
    let ip_check: u16 = pkt.load(ETH_HLEN + IP_CSUM)?;
    let l4c_off = parse::l4_csum_off(&r.ip);
    let l4_check: u16 = pkt.load(l4c_off)?;
    pkt.store(ETH_HLEN + IP_SADDR, r.rev.addr)?;
    pkt.store(ETH_HLEN + IP_CSUM, csum::update32(ip_check, r.ip.saddr, r.rev.addr))?;
    pkt.store(r.ip.l4_off + L4_SPORT, r.rev.port_be)?;
    let new = csum::update48(l4_check, r.ip.saddr, r.rev.addr, r.sport_be, r.rev.port_be);
    let new = if r.ip.proto == IPPROTO_UDP { csum::udp_fixup(l4_check, new) } else { new };
    pkt.store(l4c_off, new)
}
