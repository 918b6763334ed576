//! The mesh dataplane. One file per attach point, in the order a packet
//! meets them: `xdp` (uplink, client to service), `tc_uplink` (uplink,
//! delivery into the task), or both at once in `tc_ingress` (uplink,
//! `--intercept tc`), then `tc_task` (the task's replies, back to the
//! client, and its own requests), `tc_host` (loopback: the node's own
//! processes' requests); `deliver` hands a packet to its task, `origin`
//! serves flows that start on the node, `skb` holds what the TC programs
//! do with the skb helpers, `fib` is the routing and redirect the TC
//! programs end with, and `maps` holds the state they all share. (The
//! benchmark's floor programs are another object: floor.rs, the
//! `mesh-floor` binary.)
#![no_std]
#![no_main]
// An empty `asm!` as an optimisation barrier (see `maps::with_confirmed`).
#![feature(asm_experimental_arch)]

mod deliver;
mod fib;
mod maps;
mod origin;
mod skb;
mod tc_host;
mod tc_ingress;
mod tc_task;
mod tc_uplink;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
