//! The fixtures through BPF_PROG_TEST_RUN against the real object: the
//! verifier is part of the test. Needs root (CI runs as root).

use mesh_tests::fixtures::{BpfWorld, all, host_world, judge};

#[test]
fn root_every_fixture_holds_on_the_bpf_object() {
    let bpf = BpfWorld::new().expect("load the BPF object (root, BPF)");
    let judge_world = host_world();
    let mut failures = Vec::new();
    for fx in all() {
        if fx.input.len() < 14 {
            // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet
            // header (as drivers never hand XDP one); the host run covers it.
            assert!(
                bpf.run(&fx).is_err(),
                "{}: the kernel ran XDP on a runt",
                fx.name
            );
            continue;
        }
        match bpf.run(&fx) {
            Ok(got) => {
                if let Err(e) = judge(&fx, &got, &judge_world) {
                    failures.push(e);
                }
            }
            Err(e) => failures.push(format!("{}: {e:#}", fx.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
