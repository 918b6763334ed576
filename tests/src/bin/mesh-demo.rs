//! The demo behind `cargo xtask demo`: three nodes on one segment, each
//! running meshd from the same embedded state file, tasks (TCP and UDP
//! servers) on nodes 1 and 3 only, and a client. It sends requests to
//! every node's published ports, prints who served them through which
//! node, what each node's dataplane counted (forwarded, decapsulated,
//! replies carried back), tears the lab down and ends with one `demo:`
//! line. Exit status 0 only when every backend answered through every
//! node, every reply came from the address and port the client sent to,
//! and nothing failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use mesh_tests::lab::{Cluster, Topology, WEB_TCP, WEB_UDP, meshd_path, parse_metric};

/// Tasks per node: node 2 runs none, so everything it answers it forwards.
const TASKS: [usize; 3] = [2, 0, 2];
/// Requests per node and protocol.
const REQUESTS: usize = 60;

#[derive(Default)]
struct Tally {
    requests: usize,
    errors: Vec<String>,
    mismatched: usize,
    /// (backend, node) -> (tcp, udp) answers.
    served: BTreeMap<(String, usize), (usize, usize)>,
}

fn main() {
    let mut t = Tally::default();
    let backends = TASKS.iter().sum::<usize>();
    if let Err(e) = demo(&mut t) {
        t.errors.push(format!("{e:#}"));
    }
    for e in t.errors.iter().take(5) {
        eprintln!("error: {e}");
    }
    // A backend counts once it answered through every node.
    let mut by_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, _) in t.served.keys() {
        *by_backend.entry(name.as_str()).or_default() += 1;
    }
    let answered = by_backend.values().filter(|n| **n == TASKS.len()).count();
    let ok = answered == backends && t.mismatched == 0 && t.errors.is_empty();
    let replies = if t.mismatched == 0 {
        "replies matched destination".to_string()
    } else {
        format!("{} replies came from another address or port", t.mismatched)
    };
    println!(
        "demo: {} requests via {} nodes, {answered}/{backends} backends answered, {replies}, {} errors",
        t.requests,
        TASKS.len(),
        t.errors.len()
    );
    std::process::exit(if ok { 0 } else { 1 });
}

fn demo(t: &mut Tally) -> Result<()> {
    let meshd = meshd_path()?;
    println!(
        "demo: building the lab: 3 nodes on one segment (FORWARD policy DROP), tasks {TASKS:?}, a client with 2 addresses"
    );
    let mut c = Cluster::build(Topology::builder().nodes(&TASKS).client(2)).context("the lab")?;
    c.start_tasks()?;
    let state = c.state(&c.tasks()).render();
    c.write_state_all(&state)?;
    println!("demo: the state file every node reads:\n{}", indent(&state));
    println!("demo: starting meshd on every node ({})", meshd.display());
    c.start_all_meshds(&meshd, &[])?;
    let clients = c.client_addrs();

    for j in 1..=TASKS.len() {
        let node = c.node(j).addr;
        println!(
            "demo: to node {j} ({node}): {REQUESTS} TCP requests to :{WEB_TCP}, {REQUESTS} UDP to :{WEB_UDP}"
        );
        for i in 0..REQUESTS {
            let from = clients[i % clients.len()];
            t.requests += 1;
            let r = (|| -> Result<String> {
                let mut conn = c.tcp_connect(from, j, WEB_TCP)?;
                if conn.peer()? != SocketAddr::from((node, WEB_TCP)) {
                    t.mismatched += 1;
                }
                let a = conn.ask("peer")?;
                // The task sees the client's own address and port.
                let seen = a.split_whitespace().nth(1).unwrap_or_default();
                anyhow::ensure!(
                    seen == conn.local()?.to_string(),
                    "the task saw the client as {seen}, not {}",
                    conn.local()?
                );
                Ok(a)
            })();
            match r {
                Ok(a) => t.served.entry((task_of(&a), j)).or_default().0 += 1,
                Err(e) => t.errors.push(format!("node {j} tcp request {i}: {e:#}")),
            }
            t.requests += 1;
            let r = c
                .udp_socket(from)
                .and_then(|s| c.udp_ask(&s, j, WEB_UDP, &format!("hello {i}")));
            match r {
                Ok((a, reply_from)) => {
                    if reply_from != SocketAddr::from((node, WEB_UDP)) {
                        t.mismatched += 1;
                    }
                    t.served.entry((task_of(&a), j)).or_default().1 += 1;
                }
                Err(e) => t.errors.push(format!("node {j} udp request {i}: {e:#}")),
            }
        }
    }

    println!("demo: who served the requests, through which node (tcp/udp)");
    let mut head = format!("  {:<10} {:<16}", "backend", "address");
    for j in 1..=TASKS.len() {
        head += &format!(" {:>9}", format!("node {j}"));
    }
    println!("{head}");
    for (j, i) in c.tasks() {
        let name = Cluster::task_name(j, i);
        let mut row = format!("  {name:<10} {:<16}", c.node(j).task_addr(i).to_string());
        for n in 1..=TASKS.len() {
            let (tcp, udp) = t
                .served
                .get(&(name.clone(), n))
                .copied()
                .unwrap_or_default();
            row += &format!(" {:>9}", format!("{tcp}/{udp}"));
        }
        println!("{row}");
    }
    println!("demo: what each node's dataplane counted (per-CPU BPF maps, via /metrics)");
    for j in 1..=TASKS.len() {
        let m = c.admin_get(j, "/metrics")?;
        let v = |name| parse_metric(&m, name, "");
        println!(
            "  node {j}: {} delivered, {} forwarded, {} decapsulated, {} replies carried back, {} drops",
            v("mesh_service_packets_total"),
            v("mesh_forwarded_packets_total"),
            v("mesh_decapsulated_packets_total"),
            v("mesh_replies_from_backends_total"),
            v("mesh_drops_total")
        );
        if v("mesh_drops_total") > 0 {
            t.errors.push(format!(
                "node {j}: {} packets dropped",
                v("mesh_drops_total")
            ));
        }
    }
    for j in 1..=TASKS.len() {
        let st = c.stop_meshd(j)?;
        if !st.success() {
            t.errors.push(format!("meshd on node {j} exited with {st}"));
        }
    }
    println!("demo: meshd stopped on every node (programs detached); tearing the lab down");
    drop(c);
    Ok(())
}

fn task_of(answer: &str) -> String {
    answer
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
