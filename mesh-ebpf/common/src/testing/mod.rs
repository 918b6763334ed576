//! Test support on the host (feature `testing`, needs std): what every
//! host-side test of the packet logic needs, written once.
//!
//! - [`HostMaps`]: the BPF maps in the kernel's shapes, implementing the
//!   shared logic's table traits as the kernel does;
//! - [`frame`]: frames built from a description, checksums from scratch;
//! - [`Rng`]: a deterministic PRNG for test data.

pub mod frame;
mod maps;
mod rng;

pub use maps::{HostMaps, MapError, Sizes};
pub use rng::Rng;
