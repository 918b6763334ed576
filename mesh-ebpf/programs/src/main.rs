//! The mesh dataplane. One file per attach point, in the order a packet
//! meets them: `xdp` (uplink, client to service), `tc_uplink` (uplink,
//! delivery into the task), or both at once in `tc_ingress` (uplink,
//! `--intercept tc`), then `tc_task` (the task's replies, back to the
//! client). `deliver` hands a packet to its task, `fib` routes and
//! redirects, `skb` is what the TC programs share about socket buffers,
//! and `maps` holds the state they all share. (The benchmark's floor
//! programs are another object: floor.rs, the `mesh-floor` binary.)
#![no_std]
#![no_main]

mod deliver;
mod fib;
mod maps;
mod skb;
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
