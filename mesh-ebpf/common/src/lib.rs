//! Everything the mesh BPF programs and user space must agree on, and the
//! packet logic both of them run.
//!
//! The crate is `no_std` and builds for `bpfel-unknown-none` (inside the BPF
//! programs) and for the host (user space, unit tests, fixtures). Files in
//! the order a packet meets them:
//!
//! - [`abi`]: map names, keys and values, drop reasons (the kernel ABI).
//! - [`pkt`]: bounds-checked access to packet bytes.
//! - [`parse`]: Ethernet / IPv4 / TCP / UDP parsing into a [`parse::Flow4`].
//! - [`hash`]: the flow hash that indexes a Maglev table.
//! - [`csum`]: incremental Internet checksum updates (RFC 1624).
//! - [`icmp`]: ICMP errors about mesh flows, translated like the flows.
//! - [`fwd`]: the client-to-service path (service lookup, conntrack,
//!   Maglev, DNAT), generic over [`fwd::Tables`].
//! - [`rev`]: the task-to-client path (reverse NAT lookup).
//! - [`maglev`] (host only): building the Maglev tables the kernel indexes.
//! - [`testing`] (host only, feature `testing`): the frame builder and
//!   test helpers shared by every host-side test.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(feature = "user")]
extern crate alloc;
#[cfg(feature = "testing")]
extern crate std;

pub mod abi;
pub mod csum;
pub mod encap;
pub mod fwd;
pub mod hash;
pub mod icmp;
#[cfg(feature = "user")]
pub mod maglev;
pub mod parse;
pub mod pkt;
pub mod rev;
#[cfg(feature = "testing")]
pub mod testing;
