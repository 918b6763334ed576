//! Operating a node, end to end in network namespaces: the health answer a
//! cloud load balancer probes (drain, stalled sync, per service), and the
//! operator's commands. Needs root (CI runs as root). Each test builds its
//! own lab, removed when the test ends, also when it fails.

use std::time::Duration;

use mesh_tests::lab::{Lab, WEB_TCP, meshd_path, retry};

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
