//! A UDP server for the Docker lab's image (busybox has none): answers
//! every datagram with "<host name> <sender address:port>". Usage:
//! `mesh-udp-echo PORT`.

use std::net::UdpSocket;

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: mesh-udp-echo PORT");
            std::process::exit(2)
        });
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("mesh-udp-echo: binding port {port}: {e}");
        std::process::exit(1)
    });
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(format!("{host} {from}").as_bytes(), from);
        }
    }
}
