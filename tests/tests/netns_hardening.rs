//! Defects found by review, each reproduced end to end in a namespace lab
//! (client, node running meshd with FORWARD DROP, tasks behind a bridge).
//! Needs root (CI runs as root).

use std::time::{Duration, Instant};

use mesh_tests::lab::{ADMIN, Lab, WEB_TCP, in_netns, meshd_path};

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
    assert_eq!(lab.metric("mesh_state_rejected_total", "").unwrap(), 0);
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
    assert_eq!(lab.metric("mesh_state_rejected_total", "").unwrap(), 0);
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
/// never a moment without it), and at exit removes its filters and the
/// qdisc it added.
#[test]
fn root_netlink_tc_adds_replaces_and_removes_what_it_owns() {
    let mut lab = Lab::new(1).unwrap();
    lab.start_task(1).unwrap();
    lab.write_state(&lab.state_toml(&[1])).unwrap();
    let meshd = meshd_path().unwrap();
    let netlink = ["--tc-attach", "netlink"];
    let qdisc = |lab: &Lab| mesh_tests::lab::exec(&lab.node_ns, "tc qdisc show dev up0").unwrap();
    assert!(!qdisc(&lab).contains("clsact"), "no clsact before meshd");
    lab.start_meshd(&meshd, &netlink).unwrap();
    assert!(qdisc(&lab).contains("clsact"), "meshd added clsact");
    let on = |lab: &Lab| mesh_tests::lab::attached_programs(&lab.node_ns, &["up0", "vt1"]);
    let want = [
        "up0 xdp",
        "up0 netlink mesh_tc_uplink",
        "vt1 netlink mesh_tc_task",
    ];
    assert_eq!(on(&lab), want);
    assert!(lab.tcp_request(WEB_TCP, "a").unwrap().starts_with("task1 "));

    // kill -9: the filters stay (XDP goes with the process's link).
    let pid = lab.meshd().unwrap().pid();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = lab.stop_meshd();
    assert_eq!(
        on(&lab),
        ["up0 netlink mesh_tc_uplink", "vt1 netlink mesh_tc_task"],
        "filters outlive a killed meshd"
    );
    // The next meshd replaces them in place: still one of each.
    lab.start_meshd(&meshd, &netlink).unwrap();
    assert_eq!(on(&lab), want);
    assert!(lab.tcp_request(WEB_TCP, "b").unwrap().starts_with("task1 "));

    // SIGTERM: filters gone. The qdisc stays here: the killed meshd added
    // it, the one after found it (only what a meshd added itself goes).
    assert!(lab.stop_meshd().unwrap().success());
    assert_eq!(on(&lab), Vec::<String>::new());

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
