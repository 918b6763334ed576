//! Test support on the host (feature `testing`, needs std): what every
//! host-side test of the packet logic needs, written once.
//!
//! - [`frame`]: frames built from a description, checksums from scratch;
//! - [`Rng`]: a deterministic PRNG for test data.

pub mod frame;
mod rng;

pub use rng::Rng;
