//! Several nodes in network namespaces (mesh_tests::lab::cluster): nodes on
//! one L2 segment, each with its own task bridge, FORWARD policy DROP and
//! meshd, and clients with several addresses. Needs root (CI runs as root).
//!
//! Here each node is given a state in which the service's tasks are its
//! own (a node without tasks drops with reason no_backend): what the lab
//! itself does, apart from forwarding (netns_forward.rs).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use mesh_tests::lab::{Cluster, Topology, WEB_TCP, WEB_UDP, meshd_path, slot_namespaces};

#[test]
fn root_three_nodes_each_serve_their_own_tasks_and_the_cluster_leaves_nothing_behind() {
    // Tasks on nodes 1 and 3 only; two client namespaces, one with two
    // addresses, so requests come from three sources.
    let mut c =
        Cluster::build(Topology::builder().nodes(&[2, 0, 3]).client(2).client(1)).expect("cluster");
    c.start_tasks().expect("task servers");
    for j in 1..=3 {
        // Every node listed; the service's tasks only the node's own.
        let state = c.state(&c.local_tasks(j)).render();
        c.write_state(j, &state).unwrap();
    }
    c.start_all_meshds(&meshd_path().unwrap(), &[])
        .expect("meshd starts on every node");
    let clients = c.client_addrs();
    assert_eq!(clients.len(), 3);

    for j in [1, 3] {
        let node = c.node(j).addr;
        let (mut tcp, mut udp) = (BTreeSet::new(), BTreeSet::new());
        // Each UDP socket stays open through the loop, so that none gets an
        // earlier one's port: a reused port would be the same flow, not a
        // new one, and the count of new flows below would be one short.
        let mut socks = Vec::new();
        for (k, &from) in clients.iter().cycle().take(30).enumerate() {
            let mut conn = c.tcp_connect(from, j, WEB_TCP).expect("tcp connect");
            assert_eq!(conn.peer().unwrap(), SocketAddr::from((node, WEB_TCP)));
            let a = conn.ask("peer").expect("tcp answer");
            let (task, seen) = a.split_once(' ').unwrap();
            // The task sees the client's own address and port.
            assert_eq!(seen, conn.local().unwrap().to_string(), "request {k}");
            assert_eq!(conn.local().unwrap().ip(), from);
            tcp.insert(task.to_string());

            let sock = c.udp_socket(from).unwrap();
            udp.insert(c.udp_task_on(&sock, j, WEB_UDP).expect("udp answer"));
            socks.push(sock);
        }
        let local: BTreeSet<String> = c
            .local_tasks(j)
            .into_iter()
            .map(|(j, i)| Cluster::task_name(j, i))
            .collect();
        assert_eq!(tcp, local, "node {j}: every local task answers TCP");
        assert_eq!(udp, local, "node {j}: every local task answers UDP");
        assert_eq!(c.metric(j, "mesh_drops_total", "").unwrap(), 0);
        assert_eq!(c.metric(j, "mesh_service_new_flows_total", "").unwrap(), 60);
    }

    // Node 2 has no task: its meshd drops the service's packets (the SYN
    // goes unanswered; a refusal would be node 2's own stack answering).
    let e = c
        .tcp_connect(clients[0], 2, WEB_TCP)
        .err()
        .expect("no answer");
    assert!(
        format!("{e:#}").contains("no connection within"),
        "times out: {e:#}"
    );
    assert!(
        c.metric(2, "mesh_drops_total", "reason=\"no_backend\"")
            .unwrap()
            >= 1
    );

    let (slot, dir) = (c.topo.slot, c.topo.dir.clone());
    let pids: Vec<u32> = (1..=3).map(|j| c.meshd(j).unwrap().pid()).collect();
    drop(c);
    let left = slot_namespaces(slot);
    assert!(left.is_empty(), "namespaces left: {left:?}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "meshd (pid {pid}) still running"
        );
    }
    assert!(!dir.exists(), "lab directory left: {}", dir.display());
}
