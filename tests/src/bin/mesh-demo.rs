//! The demo behind `cargo xtask demo`: a client, one node running meshd from
//! an embedded state file, three tasks serving TCP and UDP. Sends traffic
//! to the node's published ports, prints who served it, tears the lab down,
//! and ends with one `demo:` line. Exit status 0 only when every backend
//! answered, every reply came from the address and port the client sent
//! to, and nothing failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use mesh_tests::lab::{Lab, WEB_TCP, WEB_UDP, meshd_path};

const TASKS: usize = 3;
const TCP_REQUESTS: usize = 150;
const UDP_REQUESTS: usize = 150;

struct Tally {
    requests: usize,
    errors: Vec<String>,
    mismatched: usize,
    served: BTreeMap<String, (usize, usize)>,
}

fn main() {
    let mut t = Tally {
        requests: 0,
        errors: Vec::new(),
        mismatched: 0,
        served: BTreeMap::new(),
    };
    if let Err(e) = demo(&mut t) {
        t.errors.push(format!("{e:#}"));
    }
    for e in t.errors.iter().take(5) {
        eprintln!("error: {e}");
    }
    let answered = t.served.len();
    let ok = answered == TASKS && t.mismatched == 0 && t.errors.is_empty();
    let replies = if t.mismatched == 0 {
        "replies matched destination".to_string()
    } else {
        format!("{} replies came from another address or port", t.mismatched)
    };
    println!(
        "demo: {} requests via 1 nodes, {answered}/{TASKS} backends answered, {replies}, {} errors",
        t.requests,
        t.errors.len()
    );
    std::process::exit(if ok { 0 } else { 1 });
}

fn demo(t: &mut Tally) -> Result<()> {
    let meshd = meshd_path()?;
    println!("demo: building the lab (client, node with FORWARD policy DROP, {TASKS} tasks)");
    let mut lab = Lab::new(TASKS).context("building the lab")?;
    for i in 1..=TASKS {
        lab.start_task(i)?;
    }
    let state = lab.state_toml(&(1..=TASKS).collect::<Vec<_>>());
    lab.write_state(&state)?;
    println!(
        "demo: state file ({}):\n{}",
        lab.state_path().display(),
        indent(&state)
    );
    println!("demo: starting meshd on the node ({})", meshd.display());
    lab.start_meshd(&meshd, &[])?;
    let node = lab.node_addr;
    println!(
        "demo: client {} -> node {node}: {TCP_REQUESTS} TCP requests to :{WEB_TCP}, {UDP_REQUESTS} UDP to :{WEB_UDP}",
        lab.client_addr
    );

    for i in 0..TCP_REQUESTS {
        t.requests += 1;
        let r = (|| -> Result<String> {
            let mut c = lab.tcp_connect(WEB_TCP)?;
            // A connected TCP socket only accepts segments from the address
            // and port it connected to; check the peer anyway.
            if c.peer()? != SocketAddr::from((node, WEB_TCP)) {
                t.mismatched += 1;
            }
            c.ask(&format!("hello {i}"))
        })();
        match r {
            Ok(a) => t.served.entry(task_of(&a)).or_default().0 += 1,
            Err(e) => t.errors.push(format!("tcp request {i}: {e:#}")),
        }
    }
    let socks: Vec<_> = (0..UDP_REQUESTS)
        .map(|_| lab.udp_socket())
        .collect::<Result<_>>()?;
    for (i, s) in socks.iter().enumerate() {
        t.requests += 1;
        match lab.udp_ask(s, WEB_UDP, &format!("hello {i}")) {
            Ok((a, from)) => {
                if from != SocketAddr::from((node, WEB_UDP)) {
                    t.mismatched += 1;
                }
                t.served.entry(task_of(&a)).or_default().1 += 1;
            }
            Err(e) => t.errors.push(format!("udp request {i}: {e:#}")),
        }
    }

    // What the task sees as the client: its real address and port.
    t.requests += 1;
    match lab
        .tcp_connect(WEB_TCP)
        .and_then(|mut c| Ok((c.ask("peer")?, c.local()?)))
    {
        Ok((a, local)) => {
            let seen = a.split_whitespace().nth(1).unwrap_or_default().to_string();
            println!(
                "demo: {} sees the client as {seen} (the client's socket: {local})",
                task_of(&a)
            );
            if seen != local.to_string() {
                t.errors
                    .push(format!("the task saw the client as {seen}, not {local}"));
            }
            t.served.entry(task_of(&a)).or_default().0 += 1;
        }
        Err(e) => t.errors.push(format!("peer request: {e:#}")),
    }

    println!("demo: who served the requests");
    println!(
        "  {:<8} {:<16} {:>5} {:>5}",
        "backend", "address", "tcp", "udp"
    );
    for i in 1..=TASKS {
        let name = format!("task{i}");
        let (tcp, udp) = t.served.get(&name).copied().unwrap_or_default();
        println!(
            "  {name:<8} {:<16} {tcp:>5} {udp:>5}",
            lab.task_addr(i).to_string()
        );
    }
    let metrics = lab.admin_get("/metrics")?;
    println!("demo: meshd's counters (from the per-CPU BPF maps)");
    for l in metrics.lines().filter(|l| {
        l.starts_with("mesh_service_") || (l.starts_with("mesh_drops_total") && !l.ends_with(" 0"))
    }) {
        println!("  {l}");
    }
    let drops = mesh_tests::lab::parse_metric(&metrics, "mesh_drops_total", "");
    if drops > 0 {
        t.errors
            .push(format!("{drops} packets dropped by the dataplane"));
    }
    let st = lab.stop_meshd()?;
    if !st.success() {
        t.errors.push(format!("meshd exited with {st}"));
    }
    println!("demo: meshd stopped (programs detached); tearing the lab down");
    drop(lab);
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
