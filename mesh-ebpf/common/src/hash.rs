//! The flow hash that picks a Maglev slot.
//!
//! It covers the client's address and port, the published port and the
//! protocol, but not the node address the client reached: every node picks
//! the same task for the same client flow, so a flow that a cloud load
//! balancer moves to another node stays on its task (once forwarding
//! between nodes exists). Values are converted to host order first so
//! nodes of either endianness agree.

/// MurmurHash3's 64-bit finaliser: full avalanche with two multiplies.
#[inline(always)]
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

const SEED: u64 = 0x6d65_7368_5f76_3100; // "mesh_v1\0"

/// Hash of an IPv4 client flow. `saddr`, `sport_be`, `dport_be` are raw
/// (network order) as read from the packet.
#[inline(always)]
pub fn flow_hash4(saddr: u32, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let a = u32::from_be(saddr) as u64;
    let p = ((u16::from_be(sport_be) as u64) << 16) | u16::from_be(dport_be) as u64;
    let x = (a << 32) | p;
    let h = fmix64(x ^ SEED ^ ((proto as u64) << 48).rotate_left(7));
    (h ^ (h >> 32)) as u32
}
