//! `mesh-bench churn`: continuous requests while backends come and go.
//!
//! A lab node runs meshd with some stable backends and some that churn:
//! every 100 ms one churning backend is added to the state or removed
//! from it (the state file rewritten, meshd told with SIGHUP). The
//! removed ones keep running: what breaks is only what the mesh breaks.
//! Client threads meanwhile send requests, some over persistent
//! connections, some on a new connection each. Every task's server
//! records which client port it accepted, so a failed request is
//! attributed to the backend it reached: the goal is that none fails
//! whose backend stayed. Periods without churn, interleaved, give the
//! latency to compare with.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mesh_tests::lab::state::StateFile;
use mesh_tests::lab::{Cluster, Topology};
use serde_json::{Value, json};

use mesh_userspace::plan::table_size;

use crate::sys;
use crate::util::{self, Goal, quantile, r3};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Write the results as JSON: a file, or a directory (churn.json in it).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Rounds: each is a period without churn, then one with.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Seconds of each period.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Backends that stay.
    #[arg(long, default_value_t = 3)]
    pub stable: usize,
    /// Backends that come and go.
    #[arg(long, default_value_t = 3)]
    pub churning: usize,
    /// Milliseconds between changes.
    #[arg(long, default_value_t = 100)]
    pub every_ms: u64,
    /// Client threads with a persistent connection each.
    #[arg(long, default_value_t = 4)]
    pub keepalive: usize,
    /// Client threads opening a new connection per request.
    #[arg(long, default_value_t = 2)]
    pub fresh: usize,
}

const PORT: u16 = 30080;
const TARGET: u16 = 8080;
/// The lab's meshd runs with --maglev-size 1021 (tests/src/lab/meshd.rs).
const MAGLEV_SIZE: u32 = 1021;

/// Which task accepted a connection from a client port, and when.
type Accepts = Arc<Mutex<HashMap<SocketAddr, (usize, Instant)>>>;

/// A task's server: answers each line with "task<i> <line>"; a line
/// starting with "once" gets its answer and the connection closed (the
/// server closes first, so client ports do not linger in TIME_WAIT).
fn serve(
    ns: String,
    addr: Ipv4Addr,
    task: usize,
    accepts: Accepts,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    sys::enter_netns(&ns)?;
    let l = TcpListener::bind((addr, TARGET))?;
    l.set_nonblocking(true)?;
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, peer)) => {
                    accepts.lock().unwrap().insert(peer, (task, Instant::now()));
                    let _ = s.set_nonblocking(false);
                    std::thread::spawn(move || {
                        let Ok(r) = s.try_clone() else { return };
                        let mut w = s;
                        for line in BufReader::new(r).lines() {
                            let Ok(line) = line else { return };
                            if w.write_all(format!("task{task} {line}\n").as_bytes())
                                .is_err()
                            {
                                return;
                            }
                            if line.starts_with("once") {
                                return;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    });
    Ok(())
}

/// What one client thread saw.
#[derive(Default)]
struct Seen {
    /// Latency of each answered request, µs.
    lat: Vec<f64>,
    /// Failed requests: the task that accepted their connection (None:
    /// none did) and the connection's client address and port.
    failed: Vec<(Option<usize>, Option<SocketAddr>)>,
    /// How requests failed: "timeout", "reset", "closed", "other".
    how: HashMap<&'static str, u64>,
}

fn ask(s: &mut TcpStream, r: &mut BufReader<TcpStream>, line: &str) -> Result<String> {
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut a = String::new();
    ensure!(r.read_line(&mut a)? > 0, "connection closed");
    Ok(a)
}

fn client(
    ns: String,
    to: SocketAddr,
    fresh: bool,
    accepts: Accepts,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> Result<()> {
    sys::enter_netns(&ns)?;
    let connect = || -> Result<(TcpStream, BufReader<TcpStream>, SocketAddr)> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.set_nodelay(true)?;
        let local = s.local_addr()?;
        Ok((s.try_clone()?, BufReader::new(s), local))
    };
    let task_of = |local: SocketAddr, since: Instant| {
        accepts
            .lock()
            .unwrap()
            .get(&local)
            .filter(|(_, at)| *at >= since)
            .map(|(t, _)| *t)
    };
    let mut conn = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let t0 = Instant::now();
        let res = (|| -> Result<()> {
            if conn.is_none() {
                // Any accept of this connection comes after this instant.
                let at = Instant::now();
                conn = Some((connect()?, at));
            }
            let ((s, r, _), _) = conn.as_mut().unwrap();
            ask(
                s,
                r,
                &if fresh {
                    format!("once {n}")
                } else {
                    format!("{n}")
                },
            )?;
            Ok(())
        })();
        let local = conn.as_ref().map(|((_, _, l), since)| (*l, *since));
        match res {
            Ok(()) => seen
                .lock()
                .unwrap()
                .lat
                .push(t0.elapsed().as_secs_f64() * 1e6),
            Err(e) => {
                let task = local.and_then(|(l, since)| task_of(l, since));
                let how = match e.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
                    Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        "timeout"
                    }
                    Some(
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused,
                    ) => "reset",
                    None => "closed",
                    _ => "other",
                };
                let mut s = seen.lock().unwrap();
                s.failed.push((task, local.map(|l| l.0)));
                *s.how.entry(how).or_default() += 1;
                conn = None;
                continue;
            }
        }
        if fresh {
            conn = None;
        }
    }
    Ok(())
}

pub fn run(a: &Args) -> Result<Value> {
    ensure!(
        a.stable >= 1 && a.churning >= 1 && a.rounds >= 1,
        "at least one of each"
    );
    let started = Instant::now();
    let machine = util::machine();
    let meshd = mesh_tests::lab::meshd_path()?;
    let n = a.stable + a.churning;
    let mut cluster = Cluster::build(Topology::builder().node(n).client(1))?;
    let node = cluster.node(1).clone();
    let client_ns = cluster.topo.clients[0].ns.clone();
    let accepts: Accepts = Arc::default();
    let stop_servers = Arc::new(AtomicBool::new(false));
    for t in &node.tasks {
        let (ns, addr, i, acc, stop) = (
            t.ns.clone(),
            t.addr,
            t.index,
            accepts.clone(),
            stop_servers.clone(),
        );
        std::thread::spawn(move || serve(ns, addr, i, acc, stop))
            .join()
            .map_err(|_| anyhow::anyhow!("server thread"))??;
    }
    let state = |churn_in: &[bool]| {
        let mut st = StateFile::new()
            .node(&node.name, node.addr)
            .service("web", &[("tcp", PORT, TARGET)]);
        for (k, t) in node.tasks.iter().enumerate() {
            if k < a.stable || churn_in[k - a.stable] {
                st = st.task("web", &node.name, t.addr);
            }
        }
        st.render()
    };
    let mut churn_in = vec![true; a.churning];
    // Every task set the state has held: a failed connection no task
    // accepted is attributed through the Maglev picks of its flow in them.
    let mut sets: std::collections::BTreeSet<Vec<bool>> = [churn_in.clone()].into();
    cluster.write_state(1, &state(&churn_in))?;
    cluster.start_meshd(1, &meshd, &[])?;
    let meshd_pid = cluster.meshd(1)?.pid();
    let to = SocketAddr::from((node.addr, PORT));
    let gen0 = cluster.metric(1, "mesh_state_generation", "")?;

    let mut periods = Vec::new();
    let mut changes = 0u64;
    for round in 0..a.rounds {
        for churning in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let seen_keep = Arc::new(Mutex::new(Seen::default()));
            let seen_fresh = Arc::new(Mutex::new(Seen::default()));
            let mut threads = Vec::new();
            for k in 0..a.keepalive + a.fresh {
                let fresh = k >= a.keepalive;
                let seen = if fresh {
                    seen_fresh.clone()
                } else {
                    seen_keep.clone()
                };
                let (ns, acc, st) = (client_ns.clone(), accepts.clone(), stop.clone());
                threads.push(std::thread::spawn(move || {
                    client(ns, to, fresh, acc, st, seen)
                }));
            }
            let t0 = Instant::now();
            let mut step = 0usize;
            let mut applied = 0u64;
            while t0.elapsed() < Duration::from_secs(a.secs) {
                std::thread::sleep(Duration::from_millis(a.every_ms));
                if churning {
                    let k = step % a.churning;
                    churn_in[k] = !churn_in[k];
                    sets.insert(churn_in.clone());
                    step += 1;
                    cluster.write_state(1, &state(&churn_in))?;
                    // SAFETY: signalling the meshd this run started, by PID.
                    unsafe { libc::kill(meshd_pid as i32, libc::SIGHUP) };
                    applied += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                t.join().map_err(|_| anyhow::anyhow!("client thread"))??;
            }
            // Back to every backend between periods.
            if churning {
                churn_in.fill(true);
                cluster.write_state(1, &state(&churn_in))?;
                // SAFETY: as above.
                unsafe { libc::kill(meshd_pid as i32, libc::SIGHUP) };
                std::thread::sleep(Duration::from_millis(300));
            }
            changes += applied;
            let (k, f) = (
                std::mem::take(&mut *seen_keep.lock().unwrap()),
                std::mem::take(&mut *seen_fresh.lock().unwrap()),
            );
            eprintln!(
                "round {}/{} {}: {} + {} requests answered, {} + {} failed",
                round + 1,
                a.rounds,
                if churning { "churn   " } else { "no churn" },
                k.lat.len(),
                f.lat.len(),
                k.failed.len(),
                f.failed.len()
            );
            periods.push((churning, k, f));
        }
    }
    let gen1 = cluster.metric(1, "mesh_state_generation", "")?;
    let drops = cluster.metric(1, "mesh_drops_total", "")?;
    stop_servers.store(true, Ordering::Relaxed);

    // Report. A failure is the stable backends' when a stable task
    // accepted its connection, or when none did and its flow hashes to a
    // stable task in every task set the state held (so a handshake cut by
    // a churning task's removal counts as churn).
    let tables: Vec<(Vec<Ipv4Addr>, Vec<u32>)> = sets
        .iter()
        .map(|set| {
            let mut addrs: Vec<Ipv4Addr> = node
                .tasks
                .iter()
                .enumerate()
                .filter(|(k, _)| *k < a.stable || set[*k - a.stable])
                .map(|(_, t)| t.addr)
                .collect();
            addrs.sort();
            let keys: Vec<String> = addrs.iter().map(|x| format!("{x}:{TARGET}")).collect();
            let table = mesh_common::maglev::table(&keys, table_size(keys.len(), MAGLEV_SIZE));
            (addrs, table)
        })
        .collect();
    let stable_addrs: Vec<Ipv4Addr> = node.tasks[..a.stable].iter().map(|t| t.addr).collect();
    let stayed = |f: &(Option<usize>, Option<SocketAddr>)| match f {
        (Some(t), _) => *t <= a.stable,
        (None, Some(SocketAddr::V4(l))) => tables.iter().all(|(addrs, table)| {
            let h = mesh_common::hash::flow_hash4(
                u32::from_ne_bytes(l.ip().octets()),
                l.port().to_be(),
                PORT.to_be(),
                mesh_common::abi::IPPROTO_TCP,
            );
            let pick = addrs[table[(h % table.len() as u32) as usize] as usize];
            stable_addrs.contains(&pick)
        }),
        _ => false,
    };
    let mut modes = Vec::new();
    let mut goals = Vec::new();
    let mut failed_stayed_all = 0usize;
    println!();
    println!(
        "mesh churn: {} stable + {} churning backends, one change every {} ms while churning; {} rounds of {} s without and {} s with churn",
        a.stable, a.churning, a.every_ms, a.rounds, a.secs, a.secs
    );
    println!(
        "{:<10} {:<9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "mode", "period", "answered", "failed", "stayed", "churned", "p50 ms", "p99 ms"
    );
    for (mode, pick) in [("keepalive", 0usize), ("fresh", 1)] {
        let mut row = serde_json::Map::new();
        for churning in [false, true] {
            let mut lat = Vec::new();
            let mut failed: Vec<(Option<usize>, Option<SocketAddr>)> = Vec::new();
            let mut how: HashMap<&'static str, u64> = HashMap::new();
            for (c, k, f) in &periods {
                if *c == churning {
                    let s = if pick == 0 { k } else { f };
                    lat.extend_from_slice(&s.lat);
                    failed.extend_from_slice(&s.failed);
                    for (k, v) in &s.how {
                        *how.entry(k).or_default() += v;
                    }
                }
            }
            let st = failed.iter().filter(|f| stayed(f)).count();
            let unknown = failed.iter().filter(|f| f.0.is_none()).count();
            let ch = failed.len() - st;
            if churning {
                failed_stayed_all += st;
            }
            let (p50, p99) = (quantile(&lat, 0.5) / 1e3, quantile(&lat, 0.99) / 1e3);
            let period = if churning { "churn" } else { "no churn" };
            println!(
                "{:<10} {:<9} {:>9} {:>8} {:>8} {:>8} {:>9.3} {:>9.3}",
                mode,
                period,
                lat.len(),
                failed.len(),
                st,
                ch,
                p50,
                p99
            );
            row.insert(
                if churning { "churn" } else { "no_churn" }.into(),
                json!({
                    "answered": lat.len(),
                    "failed": failed.len(),
                    "failed_backend_stayed": st,
                    "failed_backend_churned": ch,
                    "failed_not_accepted_by_any_task": unknown,
                    "failed_how": how,
                    "p50_ms": r3(p50),
                    "p99_ms": r3(p99),
                }),
            );
        }
        let p99 = |k: &str| row[k]["p99_ms"].as_f64().unwrap_or(f64::NAN);
        let (with, without) = (p99("churn"), p99("no_churn"));
        let ratio = with / without;
        row.insert("mode".into(), json!(mode));
        row.insert("p99_churn_over_no_churn".into(), json!(r3(ratio)));
        goals.push(Goal::new(
            "churn",
            format!("{mode}: p99 latency during churn vs without (reported)"),
            "reported",
            format!("{with:.3} vs {without:.3} ms ({ratio:.2}x)"),
            None,
        ));
        modes.push(Value::Object(row));
    }
    goals.insert(
        0,
        Goal::new(
            "churn",
            "failed requests whose backend stayed, during churn",
            "0",
            failed_stayed_all.to_string(),
            Some(failed_stayed_all == 0),
        ),
    );
    util::print_goals(&goals);
    eprintln!("total {:.0} s", started.elapsed().as_secs_f64());
    drop(cluster);
    Ok(json!({
        "bench": "churn",
        "modes": modes,
        "changes_made": changes,
        "state_generations_applied": gen1.saturating_sub(gen0),
        "mesh_drops": drops,
        "goals": goals.iter().map(|g| g.json()).collect::<Vec<_>>(),
        "config": {
            "rounds": a.rounds, "secs": a.secs, "stable": a.stable, "churning": a.churning,
            "every_ms": a.every_ms, "keepalive_threads": a.keepalive, "fresh_threads": a.fresh,
            "machine": machine,
        },
        "notes": [
            "One node, meshd running; stable backends stay in the state, churning ones are added and removed one at a time every every_ms while churning (state file rewritten, SIGHUP). Removed backends keep running: only the mesh decides where packets go.",
            "Clients: keepalive threads keep one connection each and send requests back to back (a failed connection is replaced); fresh threads open a new connection per request (the server answers and closes).",
            "A failed request is attributed to the backend its connection reached (each task's server records the client ports it accepted). One no task accepted (its handshake was cut) is the stable backends' only if its flow hashes to a stable backend in every task set the state held (Maglev computed on the host, as meshd computes it); failed_not_accepted_by_any_task counts those.",
            "failed_how: timeout (no answer within the client's 1 s), reset, closed (the connection ended without an answer).",
            "Latency: answered requests only, µs measured by the client; periods without churn are interleaved with periods with.",
        ],
    }))
}
