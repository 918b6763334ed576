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
    lab.start_meshd(&meshd_path().unwrap(), &[])
        .expect("meshd starts");
    lab
}

#[test]
fn root_requests_reach_every_backend_and_replies_come_from_the_published_port() {
    let lab = lab_with_meshd(3, &[1, 2, 3]);
    let mut tcp: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..60 {
        let a = lab
            .tcp_request(WEB_TCP, &format!("req{i}"))
            .expect("tcp request");
        let (task, echo) = a.split_once(' ').unwrap();
        assert_eq!(echo, format!("req{i}"));
        *tcp.entry(task.to_string()).or_default() += 1;
    }
    assert_eq!(tcp.len(), 3, "every backend answers TCP: {tcp:?}");

    // Bulk replies: the task's TCP sends GSO packets far larger than what
    // the reply program can read directly.
    let mut bulk = lab.tcp_connect(WEB_TCP).unwrap();
    let a = bulk.ask("big 300000").expect("a 300 kB answer");
    assert_eq!(
        a.len(),
        a.split_whitespace().next().unwrap().len() + 1 + 300000
    );
    // Bulk requests: the client's TCP sends GSO packets whose linear part
    // holds their headers alone; the intercept rewrites them as they are
    // (it pulls no payload), and every byte arrives.
    let line = "y".repeat(300000);
    let a = bulk.ask(&line).expect("a 300 kB echo");
    assert_eq!(a.split_once(' ').map(|(_, echo)| echo), Some(line.as_str()));

    // The tasks see the client's own address and port (Docker's IPVS mesh
    // shows them the ingress sandbox's address instead).
    let mut c = lab.tcp_connect(WEB_TCP).unwrap();
    let seen = c.ask("peer").unwrap();
    assert_eq!(
        seen.split_whitespace().nth(1).unwrap(),
        c.local().unwrap().to_string()
    );
    let sock = lab.udp_socket().unwrap();
    let (seen, _) = lab.udp_ask(&sock, WEB_UDP, "peer").unwrap();
    assert_eq!(
        seen.split_whitespace().nth(1).unwrap(),
        sock.local_addr()
            .unwrap()
            .to_string()
            .replace("0.0.0.0", &lab.client_addr.to_string())
    );

    let mut udp: BTreeMap<String, usize> = BTreeMap::new();
    // Sixty distinct flows: keep every socket (and so its port) until the end.
    let socks: Vec<_> = (0..60).map(|_| lab.udp_socket().unwrap()).collect();
    for (i, sock) in socks.iter().enumerate() {
        let (a, from) = lab
            .udp_ask(sock, WEB_UDP, &format!("u{i}"))
            .expect("udp request");
        assert_eq!(
            from,
            SocketAddr::from((lab.node_addr, WEB_UDP)),
            "UDP reply source"
        );
        *udp.entry(a.split_whitespace().next().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(udp.len(), 3, "every backend answers UDP: {udp:?}");

    // Per-service counters: 62 new TCP flows and 61 UDP flows (60 requests,
    // one "peer" question each, one bulk transfer), no drops.
    let flows_tcp = lab
        .metric("mesh_service_new_flows_total", "protocol=\"tcp\"")
        .unwrap();
    let flows_udp = lab
        .metric("mesh_service_new_flows_total", "protocol=\"udp\"")
        .unwrap();
    assert_eq!((flows_tcp, flows_udp), (62, 61));
    let pkts = lab
        .metric("mesh_service_packets_total", "protocol=\"tcp\"")
        .unwrap();
    assert!(
        pkts >= 60 * 4,
        "at least SYN, ACK, data, FIN per connection: {pkts}"
    );
    assert!(lab.metric("mesh_service_bytes_total", "").unwrap() > 0);
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
    let _ = Duration::ZERO;
}

/// The tasks that answer `n` new TCP connections to the web service.
fn tasks_answering(lab: &Lab, n: usize) -> std::collections::BTreeSet<String> {
    (0..n)
        .map(|i| {
            let a = lab
                .tcp_request(WEB_TCP, &format!("{i}"))
                .expect("tcp request");
            a.split_whitespace().next().unwrap().to_string()
        })
        .collect()
}

/// Applies a new task set and waits for meshd to report it.
fn apply(lab: &Lab, tasks: &[usize], generation: u32) {
    let skip = lab.meshd().unwrap().log_len();
    lab.write_state(&lab.state_toml(tasks)).unwrap();
    lab.meshd()
        .unwrap()
        .wait_log_after(
            skip,
            &format!("generation {generation} "),
            Duration::from_secs(10),
        )
        .expect("state applied");
}

#[test]
fn root_generic_xdp_mode_serves_too() {
    // For NICs without native XDP: the same path through generic (skb) XDP.
    let mut lab = Lab::new(2).unwrap();
    lab.start_task(1).unwrap();
    lab.start_task(2).unwrap();
    lab.write_state(&lab.state_toml(&[1, 2])).unwrap();
    lab.start_meshd(
        &meshd_path().unwrap(),
        &["--intercept", "xdp", "--xdp-mode", "generic"],
    )
    .unwrap();
    let link = std::process::Command::new("ip")
        .args(["-n", &lab.node_ns, "-d", "link", "show", "up0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("xdpgeneric"),
        "attached in generic mode"
    );
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..30 {
        seen.insert(
            lab.tcp_request(WEB_TCP, &format!("{i}"))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string(),
        );
        let (_, from) = lab.udp_request(WEB_UDP, "u").unwrap();
        assert_eq!(from, SocketAddr::from((lab.node_addr, WEB_UDP)));
    }
    assert_eq!(seen.len(), 2);
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
}

#[test]
fn root_long_lived_connections_survive_backend_changes_and_removed_backends_end() {
    let lab = lab_with_meshd(4, &[1, 2, 3]);
    // Connections until every backend holds at least two.
    let mut conns: Vec<(String, mesh_tests::lab::Conn)> = Vec::new();
    for _ in 0..200 {
        let mut c = lab.tcp_connect(WEB_TCP).unwrap();
        let t = c.task().unwrap();
        conns.push((t, c));
        let per = |n: &str| conns.iter().filter(|(t, _)| t == n).count();
        if ["task1", "task2", "task3"].iter().all(|n| per(n) >= 2) {
            break;
        }
    }
    assert!(
        conns.iter().any(|(t, _)| t == "task2"),
        "no connection reached task2"
    );

    // A fourth backend: every open connection stays where it is.
    apply(&lab, &[1, 2, 3, 4], 2);
    for (t, c) in conns.iter_mut() {
        assert_eq!(&c.task().expect("connection survives the added backend"), t);
    }
    // New flows reach the fourth.
    let mut seen = BTreeMap::new();
    for i in 0..80 {
        let a = lab.tcp_request(WEB_TCP, &format!("n{i}")).unwrap();
        *seen
            .entry(a.split_whitespace().next().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert!(
        seen.contains_key("task4"),
        "the added backend gets new flows: {seen:?}"
    );

    // Remove task2: its connections end, the others carry on.
    apply(&lab, &[1, 3, 4], 3);
    for (t, c) in conns.iter_mut() {
        let r = c.ask("after");
        if t == "task2" {
            assert!(
                r.is_err(),
                "a connection to the removed backend must end, got {r:?}"
            );
        } else {
            assert_eq!(
                r.expect("connection to a remaining backend survives")
                    .split_whitespace()
                    .next()
                    .unwrap(),
                t
            );
        }
    }
    for i in 0..40 {
        let a = lab.tcp_request(WEB_TCP, &format!("m{i}")).unwrap();
        assert!(!a.starts_with("task2 "), "a removed backend got a new flow");
    }
}

#[test]
fn root_unpublished_ports_and_other_traffic_reach_the_node_itself() {
    let lab = lab_with_meshd(1, &[1]);
    // A service of the node's own on a port in the range that nobody publishes.
    let listener = mesh_tests::lab::in_netns(&lab.node_ns, || {
        std::net::TcpListener::bind(("0.0.0.0", 31999))
    })
    .unwrap()
    .unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (&s).write_all(format!("node {line}").as_bytes()).unwrap();
    });
    assert_eq!(lab.tcp_request(31999, "hi").unwrap(), "node hi");
    server.join().unwrap();
    // ICMP (and the ARP before it) pass untouched.
    let ping = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.client_ns,
            "ping",
            "-c1",
            "-W2",
            &lab.node_addr.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "ping the node: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // A published port still works beside it.
    assert!(lab.tcp_request(WEB_TCP, "x").unwrap().starts_with("task1 "));
}

#[test]
fn root_updates_are_hitless_under_continuous_traffic() {
    let lab = lab_with_meshd(4, &[1, 2, 3]);
    let mut long = lab.tcp_connect(WEB_TCP).unwrap();
    let long_task = long.task().unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (sent, failures) = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let (mut sent, mut failures) = (0u32, Vec::new());
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // A new UDP flow per request: each one is a fresh Maglev lookup.
                match lab.udp_request(WEB_UDP, "h") {
                    Ok((_, from)) if from == SocketAddr::from((lab.node_addr, WEB_UDP)) => {}
                    other => failures.push(format!("{other:?}")),
                }
                match long.ask("h") {
                    Ok(a) if a.starts_with(&long_task) => {}
                    other => failures.push(format!("long-lived: {other:?}")),
                }
                sent += 1;
            }
            (sent, failures)
        });
        // Twenty updates: the fourth task joins and leaves (it keeps serving,
        // so a request it took just before leaving is still answered).
        for g in 0..20u32 {
            let tasks: &[usize] = if g % 2 == 0 {
                &[1, 2, 3, 4]
            } else {
                &[1, 2, 3]
            };
            apply(&lab, tasks, g + 2);
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        traffic.join().unwrap()
    });
    assert!(sent > 50, "too little traffic to prove anything: {sent}");
    assert!(
        failures.is_empty(),
        "{} of {sent} rounds failed during updates: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        lab.metric("mesh_drops_total", "").unwrap(),
        0,
        "drops during updates"
    );
}

#[test]
fn root_a_bad_state_file_is_refused_and_the_last_good_state_keeps_serving() {
    let lab = lab_with_meshd(2, &[1]);
    let skip = lab.meshd().unwrap().log_len();
    let bad = lab
        .state_toml(&[1, 2])
        .replace("published = 30053", "published = 30080")
        .replace("protocol = \"udp\"", "protocol = \"tcp\"");
    lab.write_state(&bad).unwrap();
    let line = lab
        .meshd()
        .unwrap()
        .wait_log_after(skip, "state refused", Duration::from_secs(10))
        .unwrap();
    assert!(
        line.contains("state.toml") && line.contains("published") && line.contains("30080"),
        "{line}"
    );
    assert_eq!(lab.metric("mesh_state_rejected_total", "").unwrap(), 1);
    for i in 0..20 {
        assert!(
            lab.tcp_request(WEB_TCP, &format!("{i}"))
                .unwrap()
                .starts_with("task1 "),
            "old state serves"
        );
    }
    // Unknown fields and bad addresses too.
    let skip = lab.meshd().unwrap().log_len();
    lab.write_state(&lab.state_toml(&[1, 2]).replace("addr = ", "adress = "))
        .unwrap();
    lab.meshd()
        .unwrap()
        .wait_log_after(skip, "state refused", Duration::from_secs(10))
        .unwrap();
    // A good file is applied again.
    apply(&lab, &[1, 2], 2);
    let seen = tasks_answering(&lab, 40);
    assert_eq!(seen.len(), 2);
}

#[test]
fn root_sigterm_with_on_exit_detach_detaches_everything_and_the_lab_leaves_nothing_behind() {
    let mut lab = Lab::new(1).unwrap();
    lab.start_task(1).unwrap();
    lab.write_state(&lab.state_toml(&[1])).unwrap();
    lab.start_meshd(&meshd_path().unwrap(), &["--on-exit", "detach"])
        .unwrap();
    let attached = attached_programs(&lab);
    let tc = mesh_tests::lab::tc_mode();
    let mut want = mesh_tests::lab::uplink_programs("up0");
    want.push(format!("vt1 {tc} mesh_tc_task"));
    want.push(format!("lo {tc} mesh_tc_host"));
    assert_eq!(attached, want, "attached while running");
    let accept_local = |lab: &Lab| {
        mesh_tests::lab::exec(&lab.node_ns, "sysctl -n net.ipv4.conf.lo.accept_local")
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        accept_local(&lab),
        "1",
        "the loopback takes replies to the node's flows"
    );
    assert!(lab.tcp_request(WEB_TCP, "x").is_ok());
    let status = lab.stop_meshd().unwrap();
    assert!(status.success(), "meshd exit status {status}");
    let after = attached_programs(&lab);
    assert!(after.is_empty(), "still attached after SIGTERM: {after:?}");
    assert_eq!(accept_local(&lab), "0", "put back as meshd found it");
    let pins = lab.bpffs().join("mesh");
    assert!(!pins.exists(), "{} left", pins.display());
    // Without the mesh the node's own stack answers: nothing listens there.
    assert!(lab.tcp_request(WEB_TCP, "x").is_err());

    let (slot, dir) = (lab.slot, lab.dir.clone());
    drop(lab);
    let left = mesh_tests::lab::slot_namespaces(slot);
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!dir.exists(), "lab directory left: {}", dir.display());
}

/// What is attached in the node: the intercept on the uplink (XDP and TC,
/// or TC alone), TC programs on the bridge's ports and the loopback.
fn attached_programs(lab: &Lab) -> Vec<String> {
    mesh_tests::lab::attached_programs(&lab.node_ns, &["up0", "br0", "vt1", "lo"])
}

#[test]
fn root_bpf_log_lines_reach_the_daemon_log_only_when_asked() {
    // A service without tasks: its packets are dropped (reason no_backend).
    let mut lab = Lab::new(1).unwrap();
    lab.write_state(&lab.state_toml(&[])).unwrap();
    lab.meshd_log = "debug".into();
    lab.start_meshd(&meshd_path().unwrap(), &["--bpf-log-level", "debug"])
        .unwrap();
    assert!(lab.udp_request(WEB_UDP, "x").is_err(), "no task, no answer");
    let drop_line = format!("{} drop: reason 4", mesh_tests::lab::intercept().name());
    lab.meshd()
        .unwrap()
        .wait_log(&drop_line, Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        lab.metric("mesh_drops_total", "reason=\"no_backend\"")
            .unwrap(),
        1
    );
    lab.stop_meshd().unwrap();

    // By default (info) the programs do not even emit them. (The counter
    // goes on from where the last meshd left it: the maps were adopted.)
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    assert!(lab.udp_request(WEB_UDP, "x").is_err());
    assert_eq!(
        lab.metric("mesh_drops_total", "reason=\"no_backend\"")
            .unwrap(),
        2
    );
    assert!(!lab.meshd().unwrap().log_text().contains(" drop: reason"));
}

#[test]
fn root_a_failing_test_leaves_nothing_behind() {
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let lab = lab_with_meshd(2, &[1, 2]);
        let _open = lab.tcp_connect(WEB_TCP).unwrap();
        *seen.lock().unwrap() = Some((lab.slot, lab.meshd().unwrap().pid(), lab.dir.clone()));
        panic!("deliberate failure with the lab up");
    });
    assert!(r.is_err());
    let (slot, pid, dir) = seen.lock().unwrap().take().unwrap();
    let left = mesh_tests::lab::slot_namespaces(slot);
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "meshd (pid {pid}) still running"
    );
    assert!(!dir.exists(), "lab directory left");
}

#[test]
fn root_admin_endpoint_and_sighup_reload() {
    let mut lab = Lab::new(2).unwrap();
    lab.start_task(1).unwrap();
    lab.start_task(2).unwrap();
    lab.write_state(&lab.state_toml(&[1])).unwrap();
    // A watcher too slow to matter: only SIGHUP can apply the change below.
    lab.start_meshd(&meshd_path().unwrap(), &["--watch-interval-ms", "3600000"])
        .unwrap();
    assert_eq!(lab.admin_get("/ready").unwrap().trim(), "ready");
    assert_eq!(lab.admin_get("/live").unwrap().trim(), "live");
    assert!(lab.admin_get("/nope").is_err(), "unknown paths are 404");
    assert_eq!(lab.metric("mesh_ready", "").unwrap(), 1);
    assert_eq!(lab.metric("mesh_state_generation", "").unwrap(), 1);

    let skip = lab.meshd().unwrap().log_len();
    lab.write_state(&lab.state_toml(&[1, 2])).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(lab.meshd().unwrap().pid() as i32, libc::SIGHUP) };
    lab.meshd()
        .unwrap()
        .wait_log_after(skip, "generation 2 ", Duration::from_secs(10))
        .unwrap();
    assert_eq!(lab.metric("mesh_state_generation", "").unwrap(), 2);
    let seen = tasks_answering(&lab, 30);
    assert_eq!(seen.len(), 2);
}

#[test]
fn root_a_tasks_icmp_errors_reach_the_client_translated() {
    // Task 2 serves nothing: its kernel answers UDP with "port unreachable",
    // which must reach the client as coming from the node's published port,
    // quoting the datagram the client sent, or the client just times out.
    let mut lab = Lab::new(2).unwrap();
    lab.start_task(1).unwrap();
    // The kernel rate-limits ICMP errors per destination; not what is tested.
    mesh_tests::lab::exec(&lab.task_ns[1], "sysctl -qw net.ipv4.icmp_ratelimit=0").unwrap();
    lab.write_state(&lab.state_toml(&[1, 2])).unwrap();
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    let (mut answered, mut refused) = (0, 0);
    for i in 0..40 {
        let s = lab.udp_connected(WEB_UDP).unwrap();
        s.send(format!("q{i}").as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        match s.recv(&mut buf) {
            Ok(n) => {
                assert!(buf[..n].starts_with(b"task1 "));
                answered += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => panic!("request {i}: neither an answer nor a refusal: {e}"),
        }
    }
    assert!(
        answered > 0 && refused > 0,
        "answered {answered}, refused {refused}"
    );
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
}

#[test]
fn root_path_mtu_discovery_works_through_the_mesh() {
    // A router with a 1000-byte link towards the client: replies of 1500
    // bytes make it send "fragmentation needed" to the node address. Only if
    // that reaches the task (translated) does its TCP lower the segment size;
    // otherwise the big answer never arrives.
    let mut lab = Lab::new_routed(1, 1000).unwrap();
    lab.start_task(1).unwrap();
    lab.write_state(&lab.state_toml(&[1])).unwrap();
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    let mut c = lab.tcp_connect(WEB_TCP).unwrap();
    assert_eq!(c.ask("small").unwrap(), "task1 small");
    let a = c
        .ask("big 6000")
        .expect("the big answer crosses the 1000-byte link");
    assert_eq!(a.len(), "task1 ".len() + 6000);
    let route =
        mesh_tests::lab::ip(&lab.task_ns[0], &format!("route get {}", lab.client_addr)).unwrap();
    assert!(
        route.contains("mtu 1000"),
        "the task learned the path MTU: {route}"
    );
}

#[test]
fn root_a_bridge_port_that_appears_later_gets_the_reply_program() {
    // Task 2 is in the state before its host exists (a container that has
    // not started yet); when its veth joins the bridge, meshd attaches to
    // it without any state change, and task 2's replies get through.
    let mut lab = Lab::new(1).unwrap();
    lab.start_task(1).unwrap();
    lab.write_state(&lab.state_toml(&[1, 2])).unwrap();
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    let skip = lab.meshd().unwrap().log_len();
    assert_eq!(lab.add_task_host().unwrap(), 2);
    lab.start_task(2).unwrap();
    lab.meshd()
        .unwrap()
        .wait_log_after(skip, "iface=vt2", Duration::from_secs(10))
        .expect("the new port gets the reply program");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        if let Ok(a) = lab.tcp_request(WEB_TCP, &format!("{i}")) {
            seen.insert(a.split_whitespace().next().unwrap().to_string());
        }
    }
    assert!(
        seen.contains("task2"),
        "task 2 answers through the mesh: {seen:?}"
    );
}

/// A packet for a local task goes straight into the task's namespace, to
/// the ingress of its end of the veth (`bpf_redirect_peer`, by the link
/// meshd found for it), with no FIB lookup: neither the bridge nor the
/// host end of the veth transmits it.
#[test]
fn root_requests_go_straight_into_the_tasks_namespace() {
    let lab = lab_with_meshd(1, &[1]);
    let stat = |ns: &str, dev: &str, what: &str| -> u64 {
        mesh_tests::lab::exec(ns, &format!("cat /sys/class/net/{dev}/statistics/{what}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let task_ns = lab.task_ns[0].clone();
    let before = (
        stat(&lab.node_ns, "vt1", "tx_packets"),
        stat(&lab.node_ns, "br0", "tx_packets"),
        stat(&task_ns, "eth0", "rx_packets"),
    );
    for i in 0..100 {
        lab.tcp_request(WEB_TCP, &format!("{i}")).unwrap();
    }
    let after = (
        stat(&lab.node_ns, "vt1", "tx_packets"),
        stat(&lab.node_ns, "br0", "tx_packets"),
        stat(&task_ns, "eth0", "rx_packets"),
    );
    // Each connection is at least a SYN, an ACK, a request and a FIN.
    assert!(
        after.2 - before.2 >= 400,
        "the task received {:?}",
        after.2 - before.2
    );
    // An ARP exchange between the task and its gateway may cross them,
    // and a new link's IPv6 chatter (router solicitations, MLD reports)
    // floods the bridge: a few packets, against the 400 or more the task
    // received, all of which would cross both if delivered through them.
    assert!(
        after.0 - before.0 < 20 && after.1 - before.1 < 20,
        "the host end of the veth transmitted {}, the bridge {}: delivered through them",
        after.0 - before.0,
        after.1 - before.1
    );
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
}

/// The programs keep the FIB's answers for about a second (the route
/// cache): a route or neighbour that changes reaches the replies within
/// two. Here the client's Ethernet address changes under a running
/// service; replies sent to the old one would never be received.
#[test]
fn root_replies_follow_a_changed_neighbour_within_two_seconds() {
    let lab = lab_with_meshd(1, &[1]);
    let ask = |timeout_ms: u64| -> anyhow::Result<String> {
        let sock = lab.udp_socket()?;
        sock.set_read_timeout(Some(Duration::from_millis(timeout_ms)))?;
        Ok(lab.udp_ask(&sock, WEB_UDP, "peer")?.0)
    };
    // Replies to this client are routed, and the route is cached.
    for _ in 0..5 {
        ask(2000).expect("a UDP answer before the change");
    }
    let new_mac = "02:00:5e:10:00:99";
    mesh_tests::lab::ip(
        &lab.client_ns,
        &format!("link set dev eth0 address {new_mac}"),
    )
    .unwrap();
    mesh_tests::lab::ip(
        &lab.node_ns,
        &format!(
            "neigh replace {} lladdr {new_mac} dev up0 nud reachable",
            lab.client_addr
        ),
    )
    .unwrap();
    mesh_tests::lab::answers_again_within_two_units("a UDP answer", std::time::Instant::now(), ask);
    assert_eq!(
        lab.tcp_request(WEB_TCP, "after")
            .unwrap()
            .split_once(' ')
            .unwrap()
            .1,
        "after"
    );
}
