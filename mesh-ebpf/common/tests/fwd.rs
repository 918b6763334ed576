//! The forward path (`fwd::process`) and the reply path (`rev::lookup` +
//! `rev::snat_full`) end to end, over the host maps (`testing::HostMaps`,
//! in the kernel maps' shapes): DNAT to the Maglev pick, replies SNATed
//! back to the published address, checksums checked by full
//! recomputation, conntrack stickiness and re-picks.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use mesh_common::abi::*;
use mesh_common::fwd::{self, Tables, Verdict};
use mesh_common::hash::flow_hash4;
use mesh_common::maglev;
use mesh_common::parse::ETH_HLEN;
use mesh_common::pkt::Pkt;
use mesh_common::rev;
use mesh_common::testing::frame::{Spec, TCP_ACK, UdpCsum, View};
use mesh_common::testing::{HostMaps, Rng, Sizes};

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const OTHER_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PUBLISHED: u16 = 8080;
const TARGET: u16 = 80;
const SVC_ID: u32 = 7;
/// The interface the tasks sit behind (their reply entries name none, so
/// any is trusted; `replies_from_another_port_are_refused` sets one).
const PORT: u32 = 5;
const M: u32 = 251;

fn raw(a: impl Into<Ipv4Addr>) -> u32 {
    u32::from_ne_bytes(a.into().octets())
}

/// Backend `i` of the test service: 198.18.1.i:80, on this node.
fn be_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, i as u8)
}

fn be_id(i: u32) -> u32 {
    100 + i
}

fn svc_key(proto: u8) -> SvcKey {
    SvcKey::new(PUBLISHED, proto)
}

/// The maps in the kernel's shapes, written as user space writes them.
struct World {
    maps: HostMaps,
}

impl World {
    fn new() -> Self {
        let mut maps = HostMaps::new(Sizes {
            max_services: SVC_ID + 1,
            max_backends: 256,
            reply_entries: 512,
            maglev_entries: 2 * (SVC_ID + 1) * M,
            max_nodes: 4,
        });
        maps.put_node_addr(raw(NODE)).unwrap();
        maps.put_node_addr(raw(OTHER_NODE_ADDR)).unwrap();
        World { maps }
    }

    fn add_backend(&mut self, i: u32, flags: u32) {
        let b = Backend {
            addr: [raw(be_addr(i)), 0, 0, 0],
            port_be: TARGET.to_be(),
            family: FAMILY_V4,
            flags,
            node_id: 0,
            ..Default::default()
        };
        self.maps.put_backend(be_id(i), b).unwrap();
    }

    fn update_backend(&mut self, id: u32, change: impl FnOnce(&mut Backend)) {
        let mut b = self.maps.backend_slot(id).unwrap();
        change(&mut b);
        self.maps.put_backend(id, b).unwrap();
    }

    /// The service the port points at now.
    fn service(&self, proto: u8) -> SvcValue {
        self.maps.service(&svc_key(proto)).expect("published")
    }

    /// Writes `value` into the service slot the port does not point at,
    /// then switches the port to it, like the planner; returns the slot.
    fn put_service(&mut self, proto: u8, value: SvcValue) -> u32 {
        let key = svc_key(proto);
        let slot = match self.maps.port(&key) {
            Some(s) if s == SVC_ID * 2 => SVC_ID * 2 + 1,
            _ => SVC_ID * 2,
        };
        self.maps.put_service(slot, value).unwrap();
        self.maps.switch_port(&key, slot).unwrap();
        slot
    }

    /// Writes the Maglev table over backends `idx` (by their real key
    /// format "addr:port") and (re)publishes the service, like the planner.
    fn publish(&mut self, proto: u8, idx: &[u32]) {
        let keys: Vec<String> = idx
            .iter()
            .map(|&i| format!("{}:{}", be_addr(i), TARGET))
            .collect();
        // Reply entries, as the planner writes them: both node addresses.
        for &i in idx {
            let mut v = ReplyValue4 {
                backend_id: be_id(i),
                count: 2,
                ..Default::default()
            };
            v.cands[0] = ReplyCand {
                addr: raw(NODE),
                port_be: PUBLISHED.to_be(),
                _pad: 0,
            };
            v.cands[1] = ReplyCand {
                addr: raw(OTHER_NODE_ADDR),
                port_be: PUBLISHED.to_be(),
                _pad: 0,
            };
            let key = ReplyKey4 {
                addr: raw(be_addr(i)),
                port_be: TARGET.to_be(),
                proto,
                _pad: 0,
            };
            self.maps.put_reply(key, v).unwrap();
        }
        // The table goes to the region of the slot the service moves to.
        let next = match self.maps.port(&svc_key(proto)) {
            Some(s) if s == SVC_ID * 2 => SVC_ID * 2 + 1,
            _ => SVC_ID * 2,
        };
        let table: Vec<u32> = maglev::table(&keys, M)
            .iter()
            .map(|&k| be_id(idx[k as usize]))
            .collect();
        self.maps.write_table(next * M, &table).unwrap();
        let size = if idx.is_empty() { 0 } else { M };
        let slot = self.put_service(
            proto,
            SvcValue {
                svc_id: SVC_ID,
                flags: 0,
                table_off: next * M,
                table_size: size,
                backend_count: idx.len() as u32,
                gen_: 1,
            },
        );
        assert_eq!(slot, next);
    }

    /// Points every entry of the service's table at one backend.
    fn fill_table(&mut self, proto: u8, id: u32) {
        let svc = self.service(proto);
        self.maps
            .write_table(svc.table_off, &vec![id; M as usize])
            .unwrap();
    }

    fn stats(&self) -> SvcStats {
        self.maps.stats(SVC_ID)
    }

    fn process(&self, frame: &mut [u8]) -> Verdict {
        fwd::process(&Pkt::from_slice(frame), &self.maps)
    }

    /// Backend `process` must pick for a new flow, from the table alone
    /// (independently of `fwd::select`).
    fn expected_pick(&self, client: impl Into<Ipv4Addr>, sport: u16, proto: u8) -> u32 {
        let svc = self.service(proto);
        let h = flow_hash4(raw(client), sport.to_be(), PUBLISHED.to_be(), proto);
        self.maps
            .maglev(svc.table_off + h % svc.table_size)
            .unwrap()
    }

    fn backend_of(&self, id: u32) -> (Ipv4Addr, u16) {
        let b = self.maps.backend_slot(id).unwrap();
        (
            Ipv4Addr::from(b.addr[0].to_ne_bytes()),
            u16::from_be(b.port_be),
        )
    }
}

fn world(proto: u8, n: u32) -> World {
    let mut w = World::new();
    for i in 1..=n {
        w.add_backend(i, BE_F_LOCAL);
    }
    let idx: Vec<u32> = (1..=n).collect();
    w.publish(proto, &idx);
    w
}

fn client_flow(spec: &Spec) -> FlowKey4 {
    FlowKey4 {
        saddr: raw(spec.saddr),
        daddr: raw(spec.daddr),
        sport_be: spec.sport.to_be(),
        dport_be: spec.dport.to_be(),
        proto: spec.proto,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Sends `spec` through the forward path; on `Local`, checks the frame is
/// exactly the client's frame with the destination replaced by the
/// backend (so every checksum equals a full recomputation).
fn forward(w: &World, spec: &Spec) -> Verdict {
    let mut f = spec.build();
    let before = f.clone();
    let v = w.process(&mut f);
    match v {
        Verdict::Local { backend_id } => {
            let (addr, port) = w.backend_of(backend_id);
            let mut want = spec.clone();
            want.daddr = addr;
            want.dport = port;
            assert_eq!(
                f,
                want.build(),
                "DNATed frame differs from a rebuilt one: {spec:?}"
            );
            let view = View(&f);
            assert!(view.ip_csum_valid());
            assert!(view.l4_csum_valid(spec.udp_csum == UdpCsum::None));
            if spec.udp_csum == UdpCsum::None {
                assert_eq!(view.l4_csum(), 0, "UDP without checksum stays without");
            }
        }
        _ => assert_eq!(f, before, "{v:?}: the frame must not be touched"),
    }
    v
}

/// The task's reply to `spec` (as the task sends it: from its own address
/// and port to the client), through the reply path; checks the client gets
/// a frame from the node address and published port, checksums exact.
fn reply(w: &World, spec: &Spec, backend_id: u32, rng: &mut Rng) {
    let (addr, port) = w.backend_of(backend_id);
    let mut r = spec.clone();
    r.saddr = addr;
    r.sport = port;
    r.daddr = spec.saddr;
    r.dport = spec.sport;
    let plen = rng.range(0, 300);
    r.payload = rng.bytes(plen);
    r.tcp_opts = Vec::new();
    r.ip_opts = Vec::new();
    let mut f = r.build();

    let pkt = Pkt::from_slice(&mut f);
    let rep = rev::lookup(&pkt, &w.maps, PORT)
        .expect("from the task's own port")
        .expect("reply of a tracked flow is found");
    assert_eq!(rep.addr, raw(spec.daddr));
    assert_eq!(rep.port_be, PUBLISHED.to_be());
    assert_eq!(rep.sport_be, port.to_be());
    rev::snat_full(&pkt, &rep).expect("rewrite fits");

    let mut want = r.clone();
    want.saddr = spec.daddr;
    want.sport = PUBLISHED;
    assert_eq!(f, want.build(), "SNATed reply differs from a rebuilt one");
    let view = View(&f);
    assert_eq!(view.saddr(), spec.daddr);
    assert_eq!(view.sport(), PUBLISHED);
    assert!(view.ip_csum_valid());
    assert!(view.l4_csum_valid(r.udp_csum == UdpCsum::None));
}

/// One TCP flow, step by step.
#[test]
fn tcp_flow_dnat_then_reply_snat() {
    let w = world(IPPROTO_TCP, 5);
    let mut rng = Rng::new(1);
    let spec = Spec::tcp([198, 19, 113, 5], 40000, NODE, PUBLISHED, TCP_ACK)
        .payload(b"GET / HTTP/1.1\r\n\r\n".to_vec());
    let want = w.expected_pick(spec.saddr, spec.sport, IPPROTO_TCP);
    let len = spec.build().len() as u64;

    assert_eq!(forward(&w, &spec), Verdict::Local { backend_id: want });
    assert_eq!(
        w.stats(),
        SvcStats {
            packets: 1,
            bytes: len,
            new_flows: 1
        }
    );

    // Conntrack: an ACK without an entry (and no socket of the node's own
    // for it) is a flow whose entry was lost: picked up again, unconfirmed.
    let (ct, confirmed) = w.maps.ct_any(&client_flow(&spec)).unwrap();
    assert_eq!(
        ct,
        CtValue {
            backend_id: want,
            backend_gen: 0,
            svc_id: SVC_ID,
            svc_gen: 1,
            seen: w.maps.now(),
            ack_be: 0,
            state: CT_OPEN,
            flags: CTF_RECOVERED,
            _pad0: 0,
            _pad1: 0,
        }
    );
    assert!(!confirmed);
    // One entry per flow: the reply path finds it through the backend's
    // reply candidates.
    assert_eq!(w.maps.ct().len() + w.maps.ct_new().len(), 1);
    let (baddr, _) = w.backend_of(want);

    // Next packet: same backend, not a new flow.
    assert_eq!(forward(&w, &spec), Verdict::Local { backend_id: want });
    assert_eq!(
        w.stats(),
        SvcStats {
            packets: 2,
            bytes: 2 * len,
            new_flows: 1
        }
    );

    reply(&w, &spec, want, &mut rng);
    // The backend answered: the flow is confirmed.
    assert!(w.maps.ct_any(&client_flow(&spec)).unwrap().1);

    // A reply that is not of a tracked flow is not ours.
    for (sport, dport) in [(TARGET, 40001), (TARGET + 1, 40000)] {
        let mut f = Spec::tcp(baddr, sport, spec.saddr, dport, TCP_ACK).build();
        assert_eq!(
            rev::lookup(&Pkt::from_slice(&mut f), &w.maps, PORT),
            Ok(None)
        );
    }
    // Nor is a tracked flow's reply with a broken L4 header.
    let mut f = Spec::tcp(baddr, TARGET, spec.saddr, spec.sport, TCP_ACK).build();
    f[ETH_HLEN + 20 + 12] = 4 << 4;
    assert_eq!(
        rev::lookup(&Pkt::from_slice(&mut f), &w.maps, PORT),
        Ok(None)
    );
}

/// Many random flows, TCP and UDP, payloads of every parity, IP and TCP
/// options, UDP with and without checksum, Ethernet padding, both node
/// addresses: each is DNATed to the Maglev pick and its reply SNATed back.
#[test]
fn random_flows_round_trip() {
    let mut rng = Rng::new(2);
    for proto in [IPPROTO_TCP, IPPROTO_UDP] {
        let w = world(proto, 7);
        let mut picked = HashSet::new();
        let mut padded = 0;
        for i in 0..2000 {
            let mut spec = Spec::random(&mut rng);
            spec.proto = proto;
            if proto == IPPROTO_TCP {
                spec.udp_csum = UdpCsum::Computed;
            } else {
                spec.tcp_opts.clear();
            }
            spec.daddr = if i % 3 == 0 { OTHER_NODE_ADDR } else { NODE };
            spec.dport = PUBLISHED;
            if i % 4 == 0 {
                spec.payload.truncate(rng.range(0, 9));
                spec.ip_opts.clear();
                spec.tcp_opts.clear();
            }
            // Short frames come padded to the Ethernet minimum.
            let len = spec.build().len();
            if len < 60 {
                spec.pad = 60 - len;
                padded += 1;
            }
            let want = w.expected_pick(spec.saddr, spec.sport, proto);
            assert_eq!(
                forward(&w, &spec),
                Verdict::Local { backend_id: want },
                "{spec:?}"
            );
            picked.insert(want);
            reply(&w, &spec, want, &mut rng);
        }
        assert_eq!(picked.len(), 7, "every backend gets flows");
        assert!(padded > 100, "{padded} padded frames");
        assert_eq!(w.stats().new_flows, 2000);
    }
}

/// The conntrack entry keeps an established flow on its backend when the
/// Maglev table changes; new flows follow the new table.
#[test]
fn conntrack_pins_flow_across_table_change() {
    let mut w = world(IPPROTO_TCP, 5);
    let mut rng = Rng::new(3);
    let spec = Spec::tcp([198, 19, 113, 9], 50000, NODE, PUBLISHED, TCP_ACK).payload(vec![1; 33]);
    let Verdict::Local { backend_id: first } = forward(&w, &spec) else {
        panic!()
    };

    // Another backend takes over the whole table.
    let other = (1..=5).map(be_id).find(|&id| id != first).unwrap();
    w.fill_table(IPPROTO_TCP, other);
    assert_eq!(w.expected_pick(spec.saddr, spec.sport, IPPROTO_TCP), other);
    let svc = w.service(IPPROTO_TCP);
    assert_eq!(
        fwd::select(&w.maps, &svc, &client_flow(&spec)).unwrap().0,
        other
    );

    for _ in 0..3 {
        assert_eq!(forward(&w, &spec), Verdict::Local { backend_id: first });
    }
    assert_eq!(w.stats().new_flows, 1);
    reply(&w, &spec, first, &mut rng);

    // A new flow goes by the new table.
    let fresh = Spec::tcp([198, 19, 113, 9], 50001, NODE, PUBLISHED, TCP_ACK);
    assert_eq!(forward(&w, &fresh), Verdict::Local { backend_id: other });
    assert_eq!(w.stats().new_flows, 2);

    // Also with a real Maglev rebuild over a different set: flows whose
    // pick changed stay where they were.
    let mut w = world(IPPROTO_TCP, 5);
    let specs: Vec<Spec> = (0..300)
        .map(|i| {
            Spec::tcp(
                [203, 0, 114, (i % 250) as u8],
                20000 + i,
                NODE,
                PUBLISHED,
                TCP_ACK,
            )
        })
        .collect();
    let before: Vec<u32> = specs
        .iter()
        .map(|s| match forward(&w, s) {
            Verdict::Local { backend_id } => backend_id,
            v => panic!("{v:?}"),
        })
        .collect();
    w.add_backend(6, BE_F_LOCAL);
    w.publish(IPPROTO_TCP, &[1, 2, 3, 4, 5, 6]);
    let mut would_move = 0;
    for (s, &b) in specs.iter().zip(&before) {
        if w.expected_pick(s.saddr, s.sport, IPPROTO_TCP) != b {
            would_move += 1;
        }
        assert_eq!(forward(&w, s), Verdict::Local { backend_id: b });
    }
    assert!(
        would_move > 20,
        "the rebuild must move some picks ({would_move})"
    );
    assert_eq!(w.stats().new_flows, 300);
}

/// A flow whose backend leaves the backend table is re-picked from the
/// (rebuilt) Maglev table, counted as a new flow, and its conntrack and
/// reverse entries now name the new backend. While the table still names
/// the missing backend the packet is dropped (`BackendMissing`).
#[test]
fn removed_backend_flow_is_repicked() {
    let mut w = world(IPPROTO_UDP, 4);
    let mut rng = Rng::new(4);
    let spec = Spec::udp([198, 19, 113, 77], 33333, NODE, PUBLISHED, &[]).payload(vec![2; 21]);
    let Verdict::Local { backend_id: old } = forward(&w, &spec) else {
        panic!()
    };
    assert_eq!(w.stats().new_flows, 1);
    let old_i = old - 100;

    // The backend goes away before the table is rewritten.
    w.maps.del_backend(old).unwrap();
    assert_eq!(
        forward(&w, &spec),
        Verdict::Drop(DropReason::BackendMissing)
    );
    assert_eq!(w.stats().packets, 1, "a dropped packet is not accounted");

    // The planner rebuilds the table over the survivors.
    let rest: Vec<u32> = (1..=4).filter(|&i| i != old_i).collect();
    w.publish(IPPROTO_UDP, &rest);
    let new = w.expected_pick(spec.saddr, spec.sport, IPPROTO_UDP);
    assert_ne!(new, old);
    assert_eq!(forward(&w, &spec), Verdict::Local { backend_id: new });
    assert_eq!(w.stats().new_flows, 2, "the re-pick counts as a new flow");
    assert_eq!(w.stats().packets, 2);
    assert_eq!(
        w.maps.ct_any(&client_flow(&spec)).unwrap().0.backend_id,
        new
    );
    reply(&w, &spec, new, &mut rng);

    // And it sticks there.
    assert_eq!(forward(&w, &spec), Verdict::Local { backend_id: new });
    assert_eq!(w.stats().new_flows, 2);
}

/// A tracked flow was checked against the node addresses when it was
/// created: its later packets skip that lookup, and keep flowing if the
/// address is withdrawn from the node, while new flows to it pass.
#[test]
fn established_flow_skips_node_address_lookup() {
    let mut w = world(IPPROTO_TCP, 3);
    let mut rng = Rng::new(5);
    let spec = Spec::tcp([198, 19, 113, 50], 45000, NODE, PUBLISHED, TCP_ACK).payload(vec![3; 10]);
    let Verdict::Local { backend_id } = forward(&w, &spec) else {
        panic!()
    };
    assert_eq!(
        w.maps.node_addr_lookups(),
        1,
        "a new flow checks the address"
    );
    assert_eq!(forward(&w, &spec), Verdict::Local { backend_id });
    assert_eq!(
        w.maps.node_addr_lookups(),
        1,
        "an established flow does not"
    );

    w.maps.del_node_addr(raw(NODE));
    assert_eq!(forward(&w, &spec), Verdict::Local { backend_id });
    reply(&w, &spec, backend_id, &mut rng);
    let fresh = Spec::tcp([198, 19, 113, 50], 45001, NODE, PUBLISHED, TCP_ACK);
    assert_eq!(forward(&w, &fresh), Verdict::Pass);
    assert_eq!(w.stats().new_flows, 1);

    // Established flows still get their L4 header checked.
    let mut f = spec.build();
    f[ETH_HLEN + 20 + 12] = 2 << 4;
    assert_eq!(w.process(&mut f), Verdict::Drop(DropReason::L4BadLength));
}

/// What the forward path leaves alone or drops, and that it writes
/// nothing in those cases (checked in `forward`).
#[test]
fn verdicts_for_other_traffic() {
    let mut w = world(IPPROTO_TCP, 3);
    let client = [198, 19, 113, 1];
    // Another port, another protocol on the published port, another
    // destination address.
    assert_eq!(
        forward(&w, &Spec::tcp(client, 1, NODE, PUBLISHED + 1, TCP_ACK)),
        Verdict::Pass
    );
    assert_eq!(
        forward(&w, &Spec::udp(client, 1, NODE, PUBLISHED, &[])),
        Verdict::Pass
    );
    assert_eq!(
        forward(
            &w,
            &Spec::tcp(client, 1, [198, 18, 0, 3], PUBLISHED, TCP_ACK)
        ),
        Verdict::Pass
    );

    // Fragments to the service: the first is dropped, later ones pass.
    let mut s = Spec::tcp(client, 1, NODE, PUBLISHED, TCP_ACK).payload(vec![0; 16]);
    s.frag = 0x2000;
    assert_eq!(forward(&w, &s), Verdict::Drop(DropReason::Fragment));
    s.frag = 0x0003;
    assert_eq!(forward(&w, &s), Verdict::Pass);

    // Broken TCP header to the service.
    let mut f = Spec::tcp(client, 1, NODE, PUBLISHED, TCP_ACK).build();
    f[ETH_HLEN + 20 + 12] = 3 << 4;
    assert_eq!(w.process(&mut f), Verdict::Drop(DropReason::L4BadLength));
    let mut f = Spec::tcp(client, 1, NODE, PUBLISHED, TCP_ACK).build();
    f[ETH_HLEN + 20 + 12] = 6 << 4;
    assert_eq!(w.process(&mut f), Verdict::Drop(DropReason::L4Truncated));

    // A service whose backend is remote.
    let spec = Spec::tcp(client, 2, NODE, PUBLISHED, TCP_ACK);
    let id = w.expected_pick(client, 2, IPPROTO_TCP);
    w.update_backend(id, |b| b.flags = BE_F_REMOTE);
    assert_eq!(forward(&w, &spec), Verdict::Drop(DropReason::RemoteBackend));

    // A table pointing outside the Maglev map.
    let svc = SvcValue {
        table_off: 1_000_000,
        ..w.service(IPPROTO_TCP)
    };
    w.put_service(IPPROTO_TCP, svc);
    assert_eq!(
        forward(&w, &Spec::tcp(client, 3, NODE, PUBLISHED, TCP_ACK)),
        Verdict::Drop(DropReason::TableOutOfRange)
    );

    // No backend at all.
    w.publish(IPPROTO_TCP, &[]);
    assert_eq!(
        forward(&w, &Spec::tcp(client, 4, NODE, PUBLISHED, TCP_ACK)),
        Verdict::Drop(DropReason::NoBackend)
    );
    assert_eq!(w.stats().packets, 0);
    assert!(w.maps.ct().is_empty() && w.maps.ct_new().is_empty());
}

/// The acknowledgment number of the frame builder's ACK segments: a
/// SYN-ACK with sequence `CLIENT_ACKS - 1` is the one they acknowledge.
const CLIENT_ACKS: u32 = 0x0a0b_0c0d;

/// The task's reply to `spec` with TCP `flags` (a SYN-ACK with sequence
/// `CLIENT_ACKS - 1`), through the reply path only (what `rev::lookup`
/// says of it).
fn task_answers(w: &World, spec: &Spec, backend_id: u32, flags: u8) -> Option<rev::Reply> {
    let (addr, port) = w.backend_of(backend_id);
    let mut f = Spec {
        seq: CLIENT_ACKS - 1,
        ..Spec::tcp(addr, port, spec.saddr, spec.sport, flags)
    }
    .build();
    rev::lookup(&Pkt::from_slice(&mut f), &w.maps, PORT).unwrap()
}

/// A whole handshake: the client's SYN, the task's SYN-ACK, the client's
/// ACK of it. Returns the task.
fn handshake(w: &World, syn: &Spec) -> u32 {
    use mesh_common::testing::frame::TCP_SYN;
    let Verdict::Local { backend_id } = forward(w, syn) else {
        panic!("{syn:?}")
    };
    task_answers(w, syn, backend_id, TCP_SYN | TCP_ACK).expect("a tracked flow");
    let ack = Spec {
        tcp_flags: TCP_ACK,
        ..syn.clone()
    };
    assert_eq!(forward(w, &ack), Verdict::Local { backend_id });
    backend_id
}

/// Defect 1: a conntrack entry was trusted whenever its backend slot and
/// generation still matched; the service was never compared. A port that
/// passes to another service (a new generation in its service entry)
/// takes the old service's flows with it to the new service's tasks.
#[test]
fn a_port_that_passes_to_another_service_keeps_none_of_its_flows() {
    use mesh_common::testing::frame::TCP_SYN;
    let mut w = world(IPPROTO_TCP, 4);
    let spec = Spec::tcp([198, 19, 113, 30], 41000, NODE, PUBLISHED, TCP_SYN);
    let old = handshake(&w, &spec);
    // The port now belongs to another service, whose table names other
    // backends; the old service's backends still exist (it moved ports).
    let others: Vec<u32> = (1..=4).filter(|&i| be_id(i) != old).collect();
    w.publish(IPPROTO_TCP, &others);
    let svc = SvcValue {
        gen_: 2,
        ..w.service(IPPROTO_TCP)
    };
    w.put_service(IPPROTO_TCP, svc);
    let ack = Spec {
        tcp_flags: TCP_ACK,
        ..spec.clone()
    };
    let Verdict::Local { backend_id: now } = forward(&w, &ack) else {
        panic!()
    };
    assert_ne!(now, old, "the old service's flow left the port with it");
    assert_eq!(now, w.expected_pick(spec.saddr, spec.sport, IPPROTO_TCP));
    assert_eq!(w.stats().new_flows, 2);
}

/// Defect 3: the node's own connection whose local port is a published
/// port had its SYN-ACK taken for a new mesh flow. A SYN-ACK or a RST
/// never starts a flow, a segment of a socket of the node's is the node's,
/// and any other segment without an entry is a flow picked up again.
#[test]
fn tcp_segments_that_cannot_start_a_flow_are_the_nodes() {
    use mesh_common::testing::frame::{TCP_FIN, TCP_RST, TCP_SYN};
    let mut w = world(IPPROTO_TCP, 3);
    let remote = [198, 19, 113, 40];
    for flags in [TCP_SYN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK] {
        let s = Spec::tcp(remote, 443, NODE, PUBLISHED, flags);
        assert_eq!(forward(&w, &s), Verdict::Pass, "flags {flags:#x}");
    }
    // The node's own connection (local port = the published port).
    let own = Spec::tcp(remote, 443, NODE, PUBLISHED, TCP_ACK).payload(vec![7; 5]);
    w.maps.add_host_socket(client_flow(&own));
    assert_eq!(forward(&w, &own), Verdict::Pass);
    let fin = Spec {
        tcp_flags: TCP_FIN | TCP_ACK,
        ..own.clone()
    };
    assert_eq!(forward(&w, &fin), Verdict::Pass);
    assert!(w.maps.ct().is_empty() && w.maps.ct_new().is_empty());
    assert_eq!(w.stats().packets, 0);
    // The same segment on another 4-tuple, no socket: a lost flow, picked
    // up again (to the task Maglev names, as before the loss).
    let lost = Spec::tcp(remote, 444, NODE, PUBLISHED, TCP_ACK).payload(vec![7; 5]);
    let want = w.expected_pick(remote, 444, IPPROTO_TCP);
    assert_eq!(forward(&w, &lost), Verdict::Local { backend_id: want });
    let (ct, confirmed) = w.maps.ct_any(&client_flow(&lost)).unwrap();
    assert!(!confirmed && ct.flags == CTF_RECOVERED && ct.state == CT_OPEN);
}

/// A TCP flow is confirmed only when the client's ACK acknowledges the
/// backend's SYN-ACK: a spoofed source never sees that SYN-ACK, so a SYN
/// flood (which the backend answers) stays out of the confirmed table. A
/// reset confirms nothing.
#[test]
fn a_tcp_flow_is_confirmed_by_the_acknowledged_handshake() {
    use mesh_common::testing::frame::{TCP_RST, TCP_SYN};
    let w = world(IPPROTO_TCP, 3);
    let syn = Spec::tcp([198, 19, 113, 41], 41001, NODE, PUBLISHED, TCP_SYN);
    let Verdict::Local { backend_id } = forward(&w, &syn) else {
        panic!()
    };
    let key = client_flow(&syn);
    let unconfirmed = || !w.maps.ct_any(&key).unwrap().1;
    assert_eq!(w.maps.ct_any(&key).unwrap().0.state, CT_SYN);
    assert!(task_answers(&w, &syn, backend_id, TCP_RST | TCP_ACK).is_some());
    assert!(unconfirmed(), "a reset confirms nothing");
    assert!(task_answers(&w, &syn, backend_id, TCP_SYN | TCP_ACK).is_some());
    assert!(unconfirmed(), "a SYN-ACK alone confirms nothing");
    assert_eq!(w.maps.ct_any(&key).unwrap().0.ack_be, CLIENT_ACKS.to_be());
    // An ACK that does not acknowledge it (a blind spoofer's guess).
    let mut guess = Spec {
        tcp_flags: TCP_ACK,
        ..syn.clone()
    }
    .build();
    guess[ETH_HLEN + 20 + 8] ^= 0x40;
    assert_eq!(w.process(&mut guess), Verdict::Local { backend_id });
    assert!(unconfirmed(), "a wrong acknowledgment confirms nothing");
    // The client's real ACK.
    let ack = Spec {
        tcp_flags: TCP_ACK,
        ..syn.clone()
    };
    assert_eq!(forward(&w, &ack), Verdict::Local { backend_id });
    let (ct, confirmed) = w.maps.ct_any(&key).unwrap();
    assert!(confirmed && ct.state == CT_OPEN);
    assert!(w.maps.ct_new().is_empty(), "moved, not copied");
    assert_eq!(w.stats().new_flows, 1);
}

/// A UDP flow is confirmed when its backend answers, into a table of its
/// own: a flood a UDP service answers cannot displace TCP flows.
#[test]
fn udp_flows_are_confirmed_by_an_answer_in_their_own_table() {
    let w = world(IPPROTO_UDP, 2);
    let mut rng = Rng::new(11);
    let s = Spec::udp([198, 19, 113, 45], 45000, NODE, PUBLISHED, b"q");
    let Verdict::Local { backend_id } = forward(&w, &s) else {
        panic!()
    };
    assert!(!w.maps.ct_any(&client_flow(&s)).unwrap().1);
    reply(&w, &s, backend_id, &mut rng);
    assert!(w.maps.ct_udp().contains_key(&client_flow(&s)));
    assert!(w.maps.ct().is_empty() && w.maps.ct_new().is_empty());
}

/// Entries live for their state's lifetime past the flow's last packet;
/// an expired entry is no entry (the flow is picked again, which a new
/// table may send elsewhere).
#[test]
fn conntrack_entries_expire_by_state() {
    use mesh_common::testing::frame::{TCP_FIN, TCP_SYN};
    let w = world(IPPROTO_TCP, 3);
    let lt = DEFAULT_CT_LIFETIME_SECS;
    let flow = |sport: u16, flags: u8| Spec::tcp([198, 19, 113, 42], sport, NODE, PUBLISHED, flags);
    let tracked = |s: &Spec| w.maps.ct_any(&client_flow(s)).is_some();
    let new_flows = || w.stats().new_flows;

    // Half-open: a SYN, then silence past the SYN lifetime.
    let syn = flow(42001, TCP_SYN);
    forward(&w, &syn);
    w.maps.advance(lt[0] - 2);
    forward(&w, &syn); // a retransmitted SYN refreshes it
    assert_eq!(new_flows(), 1);
    w.maps.advance(lt[0] + 2);
    forward(&w, &flow(42001, TCP_ACK));
    assert_eq!(new_flows(), 2, "expired: judged as a lost flow");
    assert!(tracked(&syn));

    // Open: lives its long lifetime, refreshed by traffic.
    let open = flow(42002, TCP_ACK);
    let Verdict::Local { backend_id } = forward(&w, &open) else {
        panic!()
    };
    task_answers(&w, &open, backend_id, TCP_ACK).unwrap();
    for _ in 0..3 {
        w.maps.advance(lt[1] - 60);
        forward(&w, &open);
    }
    assert_eq!(new_flows(), 3, "kept alive by its packets");
    w.maps.advance(lt[1] + 60);
    forward(&w, &open);
    assert_eq!(new_flows(), 4, "idle past its lifetime: expired");

    // Closing: short, once the client sent a FIN.
    // (The expired entry stays in the confirmed table, ignored, until the
    // LRU reclaims it; the flow's live entry is the unconfirmed one.)
    let fin = flow(42002, TCP_FIN | TCP_ACK);
    forward(&w, &fin);
    assert_eq!(w.maps.ct_new()[&client_flow(&fin)].state, CT_CLOSING);
    w.maps.advance(lt[2] + 2);
    forward(&w, &open);
    assert_eq!(new_flows(), 5);

    // A new connection on a 4-tuple whose last one closed is a new flow.
    forward(&w, &flow(42002, TCP_FIN | TCP_ACK));
    forward(&w, &flow(42002, TCP_SYN));
    assert_eq!(new_flows(), 6);
    assert_eq!(w.maps.ct_any(&client_flow(&syn)).unwrap().0.state, CT_OPEN);
}

/// UDP lives its lifetime past the client's last datagram.
#[test]
fn udp_entries_expire() {
    let w = world(IPPROTO_UDP, 3);
    let s = Spec::udp([198, 19, 113, 43], 43000, NODE, PUBLISHED, b"q");
    forward(&w, &s);
    w.maps.advance(DEFAULT_CT_LIFETIME_SECS[3] - 2);
    forward(&w, &s);
    assert_eq!(w.stats().new_flows, 1);
    w.maps.advance(DEFAULT_CT_LIFETIME_SECS[3] + 2);
    forward(&w, &s);
    assert_eq!(w.stats().new_flows, 2);
}

/// New flows land in the unconfirmed table, whatever their number: a flood
/// never displaces a confirmed flow.
#[test]
fn a_flood_of_new_flows_stays_out_of_the_confirmed_table() {
    use mesh_common::testing::frame::{TCP_RST, TCP_SYN};
    let w = world(IPPROTO_TCP, 4);
    let mut established = Vec::new();
    for i in 0..50u16 {
        let s = Spec::tcp([198, 19, 114, 1], 10000 + i, NODE, PUBLISHED, TCP_SYN);
        handshake(&w, &s);
        established.push(client_flow(&s));
    }
    // Spoofed SYNs (the backend answers each) and blind ACKs (it resets).
    let mut rng = Rng::new(9);
    for _ in 0..5000 {
        let syn = rng.bool();
        let s = Spec::tcp(
            rng.addr(),
            rng.next_u16() | 1,
            NODE,
            PUBLISHED,
            if syn { TCP_SYN } else { TCP_ACK },
        );
        if let Verdict::Local { backend_id } = forward(&w, &s) {
            let answer = if syn { TCP_SYN | TCP_ACK } else { TCP_RST };
            task_answers(&w, &s, backend_id, answer);
        }
    }
    assert_eq!(w.maps.ct().len(), 50);
    assert!(established.iter().all(|k| w.maps.ct().contains_key(k)));
    assert!(w.maps.ct_new().len() > 4000);
}

/// Defect 8: a packet from a task's port claiming the address of a task
/// behind another port is refused, before any lookup of its flow.
#[test]
fn replies_from_another_port_are_refused() {
    let mut w = world(IPPROTO_TCP, 2);
    let spec = Spec::tcp([198, 19, 113, 44], 44000, NODE, PUBLISHED, TCP_ACK);
    let Verdict::Local { backend_id } = forward(&w, &spec) else {
        panic!()
    };
    let (addr, port) = w.backend_of(backend_id);
    let key = ReplyKey4 {
        addr: raw(addr),
        port_be: port.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    let mut v = w.maps.reply(&key).unwrap();
    v.ifindex = PORT;
    w.maps.put_reply(key, v).unwrap();
    let mut f = Spec::tcp(addr, port, spec.saddr, spec.sport, TCP_ACK).build();
    assert_eq!(
        rev::lookup(&Pkt::from_slice(&mut f), &w.maps, PORT + 1),
        Err(DropReason::SpoofedReply)
    );
    assert!(
        rev::lookup(&Pkt::from_slice(&mut f), &w.maps, PORT)
            .unwrap()
            .is_some()
    );
}

/// The intercept's early exit (`fwd::may_be_mesh`, read from the bytes
/// directly readable alone): whatever it lets go, the whole path would
/// have passed untouched; what the mesh serves it never lets go.
#[test]
fn what_may_be_mesh_lets_go_the_forward_path_passes() {
    use mesh_common::testing::frame::{EncapSpec, IcmpErrSpec};
    let mut w = world(IPPROTO_TCP, 3);
    w.add_backend(9, BE_F_LOCAL);
    w.publish(IPPROTO_UDP, &[9]);
    let may = |f: &mut [u8]| fwd::may_be_mesh(&Pkt::from_slice(f), &w.maps);
    let client = [198, 19, 113, 1];

    // What it keeps: the published ports, the encapsulation port, ICMP.
    let kept = [
        Spec::tcp(client, 1, NODE, PUBLISHED, TCP_ACK).build(),
        Spec::udp(client, 1, NODE, PUBLISHED, b"q").build(),
        Spec::tcp(client, 1, [198, 18, 0, 3], PUBLISHED, TCP_ACK).build(),
        EncapSpec {
            from: OTHER_NODE_ADDR,
            to: NODE,
            sport: 0xc123,
            dport: DEFAULT_ENCAP_PORT,
            version: ENCAP_VERSION,
            kind: ENCAP_K_REQUEST,
            flags: 0,
            orig: (NODE, PUBLISHED),
        }
        .build(&Spec::tcp(client, 1, be_addr(1), TARGET, TCP_ACK)),
        IcmpErrSpec::frag_needed(
            Ipv4Addr::new(198, 19, 0, 9),
            NODE,
            1400,
            Spec::tcp(NODE, PUBLISHED, client, 1, TCP_ACK),
        )
        .build(),
    ];
    for mut f in kept {
        assert!(may(&mut f), "{:02x?}", &f[..f.len().min(64)]);
    }
    // A frame too short to tell takes the whole path.
    let mut cut = Spec::tcp(client, 1, NODE, PUBLISHED + 1, TCP_ACK).build();
    assert!(may(&mut cut[..30]));

    // What it lets go, the whole path passes: other ports, other
    // protocols, later fragments, not IPv4, random frames of every kind.
    let mut frames = vec![
        Spec::tcp(client, 1, NODE, PUBLISHED + 1, TCP_ACK).build(),
        Spec::udp(client, 1, NODE, 53, b"q").build(),
        Spec::new(47, client, 0, NODE, 0)
            .payload(vec![0; 64])
            .build(),
        Spec {
            frag: 0x0010,
            ..Spec::tcp(client, 1, NODE, PUBLISHED, TCP_ACK)
        }
        .build(),
    ];
    let mut v6 = Spec::tcp(client, 1, NODE, PUBLISHED, TCP_ACK).build();
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    frames.push(v6);
    let mut rng = Rng::new(11);
    for _ in 0..20000 {
        let mut s = Spec::random(&mut rng);
        if rng.bool() {
            s.daddr = NODE;
        }
        if rng.below(4) == 0 {
            s.dport = PUBLISHED;
        }
        frames.push(s.build());
    }
    let mut let_go = 0;
    for mut f in frames {
        if !may(&mut f) {
            let_go += 1;
            let before = f.clone();
            assert_eq!(w.process(&mut f), Verdict::Pass, "{before:02x?}");
            assert_eq!(f, before, "let go, and written");
        }
    }
    assert!(let_go > 10000, "only {let_go} frames let go");
}
