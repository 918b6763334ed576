//! meshd following a real Docker swarm (mesh_tests::lab::swarm): Debian's
//! dockerd 20.10 (API 1.41), one per node, each node its own namespaces.
//! Needs root and docker.io (`cargo xtask setup` installs it; CI runs as
//! root). The swarms share this machine's two cores with everything else,
//! so the tests that run one hold a lock: one swarm at a time.
//!
//! On this kernel Docker's own routing mesh cannot serve a published port
//! (no IPVS): whatever answers on one here, meshd made it answer.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use mesh_tests::lab::meshd_path;
use mesh_tests::lab::swarm::Swarm;
use serde_json::Value;

static ONE_SWARM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_SWARM_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The tasks of `service` in a `/state`.
fn tasks<'a>(st: &'a Value, service: &str) -> Vec<&'a Value> {
    st["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["service"] == service)
        .collect()
}

/// Tasks of `service` that get new flows.
fn serving(st: &Value, service: &str) -> usize {
    tasks(st, service)
        .iter()
        .filter(|t| t["draining"] == false)
        .count()
}

/// `(protocol, published, target)` of `service` in a `/state`.
fn ports(st: &Value, service: &str) -> Vec<(String, u64, u64)> {
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["ports"].as_array().unwrap().iter())
        .map(|p| {
            (
                p["protocol"].as_str().unwrap().to_string(),
                p["published"].as_u64().unwrap(),
                p["target"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Requests `/cgi-bin/peer` through node 1's `port` until `want` tasks
/// have answered (each request is a new connection, so Maglev spreads
/// them); checks that every task saw the client's own address. Returns the
/// tasks that answered.
fn every_task_answers(s: &Swarm, port: u16, want: usize) -> BTreeSet<String> {
    every_task_answers_via(s, 1, port, want)
}

/// As `every_task_answers`, through node `j`.
fn every_task_answers_via(s: &Swarm, j: usize, port: u16, want: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for k in 0..60 {
        let body = s
            .curl(j, port, "/cgi-bin/peer")
            .unwrap_or_else(|e| panic!("request {k} to port {port}: {e:#}"));
        let (task, peer) = body.trim().split_once(' ').expect("name and peer");
        // busybox httpd listens on IPv6: "[::ffff:198.18.32.100]:40000".
        let ip = peer
            .trim_start_matches('[')
            .trim_start_matches("::ffff:")
            .split([']', ':'])
            .next()
            .unwrap();
        assert_eq!(
            ip,
            s.client_addr.to_string(),
            "the task sees the client's own address ({body:?})"
        );
        seen.insert(task.to_string());
        if seen.len() == want && k >= 2 * want {
            break;
        }
    }
    assert_eq!(seen.len(), want, "tasks that answered: {seen:?}");
    seen
}

/// Nothing listens: the node's own stack refuses (curl's "couldn't
/// connect", exit 7), as opposed to a time-out.
fn refused(s: &Swarm, port: u16) -> bool {
    s.curl(1, port, "/")
        .is_err_and(|e| format!("{e:#}").contains("curl: (7)"))
}

const T: Duration = Duration::from_secs(30);

/// One UDP request from the client to node `j`'s `port`, from a fresh
/// socket (a new flow); the answer's task name and the address the task
/// saw. The reply must come from the address and port asked.
fn udp_ask(s: &Swarm, j: usize, port: u16) -> anyhow::Result<(String, std::net::SocketAddr)> {
    use anyhow::Context;
    let (from, to) = (
        s.client_addr,
        std::net::SocketAddr::from((s.nodes[j - 1].addr, port)),
    );
    let (answer, reply_from) =
        mesh_tests::lab::in_netns(&s.client_ns, move || -> anyhow::Result<_> {
            let sock = std::net::UdpSocket::bind((from, 0))?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            sock.send_to(b"who", to)?;
            let mut buf = [0u8; 512];
            let (n, reply_from) = sock
                .recv_from(&mut buf)
                .with_context(|| format!("no answer from {to}"))?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), reply_from))
        })??;
    anyhow::ensure!(
        reply_from == to,
        "the answer came from {reply_from}, not {to}"
    );
    let (task, peer) = answer.trim().split_once(' ').context("name and peer")?;
    Ok((task.to_string(), peer.parse()?))
}

#[test]
fn root_docker_single_node_swarm_is_served_and_followed_as_it_changes() {
    let _one = one_at_a_time();
    let mut s = Swarm::start(1).expect("swarm");
    s.create_web_service("web", 2, 30080, &[]).unwrap();
    s.wait(T, "web's two tasks running", || {
        let out = s.docker(
            1,
            &[
                "service",
                "ps",
                "web",
                "--filter",
                "desired-state=running",
                "--format",
                "{{.CurrentState}}",
            ],
        )?;
        Ok(out.lines().filter(|l| l.starts_with("Running")).count() == 2)
    })
    .unwrap();
    // Docker's own mesh does not answer on this kernel.
    assert!(
        refused(&s, 30080),
        "without meshd nothing answers: {:?}",
        s.curl(1, 30080, "/")
    );

    // meshd picks up the tasks that already run, with no flag but --docker.
    s.start_meshd(1, &meshd_path().unwrap(), &[]).unwrap();
    let st = s
        .wait_state(1, T, "web's two tasks", |st| serving(st, "web") == 2)
        .unwrap();
    assert_eq!(ports(&st, "web"), [("tcp".to_string(), 30080, 8080)]);
    for t in tasks(&st, "web") {
        assert_eq!(t["node"], st["local_node"]);
        assert!(
            t["local_addr"].is_string(),
            "delivered at docker_gwbridge: {t}"
        );
    }
    every_task_answers(&s, 30080, 2);

    // Scale up and down.
    s.docker(1, &["service", "scale", "-d", "web=3"]).unwrap();
    s.wait_state(1, T, "three tasks", |st| serving(st, "web") == 3)
        .unwrap();
    every_task_answers(&s, 30080, 3);
    // Each task's replies are trusted only from its own port, found in
    // the namespaces this lab's dockerd keeps under its own exec root
    // (not /run/docker/netns): the task added by the scale-up too, found
    // off meshd's event loop.
    s.wait(T, "every task's port found", || {
        let p = s.reply_ports(1)?;
        Ok(p.len() == 3 && p.iter().all(|i| *i != 0))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?}", s.reply_ports(1)));
    s.docker(1, &["service", "scale", "-d", "web=1"]).unwrap();
    let st = s
        .wait_state(1, T, "one task", |st| tasks(st, "web").len() == 1)
        .unwrap();
    let before: Vec<Value> = tasks(&st, "web").into_iter().cloned().collect();
    every_task_answers(&s, 30080, 1);

    // An update replaces the task: the maps follow it.
    s.docker(1, &["service", "update", "-d", "--env-add", "V=2", "web"])
        .unwrap();
    s.wait_state(1, T, "the updated task", |st| {
        let t = tasks(st, "web");
        t.len() == 1 && serving(st, "web") == 1 && t[0]["addr"] != before[0]["addr"]
    })
    .unwrap();
    every_task_answers(&s, 30080, 1);

    // Removed: the port is not served any more.
    s.docker(1, &["service", "rm", "web"]).unwrap();
    s.wait_state(1, T, "no service", |st| {
        st["services"].as_array().unwrap().is_empty()
    })
    .unwrap();
    s.wait(Duration::from_secs(5), "port 30080 refused", || {
        Ok(refused(&s, 30080))
    })
    .unwrap();
    assert_eq!(s.admin(1, "/ready").unwrap().0, 200);

    // Docker lost: meshd keeps the last good dataplane and says so.
    s.create_web_service("api", 1, 30081, &[]).unwrap();
    s.wait_state(1, T, "api's task", |st| serving(st, "api") == 1)
        .unwrap();
    every_task_answers(&s, 30081, 1);
    let generation = s.state(1).unwrap()["generation"].clone();
    s.kill_dockerd(1).unwrap();
    s.wait(T, "/ready says the source is unavailable", || {
        let (code, body) = s.admin(1, "/ready")?;
        Ok(code == 200 && body.contains("the state source is unavailable"))
    })
    .unwrap();
    let metrics = s.admin(1, "/metrics").unwrap().1;
    assert!(metrics.contains("mesh_source_up 0"), "{metrics}");
    assert_eq!(s.state(1).unwrap()["generation"], generation);
    every_task_answers(&s, 30081, 1);
}

/// Docker unreachable at start: meshd loads, waits, and says why (log,
/// metric, /ready) until it stops.
#[test]
fn root_docker_meshd_without_docker_waits_and_says_why() {
    use mesh_tests::lab::{Meshd, MeshdRun, exec, ip};
    let ns = format!("mswait{}", std::process::id());
    mesh_tests::lab::shell::netns_add(&ns).unwrap();
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            mesh_tests::lab::shell::netns_del(&self.0);
        }
    }
    let _del = Del(ns.clone());
    ip(&ns, "link set lo up").unwrap();
    let run = MeshdRun::docker("unix:///nonexistent/docker.sock", "nodocker");
    let mut m = Meshd::start(&ns, &meshd_path().unwrap(), &run, "info").unwrap();
    m.wait_log("no state yet", Duration::from_secs(30)).unwrap();
    let get = |path: &str| {
        exec(
            &ns,
            &format!("curl -s -w \\n%{{http_code}} http://127.0.0.1:9469{path}"),
        )
        .unwrap()
    };
    let ready = get("/ready");
    assert!(
        ready.contains("not ready: waiting for the state source")
            && ready.contains("/nonexistent/docker.sock")
            && ready.ends_with("503"),
        "{ready}"
    );
    assert!(get("/metrics").contains("mesh_source_up 0"));
    assert!(m.terminate(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn root_docker_three_node_swarm_every_meshd_follows_it_workers_included() {
    let _one = one_at_a_time();
    let mut s = Swarm::start(3).expect("swarm");
    let node3 = s.nodes[2].hostname.clone();
    let not3 = format!("node.hostname!={node3}");
    // web (TCP) and dns (UDP) publish the same number; node 3 (a worker)
    // runs no task.
    s.create_web_service("web", 2, 30080, &["--constraint", &not3])
        .unwrap();
    s.create_web_service(
        "dns",
        1,
        30053,
        &[
            "--constraint",
            &not3,
            "--publish",
            "published=30080,target=8080,protocol=udp",
        ],
    )
    .unwrap();
    let meshd = meshd_path().unwrap();
    for j in 1..=3 {
        s.start_meshd(j, &meshd, &[]).unwrap();
    }
    let addrs: Vec<String> = s.nodes.iter().map(|n| n.addr.to_string()).collect();
    let addr = |j: usize| addrs[j - 1].clone();
    for j in 1..=3 {
        let st = s
            .wait_state(
                j,
                T,
                "both services with every task and their protocols",
                |st| {
                    serving(st, "web") == 2
                        && serving(st, "dns") == 1
                        && ports(st, "dns").len() == 2
                },
            )
            .unwrap();
        assert_eq!(st["local_node"], addr(j));
        assert_eq!(ports(&st, "web"), [("tcp".to_string(), 30080, 8080)]);
        assert_eq!(
            ports(&st, "dns"),
            [
                ("tcp".to_string(), 30053, 8080),
                ("udp".to_string(), 30080, 8080)
            ],
            "node {j}: protocols from the managers' view"
        );
        for t in st["tasks"].as_array().unwrap() {
            assert_eq!(
                t["local_addr"].is_string(),
                t["node"] == addr(j),
                "node {j}: only its own tasks have a delivery address: {t}"
            );
            assert_ne!(t["node"], addr(3));
        }
        assert_eq!(st["nodes"].as_array().unwrap().len(), 3);
    }

    // Drain node 2: every node sees it, and its tasks get no new flows
    // until they are gone.
    let node2 = s.nodes[1].hostname.clone();
    s.docker(1, &["node", "update", "--availability", "drain", &node2])
        .unwrap();
    for j in 1..=3 {
        s.wait_state(j, T, "node 2 drained, its tasks out of the tables", |st| {
            let n2 = st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["addr"] == addr(2))
                .cloned()
                .unwrap_or_default();
            n2["availability"] == "drain"
                && st["tasks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|t| t["node"] != addr(2) || t["draining"] == true)
        })
        .unwrap();
    }
    // A load balancer in front of the nodes stops sending node 2 new
    // flows: its health answer is 503, the others' 200.
    let (code, body) = s.admin(2, "/healthz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("drained in the swarm"), "{body}");
    for j in [1, 3] {
        let (code, body) = s.admin(j, "/healthz").unwrap();
        assert_eq!(code, 200, "node {j}: {body}");
    }
    for j in 1..=3 {
        s.wait_state(j, T, "web back to two tasks, on node 1", |st| {
            serving(st, "web") == 2 && tasks(st, "web").iter().all(|t| t["node"] == addr(1))
        })
        .unwrap();
    }

    // The manager's meshd restarts: workers keep their dataplane, follow
    // their own dockerd meanwhile, and catch up with the view after.
    s.stop_meshd(1).unwrap();
    s.docker(1, &["service", "scale", "-d", "web=3"]).unwrap();
    for j in 2..=3 {
        s.wait_state(j, T, "three web tasks, without the manager's meshd", |st| {
            serving(st, "web") == 3
        })
        .unwrap();
        assert_eq!(s.admin(j, "/ready").unwrap().0, 200);
    }
    let mark = s.meshd(3).unwrap().log_len();
    s.start_meshd(1, &meshd, &[]).unwrap();
    s.meshd(3)
        .unwrap()
        .wait_log_after(mark, "following the managers' view", T)
        .unwrap();
    s.docker(1, &["node", "update", "--availability", "active", &node2])
        .unwrap();
    s.wait_state(3, T, "node 2 active again", |st| {
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["addr"] == addr(2) && n["availability"] == "active")
    })
    .unwrap();
    s.wait(T, "node 2's health answer back to 200", || {
        Ok(s.admin(2, "/healthz")?.0 == 200)
    })
    .unwrap();

    // A node's dockerd dies: once Docker marks the node down, every node
    // sees it.
    s.kill_dockerd(3).unwrap();
    for j in 1..=2 {
        s.wait_state(j, Duration::from_secs(40), "node 3 down", |st| {
            st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["addr"] == addr(3) && n["status"] == "down")
        })
        .unwrap();
    }
}

/// The traffic half of the three-node scenario: every node, a worker
/// without a task included, carries flows to the tasks on the others.
#[test]
fn root_docker_three_node_swarm_every_node_serves_every_service() {
    let _one = one_at_a_time();
    let mut s = Swarm::start(3).expect("swarm");
    let node3 = s.nodes[2].hostname.clone();
    // Node 3, a worker, runs no task.
    s.create_web_service(
        "web",
        2,
        30080,
        &["--constraint", &format!("node.hostname!={node3}")],
    )
    .unwrap();
    let meshd = meshd_path().unwrap();
    for j in 1..=3 {
        s.start_meshd(j, &meshd, &[]).unwrap();
        s.wait_state(j, T, "web's two tasks", |st| serving(st, "web") == 2)
            .unwrap();
    }
    // Through every node, the worker without a task included, every task
    // answers and sees the client's address.
    for j in 1..=3 {
        every_task_answers_via(&s, j, 30080, 2);
    }
    // A UDP service on the same published port number: each protocol's
    // packets reach its own service's tasks, through every node.
    s.docker(
        1,
        &[
            "service",
            "create",
            "-d",
            "--quiet",
            "--name",
            "dns",
            "--replicas",
            "2",
            "--publish",
            "published=30080,target=5353,protocol=udp",
            "--no-resolve-image",
            "--init",
            "--stop-grace-period",
            "1s",
            "--hostname",
            "{{.Node.Hostname}}-{{.Service.Name}}-{{.Task.Slot}}",
            mesh_tests::lab::swarm::IMAGE,
            mesh_tests::lab::swarm::UDP_ECHO,
            "5353",
        ],
    )
    .unwrap();
    for j in 1..=3 {
        s.wait_state(j, T, "dns's two tasks", |st| serving(st, "dns") == 2)
            .unwrap();
    }
    for j in 1..=3 {
        let mut udp = BTreeSet::new();
        for k in 0..40 {
            let (task, peer) =
                udp_ask(&s, j, 30080).unwrap_or_else(|e| panic!("node {j} udp {k}: {e:#}"));
            assert!(task.contains("-dns-"), "UDP answered by {task}");
            assert_eq!(
                peer.ip(),
                std::net::IpAddr::V4(s.client_addr),
                "the task sees the client"
            );
            udp.insert(task);
        }
        assert_eq!(udp.len(), 2, "node {j}: both dns tasks answer: {udp:?}");
        let tcp = every_task_answers_via(&s, j, 30080, 2);
        assert!(tcp.iter().all(|t| t.contains("-web-")), "{tcp:?}");
    }
    // Drain node 2: its task is replaced on node 1; traffic goes on
    // through every node.
    let node2 = s.nodes[1].hostname.clone();
    s.docker(1, &["node", "update", "--availability", "drain", &node2])
        .unwrap();
    let n1 = s.nodes[0].addr.to_string();
    for j in 1..=3 {
        s.wait_state(j, T, "web on node 1 only", |st| {
            serving(st, "web") == 2 && tasks(st, "web").iter().all(|t| t["node"] == n1)
        })
        .unwrap();
        every_task_answers_via(&s, j, 30080, 2);
    }
    s.docker(1, &["node", "update", "--availability", "active", &node2])
        .unwrap();
    // The manager's meshd restarts: the workers keep the view they had
    // meanwhile (node 1's tasks, which now run both, are out of reach
    // while node 1 has no dataplane: meshd detaches at exit), and every
    // node serves again once it is back.
    s.stop_meshd(1).unwrap();
    for j in 2..=3 {
        let st = s.state(j).unwrap();
        assert_eq!(serving(&st, "web"), 2, "node {j} keeps the view");
    }
    s.start_meshd(1, &meshd, &[]).unwrap();
    for j in 1..=3 {
        every_task_answers_via(&s, j, 30080, 2);
    }
    // Kill node 2's dockerd with a web task on it: once Docker marks it
    // down its task leaves, and the others serve through every live node.
    s.docker(1, &["service", "update", "-d", "--force", "web"])
        .unwrap();
    s.wait_state(1, T, "a web task on node 2 again", |st| {
        let n2 = s.nodes[1].addr.to_string();
        serving(st, "web") == 2 && tasks(st, "web").iter().any(|t| t["node"] == n2)
    })
    .unwrap();
    s.kill_dockerd(2).unwrap();
    for j in [1, 3] {
        s.wait_state(
            j,
            Duration::from_secs(60),
            "web's tasks on live nodes",
            |st| {
                let n2 = s.nodes[1].addr.to_string();
                serving(st, "web") == 2 && tasks(st, "web").iter().all(|t| t["node"] != n2)
            },
        )
        .unwrap();
        every_task_answers_via(&s, j, 30080, 2);
    }
}

/// meshd's image builds without a registry (packaging/docker/build-image.sh
/// with `docker import`), and meshd runs in it with the tools it needs.
#[test]
fn root_docker_the_image_builds_without_a_registry_and_meshd_runs_in_it() {
    let _one = one_at_a_time();
    let s = Swarm::start(1).expect("swarm");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let out = std::process::Command::new("bash")
        .arg(root.join("packaging/docker/build-image.sh"))
        .arg(meshd_path().unwrap())
        .arg("mesh/meshd:test")
        .env("DOCKER_HOST", s.nodes[0].url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = |args: &[&str]| {
        let mut a = vec!["run", "--rm", "--network", "none", "mesh/meshd:test"];
        a.extend_from_slice(args);
        s.docker(1, &a)
    };
    let v = run(&["--version"]).unwrap();
    assert!(v.starts_with("meshd "), "{v}");
    // Its tools are there and load: meshd finds ip and says what it lacks.
    let ip = s
        .docker(
            1,
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "/bin/ip",
                "mesh/meshd:test",
                "-j",
                "link",
            ],
        )
        .unwrap();
    assert!(ip.contains("\"ifname\":\"lo\""), "{ip}");
    // The default command is `run --docker`.
    let cfg = s
        .docker(
            1,
            &[
                "image",
                "inspect",
                "-f",
                "{{json .Config.Cmd}}",
                "mesh/meshd:test",
            ],
        )
        .unwrap();
    assert_eq!(cfg.trim(), r#"["run","--docker"]"#);
}
