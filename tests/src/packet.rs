//! Frames with correct checksums, computed from scratch (never
//! incrementally), so they can judge the dataplane's incremental updates.
//! The builder is `mesh_common::testing::frame`, the one every test suite
//! and the benchmark use; re-exported here.

pub use mesh_common::testing::frame::*;
