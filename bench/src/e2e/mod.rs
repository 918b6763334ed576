//! `mesh-bench e2e`: the mesh against what users would pick instead, in a
//! lab of network namespaces, side by side in one run: meshd, iptables
//! DNAT with conntrack, HAProxy (tcp mode), and the floor, a client routed
//! straight to one backend; and the mesh through a node that forwards (no
//! task of its own: it encapsulates to the node that runs the backend),
//! replies back through it or straight from the backend's node. Rounds interleave the paths (starting one
//! path later each round); each path is switched on only while it is
//! measured, so that one path's cost (meshd's XDP program on the uplink,
//! conntrack) never lands on another's figures.
//!
//! - `lab`: the namespaces, the servers and the data paths;
//! - `load`: wrk and iperf3, and CPU time per request.

pub mod lab;
pub mod load;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::util::{self, Goal, median, r1, r3};
use lab::{DataPath, E2eLab};
use load::Mode;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Write the results as JSON: a file, or a directory (e2e.json in it).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Rounds; each measures every path once, in a rotating order.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds of each wrk measurement.
    #[arg(long, default_value_t = 5)]
    pub secs: u32,
    /// Client namespaces, one address each; one wrk runs in each at once.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Connections per client (wrk -c).
    #[arg(long, default_value_t = 16)]
    pub conns: usize,
    /// Backends behind the node (the direct path uses the first).
    #[arg(long, default_value_t = 1)]
    pub backends: usize,
    /// Seconds of the TCP stream and of the UDP measurement (0: skip them).
    #[arg(long, default_value_t = 4)]
    pub stream_secs: u32,
    /// Paths to measure (default: all): mesh_tc, mesh_xdp, iptables,
    /// haproxy, direct, mesh_forward, mesh_forward_direct, mesh_forward_xdp.
    #[arg(long, value_delimiter = ',')]
    pub paths: Vec<String>,
}

/// One path's figures in one round.
#[derive(Default, Clone, Debug)]
struct Round {
    http: BTreeMap<&'static str, load::Http>,
    stream_gbit: Option<f64>,
    /// The direct path's stream measured while meshd is attached (mesh
    /// rounds only): traffic that is not the mesh's.
    direct_stream_with_mesh: Option<f64>,
    udp_pps: Option<f64>,
    udp_sent_pps: Option<f64>,
    mesh_drops: Option<u64>,
    /// Forwarding paths: the counters that show the path was taken
    /// (packets the second node encapsulated, packets the first node
    /// decapsulated, replies the second node sent on, replies the first
    /// node sent straight to clients).
    forwarding: Option<Value>,
}

pub fn run(a: &Args) -> Result<Value> {
    ensure!(
        a.rounds >= 1 && a.secs >= 1,
        "--rounds and --secs must be at least 1"
    );
    ensure!(
        (1..=16).contains(&a.clients) && (1..=8).contains(&a.backends),
        "1..=16 clients and 1..=8 backends"
    );
    for tool in ["wrk", "iperf3", "haproxy", "nginx", "iptables", "nft"] {
        if !crate::proc::have(tool) {
            bail!("{tool} is missing: `cargo xtask bench setup` installs what the suites need");
        }
    }
    let paths: Vec<DataPath> = if a.paths.is_empty() {
        DataPath::ALL.to_vec()
    } else {
        a.paths
            .iter()
            .map(|p| DataPath::parse(p).with_context(|| format!("unknown path {p:?}")))
            .collect::<Result<_>>()?
    };
    let started = Instant::now();
    let machine = util::machine();
    let meshd = mesh_tests::lab::meshd_path()?;
    let mut lab = E2eLab::new(a.clients, a.backends, &meshd).context("the e2e lab")?;
    let script = load::write_script(&lab.dir)?;
    eprintln!(
        "e2e lab: node {} (forwarding node {}), {} backend(s) from {}, {} clients ({}); {} s per wrk run, {} conns per client",
        lab.node.addr,
        lab.forwarder.addr,
        lab.backends.len(),
        lab.backends[0],
        lab.clients.len(),
        lab.clients
            .iter()
            .map(|c| c.addrs[0].to_string())
            .collect::<Vec<_>>()
            .join(", "),
        a.secs,
        a.conns
    );
    let ipvs = lab.ipvs();
    eprintln!("{ipvs}");

    let mut rounds: BTreeMap<&'static str, Vec<Round>> = BTreeMap::new();
    for round in 0..a.rounds {
        for k in 0..paths.len() {
            let p = paths[(round + k) % paths.len()];
            let t = Instant::now();
            lab.enable(p)?;
            let r = measure(&lab, &script, p, a);
            let off = lab.disable(p);
            let r = r.with_context(|| format!("round {} path {}", round + 1, p.name()))?;
            off?;
            eprintln!(
                "round {}/{} {:<19} keepalive {:>8.0} rps, close {:>8.0} rps, stream {} Gbit/s, udp {} pps ({:.0} s)",
                round + 1,
                a.rounds,
                p.name(),
                r.http.get("keepalive").map(|h| h.rps).unwrap_or(0.0),
                r.http.get("close").map(|h| h.rps).unwrap_or(0.0),
                r.stream_gbit
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or("-".into()),
                r.udp_pps.map(|x| format!("{x:.0}")).unwrap_or("-".into()),
                t.elapsed().as_secs_f64()
            );
            rounds.entry(p.name()).or_default().push(r);
        }
    }
    let doc = report(a, &paths, &rounds, machine, &ipvs, &lab);
    eprintln!("total {:.0} s", started.elapsed().as_secs_f64());
    Ok(doc)
}

fn measure(lab: &E2eLab, script: &std::path::Path, p: DataPath, a: &Args) -> Result<Round> {
    let (addr, http_port, perf_port) = lab.addr(p);
    let mut r = Round::default();
    // meshd keeps its counters across restarts (its maps are pinned):
    // the forwarding checks take differences.
    let before = if p.forwards() {
        Some(forwarding_counters(lab)?)
    } else {
        None
    };
    // Warm-up: connections, neighbours, caches (not recorded).
    load::http(lab, script, addr, http_port, Mode::KeepAlive, 1, a.conns)?;
    for mode in [Mode::KeepAlive, Mode::Close] {
        let h = load::http(lab, script, addr, http_port, mode, a.secs, a.conns)?;
        r.http.insert(mode.name(), h);
    }
    if a.stream_secs > 0 {
        r.stream_gbit = Some(load::stream(lab, addr, perf_port, a.stream_secs)?);
        if p.intercept().is_some() {
            let (d, _, dp) = lab.addr(DataPath::Direct);
            r.direct_stream_with_mesh = Some(load::stream(lab, d, dp, a.stream_secs)?);
        }
        if p.udp() {
            let (recv, sent) = load::udp(lab, addr, perf_port, a.stream_secs)?;
            r.udp_pps = Some(recv);
            r.udp_sent_pps = Some(sent);
        }
    }
    if p.meshd() {
        r.mesh_drops = Some(lab.mesh_drops(p)?);
    }
    if p.forwards() {
        // A checked path: every request went through the second node's
        // encapsulation and the first node's decapsulation (a path that
        // quietly took another way would not be the forwarding path).
        let requests: u64 = r.http.values().map(|h| h.requests).sum();
        let (b, a) = (before.unwrap_or_default(), forwarding_counters(lab)?);
        let d = |k: usize| a[k].saturating_sub(b[k]);
        let (fwd, decap, back, direct, mss) = (d(0), d(1), d(2), d(3), d(4));
        ensure!(
            fwd >= requests && decap >= requests,
            "{}: {requests} requests, yet node 2 forwarded {fwd} packets and node 1 decapsulated {decap}",
            p.name()
        );
        if !p.replies_direct() {
            ensure!(
                back >= requests,
                "via-ingress: {requests} requests, {back} replies back through node 2"
            );
        } else {
            ensure!(
                direct >= requests && back == 0,
                "direct replies: {requests} requests, {direct} replies sent straight, {back} through node 2"
            );
        }
        r.forwarding = Some(json!({
            "forwarded_packets_node2": fwd,
            "decapsulated_packets_node1": decap,
            "replies_from_backends_node2": back,
            "replies_direct_node1": direct,
            "mss_clamped_node2": mss,
        }));
    }
    Ok(r)
}

/// Packets node 2 encapsulated, node 1 decapsulated, replies node 2 sent
/// on, replies node 1 sent straight to clients, SYNs node 2 clamped.
fn forwarding_counters(lab: &E2eLab) -> Result<[u64; 5]> {
    Ok([
        lab.metric(2, "mesh_forwarded_packets_total")?,
        lab.metric(1, "mesh_decapsulated_packets_total")?,
        lab.metric(2, "mesh_replies_from_backends_total")?,
        lab.metric(1, "mesh_replies_direct_total")?,
        lab.metric(2, "mesh_mss_clamped_total")?,
    ])
}

fn med(v: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| median(&v))
}

fn report(
    a: &Args,
    paths: &[DataPath],
    rounds: &BTreeMap<&'static str, Vec<Round>>,
    machine: Value,
    ipvs: &str,
    lab: &E2eLab,
) -> Value {
    let http = |p: &str, m: &str, f: fn(&load::Http) -> f64| {
        med(rounds
            .get(p)
            .into_iter()
            .flatten()
            .filter_map(|r| r.http.get(m))
            .map(f))
    };
    let cpu = |p: &str, m: &str| {
        med(rounds
            .get(p)
            .into_iter()
            .flatten()
            .filter_map(|r| r.http.get(m)?.cpu_us_per_req))
    };
    let per_round = |p: &str, f: fn(&Round) -> Option<f64>| -> Vec<Option<f64>> {
        rounds.get(p).into_iter().flatten().map(f).collect()
    };

    println!();
    println!(
        "mesh e2e: {} rounds, {} clients x {} connections, {} s per run; medians over rounds",
        a.rounds, a.clients, a.conns, a.secs
    );
    println!(
        "{:<19} {:<10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>7}",
        "path", "mode", "req/s", "p50 ms", "p99 ms", "cpu us/req", "vs direct", "errors"
    );
    let mut paths_json = Vec::new();
    for p in paths {
        for m in ["keepalive", "close"] {
            let rps = http(p.name(), m, |h| h.rps);
            let direct = http("direct", m, |h| h.rps);
            let errors: u64 = rounds
                .get(p.name())
                .into_iter()
                .flatten()
                .filter_map(|r| r.http.get(m))
                .map(|h| h.errors)
                .sum();
            let ratio = match (rps, direct) {
                (Some(x), Some(d)) if d > 0.0 => Some(x / d),
                _ => None,
            };
            let f = |x: Option<f64>, d: usize| {
                x.map(|v| format!("{v:.d$}")).unwrap_or_else(|| "-".into())
            };
            println!(
                "{:<19} {:<10} {:>10} {:>8} {:>8} {:>10} {:>10} {:>7}",
                p.name(),
                m,
                f(rps, 0),
                f(http(p.name(), m, |h| h.p50_ms), 3),
                f(http(p.name(), m, |h| h.p99_ms), 3),
                f(cpu(p.name(), m), 1),
                f(ratio, 3),
                errors
            );
            let rr: Vec<Value> = rounds
                .get(p.name())
                .into_iter()
                .flatten()
                .filter_map(|r| r.http.get(m))
                .map(|h| {
                    json!({
                        "rps": r1(h.rps),
                        "p50_ms": r3(h.p50_ms),
                        "p99_ms": r3(h.p99_ms),
                        "cpu_us_per_req": h.cpu_us_per_req.map(r1),
                        "machine_cpu_us_per_req": r1(h.machine_cpu_us_per_req),
                        "requests": h.requests,
                        "errors": h.errors,
                        "per_client_rps": h.per_client_rps.iter().map(|&x| r1(x)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            paths_json.push(json!({
                "name": p.name(),
                "mode": m,
                "rps": rps.map(r1),
                "p50_ms": http(p.name(), m, |h| h.p50_ms).map(r3),
                "p99_ms": http(p.name(), m, |h| h.p99_ms).map(r3),
                "cpu_us_per_req": cpu(p.name(), m).map(r1),
                "machine_cpu_us_per_req": http(p.name(), m, |h| h.machine_cpu_us_per_req).map(r1),
                "rps_vs_direct": ratio.map(r3),
                "errors": errors,
                "rounds": rr,
            }));
        }
    }
    println!();
    println!(
        "{:<19} {:>14} {:>12} {:>14}",
        "path", "TCP Gbit/s", "vs direct", "UDP pps recv"
    );
    let stream = |p: &str| med(per_round(p, |r| r.stream_gbit).into_iter().flatten());
    let udp = |p: &str| med(per_round(p, |r| r.udp_pps).into_iter().flatten());
    let mut streams_json = Vec::new();
    for p in paths {
        let s = stream(p.name());
        let ratio = match (s, stream("direct")) {
            (Some(x), Some(d)) if d > 0.0 => Some(x / d),
            _ => None,
        };
        println!(
            "{:<19} {:>14} {:>12} {:>14}",
            p.name(),
            s.map(|x| format!("{x:.2}")).unwrap_or("-".into()),
            ratio.map(|x| format!("{x:.3}")).unwrap_or("-".into()),
            udp(p.name())
                .map(|x| format!("{x:.0}"))
                .unwrap_or(if p.udp() { "-" } else { "n/a (TCP only)" }.into())
        );
        streams_json.push(json!({
            "name": p.name(),
            "tcp_stream_gbit_s": s.map(r3),
            "tcp_stream_vs_direct": ratio.map(r3),
            "tcp_stream_rounds": per_round(p.name(), |r| r.stream_gbit).into_iter().map(|x| x.map(r3)).collect::<Vec<_>>(),
            "udp_pps_received": udp(p.name()).map(r1),
            "udp_pps_sent": med(per_round(p.name(), |r| r.udp_sent_pps).into_iter().flatten()).map(r1),
            "udp": if p.udp() { "measured" } else { "not applicable: HAProxy's community edition proxies TCP only" },
        }));
    }
    // The direct stream while meshd was attached, per intercept.
    let direct_with_mesh = |p: &str| {
        med(per_round(p, |r| r.direct_stream_with_mesh)
            .into_iter()
            .flatten())
    };
    let mesh_paths: Vec<&'static str> = paths
        .iter()
        .filter(|p| p.intercept().is_some())
        .map(|p| p.name())
        .collect();
    for m in &mesh_paths {
        if let Some(x) = direct_with_mesh(m) {
            println!(
                "direct stream while meshd is attached ({m}: traffic that is not the mesh's): {x:.2} Gbit/s"
            );
        }
    }
    let mesh_drops: Option<u64> = mesh_paths
        .iter()
        .filter_map(|m| rounds.get(m))
        .flat_map(|v| v.iter().filter_map(|r| r.mesh_drops))
        .max();
    // The forwarding paths: drops over both nodes, and the counters that
    // show each round took the path.
    let forwarding: Vec<Value> = paths
        .iter()
        .filter(|p| p.forwards())
        .map(|p| {
            let v = rounds.get(p.name()).map(Vec::as_slice).unwrap_or(&[]);
            json!({
                "name": p.name(),
                "mesh_drops": v.iter().filter_map(|r| r.mesh_drops).max(),
                "rounds": v.iter().map(|r| r.forwarding.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    println!("{ipvs}");

    // Goals.
    let mut goals = Vec::new();
    let ratio_goal = |goals: &mut Vec<Goal>, mesh: &str, m: &str, min: f64| {
        let (x, d) = (http(mesh, m, |h| h.rps), http("direct", m, |h| h.rps));
        let r = match (x, d) {
            (Some(x), Some(d)) if d > 0.0 => Some(x / d),
            _ => None,
        };
        goals.push(Goal::new(
            "e2e",
            format!("{mesh}: {m}: requests per second vs direct"),
            format!(">= {min:.2}x"),
            r.map(|r| format!("{r:.4}x"))
                .unwrap_or("not measured".into()),
            r.map(|r| r >= min),
        ));
    };
    for mesh in &mesh_paths {
        ratio_goal(&mut goals, mesh, "keepalive", 0.95);
        ratio_goal(&mut goals, mesh, "close", 0.9);
        for m in ["keepalive", "close"] {
            let (x, i) = (
                http(mesh, m, |h| h.p99_ms),
                http("iptables", m, |h| h.p99_ms),
            );
            goals.push(Goal::new(
                "e2e",
                format!("{mesh}: {m}: p99 latency no worse than iptables DNAT"),
                "mesh <= iptables",
                match (x, i) {
                    (Some(x), Some(i)) => format!("{x:.3} vs {i:.3} ms"),
                    _ => "not measured".into(),
                },
                match (x, i) {
                    (Some(x), Some(i)) => Some(x <= i),
                    _ => None,
                },
            ));
            for other in ["iptables", "haproxy"] {
                let (x, o) = (cpu(mesh, m), cpu(other, m));
                goals.push(Goal::new(
                    "e2e",
                    format!("{mesh}: {m}: CPU per request below {other}"),
                    format!("mesh < {other}"),
                    match (x, o) {
                        (Some(x), Some(o)) => format!("{x:.1} vs {o:.1} us"),
                        _ => "not measured".into(),
                    },
                    match (x, o) {
                        (Some(x), Some(o)) => Some(x < o),
                        _ => None,
                    },
                ));
            }
        }
        let r = match (stream(mesh), stream("direct")) {
            (Some(x), Some(d)) if d > 0.0 => Some(x / d),
            _ => None,
        };
        goals.push(Goal::new(
            "e2e",
            format!("{mesh}: one TCP stream through the mesh vs direct (issue 11)"),
            ">= 0.90x",
            r.map(|r| format!("{r:.3}x"))
                .unwrap_or("not measured".into()),
            r.map(|r| r >= 0.9),
        ));
        let r = match (direct_with_mesh(mesh), stream("direct")) {
            (Some(x), Some(d)) if d > 0.0 => Some(x / d),
            _ => None,
        };
        goals.push(Goal::new(
            "e2e",
            format!(
                "{mesh}: one TCP stream that is not the mesh's, meshd attached vs not (issue 11)"
            ),
            ">= 0.95x",
            r.map(|r| format!("{r:.3}x"))
                .unwrap_or("not measured".into()),
            r.map(|r| r >= 0.95),
        ));
    }
    // The same ratios through a node that forwards (issue 10).
    for p in paths.iter().filter(|p| p.forwards()) {
        ratio_goal(&mut goals, p.name(), "keepalive", 0.95);
        ratio_goal(&mut goals, p.name(), "close", 0.9);
    }
    util::print_goals(&goals);

    json!({
        "bench": "e2e",
        "paths": paths_json,
        "streams": streams_json,
        // meshd's default intercept (tc).
        "direct_stream_with_meshd_gbit_s": direct_with_mesh("mesh_tc").map(r3),
        "direct_stream_with_meshd_by_path": mesh_paths
            .iter()
            .map(|m| (m.to_string(), json!(direct_with_mesh(m).map(r3))))
            .collect::<serde_json::Map<String, Value>>(),
        "mesh_drops": mesh_drops,
        "forwarding": forwarding,
        "ipvs": ipvs,
        "goals": goals.iter().map(|g| g.json()).collect::<Vec<_>>(),
        "config": {
            "rounds": a.rounds,
            "secs_per_run": a.secs,
            "clients": a.clients,
            "client_addrs": lab.clients.iter().map(|c| c.addrs[0].to_string()).collect::<Vec<_>>(),
            "connections_per_client": a.conns,
            "backends": lab.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
            "node": lab.node.addr.to_string(),
            "forwarding_node": lab.forwarder.addr.to_string(),
            "stream_secs": a.stream_secs,
            "cpu_accounting": if lab.group.is_some() { "cgroup (cpuacct) of the lab's processes" } else { "none: machine-wide only" },
            "machine": machine,
        },
        "notes": [
            "Load: one wrk (1 thread) per client namespace, each namespace with an address of its own, all started together: the load comes from as many source addresses (so no path is judged by one client's port reuse). rps is the sum over clients; p50/p99 pool the clients' latency distributions (1,000 quantiles each, weighted by requests).",
            "keepalive: wrk's persistent connections; close: \"Connection: close\" on every request, so every request is a new TCP connection (the server closes first).",
            "The server: nginx in each backend namespace, returning a 3-byte body; iperf3 servers there too. The node: as dockerd leaves a host (FORWARD policy DROP, bridged frames through iptables) plus stateless FORWARD accepts for the backends' subnet (the direct path needs them; the mesh's packets never enter FORWARD, HAProxy's are the node's own).",
            "mesh_tc and mesh_xdp: meshd with --intercept tc (the default: one TC ingress program on the uplink, no XDP) and --intercept xdp (mesh_xdp, then mesh_tc_uplink). Each path is switched on only while it is measured: meshd is started for the mesh's turn and stopped after (an XDP program on the uplink turns TSO off on the veth peer, which would slow every other path); the DNAT rules are added for iptables' turn and the nat table deleted after (no conntrack on the node for the other paths). HAProxy idles on ports of its own.",
            "cpu_us_per_req: CPU time of the lab's processes (wrk, nginx, HAProxy, meshd of every node the path runs it on, iperf3; a cpuacct cgroup they all join, meshd once it has started) during the run over requests, including the kernel's packet work done in their context; machine_cpu_us_per_req: the whole machine's busy time from /proc/stat over requests (includes anything else running on the machine).",
            "Streams: iperf3 from the first client, one TCP stream; UDP: 64-byte datagrams as fast as iperf3 sends, received datagrams per second. The direct stream is also measured while meshd is attached (each mesh path's rounds, so per intercept): traffic that is not the mesh's, through the same uplink.",
            "Forwarding (mesh_forward, mesh_forward_direct, mesh_forward_xdp): a second node on the same segment as the clients and the first node, with no task of its own and meshd with the same state (both nodes, the service, the backends on the first node). Clients send to the second node's address; its intercept picks the backend, encapsulates (40 bytes: outer IPv4, UDP 6090, mesh header) and sends it to the first node; the first node strips it and delivers to the backend. mesh_forward: meshd's defaults, --intercept tc (mesh_tc_ingress encapsulates the socket buffer with bpf_skb_adjust_room, a TSO segment staying one buffer, and redirects it out of the uplink) and replies back through the second node (via-ingress); mesh_forward_direct: the first node sends replies straight to the client from the second node's address (--reply-mode direct); mesh_forward_xdp: as mesh_forward with --intercept xdp on both nodes (mesh_xdp encapsulates each frame and sends it with XDP_TX). Every round checks that node 2 forwarded and node 1 decapsulated at least as many packets as there were requests, and where the replies went.",
            "mesh_forward_xdp needs, for its turns only (switched on with meshd and off after): an XDP_PASS program on the segment's end of the second node's uplink (XDP_TX out of a veth reaches the peer only if the peer has an XDP program; a physical NIC needs nothing), and complete checksums from the clients and both uplinks (ethtool -K tx off: XDP sees bytes, and a veth passes a partial checksum on as it is; on a veth this also turns TSO off, so its clients segment in software). The TC forwarding paths leave the lab as it is. MTU 1500 everywhere: meshd lowers the MSS of forwarded SYNs and of the backend's SYN-ACKs to 1420, so the encapsulated segments fit.",
            "Direct is not quite a like-for-like floor for the forwarding paths: direct crosses one router (the first node), the forwarding paths two nodes and the segment twice (three for via-ingress replies); their ratios to direct include that (and, for mesh_forward_xdp, the clients' software segmentation).",
            "Ratios are between paths measured in the same run.",
        ],
    })
}
