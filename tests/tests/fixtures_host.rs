//! The fixtures against the shared packet logic on the host (no kernel).

use mesh_tests::fixtures::{
    self, Fixture, HostWorld, Program, all, all_tc, check, host_world, play,
};

#[test]
fn the_fixtures_are_well_formed() {
    let (xdp, tc) = (all(), all_tc());
    check(&xdp).unwrap();
    check(&tc).unwrap();
    for p in Program::ALL {
        assert!(
            xdp.iter().chain(&tc).any(|fx| fx.program == p),
            "no fixture runs {p:?}"
        );
    }
    // Each intercept runs every client-to-service fixture.
    let count = |v: &[Fixture], p| v.iter().filter(|fx| fx.program == p).count();
    assert_eq!(count(&xdp, Program::Xdp), count(&tc, Program::TcIngress));
    assert_eq!(count(&tc, Program::Xdp), 0);
}

#[test]
fn every_fixture_holds_on_the_host_logic() {
    holds_on_the_host(all());
}

#[test]
fn every_fixture_holds_on_the_host_logic_with_the_intercept_at_tc() {
    holds_on_the_host(all_tc());
}

fn holds_on_the_host(fixtures: Vec<Fixture>) {
    let report = play(&mut HostWorld::new(), &fixtures, &host_world());
    assert!(
        report.failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert_eq!(report.held.len(), fixtures.len());
}

/// Backend slots are reused with a new generation: a flow pinned to a
/// removed task is re-picked (a new flow), not handed to whichever task
/// took its slot.
#[test]
fn a_reused_backend_slot_does_not_inherit_stale_flows() {
    use mesh_common::fwd::{self, Verdict};
    use mesh_common::pkt::Pkt;
    use mesh_tests::packet::{Spec, TCP_ACK, TCP_SYN, View};
    use mesh_userspace::desired::Desired;
    use mesh_userspace::model::{Proto, StateBuilder};
    use mesh_userspace::sim::Sim;
    use std::net::Ipv4Addr;

    let state = |tasks: &[&str]| {
        let s = StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .tasks(
                "web",
                "n1",
                tasks.iter().map(|a| a.parse::<Ipv4Addr>().unwrap()),
            )
            .build()
            .unwrap();
        Desired::compute(&s, "n1", &[]).unwrap()
    };
    let mut sim = Sim::new(fixtures::limits());
    sim.apply(&state(&["198.18.129.2", "198.18.129.3"]))
        .unwrap();
    let node = Ipv4Addr::new(198, 18, 128, 1);
    let send = |sim: &Sim, sport: u16, flags: u8| {
        let mut f = Spec::tcp(Ipv4Addr::new(198, 18, 200, 7), sport, node, 30080, flags).build();
        let v = fwd::process(&Pkt::from_slice(&mut f), &sim.maps);
        (v, View(&f).daddr())
    };
    // A flow on 198.18.129.3.
    let sport = (40000..41000)
        .find(|&p| send(&sim, p, TCP_SYN).1 == Ipv4Addr::new(198, 18, 129, 3))
        .unwrap();
    let Verdict::Local {
        backend_id: old_slot,
    } = send(&sim, sport, TCP_ACK).0
    else {
        panic!()
    };
    // Its task goes; a new one comes and takes the freed slot.
    sim.apply(&state(&["198.18.129.2"])).unwrap();
    sim.apply(&state(&["198.18.129.2", "198.18.129.9"]))
        .unwrap();
    let new_slot = sim
        .planner
        .backend_id(Ipv4Addr::new(198, 18, 129, 9), 8080)
        .unwrap();
    assert_eq!(new_slot, old_slot, "the slot is reused");
    let flows = |sim: &Sim| {
        sim.maps
            .all_stats()
            .iter()
            .map(|s| s.new_flows)
            .sum::<u64>()
    };
    let before = flows(&sim);
    send(&sim, sport, TCP_ACK);
    assert_eq!(
        flows(&sim),
        before + 1,
        "the stale flow is re-picked as a new flow"
    );
}

/// The hairpin fixture's flow is one Maglev alone sends back to its own
/// client (a task of the service): otherwise the fixture would not test
/// that it goes to another task.
#[test]
fn the_hairpin_fixture_flow_is_a_hairpin() {
    use mesh_common::abi::SvcKey;
    use mesh_common::fwd::{self, Tables};
    use mesh_tests::fixtures::{Flow, HAIRPIN_PORT, NODE, TASKS, WEB_TCP};
    use mesh_userspace::model::Proto;
    let w = host_world();
    let pick = |port: u16| {
        let key = Flow::new(Proto::Tcp, (TASKS[0], port), (NODE, WEB_TCP)).key();
        let svc = w.maps.service(&SvcKey::new(WEB_TCP, key.proto)).unwrap();
        fwd::select(&w.maps, &svc, &key).unwrap().1.addr[0]
    };
    let own = u32::from_ne_bytes(TASKS[0].octets());
    let hairpins: Vec<u16> = (50010..50100).filter(|p| pick(*p) == own).take(3).collect();
    assert_eq!(
        pick(HAIRPIN_PORT),
        own,
        "Maglev no longer sends port {HAIRPIN_PORT} back to its client; ports that it does: {hairpins:?}"
    );
}

/// Client affinity over state changes and time (see
/// `fixtures::affinity_scenario`), on the host logic.
#[test]
fn affinity_outlives_set_changes_until_its_timeout_and_skips_draining_tasks() {
    fixtures::affinity_scenario(&mut HostWorld::new()).unwrap();
}
