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

use crate::abi::{
    CtValue, FlowKey4, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, MAX_REPLY_CANDS, ReplyCand,
    ReplyKey4, ReplyValue4,
};
use crate::csum;
use crate::icmp::{self, Quoted};
use crate::parse::{self, ETH_HLEN, IP_CSUM, IP_SADDR, IcmpErr, Ip4, L4_SPORT};
use crate::pkt::Pkt;

/// The state the reply path reads; lookups return copies, as in
/// [`crate::fwd::Tables`].
pub trait RevTables {
    fn reply(&self, key: &ReplyKey4) -> Option<ReplyValue4>;
    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue>;
}

/// A reply that must be rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub ip: Ip4,
    pub sport_be: u16,
    /// The node address and published port the client connected to.
    pub addr: u32,
    pub port_be: u16,
    /// Set when the packet is the task's ICMP error about a client's
    /// datagram (then `sport_be` is unused).
    pub icmp: Option<IcmpErr>,
}

/// Finds the flow a local task's packet replies to, if it is a mesh flow:
/// for each (node address, published port) that leads to this task, the
/// conntrack entry the client's packets created, naming this backend.
/// Malformed or unknown packets are not ours: `None`.
#[inline(always)]
pub fn lookup<T: RevTables>(pkt: &Pkt, t: &T) -> Option<Reply> {
    let ip = parse::ipv4_any(pkt)?;
    if ip.proto == IPPROTO_ICMP {
        // An error about a client's datagram, as the task received it.
        let e = parse::icmp_error(pkt, &ip)?;
        if e.daddr != ip.saddr {
            return None;
        }
        let c = find(t, e.daddr, e.dport_be, e.saddr, e.sport_be, e.proto)?;
        return Some(Reply {
            ip,
            sport_be: 0,
            addr: c.addr,
            port_be: c.port_be,
            icmp: Some(e),
        });
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP || ip.later_fragment {
        return None;
    }
    let (sport, dport) = parse::ports(pkt, &ip)?;
    let c = find(t, ip.saddr, sport, ip.daddr, dport, ip.proto)?;
    parse::check_l4(pkt, &ip).ok()?;
    Some(Reply {
        ip,
        sport_be: sport,
        addr: c.addr,
        port_be: c.port_be,
        icmp: None,
    })
}

/// The (node address, published port) of the flow between a local task
/// (`task`, `tport`) and a client (`client`, `cport`).
#[inline(always)]
fn find<T: RevTables>(
    t: &T,
    task: u32,
    tport: u16,
    client: u32,
    cport: u16,
    proto: u8,
) -> Option<ReplyCand> {
    let r = t.reply(&ReplyKey4 {
        addr: task,
        port_be: tport,
        proto,
        _pad: 0,
    })?;
    let (backend_id, backend_gen, count) = (r.backend_id, r.backend_gen, r.count as usize);
    let cands = r.cands;
    for (i, c) in cands.iter().enumerate().take(MAX_REPLY_CANDS) {
        if i >= count {
            break;
        }
        let flow = FlowKey4 {
            saddr: client,
            daddr: c.addr,
            sport_be: cport,
            dport_be: c.port_be,
            proto,
            _pad: [0; 3],
        };
        if let Some(ct) = t.ct_get(&flow)
            && ct.backend_id == backend_id
            && ct.backend_gen == backend_gen
        {
            return Some(*c);
        }
    }
    None
}

/// Rewrites a task's ICMP error (direct writes: ICMP carries no partial
/// checksum). `None` if `r` is not one.
#[inline(always)]
pub fn rewrite_icmp(pkt: &Pkt, r: &Reply) -> Option<()> {
    let e = r.icmp?;
    icmp::rewrite(pkt, &r.ip, &e, Quoted::Dst, r.addr, r.port_be)
}

/// Host-side rewrite of a reply with a complete checksum.
pub fn snat_full(pkt: &Pkt, r: &Reply) -> Option<()> {
    if r.icmp.is_some() {
        return rewrite_icmp(pkt, r);
    }
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
