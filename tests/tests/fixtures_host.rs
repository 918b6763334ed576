//! The fixtures against the shared packet logic on the host (no kernel).

use mesh_tests::fixtures::{self, all, host_world, judge, run_host};

#[test]
fn every_fixture_holds_on_the_host_logic() {
    let sim = host_world();
    let judge_world = host_world();
    let mut failures = Vec::new();
    for fx in all() {
        let got = run_host(&sim, &fx);
        if let Err(e) = judge(&fx, &got, &judge_world) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Conntrack: the established fixtures found the SYN's entry.
    assert!(sim.ct.borrow().len() >= 2);
    let _ = fixtures::NODE;
}
