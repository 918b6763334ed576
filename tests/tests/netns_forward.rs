//! Forwarding between nodes (mesh_tests::lab::cluster): every node answers
//! every published port, and carries each flow to a task on whichever node
//! runs it, keeping the client's address; replies leave from the address
//! the client used. Needs root (CI runs as root).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use mesh_tests::lab::{Cluster, Topology, WEB_TCP, WEB_UDP, exec, ip, meshd_path, retry};

/// Tasks on nodes 1 and 3 only (two each), the same state on every node.
fn cluster(extra: &[&str]) -> Cluster {
    cluster_of(&[2, 0, 2], extra)
}

fn cluster_of(tasks: &[usize], extra: &[&str]) -> Cluster {
    let mut c =
        Cluster::build(Topology::builder().nodes(tasks).client(2).client(1)).expect("cluster");
    c.start_tasks().expect("task servers");
    let state = c.state(&c.tasks()).render();
    c.write_state_all(&state).unwrap();
    c.start_all_meshds(&meshd_path().unwrap(), extra)
        .expect("meshd starts on every node");
    c
}

fn names(tasks: &[(usize, usize)]) -> BTreeSet<String> {
    tasks
        .iter()
        .map(|&(j, i)| Cluster::task_name(j, i))
        .collect()
}

fn counter(c: &Cluster, j: usize, name: &str) -> u64 {
    c.metric(j, name, "").unwrap()
}

/// Every packet forwarded was decapsulated once, by a node with tasks, and
/// nothing was dropped: no loops, no re-encapsulation.
fn assert_no_loops(c: &Cluster) {
    let n = c.topo.nodes.len();
    let sum = |name| (1..=n).map(|j| counter(c, j, name)).sum::<u64>();
    // The counters are read node by node: a packet (the client's last
    // ACK) may be between two nodes meanwhile.
    retry(
        Duration::from_secs(3),
        "every forwarded packet decapsulated",
        || {
            let (fwd, decap) = (
                sum("mesh_forwarded_packets_total"),
                sum("mesh_decapsulated_packets_total"),
            );
            anyhow::ensure!(fwd > 0, "nothing was forwarded");
            anyhow::ensure!(fwd == decap, "forwarded {fwd}, decapsulated {decap}");
            Ok(())
        },
    )
    .unwrap();
    for j in 1..=n {
        if c.local_tasks(j).is_empty() {
            assert_eq!(
                counter(c, j, "mesh_decapsulated_packets_total"),
                0,
                "node {j} runs no task, yet decapsulated"
            );
        }
        assert_eq!(
            counter(c, j, "mesh_drops_total"),
            0,
            "node {j} dropped: {}",
            c.admin_get(j, "/metrics")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("mesh_drops_total") && !l.ends_with(" 0"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn every_node_reaches_every_task(extra: &[&str], direct: bool) {
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
            // The task sees the client's own address and port.
            assert_eq!(
                seen,
                conn.local().unwrap().to_string(),
                "node {j} request {k}"
            );
            tcp.insert(task.to_string());

            udp.insert(c.udp_task(from, j, WEB_UDP).expect("udp answer"));
        }
        let all = names(&c.tasks());
        assert_eq!(tcp, all, "node {j}: every task answers TCP");
        assert_eq!(udp, all, "node {j}: every task answers UDP");
    }
    assert_no_loops(&c);
    // Node 2 runs no task: it forwarded all it answered; the replies came
    // back through it, or went straight to the clients.
    assert!(counter(&c, 2, "mesh_forwarded_packets_total") >= 160);
    let back = counter(&c, 2, "mesh_replies_from_backends_total");
    let sent = |name| counter(&c, 1, name) + counter(&c, 3, name);
    if direct {
        assert_eq!(back, 0, "direct mode, yet replies came back through node 2");
        assert!(sent("mesh_replies_direct_total") > 0);
        assert_eq!(sent("mesh_replies_to_ingress_total"), 0);
    } else {
        assert!(back >= 80, "replies back through node 2: {back}");
        assert!(sent("mesh_replies_to_ingress_total") >= back);
        assert_eq!(sent("mesh_replies_direct_total"), 0);
    }
    // Every forwarded SYN had its MSS lowered to fit encapsulation.
    assert!(counter(&c, 2, "mesh_mss_clamped_total") >= 40);
}

#[test]
fn root_every_node_reaches_every_task_replies_via_ingress() {
    every_node_reaches_every_task(&[], false);
}

#[test]
fn root_every_node_reaches_every_task_replies_direct() {
    every_node_reaches_every_task(&["--reply-mode", "direct"], true);
}

/// 1 MB each way through a node that runs no task, in both reply modes,
/// on full-size segments (the MSS clamp makes them fit encapsulated).
#[test]
fn root_a_megabyte_each_way_through_a_forwarding_node() {
    for (extra, mode) in [
        (&[][..], "via-ingress"),
        (&["--reply-mode", "direct"][..], "direct"),
    ] {
        let c = cluster(extra);
        let from = c.client_addrs()[0];
        let mb = 1 << 20;
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            let mut conn = c.tcp_connect(from, 2, WEB_TCP).expect("tcp connect");
            let a = conn.ask(&format!("big {mb}")).expect("1 MB to the client");
            let (task, body) = a.split_once(' ').unwrap();
            assert_eq!(body.len(), mb, "{mode}: bytes to the client");
            assert!(body.bytes().all(|b| b == b'x'));
            let up = "y".repeat(mb);
            let a = conn.ask(&up).expect("1 MB from the client");
            assert_eq!(
                a.len(),
                task.len() + 1 + mb,
                "{mode}: bytes from the client"
            );
            seen.insert(task.to_string());
        }
        assert_no_loops(&c);
        assert!(
            counter(&c, 2, "mesh_forwarded_packets_total") > 4 * 700,
            "{mode}: the megabytes went through node 2"
        );
        assert_eq!(counter(&c, 2, "mesh_too_big_total"), 0, "{mode}");
        assert!(!seen.is_empty());
    }
}

/// A cloud load balancer moves a connection to another node mid-flow: the
/// new ingress node picks the same task (same Maglev table, same hash),
/// the task's node moves the flow's replies to it, and the connection
/// goes on.
#[test]
fn root_a_connection_moved_to_another_ingress_node_keeps_working() {
    // One task, on node 3: nodes 1 and 2 both forward.
    let mut c = Cluster::build(Topology::builder().nodes(&[0, 0, 1]).client(1)).expect("cluster");
    c.start_tasks().unwrap();
    let n1 = c.node(1).addr;
    // A shared address in the segment (as a load balancer's, or a
    // floating IP), held by node 1 first; every node answers on it.
    let vip = Ipv4Addr::from((u32::from(n1) & !0x7f) | 24);
    let state = c.state(&c.tasks()).render();
    c.write_state_all(&state).unwrap();
    let vip_s = vip.to_string();
    c.start_all_meshds(&meshd_path().unwrap(), &["--node-addr", &vip_s])
        .expect("meshd");
    ip(
        &c.node(1).ns,
        &format!("addr add {vip}/32 dev {}", c.node(1).uplink),
    )
    .unwrap();
    let from = c.client_addrs()[0];
    let mut conn = c
        .tcp_connect_to(from, SocketAddr::from((vip, WEB_TCP)))
        .expect("connect through node 1");
    let first = conn.ask("peer").unwrap();
    assert_eq!(
        first.split_once(' ').unwrap().1,
        conn.local().unwrap().to_string()
    );
    let fwd1 = counter(&c, 1, "mesh_forwarded_packets_total");
    assert!(fwd1 > 0);

    // The move: the address leaves node 1 for node 2, and the client's
    // link sends to node 2 from now on.
    ip(
        &c.node(1).ns,
        &format!("addr del {vip}/32 dev {}", c.node(1).uplink),
    )
    .unwrap();
    ip(
        &c.node(2).ns,
        &format!("addr add {vip}/32 dev {}", c.node(2).uplink),
    )
    .unwrap();
    let mac = exec(
        &c.node(2).ns,
        &format!("cat /sys/class/net/{}/address", c.node(2).uplink),
    )
    .unwrap();
    let client = c.topo.client_with(from).unwrap();
    ip(
        &client.ns,
        &format!(
            "neigh replace {vip} lladdr {} dev {}",
            mac.trim(),
            client.iface
        ),
    )
    .unwrap();

    for i in 0..5 {
        let a = conn
            .ask(&format!("after the move {i}"))
            .expect("the connection goes on");
        assert_eq!(
            a,
            format!("{} after the move {i}", first.split_once(' ').unwrap().0)
        );
    }
    assert_eq!(
        counter(&c, 1, "mesh_forwarded_packets_total"),
        fwd1,
        "node 1 no longer sees the flow"
    );
    assert!(counter(&c, 2, "mesh_forwarded_packets_total") >= 5);
    // The replies follow the new ingress node.
    assert!(counter(&c, 2, "mesh_replies_from_backends_total") >= 5);
    assert_no_loops(&c);
}

/// A node leaves the state: its tasks' flows are picked again among the
/// remaining tasks; the others go on untouched; its next hop is no longer
/// kept resolved.
#[test]
fn root_a_node_that_leaves_takes_only_its_own_flows() {
    let mut c = cluster(&[]);
    let from = c.client_addrs()[0];
    // Connections through node 2 until one lands on node 1's tasks and
    // one on node 3's; UDP flows likewise.
    let mut to1 = None;
    let mut udp3 = None;
    for _ in 0..64 {
        if to1.is_none() {
            let mut conn = c.tcp_connect(from, 2, WEB_TCP).unwrap();
            if conn.task().unwrap().starts_with("n1.") {
                to1 = Some(conn);
            }
        }
        if udp3.is_none() {
            let sock = c.udp_socket(from).unwrap();
            let (a, _) = c.udp_ask(&sock, 2, WEB_UDP, "who").unwrap();
            if a.starts_with("n3.") {
                udp3 = Some(sock);
            }
        }
    }
    let (mut to1, udp3) = (
        to1.expect("a flow on node 1"),
        udp3.expect("a flow on node 3"),
    );
    let task1 = to1.task().unwrap();
    let n3 = c.node(3).addr.to_string();
    let neigh = |c: &Cluster| ip(&c.node(2).ns, "-d neigh show").unwrap();
    assert!(
        neigh(&c)
            .lines()
            .any(|l| l.starts_with(&format!("{n3} ")) && l.contains("managed")),
        "node 2 keeps node 3's next hop resolved:\n{}",
        neigh(&c)
    );

    // Node 3 leaves: the state lists nodes 1 and 2, and node 1's tasks.
    let mut st = mesh_tests::lab::StateFile::new();
    for j in 1..=2 {
        st = st.node(&c.node(j).name, c.node(j).addr);
    }
    st = st.web();
    for (j, i) in c.local_tasks(1) {
        st = st.task("web", &c.node(j).name, c.node(j).task_addr(i));
    }
    let skips: Vec<usize> = (1..=2).map(|j| c.meshd(j).unwrap().log_len()).collect();
    for j in 1..=2 {
        c.write_state(j, &st.render()).unwrap();
    }
    for j in 1..=2 {
        c.meshd(j)
            .unwrap()
            .wait_log_after(skips[j - 1], "generation 2 ", Duration::from_secs(10))
            .expect("the state without node 3 is applied");
    }
    c.stop_meshd(3).unwrap();

    // The flow on node 1's task goes on, on the same task.
    assert_eq!(to1.task().unwrap(), task1);
    // The UDP flow that was on node 3 is picked again, on node 1.
    let (a, _) = c
        .udp_ask(&udp3, 2, WEB_UDP, "who")
        .expect("the flow is picked again");
    assert!(a.starts_with("n1."), "{a}");
    // New flows reach node 1's tasks only.
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        seen.insert(c.tcp_connect(from, 2, WEB_TCP).unwrap().task().unwrap());
    }
    assert_eq!(seen, names(&c.local_tasks(1)));
    assert!(
        !neigh(&c)
            .lines()
            .any(|l| l.starts_with(&format!("{n3} ")) && l.contains("managed")),
        "node 2 still keeps node 3's next hop:\n{}",
        neigh(&c)
    );
}

/// An encapsulated packet from an address that is no node is dropped and
/// counted; its inner packet never reaches a task.
#[test]
fn root_encapsulated_packets_from_a_non_node_are_dropped() {
    use mesh_tests::packet::{EncapSpec, Spec, TCP_SYN};
    let c = cluster(&[]);
    let from = c.client_addrs()[0];
    let (node, task) = (c.node(1).addr, c.node(1).task_addr(1));
    // What another node would send: a client's SYN, DNAT'd to the task.
    let frame = EncapSpec {
        from,
        to: node,
        sport: 50000,
        dport: mesh_common::abi::DEFAULT_ENCAP_PORT,
        version: mesh_common::abi::ENCAP_VERSION,
        kind: mesh_common::abi::ENCAP_K_REQUEST,
        flags: 0,
        orig: (node, WEB_TCP),
    }
    .build(&Spec::tcp(
        from,
        40000,
        task,
        mesh_tests::lab::TCP_TARGET,
        TCP_SYN,
    ));
    // The UDP payload: everything behind the outer IPv4 and UDP headers.
    let payload = frame[14 + 20 + 8..].to_vec();
    let sock = c.udp_socket(from).unwrap();
    for _ in 0..3 {
        sock.send_to(&payload, (node, mesh_common::abi::DEFAULT_ENCAP_PORT))
            .unwrap();
    }
    mesh_tests::lab::retry(Duration::from_secs(5), "the drops are counted", || {
        let n = c.metric(1, "mesh_drops_total", "reason=\"encap_from_non_node\"")?;
        anyhow::ensure!(n == 3, "{n} of 3 counted");
        Ok(())
    })
    .unwrap();
    assert_eq!(counter(&c, 1, "mesh_decapsulated_packets_total"), 0);
}

/// The programs keep each node's next hop for about a second (as the FIB
/// answered it): a node whose Ethernet address changes is reached again
/// within two. The segment stops flooding to that node's port and forgets
/// its old address, so frames sent to the old one are lost.
#[test]
fn root_forwarding_follows_a_changed_next_hop_within_two_seconds() {
    // Node 1 runs no task: it forwards everything to node 2.
    let c = cluster_of(&[0, 2], &[]);
    let from = c.client_addrs()[0];
    let ask = |timeout_ms: u64| -> anyhow::Result<String> {
        let sock = c.udp_socket(from)?;
        sock.set_read_timeout(Some(Duration::from_millis(timeout_ms)))?;
        Ok(c.udp_ask(&sock, 1, WEB_UDP, "peer")?.0)
    };
    for _ in 0..5 {
        ask(2000).expect("an answer through node 1 before the change");
    }
    let n2 = c.node(2);
    let old = exec(&n2.ns, &format!("cat /sys/class/net/{}/address", n2.uplink))
        .unwrap()
        .trim()
        .to_string();
    let new = "02:00:5e:10:00:98";
    let seg = &c.topo.segment_ns;
    let port = &n2.segment_port;
    exec(seg, &format!("bridge link set dev {port} flood off")).unwrap();
    exec(
        seg,
        &format!("bridge fdb add {new} dev {port} master static"),
    )
    .unwrap();
    ip(&n2.ns, &format!("link set dev {} address {new}", n2.uplink)).unwrap();
    // Learned again from anything node 2 sent meanwhile: forget it last.
    let _ = exec(seg, &format!("bridge fdb del {old} dev {port} master"));
    ip(
        &c.node(1).ns,
        &format!(
            "neigh replace {} lladdr {new} dev {} nud reachable",
            n2.addr,
            c.node(1).uplink
        ),
    )
    .unwrap();
    mesh_tests::lab::answers_again_within_two_units(
        "an answer through node 1",
        std::time::Instant::now(),
        ask,
    );
}
