//! Defects found by review, each reproduced end to end in a namespace lab
//! (client, node running meshd with FORWARD DROP, tasks behind a bridge).
//! Needs root (CI runs as root).

use std::time::{Duration, Instant};

use mesh_tests::lab::{ADMIN, Lab, WEB_TCP, in_netns, meshd_path, retry};

fn lab_with_meshd(tasks: usize, serving: &[usize], extra: &[&str]) -> Lab {
    let mut lab = Lab::new(tasks).expect("lab");
    for i in 1..=tasks {
        lab.start_task(i).expect("task servers");
    }
    lab.write_state(&lab.state_toml(serving)).unwrap();
    lab.start_meshd(&meshd_path().unwrap(), extra)
        .expect("meshd starts");
    lab
}

/// CPU time (user + system) a process has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and
    // stime are fields 14 and 15, i.e. 12th and 13th after the ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: plain sysconf.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Defect 6: with its file descriptors used up by held admin connections,
/// meshd's accept loop spun at 100% CPU, and the state reads that failed
/// meanwhile were counted as rejected states.
#[test]
fn root_admin_connections_cannot_make_meshd_spin_or_lose_a_state() {
    let lab = lab_with_meshd(2, &[1], &[]);
    let pid = lab.meshd().unwrap().pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = format!("--nofile={}:{}", open + 6, open + 6);
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .status()
        .unwrap();
    assert!(st.success(), "prlimit");
    // 80 connections, held open: the kernel queues them all; meshd can
    // take only a few before its descriptors run out.
    let held = in_netns(&lab.node_ns, || {
        (0..80)
            .map(|_| std::net::TcpStream::connect(ADMIN))
            .collect::<std::io::Result<Vec<_>>>()
    })
    .unwrap()
    .expect("connect to the admin endpoint");
    // A new state while no descriptor is free.
    let skip = lab.meshd().unwrap().log_len();
    lab.write_state(&lab.state_toml(&[1, 2])).unwrap();
    let window = Duration::from_secs(2);
    let (c0, t0) = (cpu_time(pid), Instant::now());
    std::thread::sleep(window);
    let used = cpu_time(pid) - c0;
    let wall = t0.elapsed();
    assert!(
        used < wall / 5,
        "meshd used {used:?} of CPU in {wall:?} with its descriptors exhausted"
    );
    drop(held);
    // Once descriptors are free again, the state is applied, and it was
    // never counted as refused.
    lab.meshd()
        .unwrap()
        .wait_log_after(skip, "generation 2 ", Duration::from_secs(10))
        .expect("the state written meanwhile is applied");
    // The admin endpoint drains the 80 closed connections first.
    let rejected = retry(
        Duration::from_secs(10),
        "the admin endpoint answers",
        || lab.metric("mesh_state_rejected_total", ""),
    )
    .unwrap();
    assert_eq!(rejected, 0);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let a = lab.tcp_request(WEB_TCP, &format!("{i}")).unwrap();
        seen.insert(a.split_whitespace().next().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "both tasks serve: {seen:?}");
}

/// Defect 7: a FIFO put in place of the state file blocked meshd's loop
/// forever, so SIGTERM was never handled.
#[test]
fn root_a_fifo_in_place_of_the_state_file_is_refused_and_sigterm_still_works() {
    let mut lab = lab_with_meshd(1, &[1], &[]);
    let skip = lab.meshd().unwrap().log_len();
    let fifo = lab.dir.join("fifo.tmp");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: plain syscall with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::rename(&fifo, lab.state_path()).unwrap();
    let line = lab
        .meshd()
        .unwrap()
        .wait_log_after(skip, "state refused", Duration::from_secs(10))
        .unwrap();
    assert!(line.contains("not a regular file"), "{line}");
    assert!(lab.tcp_request(WEB_TCP, "x").unwrap().starts_with("task1 "));
    let t = Instant::now();
    let st = lab.stop_meshd().expect("meshd exits on SIGTERM");
    assert!(st.success(), "{st}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

/// Defect 4, its trigger: reply entries of removed tasks stay for 60 s,
/// and the reply map had no room for them beside the live ones: after a
/// few task changes the kernel refused a write, the state was half
/// applied (backends written, replies not) and never retried.
#[test]
fn root_task_churn_never_fills_the_reply_map() {
    // Each task is two backends (tcp 8080, udp 5353) and two reply
    // entries; --max-backends 8 lets a pair of tasks replace another.
    let lab = lab_with_meshd(2, &[1, 2], &["--max-backends", "8"]);
    let mut generation = 1;
    for pair in [[3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [1, 2]] {
        generation += 1;
        let skip = lab.meshd().unwrap().log_len();
        lab.write_state(&lab.state_toml(&pair)).unwrap();
        lab.meshd()
            .unwrap()
            .wait_log_after(
                skip,
                &format!("generation {generation} "),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|e| panic!("tasks {pair:?}: {e:#}"));
    }
    let log = lab.meshd().unwrap().log_text();
    assert!(!log.contains("refused") && !log.contains("failed"), "{log}");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let a = lab.tcp_request(WEB_TCP, &format!("{i}")).unwrap();
        seen.insert(a.split_whitespace().next().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "the last state serves: {seen:?}");
    let (_, from) = lab.udp_request(mesh_tests::lab::WEB_UDP, "u").unwrap();
    assert_eq!(from.port(), mesh_tests::lab::WEB_UDP, "replies translated");
}

/// Defect 4: a map write the kernel fails is retried (with backoff) until
/// the state is in, counted as a map update error, never as a refused
/// state.
#[test]
fn root_a_failed_map_write_is_retried_until_the_state_is_in() {
    use mesh_userspace::desired::Desired;
    use mesh_userspace::plan::{Limits, Planner};
    use mesh_userspace::source::{file, ports::DEFAULT_PORT_RANGE};

    let mut lab = Lab::new(2).unwrap();
    lab.start_task(1).unwrap();
    lab.start_task(2).unwrap();
    let first = lab.state_toml(&[1]);
    lab.write_state(&first).unwrap();
    // The writes generation 1 makes, as meshd plans them; the fourth write
    // after them (in the middle of generation 2) fails once.
    let state = file::parse(&first, "first", &DEFAULT_PORT_RANGE).unwrap();
    let d = Desired::compute(&state, "n1", &[]).unwrap();
    let (ops, _) = Planner::new(Limits::default()).plan(&d).unwrap();
    lab.meshd_env = vec![format!("MESH_TEST_FAIL_WRITE={}", ops.len() + 4)];
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    let skip = lab.meshd().unwrap().log_len();
    lab.write_state(&lab.state_toml(&[1, 2])).unwrap();
    let m = lab.meshd().unwrap();
    let failed = m
        .wait_log_after(
            skip,
            "the kernel failed a map write",
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(failed.contains("injected failure"), "{failed}");
    m.wait_log_after(skip, "generation 2 ", Duration::from_secs(10))
        .expect("the retry applies the state");
    assert_eq!(lab.metric("mesh_map_update_errors_total", "").unwrap(), 1);
    // The admin endpoint drains the 80 closed connections first.
    let rejected = retry(
        Duration::from_secs(10),
        "the admin endpoint answers",
        || lab.metric("mesh_state_rejected_total", ""),
    )
    .unwrap();
    assert_eq!(rejected, 0);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let a = lab.tcp_request(WEB_TCP, &format!("{i}")).unwrap();
        seen.insert(a.split_whitespace().next().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "both tasks serve: {seen:?}");
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
}

/// Older kernels (before 6.6) have no TCX: TC programs go on a clsact
/// qdisc through netlink. meshd adds the qdisc where it is missing,
/// replaces a filter of its own left by a meshd that was killed (in place,
/// never a moment without it), and, with --on-exit detach, removes at exit
/// its filters and the qdisc it added (also when a killed meshd added it:
/// the pin directory remembers).
#[test]
fn root_netlink_tc_adds_replaces_and_removes_what_it_owns() {
    let mut lab = Lab::new(1).unwrap();
    lab.start_task(1).unwrap();
    lab.write_state(&lab.state_toml(&[1])).unwrap();
    let meshd = meshd_path().unwrap();
    let netlink = ["--tc-attach", "netlink", "--on-exit", "detach"];
    let qdisc = |lab: &Lab| mesh_tests::lab::exec(&lab.node_ns, "tc qdisc show dev up0").unwrap();
    assert!(!qdisc(&lab).contains("clsact"), "no clsact before meshd");
    lab.start_meshd(&meshd, &netlink).unwrap();
    assert!(qdisc(&lab).contains("clsact"), "meshd added clsact");
    let on = |lab: &Lab| mesh_tests::lab::attached_programs(&lab.node_ns, &["up0", "vt1", "lo"]);
    let mut want = mesh_tests::lab::uplink_programs("up0")
        .into_iter()
        .map(|p| p.replace(" tcx ", " netlink "))
        .collect::<Vec<_>>();
    want.push("vt1 netlink mesh_tc_task".into());
    want.push("lo netlink mesh_tc_host".into());
    assert_eq!(on(&lab), want);
    assert!(lab.tcp_request(WEB_TCP, "a").unwrap().starts_with("task1 "));

    // kill -9: the filters stay, and XDP (with --intercept xdp) through
    // its pinned link.
    lab.kill_meshd().unwrap();
    assert_eq!(on(&lab), want, "everything outlives a killed meshd");
    assert!(lab.tcp_request(WEB_TCP, "k").unwrap().starts_with("task1 "));
    // The next meshd replaces them in place: still one of each.
    lab.start_meshd(&meshd, &netlink).unwrap();
    assert_eq!(on(&lab), want);
    assert!(lab.tcp_request(WEB_TCP, "b").unwrap().starts_with("task1 "));

    // SIGTERM with --on-exit detach: filters gone, and the qdisc the
    // killed meshd added (the pin directory says it did).
    assert!(lab.stop_meshd().unwrap().success());
    assert_eq!(on(&lab), Vec::<String>::new());
    assert!(!qdisc(&lab).contains("clsact"), "{}", qdisc(&lab));

    // A qdisc meshd did not add stays.
    mesh_tests::lab::exec(&lab.node_ns, "tc qdisc add dev up0 clsact").unwrap();
    lab.start_meshd(&meshd, &netlink).unwrap();
    let st = lab.stop_meshd().unwrap();
    assert!(st.success(), "{st}");
    assert!(qdisc(&lab).contains("clsact"), "not meshd's: kept");

    // A meshd that adds the qdisc removes it.
    mesh_tests::lab::exec(&lab.node_ns, "tc qdisc del dev up0 clsact").unwrap();
    lab.start_meshd(&meshd, &netlink).unwrap();
    assert!(qdisc(&lab).contains("clsact"));
    assert!(lab.stop_meshd().unwrap().success());
    assert!(
        !qdisc(&lab).contains("clsact"),
        "removed at exit: {}",
        qdisc(&lab)
    );
}

/// The task that answers on `c`.
fn task_of(c: &mut mesh_tests::lab::Conn) -> String {
    c.task().expect("the connection answers")
}

/// Applies `state` and waits for meshd to report generation `generation`.
fn apply_state(lab: &Lab, state: &str, generation: u32) {
    let skip = lab.meshd().unwrap().log_len();
    lab.write_state(state).unwrap();
    lab.meshd()
        .unwrap()
        .wait_log_after(
            skip,
            &format!("generation {generation} "),
            Duration::from_secs(10),
        )
        .expect("state applied");
}

/// Defect 1, end to end: a flow to tcp 30080 (service web); then 30080
/// belongs to service admin and web moved to 30082. The old flow's next
/// packets used to go on to web's task forever; they are admin's now (its
/// task resets the connection it never saw).
#[test]
fn root_a_port_that_passes_to_another_service_takes_none_of_its_flows() {
    use mesh_tests::lab::StateFile;
    let mut lab = Lab::new(3).unwrap();
    for i in 1..=3 {
        lab.start_task(i).unwrap();
    }
    let (node, t) = (lab.node_addr, [1, 2, 3].map(|i| lab.task_addr(i)));
    let state = move |web: u16, admin: u16| {
        StateFile::new()
            .node("n1", node)
            .service("web", &[("tcp", web, 8080)])
            .service("admin", &[("tcp", admin, 8080)])
            .task("web", "n1", t[0])
            .task("web", "n1", t[1])
            .task("admin", "n1", t[2])
            .render()
    };
    lab.write_state(&state(30080, 30090)).unwrap();
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    let mut old = lab.tcp_connect(30080).unwrap();
    let web_task = task_of(&mut old);
    assert!(web_task == "task1" || web_task == "task2", "{web_task}");

    apply_state(&lab, &state(30082, 30080), 2);
    let r = old.ask("after");
    assert!(
        r.is_err(),
        "the flow stayed with web's {web_task} after 30080 passed to admin: {r:?}"
    );
    assert_eq!(lab.tcp_request(30080, "x").unwrap(), "task3 x");
    let a = lab.tcp_request(30082, "y").unwrap();
    assert!(a.starts_with("task1 ") || a.starts_with("task2 "), "{a}");
}

/// A TCP connection of the node's own, from a local port that is a
/// published port (explicitly bound), to a server in the client's
/// namespace.
fn node_connects_from(
    lab: &Lab,
    local_port: u16,
    server: std::net::SocketAddrV4,
) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::FromRawFd;
    let local = std::net::SocketAddrV4::new(lab.node_addr, local_port);
    in_netns(&lab.node_ns, move || -> std::io::Result<String> {
        // SAFETY: plain socket calls on a descriptor this closure owns
        // (handed to TcpStream, which closes it).
        let stream = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let s = std::net::TcpStream::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
            let sa = |a: std::net::SocketAddrV4| libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            if libc::bind(fd, &sa(local) as *const _ as *const libc::sockaddr, len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::connect(fd, &sa(server) as *const _ as *const libc::sockaddr, len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            s
        };
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        (&stream).write_all(b"hello\n")?;
        let mut line = String::new();
        let mut r = BufReader::new(&stream);
        r.read_line(&mut line)?;
        // Until the server closes: closing second, this end keeps no
        // TIME_WAIT, so the next connection from the same local port and
        // to the same server can be made at once (else EADDRNOTAVAIL,
        // whenever this end happened to close first).
        std::io::Read::read_to_end(&mut r, &mut Vec::new())?;
        Ok(line.trim_end().to_string())
    })
    .expect("a thread in the node's namespace")
}

/// Defect 3: with 30080 published, a connection of the node's own using
/// local port 30080 timed out: its SYN-ACK was taken for a new mesh flow
/// and DNAT'd into a task. meshd also keeps the published ports out of the
/// node's local ports while it runs.
#[test]
fn root_the_nodes_own_connection_from_a_published_port_is_left_to_it() {
    use std::io::{BufRead, BufReader, Write};
    let mut lab = lab_with_meshd(1, &[1], &[]);
    let server = std::net::SocketAddrV4::new(lab.client_addr, 4433);
    let listener = in_netns(&lab.client_ns, move || std::net::TcpListener::bind(server))
        .unwrap()
        .unwrap();
    let serving = std::thread::spawn(move || {
        for _ in 0..2 {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            (&s).write_all(format!("client {line}").as_bytes()).unwrap();
        }
    });
    assert_eq!(
        node_connects_from(&lab, WEB_TCP, server).expect("the node's own connection"),
        "client hello"
    );
    // Its segments after the handshake too (a socket of the node's owns them).
    assert_eq!(
        node_connects_from(&lab, WEB_TCP, server).unwrap(),
        "client hello"
    );
    serving.join().unwrap();
    assert!(lab.tcp_request(WEB_TCP, "x").unwrap().starts_with("task1 "));
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);

    let reserved = |lab: &Lab| {
        mesh_tests::lab::exec(
            &lab.node_ns,
            "cat /proc/sys/net/ipv4/ip_local_reserved_ports",
        )
        .unwrap()
        .trim()
        .to_string()
    };
    assert!(reserved(&lab).contains("30000-32767"), "{}", reserved(&lab));
    let accept_local = |lab: &Lab| {
        mesh_tests::lab::exec(&lab.node_ns, "sysctl -n net.ipv4.conf.lo.accept_local")
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(accept_local(&lab), "1");
    // The dataplane stays when meshd exits, and so does the reservation;
    // a killed meshd's successor does not take it for the host's own. So
    // does the loopback's accept_local: the kept programs still hand the
    // replies of the node's own flows in there (put back, it dropped them
    // as martians and the node's connections to its own published ports
    // failed while no meshd ran).
    assert!(lab.stop_meshd().unwrap().success());
    assert!(
        reserved(&lab).contains("30000-32767"),
        "kept with the dataplane"
    );
    assert_eq!(accept_local(&lab), "1", "kept with the dataplane");
    assert!(
        lab.node_tcp_request(WEB_TCP, "x")
            .expect("the node's own flow to its published port, no meshd running")
            .starts_with("task1 ")
    );
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    lab.kill_meshd().unwrap();
    let meshd = meshd_path().unwrap();
    let (code, out, err) = lab
        .meshd_cmd(
            &meshd,
            &[
                "cleanup",
                "--bpffs",
                lab.bpffs().to_str().unwrap(),
                "--state-dir",
                lab.state_dir().to_str().unwrap(),
            ],
        )
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ip_local_reserved_ports"), "{out}");
    assert_eq!(reserved(&lab), "", "put back as meshd found it");
    assert!(out.contains("accept_local"), "{out}");
    assert_eq!(accept_local(&lab), "0", "put back as meshd found it");
}

/// Conntrack can lose a flow's entry (evicted, or a restart without
/// pinning): its next packets are picked up again, to the same task while
/// the service is unchanged, and the connection goes on.
#[test]
fn root_established_flows_survive_losing_their_conntrack_entries() {
    use aya::maps::{HashMap as BpfHashMap, Map};
    use mesh_common::abi::{CtValue, FlowKey4, MAP_CT4, MAP_CT4_NEW, MAP_CT4_UDP};
    let lab = lab_with_meshd(3, &[1, 2, 3], &[]);
    let mut conns: Vec<_> = (0..12)
        .map(|_| {
            let mut c = lab.tcp_connect(WEB_TCP).unwrap();
            let t = task_of(&mut c);
            (t, c)
        })
        .collect();
    let udp = lab.udp_connected(mesh_tests::lab::WEB_UDP).unwrap();
    let ask_udp = |m: &str| -> String {
        udp.send(m.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = udp.recv(&mut buf).expect("a UDP answer");
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let udp_task = ask_udp("a");
    let mut held = mesh_tests::lab::maps_of(lab.meshd().unwrap().pid()).unwrap();
    let tables: Vec<_> = [MAP_CT4, MAP_CT4_UDP, MAP_CT4_NEW]
        .iter()
        .filter_map(|n| held.remove(*n))
        .collect();
    assert_eq!(tables.len(), 3, "meshd's conntrack tables");
    let mut cleared = 0;
    for m in tables {
        let mut ct: BpfHashMap<_, FlowKey4, CtValue> =
            BpfHashMap::try_from(Map::LruHashMap(m)).unwrap();
        let keys: Vec<FlowKey4> = ct.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            ct.remove(&k).unwrap();
            cleared += 1;
        }
    }
    assert!(cleared >= 13, "{cleared} entries cleared");
    for (t, c) in conns.iter_mut() {
        assert_eq!(&task_of(c), t, "a connection kept its task");
    }
    assert_eq!(ask_udp("b"), udp_task);
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
}

/// Flows whose lifetime ended leave the conntrack tables: meshd sweeps
/// them (every second here), so a table keeps room for new flows instead
/// of evicting one for each. Entries of live flows stay, a connection's
/// among them, and the sweeps are counted by table.
#[test]
fn root_ended_flows_are_swept_from_conntrack_and_live_ones_stay() {
    use aya::maps::{HashMap as BpfHashMap, Map};
    use mesh_common::abi::{
        CT_CLOSING, CT_OPEN, CT_SYN, CtValue, FlowKey4, IPPROTO_TCP, IPPROTO_UDP, MAP_CT4,
        MAP_CT4_NEW, MAP_CT4_UDP, secs_to_units,
    };
    let lab = lab_with_meshd(1, &[1], &["--ct-sweep-interval", "1"]);
    let mut conn = lab.tcp_connect(WEB_TCP).unwrap();
    let task = task_of(&mut conn);
    let now = mesh_userspace::clock::ct_now(&mesh_userspace::clock::jiffy_clock()).unwrap();
    // Default lifetimes: a closing TCP flow 10 s, a SYN and UDP 60 s. Per
    // table: 100 flows that ended a few seconds ago, 100 alive.
    let ended_by = |secs: u32| now - secs_to_units(secs) - 4;
    let tables = [
        (
            MAP_CT4,
            IPPROTO_TCP,
            (CT_CLOSING, ended_by(10)),
            CT_OPEN,
            "tcp",
        ),
        (
            MAP_CT4_UDP,
            IPPROTO_UDP,
            (CT_OPEN, ended_by(60)),
            CT_OPEN,
            "udp",
        ),
        (
            MAP_CT4_NEW,
            IPPROTO_TCP,
            (CT_SYN, ended_by(60)),
            CT_SYN,
            "unconfirmed",
        ),
    ];
    let mut held = mesh_tests::lab::maps_of(lab.meshd().unwrap().pid()).unwrap();
    let key = |proto: u8, i: u32, alive: bool| FlowKey4 {
        // 198.18.250.0/24 (ended) and 198.18.251.0/24 (alive): no client.
        saddr: u32::from_ne_bytes([198, 18, 250 + u8::from(alive), (i % 250) as u8 + 1]),
        daddr: u32::from_ne_bytes(lab.node_addr.octets()),
        sport_be: (40_000 + i as u16).to_be(),
        dport_be: WEB_TCP.to_be(),
        proto,
        _pad0: 0,
        _pad1: 0,
    };
    let mut maps = Vec::new();
    for (name, proto, (ended_state, seen), alive_state, label) in tables {
        let m = held
            .remove(name)
            .unwrap_or_else(|| panic!("meshd's {name}"));
        let mut ct: BpfHashMap<_, FlowKey4, CtValue> =
            BpfHashMap::try_from(Map::LruHashMap(m)).unwrap();
        for i in 0..100 {
            let v = |state, seen| CtValue {
                state,
                seen,
                ..CtValue::default()
            };
            ct.insert(key(proto, i, false), v(ended_state, seen), 0)
                .unwrap();
            ct.insert(key(proto, i, true), v(alive_state, now), 0)
                .unwrap();
        }
        maps.push((ct, proto, label));
    }
    for (ct, proto, label) in &maps {
        retry(Duration::from_secs(10), "the ended entries swept", || {
            let left = (0..100)
                .filter(|&i| ct.get(&key(*proto, i, false), 0).is_ok())
                .count();
            anyhow::ensure!(left == 0, "{left} ended {label} entries left");
            Ok(())
        })
        .unwrap();
        let alive = (0..100)
            .filter(|&i| ct.get(&key(*proto, i, true), 0).is_ok())
            .count();
        assert_eq!(alive, 100, "live {label} entries kept");
        let swept = lab
            .metric("mesh_conntrack_swept_total", &format!("table=\"{label}\""))
            .unwrap();
        assert!(
            swept >= 100,
            "mesh_conntrack_swept_total{{table={label}}} = {swept}"
        );
    }
    // The connection's own entry stayed: it answers, from the same task.
    let std::net::SocketAddr::V4(local) = conn.local().unwrap() else {
        panic!("an IPv4 connection")
    };
    let own = FlowKey4 {
        saddr: u32::from_ne_bytes(local.ip().octets()),
        sport_be: local.port().to_be(),
        ..key(IPPROTO_TCP, 0, false)
    };
    assert!(maps[0].0.get(&own, 0).is_ok(), "the connection's entry");
    assert_eq!(task_of(&mut conn), task);
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
}

/// An IPv4 + UDP datagram from `src` to `dst` carrying `payload`, for a
/// raw socket (checksums computed).
fn udp_datagram(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    use mesh_common::testing::frame::Spec;
    let f = Spec::udp(*src.ip(), src.port(), *dst.ip(), dst.port(), payload).build();
    f[mesh_common::parse::ETH_HLEN..].to_vec()
}

/// Sends a raw IPv4 datagram (header included) from namespace `ns`.
fn send_raw(ns: &str, datagram: Vec<u8>, to: std::net::Ipv4Addr) {
    in_netns(ns, move || {
        // SAFETY: a raw socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(to.octets()),
                },
                sin_zero: [0; 8],
            };
            let n = libc::sendto(
                fd,
                datagram.as_ptr() as *const libc::c_void,
                datagram.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            assert_eq!(
                n as usize,
                datagram.len(),
                "{}",
                std::io::Error::last_os_error()
            );
            libc::close(fd);
        }
    })
    .unwrap();
}

/// Defect 8: a packet entering from one task's bridge port was trusted
/// whatever its source: a container could claim another task's address
/// and have its packets rewritten to node:published and sent to that
/// task's client. It is now refused (and counted).
#[test]
fn root_a_task_cannot_speak_for_another() {
    // Task 1 serves; task 2's host is another container on the bridge.
    let lab = lab_with_meshd(2, &[1], &[]);
    let sock = lab.udp_connected(mesh_tests::lab::WEB_UDP).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let ask = |m: &str| {
        sock.send(m.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        sock.recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    assert!(ask("hi").unwrap().starts_with("task1 "));
    let client = match sock.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        a => panic!("{a}"),
    };
    let task1 = std::net::SocketAddrV4::new(lab.task_addr(1), mesh_tests::lab::UDP_TARGET);
    send_raw(
        &lab.task_ns[1],
        udp_datagram(task1, client, b"spoofed"),
        *client.ip(),
    );
    let got = ask("again").unwrap();
    assert!(got.starts_with("task1 again"), "{got}");
    let mut buf = [0u8; 256];
    assert!(
        sock.recv(&mut buf).is_err(),
        "nothing more came: the spoofed datagram was refused"
    );
    assert_eq!(
        lab.metric("mesh_drops_total", "reason=\"spoofed_reply\"")
            .unwrap(),
        1
    );
}

/// Sends `frames` out of `iface` in namespace `ns` as fast as one thread
/// can (AF_PACKET); returns how long it took.
fn inject(ns: &str, iface: &str, frames: Vec<Vec<u8>>) -> Duration {
    let iface = iface.to_string();
    in_netns(ns, move || {
        let ifindex = {
            let c = std::ffi::CString::new(iface).unwrap();
            // SAFETY: a NUL-terminated name.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        };
        assert!(ifindex > 0);
        // SAFETY: a packet socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            let t = Instant::now();
            for f in &frames {
                sll.sll_addr[..6].copy_from_slice(&f[..6]);
                loop {
                    let n = libc::sendto(
                        fd,
                        f.as_ptr() as *const libc::c_void,
                        f.len(),
                        0,
                        &sll as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if n >= 0 {
                        break;
                    }
                    // The device queue is full: try again.
                    assert_eq!(
                        std::io::Error::last_os_error().raw_os_error(),
                        Some(libc::ENOBUFS)
                    );
                }
            }
            let took = t.elapsed();
            libc::close(fd);
            took
        }
    })
    .unwrap()
}

/// The MAC address of `iface` in namespace `ns`.
fn mac_of(ns: &str, iface: &str) -> [u8; 6] {
    let v: serde_json::Value =
        serde_json::from_str(&mesh_tests::lab::ip(ns, &format!("-j link show {iface}")).unwrap())
            .unwrap();
    let s = v[0]["address"].as_str().unwrap();
    let b: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    b.try_into().unwrap()
}

/// Conntrack under a flood: 300 established connections, then a backend
/// change (so any of them picked again by Maglev would likely move), then
/// a flood of spoofed new flows (SYNs the tasks answer, blind ACKs they
/// reset, UDP requests they answer) that overflows every table many times
/// over. Not one established connection moves. The flood rate this
/// machine's one-thread injector reached is printed (the README quotes it).
#[test]
fn root_a_flood_of_spoofed_flows_moves_no_established_flow() {
    use mesh_common::testing::Rng;
    use mesh_common::testing::frame::{Spec, TCP_ACK, TCP_SYN};
    let lab = lab_with_meshd(
        4,
        &[1, 2, 3],
        &["--ct-entries", "1024", "--ct-new-entries", "1024"],
    );
    let mut conns: Vec<_> = (0..300)
        .map(|_| {
            let mut c = lab.tcp_connect(WEB_TCP).unwrap();
            let t = task_of(&mut c);
            (t, c)
        })
        .collect();
    assert_eq!(
        lab.metric("mesh_conntrack_entries", "table=\"tcp\"")
            .unwrap(),
        300,
        "every handshake confirmed its flow"
    );
    apply_state(&lab, &lab.state_toml(&[1, 2, 3, 4]), 2);
    // The tasks answer the spoofed sources, as on a host with a default
    // route (the node then has no route for the answers: they are dropped
    // there, after the reply path saw them).
    let gw = lab.cluster().topo.nodes[0].gateway;
    for ns in &lab.task_ns {
        mesh_tests::lab::ip(ns, &format!("route add 198.19.0.0/16 via {gw}")).unwrap();
    }

    let (dmac, smac) = (mac_of(&lab.node_ns, "up0"), mac_of(&lab.client_ns, "eth0"));
    let mut rng = Rng::new(42);
    let frames: Vec<Vec<u8>> = (0..60_000)
        .map(|i| {
            // Spoofed sources out of every lab subnet: nothing answers them.
            let src = std::net::Ipv4Addr::new(198, 19, rng.next_u8(), rng.next_u8());
            let sport = 1024 + rng.next_u16() % 60000;
            let mut s = match i % 4 {
                0 | 1 => Spec::tcp(src, sport, lab.node_addr, WEB_TCP, TCP_SYN),
                2 => Spec::tcp(src, sport, lab.node_addr, WEB_TCP, TCP_ACK),
                _ => Spec::udp(src, sport, lab.node_addr, mesh_tests::lab::WEB_UDP, b"q"),
            };
            s.dst_mac = dmac;
            s.src_mac = smac;
            s.build()
        })
        .collect();
    let n = frames.len();
    let took = inject(&lab.client_ns, "eth0", frames);
    eprintln!(
        "flood: {n} spoofed flows in {took:?}: {:.0} packets/s",
        n as f64 / took.as_secs_f64()
    );
    let mut moved = Vec::new();
    for (t, c) in conns.iter_mut() {
        match c.task() {
            Ok(now) if &now == t => {}
            other => moved.push(format!("{t} -> {other:?}")),
        }
    }
    assert!(
        moved.is_empty(),
        "{} of 300 established connections moved: {:?}",
        moved.len(),
        &moved[..moved.len().min(5)]
    );
    assert_eq!(
        lab.metric("mesh_conntrack_entries", "table=\"tcp\"")
            .unwrap(),
        300,
        "the flood confirmed no TCP flow"
    );
    // The unconfirmed table churned (an LRU table keeps some room free);
    // the UDP requests the tasks answered filled the UDP table, apart.
    assert!(
        lab.metric("mesh_conntrack_entries", "table=\"unconfirmed\"")
            .unwrap()
            > 700
    );
    assert!(
        lab.metric("mesh_conntrack_entries", "table=\"udp\"")
            .unwrap()
            > 700
    );
    assert!(
        lab.metric("mesh_drops_total", "reason=\"fib_lookup_failed\"")
            .unwrap()
            > 10_000
    );
}
