//! End to end in network namespaces: a client, a node running meshd (FORWARD
//! policy DROP, as Docker leaves a host) and task hosts behind a bridge.
//! Needs root (CI runs as root). Each test builds its own lab; the lab is
//! removed when the test ends, also when it fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::lab::{Lab, WEB_TCP, WEB_UDP, meshd_path};

fn lab_with_meshd(tasks: usize, serving: &[usize]) -> Lab {
    let mut lab = Lab::new(tasks).expect("lab");
    for i in 1..=tasks {
        lab.start_task(i).expect("task servers");
    }
    lab.write_state(&lab.state_toml(serving)).unwrap();
    lab.start_meshd(&meshd_path().unwrap(), &[]).expect("meshd starts");
    lab
}

#[test]
fn root_requests_reach_every_backend_and_replies_come_from_the_published_port() {
    let lab = lab_with_meshd(3, &[1, 2, 3]);
    let mut tcp: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..60 {
        let a = lab.tcp_request(WEB_TCP, &format!("req{i}")).expect("tcp request");
        let (task, echo) = a.split_once(' ').unwrap();
        assert_eq!(echo, format!("req{i}"));
        *tcp.entry(task.to_string()).or_default() += 1;
    }
    assert_eq!(tcp.len(), 3, "every backend answers TCP: {tcp:?}");

    let mut udp: BTreeMap<String, usize> = BTreeMap::new();
    // Sixty distinct flows: keep every socket (and so its port) until the end.
    let socks: Vec<_> = (0..60).map(|_| lab.udp_socket().unwrap()).collect();
    for (i, sock) in socks.iter().enumerate() {
        let (a, from) = lab.udp_ask(sock, WEB_UDP, &format!("u{i}")).expect("udp request");
        assert_eq!(from, SocketAddr::from((lab.node_addr, WEB_UDP)), "UDP reply source");
        *udp.entry(a.split_whitespace().next().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(udp.len(), 3, "every backend answers UDP: {udp:?}");

    // Per-service counters: 60 new TCP flows, 60 new UDP flows, no drops.
    let flows_tcp = lab.metric("mesh_service_new_flows_total", "protocol=\"tcp\"").unwrap();
    let flows_udp = lab.metric("mesh_service_new_flows_total", "protocol=\"udp\"").unwrap();
    assert_eq!((flows_tcp, flows_udp), (60, 60));
    let pkts = lab.metric("mesh_service_packets_total", "protocol=\"tcp\"").unwrap();
    assert!(pkts >= 60 * 4, "at least SYN, ACK, data, FIN per connection: {pkts}");
    assert!(lab.metric("mesh_service_bytes_total", "").unwrap() > 0);
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
    let _ = Duration::ZERO;
}
