//! Operating a node, end to end in network namespaces: the health answer a
//! cloud load balancer probes (drain, stalled sync, per service), and the
//! operator's commands. Needs root (CI runs as root). Each test builds its
//! own lab, removed when the test ends, also when it fails.

use std::time::Duration;

use mesh_tests::lab::{Lab, Meshd, MeshdRun, WEB_TCP, meshd_path, retry};

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

/// Waits (at most 10 s) until the node's health answer has `status` and a
/// body containing `says`; returns the body.
fn health_becomes(lab: &Lab, path: &str, status: u16, says: &str) -> String {
    retry(
        Duration::from_secs(10),
        &format!("GET {path} answers {status} saying {says:?}"),
        || {
            let (st, body) = lab.health(path)?;
            anyhow::ensure!(st == status && body.contains(says), "{st} {body:?}");
            Ok(body)
        },
    )
    .unwrap()
}

fn served(lab: &Lab, n: usize) {
    for i in 0..n {
        let a = lab
            .tcp_request(WEB_TCP, &format!("r{i}"))
            .expect("a request is served");
        assert!(a.starts_with("task1 "), "{a}");
    }
}

#[test]
fn root_health_follows_meshd_drain_and_flows_are_still_served() {
    let lab = lab_with_meshd(1, &[1], &[]);
    let (st, body) = lab.health("/healthz").unwrap();
    assert_eq!(st, 200, "{body}");
    assert!(body.starts_with("ok: generation 1"), "{body}");
    assert_eq!(lab.health("/service/web").unwrap().0, 200);
    assert_eq!(lab.health("/service/nope").unwrap().0, 404);
    // A connection opened before the drain.
    let mut before = lab.tcp_connect(WEB_TCP).unwrap();
    assert_eq!(before.task().unwrap(), "task1");

    let meshd = meshd_path().unwrap();
    let dir = lab.state_dir();
    let dir = dir.to_str().unwrap();
    let (code, out, err) = lab
        .meshd_cmd(
            &meshd,
            &["drain", "--reason", "kernel upgrade", "--state-dir", dir],
        )
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    // It waited for the running meshd to take it.
    assert!(out.contains("answers 503"), "{out}");
    let (st, body) = lab.health("/healthz").unwrap();
    assert_eq!(st, 503);
    assert!(
        body.contains("drained by meshd drain") && body.contains("kernel upgrade"),
        "{body}"
    );
    // Services of a drained node answer 503 too.
    let (st, body) = lab.health("/service/web").unwrap();
    assert_eq!(st, 503, "{body}");
    // Draining only tells load balancers: every flow is still served,
    // the established one and new ones.
    assert_eq!(before.task().unwrap(), "task1");
    served(&lab, 10);
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);

    let (code, out, err) = lab
        .meshd_cmd(&meshd, &["undrain", "--state-dir", dir])
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("answers 200"), "{out}");
    assert_eq!(lab.health("/healthz").unwrap().0, 200);
}

#[test]
fn root_a_drain_outlives_a_restart() {
    let mut lab = lab_with_meshd(1, &[1], &[]);
    let meshd = meshd_path().unwrap();
    let dir = lab.state_dir();
    let dir = dir.to_str().unwrap();
    let (code, _, err) = lab
        .meshd_cmd(&meshd, &["drain", "--state-dir", dir])
        .unwrap();
    assert_eq!(code, 0, "{err}");
    lab.stop_meshd().unwrap();
    lab.start_meshd(&meshd, &[]).unwrap();
    let (st, body) = lab.health("/healthz").unwrap();
    assert_eq!(st, 503, "drained from the start: {body}");
    assert!(body.contains("drained by meshd drain"), "{body}");
    let (code, _, err) = lab
        .meshd_cmd(&meshd, &["undrain", "--state-dir", dir])
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(lab.health("/healthz").unwrap().0, 200);
}

#[test]
fn root_health_turns_503_when_the_sync_stalls_and_back_when_it_resumes() {
    let lab = lab_with_meshd(1, &[1], &["--health-max-sync-age", "1"]);
    assert_eq!(lab.health("/healthz").unwrap().0, 200);
    // The state file goes away: the source cannot be read; the dataplane
    // keeps serving its last state, but the node stops following.
    let path = lab.state_path();
    let aside = path.with_extension("aside");
    std::fs::rename(&path, &aside).unwrap();
    let body = health_becomes(&lab, "/healthz", 503, "stale: last sync");
    assert!(
        body.contains("the state source is unavailable") && body.contains("cannot read"),
        "{body}"
    );
    served(&lab, 5);
    std::fs::rename(&aside, &path).unwrap();
    health_becomes(&lab, "/healthz", 200, "ok: generation");

    // A state the source refuses stops the clock too.
    let good = std::fs::read_to_string(&path).unwrap();
    lab.write_state(&good.replace("addr = ", "adress = "))
        .unwrap();
    let body = health_becomes(&lab, "/healthz", 503, "stale: last sync");
    assert!(body.contains("refused"), "{body}");
    lab.write_state(&good).unwrap();
    health_becomes(&lab, "/healthz", 200, "ok: generation");
}

#[test]
fn root_a_node_drained_in_its_state_answers_503() {
    let lab = lab_with_meshd(1, &[1], &[]);
    let good = lab.state_toml(&[1]);
    // The state file says this node is drained, as Docker does after
    // `docker node update --availability drain`.
    let drained = good.replacen(
        &format!("addr = \"{}\"", lab.node_addr),
        &format!("addr = \"{}\"\navailability = \"drain\"", lab.node_addr),
        1,
    );
    assert_ne!(drained, good);
    lab.write_state(&drained).unwrap();
    health_becomes(&lab, "/healthz", 503, "drained in the swarm");
    lab.write_state(&good).unwrap();
    health_becomes(&lab, "/healthz", 200, "ok: generation");
}

/// Applies a new task set and waits for meshd to report it.
fn apply(lab: &Lab, tasks: &[usize], generation: u32) {
    apply_with(lab, lab.meshd().unwrap(), tasks, generation)
}

/// As `apply`, with the meshd `m` (one the lab does not hold).
fn apply_with(lab: &Lab, m: &Meshd, tasks: &[usize], generation: u32) {
    let skip = m.log_len();
    lab.write_state(&lab.state_toml(tasks)).unwrap();
    m.wait_log_after(
        skip,
        &format!("generation {generation} "),
        Duration::from_secs(10),
    )
    .expect("state applied");
}

/// Requests in a loop until told to stop: a new TCP connection and a new
/// UDP flow each round, each one a fresh Maglev pick. Counts rounds, and
/// keeps every failure.
struct Traffic {
    rounds: std::sync::atomic::AtomicU32,
    stop: std::sync::atomic::AtomicBool,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Traffic {
    fn new() -> Traffic {
        Traffic {
            rounds: Default::default(),
            stop: Default::default(),
            failures: Default::default(),
        }
    }

    fn run(&self, lab: &Lab) {
        use std::sync::atomic::Ordering;
        let from = std::net::SocketAddr::from((lab.node_addr, mesh_tests::lab::WEB_UDP));
        while !self.stop.load(Ordering::Relaxed) {
            let n = self.rounds.load(Ordering::Relaxed);
            match lab.tcp_request(WEB_TCP, &format!("t{n}")) {
                Ok(a) if a.ends_with(&format!(" t{n}")) => {}
                other => self
                    .failures
                    .lock()
                    .unwrap()
                    .push(format!("tcp {n}: {other:?}")),
            }
            match lab.udp_request(mesh_tests::lab::WEB_UDP, &format!("u{n}")) {
                Ok((a, f)) if f == from && a.ends_with(&format!(" u{n}")) => {}
                other => self
                    .failures
                    .lock()
                    .unwrap()
                    .push(format!("udp {n}: {other:?}")),
            }
            self.rounds.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the next meshd (`run`) while the traffic goes on, lets 20
    /// more rounds pass with it, and stops the traffic; returns it.
    fn hand_over(&self, lab: &Lab, meshd: &std::path::Path, run: &MeshdRun) -> Meshd {
        let next = Meshd::start(&lab.node_ns, meshd, run, "info").unwrap();
        next.wait_ready(Duration::from_secs(30)).unwrap();
        self.wait_rounds(20);
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        next
    }

    /// Requires every round to have been answered (`across`: what
    /// happened meanwhile), and `next` to have adopted the pinned
    /// dataplane with its connection tracking; returns `next`'s log.
    fn none_lost_and_adopted(&self, across: &str, next: &Meshd) -> String {
        let failures = self.failures.lock().unwrap();
        let rounds = self.rounds.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{} of {rounds} rounds failed {across}: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        let log = next.log_text();
        assert!(
            log.contains("adopting the dataplane pinned under")
                && log.contains("connection tracking kept"),
            "{log}"
        );
        log
    }

    /// Waits (at most 20 s) until `n` more rounds are done.
    fn wait_rounds(&self, n: u32) {
        use std::sync::atomic::Ordering;
        let target = self.rounds.load(Ordering::Relaxed) + n;
        retry(Duration::from_secs(20), "traffic goes on", || {
            let r = self.rounds.load(Ordering::Relaxed);
            anyhow::ensure!(r >= target, "{r} rounds of {target}");
            Ok(())
        })
        .unwrap();
    }
}

/// Connections until every task of `tasks` holds at least two.
fn connections(lab: &Lab, tasks: &[&str]) -> Vec<(String, mesh_tests::lab::Conn)> {
    let mut conns: Vec<(String, mesh_tests::lab::Conn)> = Vec::new();
    for _ in 0..300 {
        let mut c = lab.tcp_connect(WEB_TCP).unwrap();
        conns.push((c.task().unwrap(), c));
        let per = |n: &str| conns.iter().filter(|(t, _)| t == n).count();
        if conns.len() >= 24 && tasks.iter().all(|n| per(n) >= 2) {
            break;
        }
    }
    conns
}

/// After task 2 left the state: its connections end, every other one
/// still reaches its task.
fn task2s_end_the_others_stay(conns: &mut [(String, mesh_tests::lab::Conn)]) {
    for (t, c) in conns.iter_mut() {
        let r = c.ask("after");
        if t == "task2" {
            assert!(r.is_err(), "a connection to a removed task ends: {r:?}");
        } else {
            assert!(r.unwrap().starts_with(t.as_str()));
        }
    }
}

/// The headline of pinning: `kill -9` of meshd under continuous requests
/// loses none (the dataplane keeps serving its last state while no meshd
/// runs), and the next meshd adopts the pinned dataplane without flushing
/// connection tracking: long-lived connections keep their task even where
/// Maglev, asked again, would now pick another one.
#[test]
fn root_kill_9_under_continuous_requests_loses_none_and_the_next_meshd_keeps_every_flow() {
    let lab = lab_with_meshd(4, &[1, 2, 3], &[]);
    let mut conns = connections(&lab, &["task1", "task2", "task3"]);
    // A fourth task: Maglev would now send about a quarter of these
    // connections' packets elsewhere; only conntrack keeps them.
    apply(&lab, &[1, 2, 3, 4], 2);
    let meshd = meshd_path().unwrap();
    let (pid, run) = (
        lab.meshd().unwrap().pid() as i32,
        lab.cluster().meshd_run(1),
    );
    let traffic = Traffic::new();
    let next = std::thread::scope(|s| {
        let t = s.spawn(|| traffic.run(&lab));
        traffic.wait_rounds(20);
        // SAFETY: signalling and reaping the lab's child, whose status
        // nobody else waits for (the lab's handle then finds it gone).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        // No meshd: the pinned dataplane serves on.
        traffic.wait_rounds(20);
        for (t, c) in conns.iter_mut() {
            assert_eq!(&c.task().expect("served while meshd is down"), t);
        }
        let next = traffic.hand_over(&lab, &meshd, &run);
        t.join().unwrap();
        next
    });
    traffic.none_lost_and_adopted("across kill -9", &next);
    for (t, c) in conns.iter_mut() {
        assert_eq!(&c.task().expect("the connection survives the restart"), t);
    }
    // The adopted conntrack still holds them (and the new meshd counts them).
    let held = lab
        .metric("mesh_conntrack_entries", "table=\"tcp\"")
        .unwrap();
    assert!(held >= conns.len() as u64, "{held} < {}", conns.len());
    assert_eq!(lab.metric("mesh_drops_total", "").unwrap(), 0);
    // And the new meshd follows changes as the old one did: task 2's
    // connections end, the others' stay.
    apply_with(&lab, &next, &[1, 3, 4], 2);
    task2s_end_the_others_stay(&mut conns);
}

/// Where the lab pins node 1's dataplane, and the names under it.
fn pinned(lab: &Lab, sub: &str) -> Vec<String> {
    mesh_userspace::net::dir_names(&lab.bpffs().join("mesh").join(sub))
}

#[test]
fn root_meshd_cleanup_removes_everything_and_says_what() {
    let mut lab = lab_with_meshd(1, &[1], &[]);
    let meshd = meshd_path().unwrap();
    let bpffs = lab.bpffs().to_str().unwrap().to_string();
    let dir = lab.state_dir().to_str().unwrap().to_string();
    let cleanup = ["cleanup", "--bpffs", &bpffs, "--state-dir", &dir];
    // Not while a meshd runs with these pins.
    let (code, out, err) = lab.meshd_cmd(&meshd, &cleanup).unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("a meshd is running"), "{err}");
    lab.kill_meshd().unwrap();
    let on = |lab: &Lab| mesh_tests::lab::attached_programs(&lab.node_ns, &["up0", "vt1"]);
    // The intercept on the uplink (XDP and TC, or TC alone), the reply
    // program on the task's port.
    let uplink = mesh_tests::lab::uplink_programs("up0");
    let attached = uplink.len() + 1;
    assert_eq!(on(&lab).len(), attached, "{:?}", on(&lab));
    assert!(!pinned(&lab, "maps").is_empty());
    assert!(lab.tcp_request(WEB_TCP, "x").unwrap().starts_with("task1 "));
    // A dry run says the same and removes nothing.
    let mut dry = cleanup.to_vec();
    dry.push("--dry-run");
    let (code, out, err) = lab.meshd_cmd(&meshd, &dry).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("would remove"), "{out}");
    assert_eq!(on(&lab).len(), attached);

    let (code, out, err) = lab.meshd_cmd(&meshd, &cleanup).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    for says in [
        "removed the pinned map MESH_CT4_V2",
        "removed the pinned map MESH_SVC_V2",
        "ip_local_reserved_ports",
    ] {
        assert!(out.contains(says), "{says:?} not in:\n{out}");
    }
    let tc = match mesh_tests::lab::tc_mode() {
        "tcx" => "the pinned link of",
        _ => "the TC filter of",
    };
    let (uplink_tc, xdp) = match mesh_tests::lab::intercept() {
        mesh_userspace::dataplane::Intercept::Xdp => ("mesh_tc_uplink", true),
        mesh_userspace::dataplane::Intercept::Tc => ("mesh_tc_ingress", false),
    };
    assert!(
        out.contains(&format!("removed {tc} {uplink_tc} on up0")),
        "{out}"
    );
    assert!(
        out.contains(&format!("removed {tc} mesh_tc_task on vt1")),
        "{out}"
    );
    assert_eq!(out.contains("mesh_xdp"), xdp, "{out}");
    assert_eq!(on(&lab), Vec::<String>::new());
    assert!(!lab.bpffs().join("mesh").exists(), "the pin directory goes");
    assert!(lab.tcp_request(WEB_TCP, "x").is_err(), "nothing serves now");
    // Nothing left: it says so.
    let (code, out, _) = lab.meshd_cmd(&meshd, &cleanup).unwrap();
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "nothing of the mesh is installed here");
}

/// What a restarted meshd cannot read as its own is replaced, with the
/// reason logged, never misread: a conntrack table of another size alone
/// (the rest is adopted), and a map of an older layout (another `_Vn`)
/// with the whole state (and conntrack, whose entries name its slots).
#[test]
fn root_a_changed_size_or_layout_is_replaced_with_a_reason_never_misread() {
    let mut lab = lab_with_meshd(2, &[1, 2], &[]);
    let meshd = meshd_path().unwrap();
    let mut c = lab.tcp_connect(WEB_TCP).unwrap();
    let t = c.task().unwrap();
    lab.stop_meshd().unwrap();

    lab.start_meshd(&meshd, &["--ct-entries", "4096"]).unwrap();
    let log = lab.meshd().unwrap().log_text();
    assert!(
        log.contains("pinned map MESH_CT4_V2 is not adopted: another layout or size")
            && log.contains("4096 entries"),
        "{log}"
    );
    assert!(log.contains("adopting the dataplane pinned under"), "{log}");
    // Picked up again by Maglev: the same task while the service is the same.
    assert_eq!(c.task().unwrap(), t);
    lab.stop_meshd().unwrap();

    // An older layout of the service map: rename this one's pin as if an
    // older meshd had left MESH_SVC_V1.
    let maps = lab.bpffs().join("mesh/maps");
    std::fs::rename(maps.join("MESH_SVC_V2"), maps.join("MESH_SVC_V1")).unwrap();
    lab.start_meshd(&meshd, &["--ct-entries", "4096"]).unwrap();
    let log = lab.meshd().unwrap().log_text();
    assert!(
        log.contains("map MESH_SVC_V2 is made anew: its layout changed (MESH_SVC_V1 pinned"),
        "{log}"
    );
    assert!(log.contains("a fresh dataplane"), "{log}");
    assert!(log.contains("removed pinned map MESH_SVC_V1"), "{log}");
    assert!(!pinned(&lab, "maps").contains(&"MESH_SVC_V1".to_string()));
    assert!(pinned(&lab, "maps").contains(&"MESH_SVC_V2".to_string()));
    // Served, and the connection too (picked up again).
    assert_eq!(c.task().unwrap(), t);
    assert!(lab.tcp_request(WEB_TCP, "y").is_ok());
}

/// An upgrade: meshd of the previous pinned layout (the commit
/// tests/upgrade-from names, built by `cargo xtask test`) serves, holds
/// long-lived connections, and is replaced by this meshd the way a
/// package upgrade does it (SIGTERM, then the new binary) under continuous
/// requests. Not one is lost, the new meshd adopts what the old one
/// pinned (its new programs swapped in, maps new in this layout made,
/// connection tracking kept), and every connection keeps its task.
#[test]
fn root_an_upgrade_from_the_previous_layout_loses_no_request_and_keeps_every_flow() {
    let Some(prev) = std::env::var_os("MESH_UPGRADE_FROM") else {
        eprintln!(
            "skipped: MESH_UPGRADE_FROM is not set (cargo xtask test builds the meshd of the \
             commit tests/upgrade-from names and sets it)"
        );
        return;
    };
    let prev = std::path::PathBuf::from(prev);
    let mut lab = Lab::new(4).expect("lab");
    for i in 1..=4 {
        lab.start_task(i).unwrap();
    }
    lab.write_state(&lab.state_toml(&[1, 2, 3])).unwrap();
    // The previous meshd runs the intercept that is not the default (XDP),
    // so that the new one shows it keeps what is pinned without a flag.
    let prev_args: &[&str] = if mesh_tests::lab::intercept_override().is_none() {
        &["--intercept", "xdp"]
    } else {
        &[]
    };
    lab.start_meshd(&prev, prev_args)
        .expect("the previous meshd starts");
    let mut conns = connections(&lab, &["task1", "task2", "task3"]);
    apply(&lab, &[1, 2, 3, 4], 2);
    let (pid, run) = (
        lab.meshd().unwrap().pid() as i32,
        lab.cluster().meshd_run(1),
    );
    let meshd = meshd_path().unwrap();
    let traffic = Traffic::new();
    let next = std::thread::scope(|s| {
        let t = s.spawn(|| traffic.run(&lab));
        traffic.wait_rounds(20);
        // SAFETY: signalling and reaping the lab's child, whose status
        // nobody else waits for.
        let status = unsafe {
            libc::kill(pid, libc::SIGTERM);
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            st
        };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the previous meshd exits cleanly: {status:#x}"
        );
        traffic.wait_rounds(10);
        // The upgrade keeps the node's intercept without being told: the
        // previous meshd's is XDP (started so above), and the new one's
        // default is the pinned dataplane's. Changing it is a
        // change of its own, and not hitless (detaching XDP makes a veth,
        // and many drivers, reconfigure their queues): see
        // root_changing_the_intercept_across_a_restart_keeps_the_flows.
        let next = traffic.hand_over(&lab, &meshd, &run);
        t.join().unwrap();
        next
    });
    let log = traffic.none_lost_and_adopted("across the upgrade", &next);
    assert!(!log.contains(" WARN "), "nothing went wrong:\n{log}");
    if mesh_tests::lab::intercept_override().is_none() {
        assert!(
            log.contains("keeping the intercept the pinned dataplane has, xdp"),
            "{log}"
        );
    }
    for (t, c) in conns.iter_mut() {
        assert_eq!(&c.task().expect("the connection survives the upgrade"), t);
    }
    apply_with(&lab, &next, &[1, 3, 4], 2);
    task2s_end_the_others_stay(&mut conns);
}

/// Changing meshd's intercept across a restart (`--intercept xdp`, then
/// `tc`, then `xdp` again): the new meshd attaches its intercept, the
/// links of the other one a previous meshd pinned are removed (XDP too),
/// the pinned maps are adopted with connection tracking, so long-lived
/// connections keep their task even where Maglev would now pick another,
/// and new ones are served. (Not hitless for packets in flight at the
/// moment XDP leaves the device: a veth, as many drivers, reconfigures
/// its queues then. TCP retransmits; the README says so.)
#[test]
fn root_changing_the_intercept_across_a_restart_keeps_the_flows() {
    use mesh_userspace::dataplane::Intercept;
    let mut lab = lab_with_meshd(3, &[1, 2], &["--intercept", "xdp"]);
    let meshd = meshd_path().unwrap();
    let mut conns = connections(&lab, &["task1", "task2"]);
    apply(&lab, &[1, 2, 3], 2);
    let on = |lab: &Lab| mesh_tests::lab::attached_programs(&lab.node_ns, &["up0", "vt1"]);
    let tc = mesh_tests::lab::tc_mode();
    for (step, intercept) in [Intercept::Tc, Intercept::Xdp].into_iter().enumerate() {
        lab.stop_meshd().unwrap();
        lab.start_meshd(&meshd, &["--intercept", intercept.name()])
            .unwrap();
        let mut want = match intercept {
            Intercept::Tc => vec![format!("up0 {tc} mesh_tc_ingress")],
            Intercept::Xdp => vec!["up0 xdp".to_string(), format!("up0 {tc} mesh_tc_uplink")],
        };
        want.push(format!("vt1 {tc} mesh_tc_task"));
        // The other intercept's links go once everything is attached;
        // the device lets go of XDP a moment later.
        retry(
            Duration::from_secs(3),
            &format!("step {step}: only this intercept"),
            || {
                let got = on(&lab);
                anyhow::ensure!(got == want, "{got:?}, want {want:?}");
                Ok(())
            },
        )
        .unwrap();
        let log = lab.meshd().unwrap().log_text();
        assert!(log.contains("connection tracking kept"), "{log}");
        for (t, c) in conns.iter_mut() {
            // (A segment lost as XDP left is retransmitted by TCP.)
            let r = c.ask(&format!("step {step}"));
            assert!(
                r.as_deref().is_ok_and(|a| a.starts_with(t.as_str())),
                "step {step}: the connection keeps {t}: {r:?}"
            );
        }
        assert!(lab.tcp_request(WEB_TCP, "new").is_ok());
    }
}

/// `text` with `line` added to service `web` (after its name).
fn web_with(text: &str, line: &str) -> String {
    let out = text.replacen("name = \"web\"\n", &format!("name = \"web\"\n{line}\n"), 1);
    assert_ne!(out, text, "no service web in the state");
    out
}

/// A service's allow list lets in only its sources: others are dropped
/// in XDP and counted, and never reach conntrack; the list follows the
/// state, and without one every source is served.
#[test]
fn root_source_ranges_let_only_their_sources_in_and_count_the_others() {
    use mesh_tests::lab::{Cluster, Topology, WEB_UDP};
    let mut c = Cluster::build(Topology::builder().node(1).client(2)).expect("cluster");
    c.start_tasks().unwrap();
    let [a, b] = c.client_addrs()[..] else {
        panic!("two client addresses")
    };
    let state = c.state(&[(1, 1)]).render();
    let only = |allowed: &str| web_with(&state, &format!("source_ranges = [{allowed}]"));
    c.write_state(1, &only(&format!("\"{a}/32\""))).unwrap();
    c.start_meshd(1, &meshd_path().unwrap(), &[]).unwrap();
    let served = |from| {
        c.tcp_request(from, 1, WEB_TCP, "x").is_ok() && c.udp_request(from, 1, WEB_UDP, "u").is_ok()
    };
    assert!(served(a), "an allowed source is served");
    assert!(c.tcp_request(b, 1, WEB_TCP, "x").is_err(), "tcp from b");
    assert!(c.udp_request(b, 1, WEB_UDP, "u").is_err(), "udp from b");
    // Counted: every SYN (retransmitted ones too) and the datagram.
    let denied = c
        .metric(1, "mesh_drops_total", "reason=\"source_denied\"")
        .unwrap();
    assert!(denied >= 2, "{denied}");
    // Dropped before conntrack: no entry was made for b's packets (a's
    // flows are confirmed, so nothing is left unconfirmed).
    assert_eq!(
        c.metric(1, "mesh_conntrack_entries", "table=\"unconfirmed\"")
            .unwrap(),
        0
    );
    // The list follows the state: b's /24 joins, then the list goes.
    let net = format!("{}/24", std::net::Ipv4Addr::from(u32::from(b) & !0xff));
    let skip = c.meshd(1).unwrap().log_len();
    c.write_state(1, &only(&format!("\"{a}/32\", \"{net}\"")))
        .unwrap();
    c.meshd(1)
        .unwrap()
        .wait_log_after(skip, "generation 2 ", Duration::from_secs(10))
        .unwrap();
    assert!(served(a) && served(b));
    let skip = c.meshd(1).unwrap().log_len();
    c.write_state(1, &state).unwrap();
    c.meshd(1)
        .unwrap()
        .wait_log_after(skip, "generation 3 ", Duration::from_secs(10))
        .unwrap();
    assert!(served(a) && served(b));
    assert_eq!(
        c.metric(1, "mesh_drops_total", "reason=\"source_denied\"")
            .unwrap(),
        denied,
        "nothing denied once allowed"
    );
}

/// Traffic mode `local`: a node sends a service's new flows only to its
/// own tasks (never forwarded), and its per-service health answer is 200
/// only while it has one; in cluster mode a node without a task forwards.
#[test]
fn root_local_traffic_serves_only_local_tasks_and_its_health_follows() {
    use mesh_tests::lab::Cluster;
    let mut c = Cluster::new(&[1, 1]).expect("cluster");
    c.start_tasks().unwrap();
    let from = c.client_addrs()[0];
    let both = c.state(&[(1, 1), (2, 1)]).render();
    let local = |s: &str| web_with(s, "traffic = \"local\"");
    c.write_state_all(&local(&both)).unwrap();
    c.start_all_meshds(&meshd_path().unwrap(), &[]).unwrap();
    let answers = |j: usize| -> std::collections::BTreeSet<String> {
        (0..20)
            .filter_map(|k| c.tcp_request(from, j, WEB_TCP, &format!("{k}")).ok())
            .map(|a| a.split_whitespace().next().unwrap().to_string())
            .collect()
    };
    for j in [1, 2] {
        assert_eq!(
            answers(j),
            [Cluster::task_name(j, 1)].into(),
            "node {j} serves only its own task"
        );
        let (st, body) = c.health(j, "/service/web").unwrap();
        assert_eq!(st, 200, "node {j}: {body}");
        assert!(body.contains("on this node (traffic local)"), "{body}");
    }
    assert_eq!(c.metric(1, "mesh_forwarded_packets_total", "").unwrap(), 0);
    assert_eq!(c.metric(2, "mesh_forwarded_packets_total", "").unwrap(), 0);

    // Node 2's task goes: node 2 has none, its service health says so
    // (a load balancer probing /service/web skips it) and it forwards
    // nothing; node 1 goes on.
    let one = c.state(&[(1, 1)]).render();
    for j in [1, 2] {
        let skip = c.meshd(j).unwrap().log_len();
        c.write_state(j, &local(&one)).unwrap();
        c.meshd(j)
            .unwrap()
            .wait_log_after(skip, "generation 2 ", Duration::from_secs(10))
            .unwrap();
    }
    let (st, body) = c.health(2, "/service/web").unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("no task of web on this node"), "{body}");
    assert_eq!(
        c.health(2, "/healthz").unwrap().0,
        200,
        "the node itself is fine"
    );
    assert_eq!(c.health(1, "/service/web").unwrap().0, 200);
    // (One try: a SYN nobody answers costs the connect timeout.)
    assert!(
        c.tcp_request(from, 2, WEB_TCP, "none").is_err(),
        "node 2 serves web from nowhere"
    );
    assert!(
        c.metric(2, "mesh_drops_total", "reason=\"no_backend\"")
            .unwrap()
            > 0
    );
    assert_eq!(c.metric(2, "mesh_forwarded_packets_total", "").unwrap(), 0);
    assert_eq!(answers(1), [Cluster::task_name(1, 1)].into());

    // In cluster mode node 2 forwards to node 1's task instead.
    for j in [1, 2] {
        let skip = c.meshd(j).unwrap().log_len();
        c.write_state(j, &one).unwrap();
        c.meshd(j)
            .unwrap()
            .wait_log_after(skip, "generation 3 ", Duration::from_secs(10))
            .unwrap();
    }
    assert_eq!(answers(2), [Cluster::task_name(1, 1)].into());
    assert!(c.metric(2, "mesh_forwarded_packets_total", "").unwrap() > 0);
    assert_eq!(c.health(2, "/service/web").unwrap().0, 200);
}

/// Counters scraped from /metrics match the traffic sent, exactly where
/// the traffic says exactly; the control plane's own metrics are there;
/// and the dataplane's counters go on across a restart that adopts it.
#[test]
fn root_counters_match_the_traffic_sent_and_go_on_across_a_restart() {
    use mesh_tests::lab::WEB_UDP;
    let mut lab = lab_with_meshd(1, &[1], &[]);
    let m = |lab: &Lab, name: &str, labels: &str| lab.metric(name, labels).unwrap();
    let udp = "protocol=\"udp\"";
    let before = (
        m(&lab, "mesh_service_new_flows_total", udp),
        m(&lab, "mesh_service_packets_total", udp),
        m(&lab, "mesh_replies_rewritten_total", ""),
    );
    // Ten UDP flows, one request and one answer each.
    for k in 0..10 {
        let (a, _) = lab.udp_request(WEB_UDP, &format!("u{k}")).unwrap();
        assert!(a.starts_with("task1 "), "{a}");
    }
    let after = (
        m(&lab, "mesh_service_new_flows_total", udp),
        m(&lab, "mesh_service_packets_total", udp),
        m(&lab, "mesh_replies_rewritten_total", ""),
    );
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (10, 10, 10),
        "new flows, packets delivered, replies rewritten"
    );
    // A TCP request: at least its SYN-ACK and its answer are rewritten.
    lab.tcp_request(WEB_TCP, "t").unwrap();
    assert!(m(&lab, "mesh_replies_rewritten_total", "") >= after.2 + 2);
    assert_eq!(
        m(&lab, "mesh_service_new_flows_total", "protocol=\"tcp\""),
        1
    );

    assert!(m(&lab, "mesh_sync_duration_seconds_count", "") >= 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let last = m(&lab, "mesh_last_sync_timestamp_seconds", "");
    assert!(last + 30 >= now && last <= now + 1, "{last} vs {now}");
    assert_eq!(m(&lab, "mesh_node_healthy", ""), 1);
    assert_eq!(m(&lab, "mesh_node_drained", ""), 0);
    assert_eq!(m(&lab, "mesh_dataplane_adopted", ""), 0);

    lab.stop_meshd().unwrap();
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    assert_eq!(m(&lab, "mesh_dataplane_adopted", ""), 1);
    assert_eq!(
        m(&lab, "mesh_service_new_flows_total", udp),
        after.0,
        "the adopted counters go on"
    );
}

/// A daemon's log in JSON: every line an object with a level and a
/// message, and no Rust Debug rendering of a struct anywhere (people and
/// log pipelines read these, not Rust programmers).
#[test]
fn root_logs_are_json_objects_without_debug_structs() {
    let mut lab = lab_with_meshd(2, &[1], &["--log-format", "json"]);
    apply(&lab, &[1, 2], 2);
    let json = lab.meshd().unwrap().log_text();
    lab.stop_meshd().unwrap();
    // And the text log of a default run, for the same patterns.
    lab.start_meshd(&meshd_path().unwrap(), &[]).unwrap();
    apply(&lab, &[1], 2);
    let text = lab.meshd().unwrap().log_text();
    lab.stop_meshd().unwrap();
    let debug_like = |l: &str| {
        ["Report {", "Some(", "None)", "Tcx", "Netlink", ": [", "{ "]
            .iter()
            .find(|p| l.contains(*p))
            .copied()
    };
    for l in text.lines() {
        assert_eq!(debug_like(l), None, "{l}");
    }
    let mut messages = 0;
    for l in json.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        let m = v["message"].as_str().unwrap_or_default();
        assert_eq!(debug_like(m), None, "{l}");
        messages += 1;
    }
    assert!(messages >= 5, "{json}");
    // Fields are keys of their own.
    assert!(json.contains("\"generation\":2"), "{json}");
}

/// `meshd status` shows what the node serves, from the running meshd, and
/// from the pinned maps once no meshd runs (the dataplane still serves).
#[test]
fn root_status_shows_what_the_node_serves_from_the_daemon_or_the_pins() {
    let mut lab = lab_with_meshd(2, &[1, 2], &[]);
    for k in 0..6 {
        lab.tcp_request(WEB_TCP, &format!("{k}")).unwrap();
    }
    let meshd = meshd_path().unwrap();
    let (code, out, err) = lab.meshd_cmd(&meshd, &["status"]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("from the running meshd at 127.0.0.1:9469"),
        "{out}"
    );
    assert!(out.contains("health 200: ok"), "{out}");
    let web = out
        .lines()
        .find(|l| l.starts_with("web ") && l.contains("tcp/30080"))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = web.split_whitespace().collect();
    // SERVICE PORT TARGET TRAFFIC SOURCES AFFINITY TASKS LOCAL NEW-FLOWS ...
    assert_eq!(
        &cols[..9],
        [
            "web",
            "tcp/30080",
            "8080",
            "cluster",
            "any",
            "none",
            "2",
            "2",
            "6"
        ],
        "{web}"
    );
    assert!(out.contains("n1 (this)"), "{out}");

    let (code, out, err) = lab.meshd_cmd(&meshd, &["status", "--json"]).unwrap();
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tcp = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["protocol"] == "tcp")
        .unwrap();
    assert_eq!(tcp["new_flows"], 6);
    assert_eq!(v["health"]["status"], 200);

    lab.kill_meshd().unwrap();
    let bpffs = lab.bpffs().to_str().unwrap().to_string();
    let (code, out, err) = lab
        .meshd_cmd(&meshd, &["status", "--json", "--bpffs", &bpffs])
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["from"].as_str().unwrap().contains("pinned maps"), "{v}");
    let tcp = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["protocol"] == "tcp")
        .unwrap();
    assert_eq!(
        (tcp["name"].as_str(), tcp["port"].as_u64()),
        (Some("web"), Some(30080))
    );
    assert_eq!(tcp["new_flows"], 6);
    assert_eq!(tcp["tasks"], 2);
    let (code, out, _) = lab
        .meshd_cmd(&meshd, &["status", "--bpffs", &bpffs])
        .unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("web") && out.contains("tcp/30080"), "{out}");
}

/// `meshd explain` runs the XDP program on the packet asked about against
/// a copy of the live maps: it says which task a flow goes to before the
/// flow exists, and the real flow goes there; a tracked flow is explained
/// by its entry; an allow list's drop and a port nobody publishes are
/// explained as what they are; and explaining changes nothing.
#[test]
fn root_explain_agrees_with_what_real_packets_do_and_changes_nothing() {
    use mesh_tests::lab::WEB_UDP;
    use std::net::SocketAddrV4;
    let lab = lab_with_meshd(3, &[1, 2, 3], &[]);
    let meshd = meshd_path().unwrap();
    let node = lab.node_addr;
    let explain = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["explain"];
        a.extend_from_slice(args);
        a.push("--json");
        let bpffs = lab.bpffs().to_str().unwrap().to_string();
        a.extend(["--bpffs", &bpffs]);
        let (code, out, err) = lab.meshd_cmd(&meshd, &a).unwrap();
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let task_of_addr = |a: &str| {
        (1..=3)
            .find(|&i| lab.task_addr(i).to_string() == a)
            .map(|i| format!("task{i}"))
            .unwrap_or_else(|| panic!("no task at {a}"))
    };
    let held = |lab: &Lab| {
        (
            lab.metric("mesh_conntrack_entries", "").unwrap(),
            lab.metric("mesh_drops_total", "").unwrap(),
            lab.metric("mesh_service_new_flows_total", "").unwrap(),
        )
    };
    let before = held(&lab);
    let mut picked = std::collections::BTreeSet::new();
    for sport in 45001..45009u16 {
        // Before the flow exists: which task would it reach?
        let src = SocketAddrV4::new(lab.client_addr, sport);
        let dst = format!("{node}:{WEB_TCP}");
        let v = explain(&["tcp", &src.to_string(), &dst]);
        assert_eq!(v["verdict"], "deliver", "{v}");
        // Told in the terms of the node's intercept (both decide alike).
        assert_eq!(v["intercept"], mesh_tests::lab::intercept().name(), "{v}");
        let deliverer = match mesh_tests::lab::intercept() {
            mesh_userspace::dataplane::Intercept::Xdp => "mesh_tc_uplink",
            mesh_userspace::dataplane::Intercept::Tc => "mesh_tc_ingress",
        };
        assert!(
            v["explanation"].as_str().unwrap().contains(deliverer),
            "{v}"
        );
        assert_eq!(v["service"], "web");
        assert_eq!(v["conntrack"]["new_entry"], true, "{v}");
        let want = task_of_addr(v["conntrack"]["backend"]["addr"].as_str().unwrap());
        assert_eq!(v["conntrack"]["backend"]["port"], 8080);
        // The real flow from that very port goes there.
        let mut c = lab.cluster().tcp_connect_from(src, 1, WEB_TCP).unwrap();
        assert_eq!(c.task().unwrap(), want, "source port {sport}");
        picked.insert(want.clone());
        // Once tracked, its segments are explained by the entry.
        let v = explain(&["tcp", &src.to_string(), &dst, "--flags", "ack"]);
        assert_eq!(v["conntrack"]["tracked"], true, "{v}");
        assert_eq!(
            task_of_addr(v["conntrack"]["backend"]["addr"].as_str().unwrap()),
            want
        );
        // UDP likewise.
        let src = SocketAddrV4::new(lab.client_addr, sport);
        let v = explain(&["udp", &src.to_string(), &format!("{node}:{WEB_UDP}")]);
        let want = task_of_addr(v["conntrack"]["backend"]["addr"].as_str().unwrap());
        let sock = lab.cluster().udp_socket_at(src).unwrap();
        let (a, _) = lab.udp_ask(&sock, WEB_UDP, "who").unwrap();
        assert!(a.starts_with(&format!("{want} ")), "{a} vs {want}");
    }
    assert!(picked.len() >= 2, "Maglev spread the flows: {picked:?}");
    // Explaining changed nothing: only the real flows counted.
    let after = held(&lab);
    assert_eq!(after.1, before.1, "drops");
    assert_eq!(after.2 - before.2, 16, "new flows: the real ones only");

    // A port nobody publishes passes untouched.
    let v = explain(&[
        "tcp",
        &format!("{}:45100", lab.client_addr),
        &format!("{node}:31999"),
    ]);
    assert_eq!(v["verdict"], "pass");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains("no service publishes tcp/31999"),
        "{v}"
    );
    // An allow list that leaves the client out: explained as the drop it is,
    // and the real packet is dropped so.
    let skip = lab.meshd().unwrap().log_len();
    lab.write_state(&web_with(
        &lab.state_toml(&[1, 2, 3]),
        "source_ranges = [\"198.19.0.0/16\"]",
    ))
    .unwrap();
    lab.meshd()
        .unwrap()
        .wait_log_after(skip, "generation 2 ", Duration::from_secs(10))
        .unwrap();
    let v = explain(&[
        "udp",
        &format!("{}:45200", lab.client_addr),
        &format!("{node}:{WEB_UDP}"),
    ]);
    assert_eq!(v["verdict"], "drop", "{v}");
    assert_eq!(v["drops"], serde_json::json!(["source_denied"]));
    let denied = lab
        .metric("mesh_drops_total", "reason=\"source_denied\"")
        .unwrap();
    assert_eq!(denied, 0, "explaining dropped nothing for real");
    assert!(lab.udp_request(WEB_UDP, "x").is_err());
    assert_eq!(
        lab.metric("mesh_drops_total", "reason=\"source_denied\"")
            .unwrap(),
        1
    );
}

/// On a node without a task of the service, `meshd explain` says the flow
/// is forwarded, to which node and which task, and the real flow reaches
/// that task.
#[test]
fn root_explain_names_the_node_and_task_a_flow_is_forwarded_to() {
    use mesh_tests::lab::Cluster;
    use std::net::SocketAddrV4;
    let mut c = Cluster::new(&[1, 1]).expect("cluster");
    c.start_tasks().unwrap();
    c.write_state_all(&c.state(&[(1, 1)]).render()).unwrap();
    c.start_all_meshds(&meshd_path().unwrap(), &[]).unwrap();
    let src = SocketAddrV4::new(c.client_addrs()[0], 46001);
    let dst = format!("{}:{WEB_TCP}", c.node(2).addr);
    let bpffs = c.bpffs(2).to_str().unwrap().to_string();
    let src_s = src.to_string();
    let explain = |more: &[&str]| {
        let mut args = vec!["explain", "tcp", &src_s, &dst, "--bpffs", &bpffs];
        args.extend_from_slice(more);
        c.meshd_cmd(2, &meshd_path().unwrap(), &args).unwrap()
    };
    let (code, out, err) = explain(&["--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"], "forward", "{v}");
    let be = &v["conntrack"]["backend"];
    assert_eq!(be["local"], false);
    assert_eq!(be["node"], c.node(1).addr.to_string());
    assert_eq!(be["addr"], c.task(1, 1).addr.to_string());
    let mut conn = c.tcp_connect_from(src, 2, WEB_TCP).unwrap();
    assert_eq!(conn.task().unwrap(), Cluster::task_name(1, 1));
    // The text form says it in words.
    let (_, text, _) = explain(&["--flags", "ack"]);
    assert!(text.contains("forwarded"), "{text}");
    assert!(
        text.contains(&format!("on node {}", c.node(1).addr)),
        "{text}"
    );
}

/// Client affinity, end to end: every connection from one client address
/// lands on one task, whichever node it enters (the nodes share nothing:
/// Maglev hashes the address alone), while several addresses spread over
/// the tasks; a task added to the service does not take a client away
/// from the task it has (the node remembers it), and the setting shows in
/// status.
#[test]
fn root_affinity_keeps_a_client_on_one_task_and_clients_spread() {
    use mesh_tests::lab::{Cluster, Topology};
    use std::collections::{BTreeMap, BTreeSet};
    let mut c = Cluster::build(Topology::builder().nodes(&[2, 2]).client(8)).expect("cluster");
    c.start_tasks().unwrap();
    let clients = c.client_addrs();
    let three = c.state(&[(1, 1), (1, 2), (2, 1)]).render();
    let sticky = |s: &str| web_with(s, "affinity = \"client\"\naffinity_timeout = 600");
    c.write_state_all(&sticky(&three)).unwrap();
    c.start_all_meshds(&meshd_path().unwrap(), &[]).unwrap();
    let task_of = |from, j: usize, k: usize| -> String {
        let a = c
            .tcp_request(from, j, WEB_TCP, &format!("{k}"))
            .unwrap_or_else(|e| panic!("from {from} via node {j}: {e:#}"));
        a.split_whitespace().next().unwrap().to_string()
    };
    let mut chosen = BTreeMap::new();
    for &from in &clients {
        // Many connections (each from a new source port), through both
        // nodes: one task.
        let seen: BTreeSet<String> = (0..12).map(|k| task_of(from, 1 + k % 2, k)).collect();
        assert_eq!(seen.len(), 1, "client {from} reached {seen:?}");
        chosen.insert(from, seen.into_iter().next().unwrap());
    }
    let spread: BTreeSet<&String> = chosen.values().collect();
    assert!(
        spread.len() >= 2,
        "{} clients all went to one task: {chosen:?}",
        clients.len()
    );
    // A fourth task: each client keeps its task (through the node it
    // used: that node remembers it).
    let four = c.state(&[(1, 1), (1, 2), (2, 1), (2, 2)]).render();
    for j in [1, 2] {
        let skip = c.meshd(j).unwrap().log_len();
        c.write_state(j, &sticky(&four)).unwrap();
        c.meshd(j)
            .unwrap()
            .wait_log_after(skip, "generation 2 ", Duration::from_secs(10))
            .unwrap();
    }
    for (k, (&from, task)) in chosen.iter().enumerate() {
        for j in [1, 2] {
            assert_eq!(
                &task_of(from, j, 100 + k),
                task,
                "client {from} via node {j}"
            );
        }
    }
    let (code, out, err) = c.meshd_cmd(1, &meshd_path().unwrap(), &["status"]).unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains("client/600s")),
        "{out}"
    );
}
