//! The fixtures through BPF_PROG_TEST_RUN against the real object: the
//! verifier is part of the test. Needs root (CI runs as root).

use mesh_tests::fixtures::{BpfWorld, FibNet, Fixture, all, all_tc, host_world, play};

/// Every fixture, on a thread inside the namespace the TC programs' FIB
/// lookups need (XDP's runs do not care where they run).
#[test]
fn root_every_fixture_holds_on_the_bpf_object() {
    holds_on_the_bpf_object(all);
}

/// The same with the intercept at TC ingress (`mesh_tc_ingress` in place
/// of `mesh_xdp`), in a world of its own.
#[test]
fn root_every_fixture_holds_on_the_bpf_object_with_the_intercept_at_tc() {
    holds_on_the_bpf_object(all_tc);
}

fn holds_on_the_bpf_object(fixtures: fn() -> Vec<Fixture>) {
    let net = FibNet::new().expect("the fixtures' namespace (root)");
    let report = net
        .run(move || -> anyhow::Result<_> {
            let mut bpf = BpfWorld::new()?;
            Ok(play(&mut bpf, &fixtures(), &host_world()))
        })
        .unwrap()
        .expect("load the BPF object (root, BPF)");
    assert!(
        report.failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
    // The kernel refuses some frames too short for what they claim (the
    // world checks which); the host world runs them.
    for (name, why) in &report.refused {
        eprintln!("{name}: refused: {why}");
    }
    assert_eq!(report.held.len() + report.refused.len(), fixtures().len());
}

/// BPF_PROG_TEST_RUN cannot give a TC program metadata: a `__sk_buff`
/// with `data_meta` set is refused (EINVAL), and without it the program
/// sees none. So `mesh_tc_uplink`'s delivery path, which starts from XDP's
/// metadata, has no fixture (the end-to-end tests deliver through it). If
/// this fails, the kernel has lifted the limit: give the uplink fixtures
/// metadata.
#[test]
fn root_tc_test_runs_cannot_carry_metadata() {
    use mesh_common::abi::PROG_TC_UPLINK;
    use mesh_tests::fixtures::{CLIENT, SKB_DATA_META, TASKS, errno, skb_ctx, test_run_tc};
    use mesh_tests::packet::{Spec, TCP_SYN};

    let bpf = BpfWorld::new().unwrap();
    // As XDP leaves a SYN for a task, behind its 8 bytes of metadata.
    let frame = Spec::tcp(CLIENT, 40001, TASKS[2], 8080, TCP_SYN).build();
    let run = |ctx: &[u8]| test_run_tc(bpf.dp.ebpf(), PROG_TC_UPLINK, &frame, ctx);
    const TC_ACT_UNSPEC: i32 = -1;
    assert_eq!(run(&skb_ctx(0)).unwrap().ret as i32, TC_ACT_UNSPEC);
    let mut ctx = skb_ctx(0);
    ctx[SKB_DATA_META..SKB_DATA_META + 4].copy_from_slice(&8u32.to_ne_bytes());
    let err = run(&ctx).expect_err("the kernel took data_meta for a TC program");
    assert_eq!(errno(&err), Some(libc::EINVAL), "{err:#}");
}

/// The node-address set in the kernel follows the state: an address that
/// leaves stops being answered, one that arrives starts (places are
/// reused, never moved).
#[test]
fn root_node_addresses_follow_the_state() {
    use mesh_tests::fixtures::{CLIENT, NODE, WEB_TCP, XDP_PASS, world};
    use mesh_tests::packet::{Spec, TCP_SYN};
    use std::net::Ipv4Addr;

    let mut bpf = BpfWorld::new().unwrap();
    let other = Ipv4Addr::new(198, 18, 128, 3);
    let syn = |to: Ipv4Addr, sport: u16| Spec::tcp(CLIENT, sport, to, WEB_TCP, TCP_SYN).build();
    let meta = |bpf: &BpfWorld, to, sport| {
        let r = bpf
            .run_xdp(mesh_common::abi::PROG_XDP, &syn(to, sport))
            .unwrap();
        assert_eq!(r.ret, XDP_PASS);
        r.meta.len() == 8
    };
    assert!(meta(&bpf, NODE, 50001), "answered on the node address");
    assert!(!meta(&bpf, other, 50002), "not on another address");
    let mut d = world();
    d.node_addrs = vec![other];
    bpf.dp.apply(&d).unwrap();
    assert!(
        !meta(&bpf, NODE, 50003),
        "the old address is no longer answered"
    );
    assert!(meta(&bpf, other, 50004), "the new one is");
    d.node_addrs = vec![NODE, other];
    bpf.dp.apply(&d).unwrap();
    assert!(meta(&bpf, NODE, 50005) && meta(&bpf, other, 50006));
    // Seventeen addresses do not fit: refused before anything is written.
    d.node_addrs = (1..=17).map(|i| Ipv4Addr::new(198, 18, 127, i)).collect();
    assert!(bpf.dp.apply(&d).is_err());
    assert!(meta(&bpf, NODE, 50007), "the last good state still serves");
}

/// The node map is in the object with the layout user space writes
/// (`NodeValue`, `DEFAULT_MAX_NODES` slots), and holds every node of the
/// state in the slot the planner gave it, this node flagged as itself.
#[test]
fn root_the_node_map_holds_node_values() {
    use mesh_common::abi::{DEFAULT_MAX_NODES, FAMILY_V4, NODE_F_SELF};
    use mesh_tests::fixtures::{NODE, OTHER_NODE};

    let bpf = BpfWorld::new().unwrap();
    let nodes = bpf.dp.applier.writer().nodes();
    assert_eq!(nodes.len(), DEFAULT_MAX_NODES);
    let planner = bpf.dp.applier.planner();
    for (name, addr, flags) in [("n1", NODE, NODE_F_SELF), ("n2", OTHER_NODE, 0)] {
        let slot = planner.nodes[name].slot;
        let n = nodes.get(&slot, 0).unwrap();
        assert_eq!(n.addr[0], u32::from_ne_bytes(addr.octets()), "{name}");
        assert_eq!((n.family, n.flags, n.gen_), (FAMILY_V4, flags, 1), "{name}");
    }
    assert!(nodes.get(&DEFAULT_MAX_NODES, 0).is_err());
}

/// The benchmark's floor programs load from their own object; the
/// dataplane's object does not carry them.
#[test]
fn root_the_floor_programs_are_their_own_object() {
    use mesh_common::abi::{
        DEFAULT_ENCAP_PORT, ENCAP_K_REPLY, ENCAP_K_REQUEST, ENCAP_VERSION, MAP_FLOOR,
        PROG_FLOOR_DECAP, PROG_FLOOR_LOOKUP, PROG_FLOOR_PASS, PROG_FLOOR_REPLY, PROG_FLOOR_TC_NAT,
        PROG_FLOOR_TRACK, XDP_META_MAGIC,
    };
    use mesh_tests::fixtures::{CLIENT, Floors, Flow, NODE, WEB_TCP, XDP_PASS};
    use mesh_tests::packet::{EncapSpec, Spec, TCP_ACK, TCP_SYN, View, checksums_ok};
    use mesh_userspace::model::Proto;
    use std::net::{Ipv4Addr, SocketAddrV4};

    let bpf = BpfWorld::new().unwrap();
    assert!(bpf.dp.ebpf().program(PROG_FLOOR_PASS).is_none());
    assert!(bpf.dp.ebpf().program(PROG_FLOOR_LOOKUP).is_none());
    assert!(bpf.dp.ebpf().map(MAP_FLOOR).is_none());

    let mut floors = Floors::load().unwrap();
    let ack = Spec::tcp(CLIENT, 40001, NODE, WEB_TCP, TCP_ACK).build();
    assert_eq!(floors.run_xdp(PROG_FLOOR_PASS, &ack).unwrap().ret, XDP_PASS);
    assert_eq!(
        floors.run_xdp(PROG_FLOOR_LOOKUP, &ack).unwrap().ret,
        XDP_PASS,
        "a miss passes"
    );
    floors
        .map()
        .unwrap()
        .insert(WEB_TCP.to_be() as u32, 1, 0)
        .unwrap();
    const XDP_TX: u32 = 3;
    assert_eq!(floors.run_xdp(PROG_FLOOR_LOOKUP, &ack).unwrap().ret, XDP_TX);

    // floor_track: a flow's first packet is inserted (XDP_TX), its next
    // one found (XDP_PASS); emptied, the table takes it again.
    assert!(bpf.dp.ebpf().program(PROG_FLOOR_TRACK).is_none());
    let syn = |port| Spec::tcp(CLIENT, port, NODE, WEB_TCP, TCP_SYN).build();
    assert_eq!(
        floors.run_xdp(PROG_FLOOR_TRACK, &syn(40002)).unwrap().ret,
        XDP_TX
    );
    assert_eq!(
        floors.run_xdp(PROG_FLOOR_TRACK, &syn(40003)).unwrap().ret,
        XDP_TX
    );
    assert_eq!(
        floors.run_xdp(PROG_FLOOR_TRACK, &syn(40002)).unwrap().ret,
        XDP_PASS,
        "a flow it holds"
    );
    assert_eq!(floors.clear_track().unwrap(), 2);
    assert_eq!(
        floors.run_xdp(PROG_FLOOR_TRACK, &syn(40002)).unwrap().ret,
        XDP_TX
    );

    // floor_tc_nat: a flow it holds is rewritten for its task (checksums
    // right) and handed to the link; any other goes on untouched.
    assert!(bpf.dp.ebpf().program(PROG_FLOOR_TC_NAT).is_none());
    const TC_ACT_UNSPEC: i32 = -1;
    const TC_ACT_REDIRECT: i32 = 7;
    let r = floors.run_tc(PROG_FLOOR_TC_NAT, &ack, 1).unwrap();
    assert_eq!((r.ret as i32, &r.output), (TC_ACT_UNSPEC, &ack));
    let task = SocketAddrV4::new(Ipv4Addr::new(198, 18, 7, 9), 8080);
    let (dst, src) = ([2, 0, 0, 0, 0x30, 9], [2, 0, 0, 0, 0x10, 2]);
    let flow = Flow::new(Proto::Tcp, (CLIENT, 40001), (NODE, WEB_TCP));
    floors.nat(&flow.key(), task, 1, dst, src).unwrap();
    let r = floors.run_tc(PROG_FLOOR_TC_NAT, &ack, 1).unwrap();
    assert_eq!(r.ret as i32, TC_ACT_REDIRECT);
    let o = View(&r.output);
    assert_eq!((o.daddr(), o.dport()), (*task.ip(), task.port()));
    assert_eq!((&r.output[0..6], &r.output[6..12]), (&dst[..], &src[..]));
    assert!(checksums_ok(&r.output), "checksums after the rewrite");
    let udp = Spec::udp(CLIENT, 40001, NODE, WEB_TCP, b"x").build();
    let r = floors.run_tc(PROG_FLOOR_TC_NAT, &udp, 1).unwrap();
    assert_eq!(r.ret as i32, TC_ACT_UNSPEC, "another flow");

    // floor_decap: another node's packet for a task here is stripped and
    // leaves with the metadata that names the task, once the node, the
    // task and the flow are known; before that it passes untouched.
    assert!(bpf.dp.ebpf().program(PROG_FLOOR_DECAP).is_none());
    // `inner` as node `from` sends it to this one.
    let encap = |from, kind, inner: &Spec| {
        EncapSpec {
            from,
            to: NODE,
            sport: 0xc123,
            dport: DEFAULT_ENCAP_PORT,
            version: ENCAP_VERSION,
            kind,
            flags: 0,
            orig: (NODE, WEB_TCP),
        }
        .build(inner)
    };
    let other = Ipv4Addr::new(198, 18, 0, 2);
    let client = SocketAddrV4::new(CLIENT, 40004);
    let inner = Spec::tcp(
        *client.ip(),
        client.port(),
        *task.ip(),
        task.port(),
        TCP_ACK,
    );
    let frame = encap(other, ENCAP_K_REQUEST, &inner);
    let r = floors.run_xdp(PROG_FLOOR_DECAP, &frame).unwrap();
    assert_eq!((r.ret, &r.output, r.meta.len()), (XDP_PASS, &frame, 0));
    floors.decap(other, task, client).unwrap();
    let r = floors.run_xdp(PROG_FLOOR_DECAP, &frame).unwrap();
    assert_eq!(r.ret, XDP_PASS);
    assert_eq!(r.output, inner.build(), "the inner frame, its MACs kept");
    assert_eq!(r.meta[..4], XDP_META_MAGIC.to_ne_bytes());

    // floor_reply: a reply another node carried back goes out stripped,
    // with the route's MACs, once the node and the route are known.
    assert!(bpf.dp.ebpf().program(PROG_FLOOR_REPLY).is_none());
    let far = Ipv4Addr::new(198, 18, 0, 3);
    let inner = Spec::tcp(NODE, WEB_TCP, CLIENT, 40005, TCP_ACK);
    let frame = encap(far, ENCAP_K_REPLY, &inner);
    let r = floors.run_xdp(PROG_FLOOR_REPLY, &frame).unwrap();
    assert_eq!((r.ret, &r.output), (XDP_PASS, &frame), "from no node");
    // A floor's test run arrives on the loopback (no ingress device given).
    let lo = mesh_common::abi::LOOPBACK_IFINDEX;
    floors
        .reply_route(far, (NODE, CLIENT, lo), dst, src)
        .unwrap();
    let r = floors.run_xdp(PROG_FLOOR_REPLY, &frame).unwrap();
    assert_eq!(r.ret, XDP_TX);
    let mut want = inner.build();
    want[0..6].copy_from_slice(&dst);
    want[6..12].copy_from_slice(&src);
    assert_eq!(r.output, want, "the inner frame with the route's MACs");
}

/// Client affinity over state changes and time (see
/// `fixtures::affinity_scenario`), on the BPF object.
#[test]
fn root_affinity_outlives_set_changes_until_its_timeout_and_skips_draining_tasks() {
    let mut bpf = BpfWorld::new().expect("load the BPF object (root, BPF)");
    mesh_tests::fixtures::affinity_scenario(&mut bpf).unwrap();
}

/// Conntrack's clock: the tick rate read off /proc/timer_list and the one
/// measured with a BPF program reading bpf_jiffies64 (what meshd falls
/// back to where Docker masks that file, as in its swarm service) agree,
/// and are a kernel's rate.
#[test]
fn root_the_tick_rate_is_the_same_read_either_way() {
    let listed = mesh_userspace::clock::hz_from_timer_list().expect("/proc/timer_list");
    let measured = mesh_userspace::clock::hz_from_bpf().expect("bpf_jiffies64");
    assert_eq!(listed, measured);
    assert!([100, 250, 300, 1000].contains(&listed), "{listed}");
}
