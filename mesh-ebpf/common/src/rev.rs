//! The task-to-client path, run by the TC program on the interfaces that
//! lead to local tasks: a reply whose flow the forward path recorded gets
//! the node address and published port back as its source.
//!
//! No per-flow reverse entry: the reply table holds, per local backend, the
//! (node address, published port) pairs its flows can have come through,
//! and the client's conntrack entry confirms which one.
//!
//! The lookup is shared; the kernel rewrites with the skb checksum helpers
//! (replies from a local task usually carry a partial checksum that only
//! they handle right), the host with [`snat_full`], which is what those
//! helpers do to a packet with a complete checksum.

use crate::abi::{CtValue, FlowKey4, IPPROTO_UDP, MAX_REPLY_CANDS, ReplyKey4, ReplyValue4};
use crate::csum;
use crate::parse::{self, ETH_HLEN, IP_CSUM, IP_SADDR, Ip4, L4_SPORT};
use crate::pkt::Pkt;

pub trait RevTables {
    fn reply(&self, key: &ReplyKey4) -> Option<&ReplyValue4>;
    fn ct_get(&self, key: &FlowKey4) -> Option<&CtValue>;
}

/// A reply that must be rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub ip: Ip4,
    pub sport_be: u16,
    /// The node address and published port the client connected to.
    pub addr: u32,
    pub port_be: u16,
}

/// Finds the flow a local task's packet replies to, if it is a mesh flow:
/// for each (node address, published port) that leads to this task, the
/// conntrack entry the client's packets created, naming this backend.
/// Malformed or unknown packets are not ours: `None`.
#[inline(always)]
pub fn lookup<T: RevTables>(pkt: &Pkt, t: &T) -> Option<Reply> {
    let ip = parse::ipv4(pkt)?;
    if ip.later_fragment {
        return None;
    }
    let (sport, dport) = parse::ports(pkt, &ip)?;
    let r = t.reply(&ReplyKey4 {
        addr: ip.saddr,
        port_be: sport,
        proto: ip.proto,
        _pad: 0,
    })?;
    let (backend_id, count) = (r.backend_id, r.count as usize);
    let cands = r.cands;
    let mut found = None;
    for (i, c) in cands.iter().enumerate().take(MAX_REPLY_CANDS) {
        if i >= count {
            break;
        }
        let flow = FlowKey4 {
            saddr: ip.daddr,
            daddr: c.addr,
            sport_be: dport,
            dport_be: c.port_be,
            proto: ip.proto,
            _pad: [0; 3],
        };
        if let Some(ct) = t.ct_get(&flow)
            && ct.backend_id == backend_id
        {
            found = Some(*c);
            break;
        }
    }
    let c = found?;
    parse::check_l4(pkt, &ip).ok()?;
    Some(Reply {
        ip,
        sport_be: sport,
        addr: c.addr,
        port_be: c.port_be,
    })
}

/// Host-side rewrite of a reply with a complete checksum.
pub fn snat_full(pkt: &Pkt, r: &Reply) -> Option<()> {
    let ip_check: u16 = pkt.load(ETH_HLEN + IP_CSUM)?;
    let l4c_off = parse::l4_csum_off(&r.ip);
    let l4_check: u16 = pkt.load(l4c_off)?;
    pkt.store(ETH_HLEN + IP_SADDR, r.addr)?;
    pkt.store(
        ETH_HLEN + IP_CSUM,
        csum::update32(ip_check, r.ip.saddr, r.addr),
    )?;
    pkt.store(r.ip.l4_off + L4_SPORT, r.port_be)?;
    let new = csum::update48(l4_check, r.ip.saddr, r.addr, r.sport_be, r.port_be);
    let new = if r.ip.proto == IPPROTO_UDP {
        csum::udp_fixup(l4_check, new)
    } else {
        new
    };
    pkt.store(l4c_off, new)
}
