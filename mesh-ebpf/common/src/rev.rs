//! The task-to-client path, run by the TC program on the interfaces that
//! lead to local tasks: a reply whose flow the forward path recorded gets
//! the node address and published port back as its source. A reply to a
//! flow one of the node's own processes started goes to the node's own
//! stack ([`to_host`]).
//!
//! No per-flow reverse entry: the reply table holds, per local backend, the
//! (node address, published port) pairs its flows can have come through,
//! and the client's conntrack entry confirms which one. A reply to an
//! unconfirmed flow tells the forward path what it needs to confirm it: a
//! SYN-ACK the acknowledgment the client's ACK must carry; any other
//! answer but a reset confirms a UDP flow, or a TCP flow picked up again
//! after its entry was lost.
//!
//! A packet is trusted only from the port its task sits behind: one whose
//! source is a task behind another port is dropped (a container claiming
//! another task's address).
//!
//! The lookup is shared; the kernel rewrites with the skb checksum helpers
//! (replies from a local task usually carry a partial checksum that only
//! they handle right), the host with [`snat_full`], which is what those
//! helpers do to a packet with a complete checksum.

use crate::abi::{
    CTF_RECOVERED, CtValue, DropReason, FlowKey4, FwdValue, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    MAX_REPLY_CANDS, ReplyCand, ReplyKey4, ReplyValue4,
};
use crate::abi::{ENCAP_F_DIRECT, ENCAP_K_REPLY, ENCAP_VERSION, EncapHdr, NodeConfig};
use crate::csum;
use crate::encap::{self, Outer};
use crate::hash::flow_hash4;
use crate::icmp::{self, Quoted};
use crate::parse::{
    self, ETH_HLEN, IP_CSUM, IP_SADDR, IcmpErr, Ip4, L4_SPORT, TCP_FLAGS, TCP_HLEN_MIN, TCP_RST,
    TCP_SEQ, TCP_SYN,
};
use crate::pkt::Pkt;

/// The state the reply path reads; lookups return copies, as in
/// [`crate::fwd::Tables`].
pub trait RevTables {
    fn reply(&self, key: &ReplyKey4) -> Option<ReplyValue4>;
    /// A confirmed flow's entry.
    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue>;
    /// An unconfirmed flow's entry.
    fn ct_new_get(&self, key: &FlowKey4) -> Option<CtValue>;
    /// Moves an unconfirmed flow's entry to the confirmed table.
    fn ct_confirm(&self, key: &FlowKey4, ct: &CtValue);
    /// Records, in an unconfirmed TCP flow's entry, the acknowledgment
    /// number that completes its handshake.
    fn ct_answered(&self, key: &FlowKey4, ack_be: u32);
    /// A flow another node forwarded to this node's task, as the task sees
    /// it (client address and port, the task's address and target port).
    fn fwd_get(&self, key: &FlowKey4) -> Option<FwdValue>;
    /// Whether `addr` is one of this node's addresses (as
    /// `fwd::Tables::is_node_addr4`).
    fn is_own_addr4(&self, addr: u32) -> bool;
}

/// What a reply tells of its flow. (A struct with every field defined,
/// not an enum with a payload: see the note in `fwd::process`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub kind: u8,
    /// For `SYN_ACK`: what the client's ACK must acknowledge (network
    /// order) to confirm the flow.
    pub ack_be: u32,
}

impl Answer {
    /// Nothing: a reset, or an ICMP error.
    pub const NOTHING: u8 = 0;
    /// A TCP SYN-ACK.
    pub const SYN_ACK: u8 = 1;
    /// Any other answer (UDP, TCP data or ACK): confirms a UDP flow, or a
    /// TCP flow picked up again after its entry was lost.
    pub const DATA: u8 = 2;

    pub const fn of(kind: u8) -> Self {
        Self { kind, ack_be: 0 }
    }
}

/// What a TCP/UDP reply (whose L4 header `check_l4` validated) tells of
/// its flow; a reset is no sign the flow is real.
#[inline(always)]
pub fn answer_of(pkt: &Pkt, ip: &Ip4) -> Answer {
    if ip.proto != IPPROTO_TCP {
        return Answer::of(Answer::DATA);
    }
    match pkt.view::<TCP_HLEN_MIN>(ip.l4_off) {
        Some(h) => {
            let flags: u8 = h.get(TCP_FLAGS);
            if flags & TCP_RST != 0 {
                Answer::of(Answer::NOTHING)
            } else if flags & TCP_SYN != 0 {
                let seq = u32::from_be(h.get::<u32>(TCP_SEQ));
                Answer {
                    kind: Answer::SYN_ACK,
                    ack_be: seq.wrapping_add(1).to_be(),
                }
            } else {
                Answer::of(Answer::DATA)
            }
        }
        None => Answer::of(Answer::NOTHING),
    }
}

/// A reply that must be rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub ip: Ip4,
    pub sport_be: u16,
    /// The client's port (0 for an ICMP error).
    pub dport_be: u16,
    /// The node address and published port the client connected to.
    pub addr: u32,
    pub port_be: u16,
    /// Set when the packet is the task's ICMP error about a client's
    /// datagram (then `sport_be` is unused).
    pub icmp: Option<IcmpErr>,
    /// A flow another node forwarded here (`ingress != 0`): its replies go
    /// back to `ingress`, or straight to the client (`ENCAP_F_DIRECT`).
    pub fwd: FwdValue,
}

/// Finds the flow a local task's packet replies to, if it is a mesh flow:
/// for each (node address, published port) that leads to this task, the
/// conntrack entry the client's packets created, naming this backend.
/// Malformed or unknown packets are not ours: `Ok(None)`. A packet that
/// came in through `ifindex` claiming the address of a task behind another
/// interface: `Err(SpoofedReply)`.
#[inline(always)]
pub fn lookup<T: RevTables>(pkt: &Pkt, t: &T, ifindex: u32) -> Result<Option<Reply>, DropReason> {
    let Some(ip) = parse::ipv4_any(pkt) else {
        return Ok(None);
    };
    if ip.proto == IPPROTO_ICMP {
        // An error about a client's datagram, as the task received it.
        let Some(e) = parse::icmp_error(pkt, &ip) else {
            return Ok(None);
        };
        if e.daddr != ip.saddr {
            return Ok(None);
        }
        let Some((c, fwd)) = find(
            t,
            e.daddr,
            e.dport_be,
            e.saddr,
            e.sport_be,
            e.proto,
            ifindex,
            Answer::of(Answer::NOTHING),
        )?
        else {
            return Ok(None);
        };
        return Ok(Some(Reply {
            ip,
            sport_be: 0,
            dport_be: 0,
            addr: c.addr,
            port_be: c.port_be,
            icmp: Some(e),
            fwd,
        }));
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP || ip.later_fragment {
        return Ok(None);
    }
    let Some((sport, dport)) = parse::ports(pkt, &ip) else {
        return Ok(None);
    };
    if parse::check_l4(pkt, &ip).is_err() {
        return Ok(None);
    }
    let answer = answer_of(pkt, &ip);
    let Some((c, fwd)) = find(
        t, ip.saddr, sport, ip.daddr, dport, ip.proto, ifindex, answer,
    )?
    else {
        return Ok(None);
    };
    Ok(Some(Reply {
        ip,
        sport_be: sport,
        dport_be: dport,
        addr: c.addr,
        port_be: c.port_be,
        icmp: None,
        fwd,
    }))
}

/// The (node address, published port) of the flow between a local task
/// (`task`, `tport`) and a client (`client`, `cport`): confirmed flows
/// first, then unconfirmed ones (which `answer` may confirm, or record the
/// handshake's completion for), then flows other nodes forwarded here
/// (with what this node keeps of them).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn find<T: RevTables>(
    t: &T,
    task: u32,
    tport: u16,
    client: u32,
    cport: u16,
    proto: u8,
    ifindex: u32,
    answer: Answer,
) -> Result<Option<(ReplyCand, FwdValue)>, DropReason> {
    let Some(r) = t.reply(&ReplyKey4 {
        addr: task,
        port_be: tport,
        proto,
        _pad: 0,
    }) else {
        return Ok(None);
    };
    if r.ifindex != 0 && r.ifindex != ifindex {
        return Err(DropReason::SpoofedReply);
    }
    let (backend_id, backend_gen, count) = (r.backend_id, r.backend_gen, r.count as usize);
    let cands = r.cands;
    let flow = |c: &ReplyCand| FlowKey4 {
        saddr: client,
        daddr: c.addr,
        sport_be: cport,
        dport_be: c.port_be,
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    let ours = |ct: &CtValue| ct.backend_id == backend_id && ct.backend_gen == backend_gen;
    for (i, c) in cands.iter().enumerate().take(MAX_REPLY_CANDS) {
        if i >= count {
            break;
        }
        if t.ct_get(&flow(c)).is_some_and(|ct| ours(&ct)) {
            return Ok(Some((*c, FwdValue::default())));
        }
    }
    for (i, c) in cands.iter().enumerate().take(MAX_REPLY_CANDS) {
        if i >= count {
            break;
        }
        let key = flow(c);
        if let Some(ct) = t.ct_new_get(&key)
            && ours(&ct)
        {
            if answer.kind == Answer::SYN_ACK {
                t.ct_answered(&key, answer.ack_be);
            } else if answer.kind == Answer::DATA
                && (proto != IPPROTO_TCP || ct.flags & CTF_RECOVERED != 0)
            {
                t.ct_confirm(&key, &ct);
            }
            return Ok(Some((*c, FwdValue::default())));
        }
    }
    let fwd = FlowKey4 {
        saddr: client,
        daddr: task,
        sport_be: cport,
        dport_be: tport,
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    if let Some(v) = t.fwd_get(&fwd) {
        let c = ReplyCand {
            addr: v.orig_daddr,
            port_be: v.orig_dport_be,
            _pad: 0,
        };
        return Ok(Some((c, v)));
    }
    Ok(None)
}

/// Whether reply `r` (of a flow another node forwarded here) goes back
/// to that node, encapsulated; otherwise it goes to the client from here.
#[inline(always)]
pub fn via_ingress(r: &Reply) -> bool {
    r.fwd.ingress != 0 && r.fwd.flags & ENCAP_F_DIRECT == 0
}

/// Whether reply `r` (going to its client from here, not via an ingress
/// node) is for one of this node's own processes: a flow that started on
/// this node, to one of its own addresses. Such a reply is handed to the
/// node's own stack (through the loopback device): routing it would send
/// a packet from and to this node's own address out of a device.
#[inline(always)]
pub fn to_host<T: RevTables>(r: &Reply, t: &T) -> bool {
    !via_ingress(r) && t.is_own_addr4(r.ip.daddr)
}

/// The outer headers that carry reply `r` (already rewritten) back to its
/// flow's ingress node: the same UDP source port as the flow's requests.
#[inline(always)]
pub fn reply_outer(r: &Reply, cfg: &NodeConfig) -> Outer {
    Outer {
        saddr: cfg.self_addr,
        daddr: r.fwd.ingress,
        sport_be: encap::source_port(flow_hash4(r.ip.daddr, r.dport_be, r.port_be, r.ip.proto)),
        dport_be: cfg.encap_port_be,
        hdr: EncapHdr {
            version: ENCAP_VERSION,
            kind: ENCAP_K_REPLY,
            flags: 0,
            _pad0: 0,
            orig_daddr: r.addr,
            orig_dport_be: r.port_be,
            _pad1: 0,
        },
    }
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
