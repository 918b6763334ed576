//! The mesh dataplane. One file per attach point, in the order a packet
//! meets them: `xdp` (uplink, client to service), `tc` (uplink delivery
//! into the task; task replies back to the client), plus `floor`
//! (benchmark baselines). `maps` holds the state they share.
#![no_std]
#![no_main]

mod floor;
mod maps;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
