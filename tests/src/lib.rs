//! Shared by the test suites (tests/tests) and the benchmarks (bench/):
//! packet builders, the fixture world and its fixtures, the runners that
//! play them against the host logic and the real BPF object, and the
//! network-namespace lab.

pub mod fixtures;
pub mod lab;
pub mod packet;
