//! Traffic that starts on a node (mesh_tests::lab::cluster). Docker's
//! routing mesh answers a node's address and published port from the node
//! itself and from the containers on it; so does mesh. A node's own
//! processes (in its namespace) and its tasks (processes in a task host
//! behind its bridge) call the web service through their node's address,
//! over TCP and UDP. Tasks on that node and on the others answer, each
//! sees the caller's own address and port (no SNAT), and every reply
//! comes from the address and port the caller sent to. Needs root (CI
//! runs as root).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mesh_tests::lab::{Cluster, Topology, WEB_TCP, WEB_UDP, meshd_path};

/// The web service's tasks: two on node 1, two on node 3, none on node 2.
/// Node 1's third task host and node 2's only one serve nothing: they
/// stand for containers of other services that call web.
const WEB: [(usize, usize); 4] = [(1, 1), (1, 2), (3, 1), (3, 2)];

/// The lab, with meshd on every node run with `extra`. Node 2 runs no
/// task of the service, so its meshd cannot find the bridge its tasks sit
/// behind from their routes: it is told (`--task-iface`).
fn cluster(extra: &[&str]) -> Cluster {
    let mut c = Cluster::build(Topology::builder().nodes(&[3, 1, 2]).client(1)).expect("cluster");
    for (j, i) in WEB {
        c.start_task(j, i).expect("task servers");
    }
    let state = c.state(&WEB).render();
    c.write_state_all(&state).unwrap();
    let meshd = meshd_path().unwrap();
    c.start_meshds(&[1, 3], &meshd, extra)
        .expect("meshd starts on nodes 1 and 3");
    let bridge = c.node(2).bridge.clone();
    let mut two = extra.to_vec();
    two.extend(["--task-iface", bridge.as_str()]);
    c.start_meshd(2, &meshd, &two)
        .expect("meshd starts on node 2");
    c
}

fn web_tasks() -> BTreeSet<String> {
    WEB.iter().map(|&(j, i)| Cluster::task_name(j, i)).collect()
}

/// A process that calls the service through its node's address.
struct Caller {
    what: String,
    /// Its network namespace.
    ns: String,
    /// Its node.
    node: usize,
    /// The address its packets to its node's address leave from.
    addr: Ipv4Addr,
}

impl Caller {
    /// A process of node `j` itself.
    fn node(c: &Cluster, j: usize) -> Caller {
        let n = c.node(j);
        Caller {
            what: format!("node {j}"),
            ns: n.ns.clone(),
            node: j,
            addr: n.addr,
        }
    }

    /// A process in task host `i` of node `j`.
    fn task(c: &Cluster, j: usize, i: usize) -> Caller {
        let t = c.task(j, i);
        Caller {
            what: format!("task {i} of node {j}"),
            ns: t.ns.clone(),
            node: j,
            addr: t.addr,
        }
    }
}

/// `n` TCP connections and `n` UDP requests (each from a socket of its
/// own) from `caller` to its node's address; the tasks that answered each.
/// Every answer names the caller's own address and port as the task saw
/// them, and comes from the address and port the caller sent to.
fn call(c: &Cluster, caller: &Caller, n: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    let who = &caller.what;
    let node = c.node(caller.node).addr;
    let (mut tcp, mut udp) = (BTreeSet::new(), BTreeSet::new());
    for k in 0..n {
        let to = SocketAddr::from((node, WEB_TCP));
        let mut conn = c
            .tcp_connect_in(&caller.ns, to)
            .unwrap_or_else(|e| panic!("{who}: TCP connection {k} to {to}: {e:#}"));
        let local = conn.local().unwrap();
        assert_eq!(local.ip(), IpAddr::V4(caller.addr), "{who}: TCP source");
        let a = conn
            .ask("peer")
            .unwrap_or_else(|e| panic!("{who}: TCP request {k} to {to}: {e:#}"));
        let (task, seen) = a.split_once(' ').expect("task and peer");
        assert_eq!(
            seen,
            local.to_string(),
            "{who}: {task} sees the caller's own address and port (TCP {k})"
        );
        tcp.insert(task.to_string());

        let sock = c.udp_socket_in(&caller.ns).unwrap();
        let (a, from) = c
            .udp_ask(&sock, caller.node, WEB_UDP, "peer")
            .unwrap_or_else(|e| {
                let d = lost_answer(c, caller, &sock);
                panic!("{who}: UDP request {k} to {node}:{WEB_UDP}: {e:#}\n{d}")
            });
        assert_eq!(
            from,
            SocketAddr::from((node, WEB_UDP)),
            "{who}: UDP reply source (request {k})"
        );
        let (task, seen) = a.split_once(' ').expect("task and peer");
        let port = sock.local_addr().unwrap().port();
        assert_eq!(
            seen,
            SocketAddr::from((caller.addr, port)).to_string(),
            "{who}: {task} sees the caller's own address and port (UDP {k})"
        );
        udp.insert(task.to_string());
    }
    (tcp, udp)
}

/// What the lab shows once a UDP answer did not come (an intermittent
/// failure of this file's tests in full-suite runs, never reproduced
/// alone): whether it comes late, every node's
/// non-zero mesh counters, the kernel's counters and neighbours in the
/// caller's and the nodes' namespaces, and what `meshd explain` says of
/// the flow. For the failure message; assertions are unchanged.
fn lost_answer(c: &Cluster, caller: &Caller, sock: &std::net::UdpSocket) -> String {
    let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut out = String::from("--- diagnostics\n");
    let mut buf = [0u8; 1500];
    let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(3)));
    out += &match sock.recv_from(&mut buf) {
        Ok((n, from)) => format!(
            "a late answer from {from} within 3 s more: {:?}\n",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => format!("no answer within 3 s more either: {e}\n"),
    };
    for j in 1..=3 {
        let m = c
            .admin_get(j, "/metrics")
            .unwrap_or_else(|e| format!("{e:#}"));
        out += &format!("--- node {j}: mesh counters and conntrack entries (non-zero)\n");
        let counter = |l: &&str| {
            (l.contains("_total") || l.starts_with("mesh_conntrack_entries")) && !l.ends_with(" 0")
        };
        for l in m.lines().filter(counter) {
            out += l;
            out += "\n";
        }
    }
    let mut nss = vec![caller.ns.clone()];
    nss.extend((1..=3).map(|j| c.node(j).ns.clone()));
    for ns in &nss {
        for cmd in ["nstat -as", "ip -s neigh"] {
            let o = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("ip netns exec {ns} {cmd} 2>&1"))
                .output();
            let text = o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            out += &format!(
                "--- {ns}: {cmd}\n{}",
                text.unwrap_or_else(|e| e.to_string())
            );
        }
    }
    if let Ok(meshd) = meshd_path() {
        let node = c.node(caller.node).addr;
        let bpffs = c.bpffs(caller.node).display().to_string();
        let src = format!("{}:{port}", caller.addr);
        let dst = format!("{node}:{WEB_UDP}");
        let ex = c.meshd_cmd(
            caller.node,
            &meshd,
            &["explain", "udp", &src, &dst, "--bpffs", &bpffs],
        );
        out += &format!("--- meshd explain udp {src} {dst}\n{ex:?}\n");
    }
    out
}

fn node_origin(extra: &[&str]) -> Cluster {
    let c = cluster(extra);
    let all = web_tasks();
    // Node 1 runs two of the tasks, node 2 none: flows from either go to
    // tasks here and on node 3.
    let callers = [
        (Caller::node(&c, 1), all.clone()),
        (Caller::node(&c, 2), all.clone()),
        (Caller::task(&c, 1, 3), all.clone()),
        (Caller::task(&c, 2, 1), all.clone()),
        // A task of the service calling its own service: another task
        // answers (to itself it would need SNAT).
        (Caller::task(&c, 1, 1), {
            let mut s = all.clone();
            s.remove(&Cluster::task_name(1, 1));
            s
        }),
    ];
    for (caller, want) in &callers {
        let (tcp, udp) = call(&c, caller, 40);
        assert_eq!(&tcp, want, "{}: the tasks that answer TCP", caller.what);
        assert_eq!(&udp, want, "{}: the tasks that answer UDP", caller.what);
    }
    let m = |j: usize, name: &str| c.metric(j, name, "").unwrap();
    for j in [1, 2] {
        assert!(
            m(j, "mesh_host_origin_packets_total") >= 160,
            "node {j}: its processes' packets"
        );
        assert!(
            m(j, "mesh_task_origin_packets_total") >= 160,
            "node {j}: its tasks' packets"
        );
        assert!(
            m(j, "mesh_replies_to_host_total") >= 80,
            "node {j}: replies handed to its processes"
        );
    }
    for j in 1..=3 {
        assert_eq!(m(j, "mesh_drops_total"), 0, "node {j} drops");
        // Replies of flows that start on a node come back through it,
        // whatever the reply mode.
        assert_eq!(m(j, "mesh_replies_direct_total"), 0, "node {j}");
    }
    // Node 2 runs no task: everything its callers sent, it forwarded.
    assert!(m(2, "mesh_forwarded_packets_total") >= 320);
    c
}

#[test]
fn root_a_nodes_processes_and_tasks_reach_every_task_through_its_address() {
    let c = node_origin(&[]);
    // A datagram of the node's own process that fits neither a task's
    // link (it went out over the loopback's 64 KiB MTU, unfragmented) nor
    // the tunnel to another node: dropped and counted, wherever its task.
    let sock = c.udp_socket_in(&c.node(1).ns).unwrap();
    let big = "x".repeat(3000);
    assert!(
        c.udp_ask(&sock, 1, WEB_UDP, &big).is_err(),
        "no answer to a datagram too big for the way to its task"
    );
    assert_eq!(
        c.metric(1, "mesh_drops_total", "reason=\"too_big\"")
            .unwrap(),
        1
    );
}

#[test]
fn root_flows_that_start_on_a_node_reply_through_it_in_direct_mode() {
    node_origin(&["--reply-mode", "direct"]);
}
