//! Forwarding between nodes (mesh_tests::lab::cluster): every node answers
//! every published port, and carries each flow to a task on whichever node
//! runs it. Needs root (CI runs as root).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use mesh_tests::lab::{Cluster, Topology, WEB_TCP, WEB_UDP, meshd_path};

/// Three nodes, tasks on nodes 1 and 3 only, the same state on every node.
fn cluster(extra: &[&str]) -> Cluster {
    let mut c =
        Cluster::build(Topology::builder().nodes(&[2, 0, 2]).client(2).client(1)).expect("cluster");
    c.start_tasks().expect("task servers");
    let state = c.state(&c.tasks()).render();
    c.write_state_all(&state).unwrap();
    c.start_all_meshds(&meshd_path().unwrap(), extra)
        .expect("meshd starts on every node");
    c
}

fn all_tasks(c: &Cluster) -> BTreeSet<String> {
    c.tasks()
        .into_iter()
        .map(|(j, i)| Cluster::task_name(j, i))
        .collect()
}

fn every_node_reaches_every_task(extra: &[&str]) {
    let c = cluster(extra);
    let clients = c.client_addrs();
    for j in 1..=3 {
        let node = c.node(j).addr;
        let (mut tcp, mut udp) = (BTreeSet::new(), BTreeSet::new());
        for (k, &from) in clients.iter().cycle().take(40).enumerate() {
            let mut conn = c.tcp_connect(from, j, WEB_TCP).expect("tcp connect");
            assert_eq!(conn.peer().unwrap(), SocketAddr::from((node, WEB_TCP)));
            let a = conn.ask("peer").expect("tcp answer");
            let (task, seen) = a.split_once(' ').unwrap();
            assert_eq!(
                seen,
                conn.local().unwrap().to_string(),
                "node {j} request {k}"
            );
            tcp.insert(task.to_string());

            let sock = c.udp_socket(from).unwrap();
            let (a, reply_from) = c.udp_ask(&sock, j, WEB_UDP, "peer").expect("udp answer");
            assert_eq!(
                reply_from,
                SocketAddr::from((node, WEB_UDP)),
                "UDP reply source"
            );
            let (task, seen) = a.split_once(' ').unwrap();
            assert_eq!(seen, sock.local_addr().unwrap().to_string());
            udp.insert(task.to_string());
        }
        assert_eq!(tcp, all_tasks(&c), "node {j}: every task answers TCP");
        assert_eq!(udp, all_tasks(&c), "node {j}: every task answers UDP");
    }
    for j in 1..=3 {
        assert_eq!(
            c.metric(j, "mesh_drops_total", "").unwrap(),
            0,
            "node {j} drops"
        );
    }
    // Node 2 runs no task: everything it answered, it forwarded.
    assert!(c.metric(2, "mesh_forwarded_packets_total", "").unwrap() >= 160);
}

#[test]
fn root_every_node_reaches_every_task_replies_via_ingress() {
    every_node_reaches_every_task(&[]);
}

#[test]
fn root_every_node_reaches_every_task_replies_direct() {
    every_node_reaches_every_task(&["--reply-mode", "direct"]);
}
