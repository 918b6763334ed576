//! The client-to-service path, run by the XDP program on the uplink
//! ([`process`]), and by the TC programs for flows that start on the node
//! itself, from its own processes or its tasks ([`node_origin`]): both
//! decide with the same `pick`.
//!
//! parse -> service lookup (port, proto) -> conntrack (confirmed flows,
//! then unconfirmed ones); for an untracked flow, node address check ->
//! L4 checks -> whether the packet may start a flow -> Maglev (new or
//! re-picked flows) -> DNAT to the task -> counters.
//!
//! Conntrack, as this path keeps it:
//! - An entry counts only while it is alive (its state's lifetime past
//!   the flow's last packet, [`CtLifetimes`]) and names the service that
//!   owns the port now (`svc_id` and generation): otherwise the packet is
//!   judged as if there were none.
//! - New flows go to the unconfirmed table. A TCP flow is confirmed when
//!   the client's ACK acknowledges the backend's SYN-ACK (the reply path
//!   records what that acknowledgment must be: a spoofed source never
//!   sees it); a UDP flow, or a TCP flow picked up after its entry was
//!   lost, when its backend answers (the reply path moves it). A flood of
//!   spoofed packets churns only the unconfirmed table; confirmed UDP
//!   flows have a table of their own, so a flood a UDP service answers
//!   never displaces TCP flows.
//! - Without an entry, a TCP SYN starts a flow; a SYN-ACK or a RST never
//!   does (the node's own connections get those); any other TCP segment
//!   belongs to the node if one of its sockets owns the 4-tuple, and is
//!   otherwise a flow whose entry was lost: Maglev picks again (the same
//!   task while the service is unchanged) and the flow goes on.
//!
//! Written once, generic over [`Tables`]: the kernel backs it with BPF
//! maps, host tests and fixtures with `testing::HostMaps` (the same
//! shapes, in plain collections).

use crate::abi::{
    AffKey4, AffValue4, BE_F_LOCAL, BE_F_NO_NEW, Backend, CT_CLOSING, CT_OPEN, CT_SYN,
    CTF_RECOVERED, Counter, CtLifetimes, CtValue, DropReason, ENCAP_F_DIRECT, ENCAP_K_REPLY,
    ENCAP_K_REQUEST, ENCAP_VERSION, EncapHdr, FlowKey4, FwdValue, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, NodeConfig, NodeValue, ReplyKey4, SVC_F_AFFINITY, SVC_F_REPLY_DIRECT,
    SVC_F_SRC_RANGES, SvcKey, SvcValue, age,
};
use crate::csum::{self, Delta};
use crate::encap::{self, Encapsulated, Outer};
use crate::hash::flow_hash4;
use crate::icmp::{self, Quoted};
use crate::parse::{
    self, ETH_HLEN, IP_CSUM, IP_DADDR, IP_HLEN_MIN, L4_DPORT, L4Error, TCP_ACK, TCP_ACK_SEQ,
    TCP_FIN, TCP_FLAGS, TCP_HLEN_MIN, TCP_RST, TCP_SYN,
};
use crate::pkt::Pkt;

/// The state the forward path reads and writes. Lookups return copies:
/// the values are a few words, a BPF map value can change under a reader
/// anyway, and an owned value needs no borrow of the tables (host
/// implementations write through `&self` as BPF maps are written).
pub trait Tables {
    fn service(&self, key: &SvcKey) -> Option<SvcValue>;
    /// Whether a service publishes `key`'s port (without reading it).
    fn published(&self, key: &SvcKey) -> bool {
        self.service(key).is_some()
    }
    /// Whether a source-range of service `svc_id`'s allow list holds
    /// `saddr` (raw).
    fn source_allowed(&self, svc_id: u32, saddr: u32) -> bool;
    fn is_node_addr4(&self, addr: u32) -> bool;
    /// A confirmed flow's entry (the table of the key's protocol).
    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue>;
    /// An unconfirmed flow's entry.
    fn ct_new_get(&self, key: &FlowKey4) -> Option<CtValue>;
    /// Moves an unconfirmed flow's entry, as `ct`, to the confirmed table.
    fn ct_confirm(&self, key: &FlowKey4, ct: &CtValue);
    /// Forgets a flow's confirmed entry (a new connection on its 4-tuple,
    /// or a new pick after its backend went, replaces it).
    fn ct_forget(&self, key: &FlowKey4);
    /// Deletes `key`'s unconfirmed entry, if any.
    fn ct_new_forget(&self, key: &FlowKey4);
    /// Record a new (unconfirmed) flow. Failure (a full map that is not
    /// LRU) is not fatal: the flow's next packet hashes the same way.
    fn ct_new_put(&self, key: &FlowKey4, ct: &CtValue);
    /// Update a flow's last packet and state in place, in the table it is
    /// in (confirmed or not); nothing if it is gone meanwhile.
    fn ct_touch(&self, key: &FlowKey4, confirmed: bool, seen: u32, state: u8);
    /// The coarse clock, in conntrack units (`abi::now_units`).
    fn now(&self) -> u32;
    fn lifetimes(&self) -> CtLifetimes;
    /// Whether a TCP socket of this node (not a listener) owns the flow's
    /// 4-tuple, as the packet carries it (source: the remote end).
    fn host_socket(&self, key: &FlowKey4) -> bool;
    /// Records, in an unconfirmed TCP flow's entry, the acknowledgment
    /// number that completes its handshake.
    fn ct_answered(&self, key: &FlowKey4, ack_be: u32);
    /// This node's settings (address, encapsulation port, MTU).
    fn config(&self) -> NodeConfig;
    /// The node in slot `slot`, if the slot is in use.
    fn node(&self, slot: u32) -> Option<NodeValue>;
    /// Whether `addr` is the address of a node of the swarm.
    fn is_node(&self, addr: u32) -> bool;
    /// The local backend slot of a task by its identity in the swarm.
    fn local_backend(&self, key: &ReplyKey4) -> Option<u32>;
    /// What this node keeps of a flow another node forwarded to it.
    fn fwd_get(&self, key: &FlowKey4) -> Option<FwdValue>;
    fn fwd_put(&self, key: &FlowKey4, v: &FwdValue);
    /// Adds `n` to counter `c`.
    fn count_n(&self, c: Counter, n: u32);
    #[inline(always)]
    fn count(&self, c: Counter) {
        self.count_n(c, 1)
    }
    /// Entry `index` of the Maglev map: a backend id.
    fn maglev(&self, index: u32) -> Option<u32>;
    /// The backend in slot `id`, if the slot is in use (its generation
    /// is for the caller to compare).
    fn backend(&self, id: u32) -> Option<Backend>;
    /// Counts `packets` packets of `bytes` bytes for a service (a new flow
    /// if so).
    fn account(&self, svc_id: u32, packets: u32, bytes: u64, new_flow: bool);

    /// Brings the TCP/UDP checksum at `off` up to date once fields under
    /// it have changed: `pseudo` holds the changes of fields the
    /// pseudo-header covers (addresses), `seg` of fields only the segment
    /// covers (ports, options). Always the last write of a rewrite. By
    /// hand by default: a packet's bytes are all there is to XDP and the
    /// host. A TC program's tables use the socket buffer's helpers
    /// instead, because its checksum may be partial (offloaded: only the
    /// pseudo-header is summed in the packet) or summed by the device
    /// (which the helpers keep true); they invalidate packet pointers, so
    /// nothing reads the packet after this.
    #[inline(always)]
    fn l4_csum(&self, pkt: &Pkt, off: usize, udp: bool, pseudo: Delta, seg: Delta) -> Option<()> {
        csum::fix_l4(pkt, off, udp, pseudo, seg)
    }

    /// The task a client of a service with `SVC_F_AFFINITY` had.
    fn aff_get(&self, key: &AffKey4) -> Option<AffValue4>;
    /// Remembers a client's task (an LRU map: the least recently used
    /// client is forgotten when full).
    fn aff_put(&self, key: &AffKey4, v: &AffValue4);
    /// Service `svc_id`'s affinity timeout, in conntrack time units.
    fn affinity_timeout(&self, svc_id: u32) -> u32;
}

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not service traffic: to the kernel, untouched.
    Pass,
    Drop(DropReason),
    /// Rewritten for a task on this node: deliver it there.
    Local {
        backend_id: u32,
    },
    /// Rewritten for a task on another node: encapsulate it there (make
    /// `ENCAP_LEN` bytes of room behind the Ethernet header, write `outer`,
    /// route to its destination).
    Forward {
        outer: Outer,
        /// The destination node's slot (`Backend::node_id`): where the
        /// programs keep its next hop.
        node: u32,
    },
    /// Too big to encapsulate: answer the client with "fragmentation
    /// needed" from the address it sent to (`from`), next-hop MTU `mtu`.
    TooBig {
        from: u32,
        mtu: u16,
    },
    /// Encapsulated, from another node, for this one: strip `ENCAP_LEN`
    /// bytes behind the Ethernet header, then [`decap_request`] or
    /// [`decap_reply`] by `info.hdr.kind`.
    Decap {
        info: Encapsulated,
    },
    /// Rewritten for a client (a reply another node sent back): route it
    /// from `saddr` to `daddr` and send it.
    Out {
        saddr: u32,
        daddr: u32,
    },
    /// A reply another node sent back to a flow this node's own process
    /// started (its client is an address of this node): into the node's
    /// own stack.
    Host,
}

/// Whether `pkt` may be the forward path's to judge, from the bytes it
/// can read alone (`pkt`'s readable part): `false` only for what
/// [`process`] passes untouched whatever the tables hold besides the
/// published ports: a frame that is not IPv4, another protocol than
/// TCP, UDP or ICMP, a later fragment, a TCP or UDP datagram to a port no
/// service publishes (and, for UDP, not the encapsulation port). What
/// cannot be read here takes the whole path. For an intercept that sees
/// the node's other traffic too: it leaves before anything else is read.
#[inline(always)]
pub fn may_be_mesh<T: Tables>(pkt: &Pkt, t: &T) -> bool {
    let h = parse::head(pkt);
    if !h.readable {
        return true;
    }
    let proto = h.proto;
    if !h.ipv4 {
        return false;
    }
    if proto == IPPROTO_ICMP {
        return true;
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP || h.later_fragment {
        return false;
    }
    let Some(dport) = pkt.load::<u16>(h.l4_off + L4_DPORT) else {
        return true;
    };
    let key = SvcKey {
        port_be: dport,
        proto,
        _pad: 0,
    };
    t.published(&key) || (proto == IPPROTO_UDP && dport == t.config().encap_port_be)
}

/// Runs the forward path on `pkt`, rewriting it in place when the verdict
/// is `Local`. Nothing is written for any other verdict.
#[inline(always)]
pub fn process<T: Tables>(pkt: &Pkt, t: &T) -> Verdict {
    let Some(ip) = parse::ipv4_any(pkt) else {
        return Verdict::Pass;
    };
    if ip.proto == IPPROTO_ICMP {
        return icmp_to_task(pkt, &ip, t);
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Verdict::Pass;
    }
    if ip.later_fragment {
        return Verdict::Pass;
    }
    let Some((sport, dport)) = parse::ports(pkt, &ip) else {
        return Verdict::Pass;
    };
    // Another node's packet for this one: only from a node, only to an
    // address of this node.
    let cfg = t.config();
    if ip.proto == IPPROTO_UDP && dport == cfg.encap_port_be && t.is_node_addr4(ip.daddr) {
        return match encap::read(pkt, &ip, cfg.encap_port_be) {
            None => Verdict::Pass,
            Some(_) if !t.is_node(ip.saddr) => Verdict::Drop(DropReason::EncapFromNonNode),
            Some(Ok(info))
                if info.hdr.kind == ENCAP_K_REQUEST || info.hdr.kind == ENCAP_K_REPLY =>
            {
                Verdict::Decap { info }
            }
            Some(_) => Verdict::Drop(DropReason::EncapMalformed),
        };
    }
    let key = SvcKey {
        port_be: dport,
        proto: ip.proto,
        _pad: 0,
    };
    let Some(svc) = t.service(&key) else {
        return Verdict::Pass;
    };
    let p = pick(pkt, &ip, t, &svc, sport, dport, 0);
    if p.action == PICK_PASS {
        return Verdict::Pass;
    }
    if p.action == PICK_DROP {
        return Verdict::Drop(p.reason);
    }
    let be = p.be;
    if be.flags & BE_F_LOCAL == 0 {
        return forward(pkt, &ip, t, &svc, &be, &cfg, p.syn, sport, p.new_flow);
    }
    let bytes = pkt.wire_len() as u64;
    if dnat(pkt, &ip, be.addr[0], be.port_be, Delta::default(), t).is_none() {
        // Unreachable after check_l4; kept so no path writes half a packet
        // without saying so.
        return Verdict::Drop(DropReason::L4Truncated);
    }
    t.account(svc.svc_id, pkt.segs(), bytes, p.new_flow);
    Verdict::Local {
        backend_id: p.backend_id,
    }
}

/// What `pick` decided for a packet to a published port, before any
/// rewrite. (A struct with every field defined on every path, not an enum
/// with payloads: see the note in `pick`.)
#[derive(Clone, Copy)]
struct Pick {
    /// `PICK_*`.
    action: u8,
    /// For `PICK_DROP`.
    reason: DropReason,
    /// For `PICK_GO`: the backend's slot and value.
    backend_id: u32,
    be: Backend,
    /// A flow Maglev picked for (new, re-picked or picked up again).
    new_flow: bool,
    /// A TCP SYN (without ACK).
    syn: bool,
}

/// Not service traffic after all: to the kernel, untouched.
const PICK_PASS: u8 = 0;
const PICK_DROP: u8 = 1;
/// To backend `Pick::be`; its flow is tracked.
const PICK_GO: u8 = 2;

impl Pick {
    #[inline(always)]
    fn pass() -> Self {
        Self::drop(DropReason::Unused0, PICK_PASS)
    }

    #[inline(always)]
    fn drop(reason: DropReason, action: u8) -> Self {
        Pick {
            action,
            reason,
            backend_id: 0,
            be: Backend::default(),
            new_flow: false,
            syn: false,
        }
    }
}

/// The forward path's decision for a packet to published port `dport` of
/// service `svc`, the same whoever sent it: the flow's live conntrack
/// entry, or (for a packet that may start a flow) Maglev's pick, tracked.
/// Writes conntrack, never the packet. `avoid`, when not 0, is an address
/// a new flow must not go to (the address of a task calling its own
/// service: see [`other_backend`]).
#[inline(always)]
fn pick<T: Tables>(
    pkt: &Pkt,
    ip: &parse::Ip4,
    t: &T,
    svc: &SvcValue,
    sport: u16,
    dport: u16,
    avoid: u32,
) -> Pick {
    // A service with an allow list takes only its sources: others are
    // dropped here, before conntrack (no entry, however the flow began).
    // (Traffic to an address that is not this node's is not the
    // service's, allow list or not: it passes below.) The same for
    // every sender: clients through XDP, the node's processes and tasks.
    if svc.flags & SVC_F_SRC_RANGES != 0
        && t.is_node_addr4(ip.daddr)
        && !t.source_allowed(svc.svc_id, ip.saddr)
    {
        return Pick::drop(DropReason::SourceDenied, PICK_DROP);
    }
    let flow = FlowKey4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport_be: sport,
        dport_be: dport,
        proto: ip.proto,
        _pad0: 0,
        _pad1: 0,
    };
    // The flow's live entry for this service, confirmed or not. A tracked
    // flow was checked against the node addresses when it was created: the
    // established path skips that lookup.
    //
    // (Every value below is defined on every path, and no `Option` payload
    // crosses a join: LLVM leaves the payload of a `None` undefined, spills
    // it anyway, and the verifier refuses to read an uninitialized register.)
    let now = t.now();
    let lt = t.lifetimes();
    let live = |c: &CtValue| {
        c.svc_id == svc.svc_id && c.svc_gen == svc.gen_ && !c.expired(ip.proto, now, &lt)
    };
    let (entry, kind) = match t.ct_get(&flow) {
        Some(c) if live(&c) => (c, CT_CONFIRMED),
        _ => match t.ct_new_get(&flow) {
            Some(c) if live(&c) => (c, CT_UNCONFIRMED),
            _ => (CtValue::default(), CT_NONE),
        },
    };
    if kind == CT_NONE && !t.is_node_addr4(ip.daddr) {
        return Pick::pass();
    }
    if ip.first_fragment {
        return Pick::drop(DropReason::Fragment, PICK_DROP);
    }
    match parse::check_l4(pkt, ip) {
        Ok(()) => {}
        Err(L4Error::Truncated) => return Pick::drop(DropReason::L4Truncated, PICK_DROP),
        Err(L4Error::BadLength) => return Pick::drop(DropReason::L4BadLength, PICK_DROP),
    }
    let (flags, ack_seq): (u8, u32) = if ip.proto == IPPROTO_TCP {
        // Inside the header check_l4 validated.
        match pkt.view::<TCP_HLEN_MIN>(ip.l4_off) {
            Some(h) => (h.get(TCP_FLAGS), h.get(TCP_ACK_SEQ)),
            None => return Pick::drop(DropReason::L4Truncated, PICK_DROP),
        }
    } else {
        (0, 0)
    };
    let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // A tracked flow whose backend is still there keeps it, and its state
    // follows the packet; a new connection on a 4-tuple whose last one
    // closed (a client behind NAT reuses them) is judged as a new flow.
    let mut new_flow = true;
    let mut backend_id = entry.backend_id;
    let mut be = Backend::default();
    if kind != CT_NONE
        && !(syn && entry.state != CT_SYN)
        && let Some(b) = t.backend(entry.backend_id)
        && b.gen_ == entry.backend_gen
    {
        let mut state = next_state(ip.proto, entry.state, flags);
        if kind == CT_UNCONFIRMED && entry.state == CT_SYN && state == CT_OPEN {
            // Half-open until the client acknowledges the backend's
            // SYN-ACK (the reply path recorded what that takes): then a
            // real flow. A blind guess leaves it half-open.
            if entry.ack_be != 0 && flags & TCP_SYN == 0 && ack_seq == entry.ack_be {
                t.ct_confirm(
                    &flow,
                    &CtValue {
                        seen: now,
                        state,
                        ..entry
                    },
                );
                state = entry.state;
            } else {
                state = CT_SYN;
            }
        }
        if state != entry.state || entry.seen != now {
            t.ct_touch(&flow, kind == CT_CONFIRMED, now, state);
        }
        be = b;
        new_flow = false;
    }
    if new_flow {
        if ip.proto == IPPROTO_TCP && !syn {
            // Never the start of a flow: a SYN-ACK or a RST, or a segment
            // of a flow of the node's own.
            if flags & (TCP_SYN | TCP_RST) != 0 || (kind == CT_NONE && t.host_socket(&flow)) {
                return Pick::pass();
            }
        }
        // New, re-picked after its backend went, or picked up again after
        // its entry was lost: the client's task if its service has
        // affinity and this node remembers one it may still have, else
        // Maglev's pick. (Services without affinity pay this one flag
        // test.)
        let affinity = svc.flags & SVC_F_AFFINITY != 0;
        let aff_key = AffKey4 {
            svc_id: svc.svc_id,
            addr: ip.saddr,
        };
        let mut followed = false;
        if affinity
            && let Some(a) = t.aff_get(&aff_key)
            && a.svc_gen == svc.gen_
            && age(now, a.seen) <= t.affinity_timeout(svc.svc_id)
            && let Some(b) = t.backend(a.backend_id)
            && b.gen_ == a.backend_gen
            && b.flags & BE_F_NO_NEW == 0
            && !(avoid != 0 && b.flags & BE_F_LOCAL != 0 && b.addr[0] == avoid)
        {
            backend_id = a.backend_id;
            be = b;
            followed = true;
        }
        if !followed {
            match select_for(t, svc, &flow, avoid) {
                Ok((id, b)) => {
                    backend_id = id;
                    be = b;
                }
                Err(r) => return Pick::drop(r, PICK_DROP),
            }
        }
        // A task on a node the node map does not hold (yet): nothing to
        // track.
        if be.flags & BE_F_LOCAL == 0 && t.node(be.node_id).is_none() {
            return Pick::drop(DropReason::RemoteBackend, PICK_DROP);
        }
        if affinity {
            // The client keeps this task for the timeout past its last
            // new flow (kube-proxy's `recent --set` does the same).
            t.aff_put(
                &aff_key,
                &AffValue4 {
                    backend_id,
                    backend_gen: be.gen_,
                    svc_gen: svc.gen_,
                    seen: now,
                },
            );
            if followed {
                t.count(Counter::AffinityFollowed);
            }
        }
        // The flow's packets look in the confirmed table first: an entry
        // left there would send the rest of a new connection (or of a
        // re-picked flow) to the old pick.
        if kind == CT_CONFIRMED {
            t.ct_forget(&flow);
        }
        let (state, cflags) = if ip.proto != IPPROTO_TCP {
            (CT_OPEN, 0)
        } else if syn {
            (CT_SYN, 0)
        } else {
            (next_state(ip.proto, CT_OPEN, flags), CTF_RECOVERED)
        };
        {
            // One entry serves both directions: replies find it through
            // the backend's reply candidates (see `rev`), or come back
            // encapsulated from the backend's node.
            t.ct_new_put(
                &flow,
                &CtValue {
                    backend_id,
                    backend_gen: be.gen_,
                    svc_id: svc.svc_id,
                    svc_gen: svc.gen_,
                    seen: now,
                    ack_be: 0,
                    state,
                    flags: cflags,
                    _pad0: 0,
                    _pad1: 0,
                },
            );
        }
    }
    Pick {
        action: PICK_GO,
        reason: DropReason::Unused0,
        backend_id,
        be,
        new_flow,
        syn,
    }
}

/// An ICMP error about one of our replies (it quotes a datagram from a
/// node address and published port to a client): to the flow's task, with
/// the quote translated back, so the task's kernel finds its socket (path
/// MTU, unreachable client). Anything else is the node's own: `Pass`.
#[inline(always)]
fn icmp_to_task<T: Tables>(pkt: &Pkt, ip: &parse::Ip4, t: &T) -> Verdict {
    let Some(e) = parse::icmp_error(pkt, ip) else {
        return Verdict::Pass;
    };
    if e.saddr != ip.daddr {
        return Verdict::Pass;
    }
    // The client's flow: from the quoted destination to the quoted source.
    let flow = FlowKey4 {
        saddr: e.daddr,
        daddr: e.saddr,
        sport_be: e.dport_be,
        dport_be: e.sport_be,
        proto: e.proto,
        _pad0: 0,
        _pad1: 0,
    };
    let Some(ct) = t.ct_get(&flow).or_else(|| t.ct_new_get(&flow)) else {
        return Verdict::Pass;
    };
    let (backend_id, svc_id, gen_) = (ct.backend_id, ct.svc_id, ct.backend_gen);
    let Some(be) = t.backend(backend_id) else {
        return Verdict::Pass;
    };
    if be.gen_ != gen_ {
        return Verdict::Pass;
    }
    if be.flags & BE_F_LOCAL == 0 {
        return Verdict::Pass;
    }
    let (addr, port) = (be.addr[0], be.port_be);
    if icmp::rewrite(pkt, ip, &e, Quoted::Src, addr, port).is_none() {
        return Verdict::Drop(DropReason::L4Truncated);
    }
    t.account(svc_id, pkt.segs(), pkt.wire_len() as u64, false);
    Verdict::Local { backend_id }
}

/// A client's packet for a task on another node: DNAT to the task's
/// identity, the MSS of a SYN lowered to what fits once encapsulated, the
/// outer headers for the caller to write. A packet that would not fit is
/// answered with "fragmentation needed" instead.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward<T: Tables>(
    pkt: &Pkt,
    ip: &parse::Ip4,
    t: &T,
    svc: &SvcValue,
    be: &Backend,
    cfg: &NodeConfig,
    syn: bool,
    sport: u16,
    new_flow: bool,
) -> Verdict {
    let Some(node) = t.node(be.node_id) else {
        return Verdict::Drop(DropReason::RemoteBackend);
    };
    // What must fit is one packet on the wire: a socket buffer standing
    // for several segments (GSO) is cut into segments that each fit, once
    // encapsulation took its room from their payload.
    let len = ip.l3_end - ETH_HLEN;
    if pkt.gso_size() == 0 && !encap::fits(len, cfg.mtu) {
        return Verdict::TooBig {
            from: ip.daddr,
            mtu: (cfg.mtu as usize - crate::abi::ENCAP_LEN) as u16,
        };
    }
    let (orig_daddr, orig_dport) = (ip.daddr, pkt.load::<u16>(ip.l4_off + L4_DPORT).unwrap_or(0));
    // The MSS first: its checksum change rides on the DNAT's, the one
    // checksum update (the rewrite's last write).
    let mss = if syn {
        lower_mss(pkt, ip, encap::mss(cfg.mtu))
    } else {
        Delta::default()
    };
    let bytes = pkt.wire_len() as u64;
    if dnat(pkt, ip, be.addr[0], be.port_be, mss, t).is_none() {
        return Verdict::Drop(DropReason::L4Truncated);
    }
    if syn && !mss.is_empty() {
        t.count(Counter::MssClamped);
    }
    t.account(svc.svc_id, pkt.segs(), bytes, new_flow);
    t.count_n(Counter::Forwarded, pkt.segs());
    let flags = if svc.flags & SVC_F_REPLY_DIRECT != 0 {
        ENCAP_F_DIRECT
    } else {
        0
    };
    Verdict::Forward {
        outer: request_outer(ip, sport, orig_daddr, orig_dport, node.addr[0], cfg, flags),
        node: be.node_id,
    }
}

/// The outer headers that carry a client's packet (`ip`, from port
/// `sport`, sent to `orig_daddr`:`orig_dport`) to node `to`: the UDP
/// source port from the flow hash, as the replies' (see
/// `rev::reply_outer`).
#[inline(always)]
fn request_outer(
    ip: &parse::Ip4,
    sport: u16,
    orig_daddr: u32,
    orig_dport: u16,
    to: u32,
    cfg: &NodeConfig,
    flags: u8,
) -> Outer {
    Outer {
        saddr: cfg.self_addr,
        daddr: to,
        sport_be: encap::source_port(flow_hash4(ip.saddr, sport, orig_dport, ip.proto)),
        dport_be: cfg.encap_port_be,
        hdr: EncapHdr {
            version: ENCAP_VERSION,
            kind: ENCAP_K_REQUEST,
            flags,
            _pad0: 0,
            orig_daddr,
            orig_dport_be: orig_dport,
            _pad1: 0,
        },
    }
}

/// Where a flow that starts on this node starts, for [`node_origin`].
/// One of the node's own processes (its packets to its own addresses pass
/// the loopback device).
pub const ORIGIN_HOST: u8 = 1;
/// A task on this node (its packets enter from the task's side).
pub const ORIGIN_TASK: u8 = 2;

/// What to do with a packet of a flow that starts on this node. (A struct
/// with every field defined on every path, not an enum with payloads: see
/// the note in `pick`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `PLAN_*`.
    pub kind: u8,
    /// For `PLAN_DROP`.
    pub reason: DropReason,
    /// The packet's IPv4 header, as parsed.
    pub ip: parse::Ip4,
    /// The packet's destination port (the published port).
    pub dport_be: u16,
    /// The destination to write: the task's address (where this node
    /// delivers it, or its identity when it runs on another node) and
    /// target port.
    pub addr: u32,
    pub port_be: u16,
    /// A TCP SYN for a task on another node: the MSS it may carry at most
    /// once encapsulated (0: leave it).
    pub mss: u16,
    /// For `PLAN_FORWARD`: the outer headers that carry it there.
    pub outer: Outer,
    /// The backend's slot.
    pub backend_id: u32,
}

/// Not ours: on into the stack, untouched.
pub const PLAN_PASS: u8 = 0;
/// Dropped, counted under `Plan::reason`.
pub const PLAN_DROP: u8 = 1;
/// DNAT to the task on this node; route it there.
pub const PLAN_LOCAL: u8 = 2;
/// DNAT to the task on another node, lower a SYN's MSS, encapsulate,
/// route to that node.
pub const PLAN_FORWARD: u8 = 3;

impl Plan {
    #[inline(always)]
    fn nothing(kind: u8, reason: DropReason) -> Self {
        Plan {
            kind,
            reason,
            ip: parse::Ip4 {
                l4_off: 0,
                l3_end: 0,
                saddr: 0,
                daddr: 0,
                proto: 0,
                first_fragment: false,
                later_fragment: false,
            },
            dport_be: 0,
            addr: 0,
            port_be: 0,
            mss: 0,
            outer: Outer::NONE,
            backend_id: 0,
        }
    }
}

/// The forward path for a packet of a flow that starts on this node: one
/// of its own processes (`ORIGIN_HOST`) or one of its tasks
/// (`ORIGIN_TASK`) sending to a published port on one of this node's
/// addresses, as Docker's routing mesh lets them. The same service
/// lookup, conntrack and Maglev pick as a client's packet on the uplink
/// (`pick`), so such a flow goes where the same flow from outside
/// would; the source stays the caller's own (no SNAT). Decides only: the
/// TC programs rewrite with the skb helpers (the packets of local sockets
/// carry partial checksums), the host with [`rewrite_full`].
///
/// Differences from a client's packet: replies of such a flow always come
/// back through this node (never straight from the task's node, which
/// cannot route to this node's own addresses and tasks); a task's new
/// flow to its own service goes to another of its tasks (to itself it
/// would need SNAT); and a packet that is too big to encapsulate is
/// dropped (`TooBig`), not answered. `gso`: the packet is a GSO packet,
/// whose segments the MSS bounds (and the SYNs' MSS was lowered to fit).
#[inline(always)]
pub fn node_origin<T: Tables>(pkt: &Pkt, t: &T, origin: u8, gso: bool) -> Plan {
    let Some(ip) = parse::ipv4(pkt) else {
        return Plan::nothing(PLAN_PASS, DropReason::Unused0);
    };
    if ip.later_fragment {
        return Plan::nothing(PLAN_PASS, DropReason::Unused0);
    }
    let Some((sport, dport)) = parse::ports(pkt, &ip) else {
        return Plan::nothing(PLAN_PASS, DropReason::Unused0);
    };
    let key = SvcKey {
        port_be: dport,
        proto: ip.proto,
        _pad: 0,
    };
    let Some(svc) = t.service(&key) else {
        return Plan::nothing(PLAN_PASS, DropReason::Unused0);
    };
    let avoid = if origin == ORIGIN_TASK { ip.saddr } else { 0 };
    let p = pick(pkt, &ip, t, &svc, sport, dport, avoid);
    if p.action == PICK_PASS {
        return Plan::nothing(PLAN_PASS, DropReason::Unused0);
    }
    if p.action == PICK_DROP {
        return Plan::nothing(PLAN_DROP, p.reason);
    }
    let be = p.be;
    let mut plan = Plan {
        kind: PLAN_LOCAL,
        reason: DropReason::Unused0,
        ip,
        dport_be: dport,
        addr: be.addr[0],
        port_be: be.port_be,
        mss: 0,
        outer: Outer::NONE,
        backend_id: p.backend_id,
    };
    if be.flags & BE_F_LOCAL == 0 {
        let Some(node) = t.node(be.node_id) else {
            return Plan::nothing(PLAN_DROP, DropReason::RemoteBackend);
        };
        let cfg = t.config();
        if !gso && !encap::fits(ip.l3_end - ETH_HLEN, cfg.mtu) {
            return Plan::nothing(PLAN_DROP, DropReason::TooBig);
        }
        plan.kind = PLAN_FORWARD;
        if p.syn {
            plan.mss = encap::mss(cfg.mtu);
        }
        // Never ENCAP_F_DIRECT: the task's node cannot reach this node's
        // own addresses or its tasks but through it.
        plan.outer = request_outer(&ip, sport, ip.daddr, dport, node.addr[0], &cfg, 0);
        t.count_n(Counter::Forwarded, pkt.segs());
    }
    t.account(svc.svc_id, pkt.segs(), pkt.wire_len() as u64, p.new_flow);
    t.count(if origin == ORIGIN_TASK {
        Counter::TaskOrigin
    } else {
        Counter::HostOrigin
    });
    plan
}

/// Host-side rewrite of a planned packet with a complete checksum: what
/// the TC programs' skb helpers make of it (DNAT, a SYN's MSS lowered).
/// The encapsulation is the caller's.
pub fn rewrite_full<T: Tables>(pkt: &Pkt, plan: &Plan, t: &T) -> Option<()> {
    if plan.mss != 0 {
        clamp_mss(pkt, &plan.ip, plan.mss, t);
    }
    dnat(pkt, &plan.ip, plan.addr, plan.port_be, Delta::default(), t)
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) to `max` if it is
/// above, fixing the TCP checksum; says whether it did.
#[inline(always)]
pub fn clamp_mss<T: Tables>(pkt: &Pkt, ip: &parse::Ip4, max: u16, t: &T) -> bool {
    let d = lower_mss(pkt, ip, max);
    if d.is_empty() {
        return false;
    }
    if t.l4_csum(pkt, ip.l4_off + parse::TCP_CSUM, false, Delta::default(), d)
        .is_none()
    {
        return false;
    }
    t.count(Counter::MssClamped);
    true
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) to `max` if it is
/// above; returns the checksum change it owes (empty if it left it).
#[inline(always)]
fn lower_mss(pkt: &Pkt, ip: &parse::Ip4, max: u16) -> Delta {
    let (off, mss) = parse::tcp_mss(pkt, ip);
    if off == 0 || mss <= max {
        return Delta::default();
    }
    let (old, new) = (mss.to_be(), max.to_be());
    if pkt.store(off, new).is_none() {
        return Delta::default();
    }
    Delta::default().add16(old, new)
}

/// An encapsulated packet, stripped of its outer headers (`pkt`), by what
/// `info` says it carries: a client's request ([`decap_request`]) or a
/// task's reply on its way back ([`decap_reply`]).
#[inline(always)]
pub fn decap<T: Tables>(pkt: &Pkt, t: &T, info: &Encapsulated) -> Verdict {
    if info.hdr.kind == ENCAP_K_REQUEST {
        decap_request(pkt, t, info)
    } else {
        decap_reply(pkt, t)
    }
}

/// An encapsulated client packet, once stripped to its inner datagram:
/// for the local task its destination names (by identity: DNAT to where
/// this node delivers, when that differs). Its flow's ingress node and
/// the address and port the client used are kept for the task's replies;
/// a flow that now comes through another ingress node moves its replies
/// there. Never re-picked, never re-forwarded.
#[inline(always)]
pub fn decap_request<T: Tables>(pkt: &Pkt, t: &T, info: &Encapsulated) -> Verdict {
    let Some(ip) = parse::ipv4_any(pkt) else {
        return Verdict::Drop(DropReason::EncapMalformed);
    };
    if (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP)
        || ip.first_fragment
        || ip.later_fragment
    {
        return Verdict::Drop(DropReason::EncapMalformed);
    }
    let Some((sport, dport)) = parse::ports(pkt, &ip) else {
        return Verdict::Drop(DropReason::EncapMalformed);
    };
    if parse::check_l4(pkt, &ip).is_err() {
        return Verdict::Drop(DropReason::EncapMalformed);
    }
    let key = ReplyKey4 {
        addr: ip.daddr,
        port_be: dport,
        proto: ip.proto,
        _pad: 0,
    };
    let Some(slot) = t.local_backend(&key) else {
        return Verdict::Drop(DropReason::NotLocal);
    };
    let be = match t.backend(slot) {
        Some(b) if b.flags & BE_F_LOCAL != 0 => b,
        _ => return Verdict::Drop(DropReason::NotLocal),
    };
    if (be.addr[0] != ip.daddr || be.port_be != dport)
        && dnat(pkt, &ip, be.addr[0], be.port_be, Delta::default(), t).is_none()
    {
        return Verdict::Drop(DropReason::EncapMalformed);
    }
    let flow = FlowKey4 {
        saddr: ip.saddr,
        daddr: be.addr[0],
        sport_be: sport,
        dport_be: be.port_be,
        proto: ip.proto,
        _pad0: 0,
        _pad1: 0,
    };
    let now = t.now();
    let want = FwdValue {
        ingress: info.from,
        orig_daddr: info.hdr.orig_daddr,
        orig_dport_be: info.hdr.orig_dport_be,
        flags: info.hdr.flags,
        _pad0: 0,
        seen: now,
    };
    // The record names the flow's way back; its time only keeps it alive
    // (rewritten once a clock unit).
    let (known, way) = match t.fwd_get(&flow) {
        Some(v) => (v.seen == now, v.same_way(&want)),
        None => (false, false),
    };
    if !(known && way) {
        t.fwd_put(&flow, &want);
    }
    if !way {
        // The same client port may have reached the task through this
        // node's own address before (a UDP client that sends to several
        // nodes from one socket): the task sees one flow either way, and
        // its replies go the way of the newest request. Replies look for
        // a local flow first, so this node's one is forgotten (a request
        // through this node again makes it anew, to the same task).
        let local = FlowKey4 {
            daddr: t.config().self_addr,
            dport_be: info.hdr.orig_dport_be,
            sport_be: sport,
            ..flow
        };
        if local.daddr != 0 && local.daddr != info.hdr.orig_daddr {
            t.ct_forget(&local);
            t.ct_new_forget(&local);
        }
    }
    t.count_n(Counter::Decapsulated, pkt.segs());
    Verdict::Local { backend_id: slot }
}

/// An encapsulated reply, once stripped: a task on another node answered
/// a flow that came in through this node, and its node already gave it
/// the address and port the client sent to. Sent on to the client; its
/// answer confirms the flow here as a local task's would.
#[inline(always)]
pub fn decap_reply<T: Tables>(pkt: &Pkt, t: &T) -> Verdict {
    let Some(ip) = parse::ipv4_any(pkt) else {
        return Verdict::Drop(DropReason::EncapMalformed);
    };
    if (ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP) || ip.later_fragment {
        return Verdict::Drop(DropReason::EncapMalformed);
    }
    // Only as this node: never a relay for other sources.
    if !t.is_node_addr4(ip.saddr) {
        return Verdict::Drop(DropReason::EncapMalformed);
    }
    let Some((sport, dport)) = parse::ports(pkt, &ip) else {
        return Verdict::Drop(DropReason::EncapMalformed);
    };
    if parse::check_l4(pkt, &ip).is_err() {
        return Verdict::Drop(DropReason::EncapMalformed);
    }
    let flow = FlowKey4 {
        saddr: ip.daddr,
        daddr: ip.saddr,
        sport_be: dport,
        dport_be: sport,
        proto: ip.proto,
        _pad0: 0,
        _pad1: 0,
    };
    if let Some(ct) = t.ct_new_get(&flow) {
        let answer = crate::rev::answer_of(pkt, &ip);
        if answer.kind == crate::rev::Answer::SYN_ACK {
            t.ct_answered(&flow, answer.ack_be);
        } else if answer.kind == crate::rev::Answer::DATA
            && (ip.proto != IPPROTO_TCP || ct.flags & CTF_RECOVERED != 0)
        {
            t.ct_confirm(&flow, &ct);
        }
    }
    t.count_n(Counter::RepliesFromBackends, pkt.segs());
    if t.is_node_addr4(ip.daddr) {
        // A flow one of this node's own processes started.
        t.count(Counter::RepliesToHost);
        return Verdict::Host;
    }
    Verdict::Out {
        saddr: ip.saddr,
        daddr: ip.daddr,
    }
}

/// Where a flow's live entry is.
const CT_NONE: u8 = 0;
const CT_CONFIRMED: u8 = 1;
const CT_UNCONFIRMED: u8 = 2;

/// A TCP flow's state after a packet with `flags` from the client: a FIN
/// or a RST closes it, anything after the SYN opens it. UDP stays open.
#[inline(always)]
fn next_state(proto: u8, state: u8, flags: u8) -> u8 {
    if proto != IPPROTO_TCP {
        CT_OPEN
    } else if flags & (TCP_FIN | TCP_RST) != 0 {
        CT_CLOSING
    } else if state == CT_SYN && flags & TCP_SYN != 0 {
        CT_SYN
    } else if state == CT_CLOSING {
        CT_CLOSING
    } else {
        CT_OPEN
    }
}

/// Picks a backend for a flow from the service's Maglev table.
#[inline(always)]
pub fn select<T: Tables>(
    t: &T,
    svc: &SvcValue,
    flow: &FlowKey4,
) -> Result<(u32, Backend), DropReason> {
    if svc.table_size == 0 {
        return Err(DropReason::NoBackend);
    }
    let index = svc.table_off.wrapping_add(slot_of(svc, flow));
    let id = t.maglev(index).ok_or(DropReason::TableOutOfRange)?;
    let be = t.backend(id).ok_or(DropReason::BackendMissing)?;
    Ok((id, be))
}

/// A flow's entry in its service's table (which must not be empty). A
/// service with client affinity hashes the client's address alone: all
/// of a client's flows pick the same task, on every node, with no state
/// shared between nodes.
#[inline(always)]
fn slot_of(svc: &SvcValue, flow: &FlowKey4) -> u32 {
    let h = if svc.flags & SVC_F_AFFINITY != 0 {
        flow_hash4(flow.saddr, 0, 0, 0)
    } else {
        flow_hash4(flow.saddr, flow.sport_be, flow.dport_be, flow.proto)
    };
    h % svc.table_size
}

/// [`select`], for a flow that may come from a task of the service
/// itself (`avoid`, its address; 0 for none): such a flow goes to another
/// task. Handing a task its own packet back would need SNAT, and any
/// other task of the service serves it as well.
#[inline(always)]
pub fn select_for<T: Tables>(
    t: &T,
    svc: &SvcValue,
    flow: &FlowKey4,
    avoid: u32,
) -> Result<(u32, Backend), DropReason> {
    let (id, be) = select(t, svc, flow)?;
    if avoid == 0 || be.flags & BE_F_LOCAL == 0 || be.addr[0] != avoid {
        return Ok((id, be));
    }
    let other = other_backend(t, svc.table_off, svc.table_size, slot_of(svc, flow), avoid);
    if other == NO_BACKEND {
        return Err(DropReason::Hairpin);
    }
    let be = t.backend(other).ok_or(DropReason::BackendMissing)?;
    Ok((other, be))
}

/// Table entries `other_backend` tries: a Maglev table interleaves its
/// backends (each fills the entries its own permutation reaches first, in
/// turns), so with two or more tasks one of the next few is another.
pub const HAIRPIN_PROBES: u32 = 16;
const NO_BACKEND: u32 = u32::MAX;

/// The first backend after entry `start` of the table at `off` (`size`
/// entries) whose address is not `avoid`: its slot, or `NO_BACKEND` when
/// the next [`HAIRPIN_PROBES`] entries name none (a service whose only
/// task is the caller). Never inlined: in BPF a subprogram, so its loop's
/// states do not multiply with its caller's.
#[inline(never)]
fn other_backend<T: Tables>(t: &T, off: u32, size: u32, start: u32, avoid: u32) -> u32 {
    for k in 1..=HAIRPIN_PROBES {
        let Some(id) = t.maglev(off.wrapping_add((start + k) % size)) else {
            return NO_BACKEND;
        };
        if let Some(b) = t.backend(id)
            && !(b.flags & BE_F_LOCAL != 0 && b.addr[0] == avoid)
        {
            return id;
        }
    }
    NO_BACKEND
}

/// Rewrites the destination address and port, fixing the IPv4 header
/// checksum, then the TCP/UDP checksum for them and for `seg` (changes
/// made before, such as a lowered MSS) through [`Tables::l4_csum`]: the
/// last write.
#[inline(always)]
fn dnat<T: Tables>(
    pkt: &Pkt,
    ip: &parse::Ip4,
    addr: u32,
    port_be: u16,
    seg: Delta,
    t: &T,
) -> Option<()> {
    // Every bounds check before the first write: all or nothing. (The L4
    // header was validated against the datagram by `check_l4`.)
    let ip_hdr = pkt.view::<{ ETH_HLEN + IP_HLEN_MIN }>(0)?;
    let udp = ip.proto == IPPROTO_UDP;
    let csum_off = parse::l4_csum_off(ip);
    pkt.load::<u16>(csum_off)?;
    let ports = pkt.view::<4>(ip.l4_off)?;
    let old_port: u16 = ports.get(L4_DPORT);
    let ip_check: u16 = ip_hdr.get(ETH_HLEN + IP_CSUM);
    ip_hdr.set(ETH_HLEN + IP_DADDR, addr);
    ip_hdr.set(ETH_HLEN + IP_CSUM, csum::update32(ip_check, ip.daddr, addr));
    ports.set(L4_DPORT, port_be);
    t.l4_csum(
        pkt,
        csum_off,
        udp,
        Delta::default().add32(ip.daddr, addr),
        seg.add16(old_port, port_be),
    )
}
