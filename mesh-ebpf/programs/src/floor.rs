//! Benchmark floors, measured in the same run as the real program so that
//! only the mesh's own cost is reported: an XDP program that only passes,
//! and one that parses and does one hash lookup, then transmits.
//!
//! Their own object (`mesh-floor`), not part of the dataplane: meshd never
//! loads them; the benchmark and the tests do (`mesh_tests::fixtures::Floors`).
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::HashMap;
use aya_ebpf::programs::XdpContext;
use mesh_common::parse;
use mesh_common::pkt::Pkt;

#[map(name = "MESH_FLOOR")]
static FLOOR: HashMap<u32, u32> = HashMap::with_max_entries(16, 0);

#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn floor_lookup(ctx: XdpContext) -> u32 {
    // SAFETY: data..data_end is the packet.
    let pkt = unsafe { Pkt::new(ctx.data(), ctx.data_end()) };
    let Some(ip) = parse::ipv4(&pkt) else {
        return xdp_action::XDP_PASS;
    };
    let Some((_, dport)) = parse::ports(&pkt, &ip) else {
        return xdp_action::XDP_PASS;
    };
    match FLOOR.get_ptr(dport as u32) {
        Some(_) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
