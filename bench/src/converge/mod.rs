//! `mesh-bench converge`: how long after a Docker change every node's
//! maps hold it, split into Docker's part and meshd's (issue 8).
//!
//! A real three-node swarm (the tests' `lab::swarm`: a manager and two
//! workers, each its own network namespace, containerd and dockerd),
//! meshd on every node as a user runs it (`meshd run --docker`, with
//! meshd's default `--watch-interval-ms`; the lab adds its small table
//! sizes), one service scaled up and down again and again (2 <-> 6
//! replicas by default). For each change:
//!
//! - t0: the instant `docker service scale -d` is issued (the command
//!   returns some 100 ms later: reported as `cli_ms`, inside Docker's part);
//! - Docker's part: until the manager's tasks API (`GET /tasks`, polled)
//!   reports the change done: every task of the service that runs is one
//!   Docker wants running, and there are as many as asked. Scaling up:
//!   the new tasks are reported running. Scaling down: the removed tasks
//!   are reported no longer running. Its set of running tasks' ingress
//!   addresses is the target;
//! - ours, per node: from Docker's report until the node's BPF maps hold
//!   exactly the target: the published port's active Maglev table names
//!   exactly those tasks, and no other backend slot is in use (no task
//!   shutting down kept for its flows). The maps are read from outside
//!   meshd, as the XDP program reads them ([`maps`]). Negative when the
//!   node got there before the manager's API said so;
//! - total: from t0 until the last node got there.
//!
//! Also polled, to split ours and to check the reader: each node's own
//! dockerd's ingress table (what meshd reads for membership) and meshd's
//! `/state` (which meshd sets right after the map writes of a state).
//!
//! Everything is observed by polling, every `--poll-ms`, from threads of
//! their own, so each instant is late by up to one poll; a source's state
//! counts from the first poll that saw it, if every later poll of the
//! change saw it too. The next change starts once everything has settled,
//! after a pause with a random part (so changes do not keep one phase
//! against meshd's periodic reads).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mesh_tests::lab::swarm::Swarm;
use mesh_tests::lab::{ADMIN, http_get};
use serde_json::{Value, json};

mod maps;

use crate::sys;
use crate::util::{self, Goal, median, quantile, r1};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Write the results as JSON: a file, or a directory (converge.json in it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Rounds: each scales the service up, then down again.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Nodes in the swarm: node 1 is its manager, the others workers.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Replicas scaled down to.
    #[arg(long, default_value_t = 2)]
    pub low: usize,
    /// Replicas scaled up to.
    #[arg(long, default_value_t = 6)]
    pub high: usize,
    /// How often Docker's tasks API and every node's /state are read (ms).
    #[arg(long, default_value_t = 20)]
    pub poll_ms: u64,
    /// meshd's --watch-interval-ms (default: meshd's own default, as a
    /// user runs it).
    #[arg(long, default_value_t = MESHD_DEFAULT_WATCH_MS)]
    pub watch_interval_ms: u64,
    /// Settled, wait this long (plus up to one watch interval, at random)
    /// before the next change (ms).
    #[arg(long, default_value_t = 1000)]
    pub pause_ms: u64,
    /// A change that has not converged on every node by then is recorded
    /// as such (s).
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Write every node's meshd log into this directory (meshd-N.log).
    #[arg(long)]
    pub logs: Option<PathBuf>,
    /// RUST_LOG for meshd.
    #[arg(long, default_value = "info")]
    pub meshd_log: String,
}

/// `meshd run --watch-interval-ms`'s default (mesh-userspace/src/cli.rs).
pub const MESHD_DEFAULT_WATCH_MS: u64 = 500;
const SERVICE: &str = "conv";
const PORT: u16 = 30080;
/// Backend slots each read of a node's maps covers (from slot 0).
const BACKEND_SLOTS_READ: usize = 256;
/// The issue's goal for meshd's part, at p99, on every role.
const GOAL_OURS_MS: f64 = 1000.0;

/// What Docker's manager says about the service's tasks.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct DockerSeen {
    /// Ingress addresses of tasks that run and should.
    running: BTreeSet<Ipv4Addr>,
    /// Ingress addresses of every task that runs.
    running_any: BTreeSet<Ipv4Addr>,
    /// Tasks Docker wants running (started or not).
    desired: usize,
}

impl DockerSeen {
    /// Docker reports `n` tasks running and no other task running.
    fn done(&self, n: usize) -> bool {
        self.desired == n && self.running.len() == n && self.running_any == self.running
    }
}

/// What one node has for the service, from its maps or from its meshd's
/// `/state`: task address -> shutting down (kept for its established
/// flows, no new ones).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct NodeSeen {
    /// `/state`'s generation (0 for the maps).
    generation: i64,
    tasks: BTreeMap<Ipv4Addr, bool>,
    /// Maps only: entries that name no task (see [`maps::PortInMaps`]).
    dangling: usize,
}

impl NodeSeen {
    fn from_maps(m: maps::PortInMaps) -> NodeSeen {
        NodeSeen {
            generation: 0,
            tasks: m
                .backends
                .iter()
                .map(|a| (*a, !m.table.contains(a)))
                .chain(m.table.iter().map(|a| (*a, false)))
                .collect(),
            dangling: m.dangling,
        }
    }

    /// It holds exactly `target`, every task taking new flows.
    fn holds(&self, target: &BTreeSet<Ipv4Addr>) -> bool {
        self.dangling == 0
            && self.tasks.len() == target.len()
            && self
                .tasks
                .iter()
                .all(|(a, draining)| !draining && target.contains(a))
    }

    /// New flows go to exactly `target` (tasks shutting down may still
    /// hold established flows).
    fn serves(&self, target: &BTreeSet<Ipv4Addr>) -> bool {
        if self.dangling > 0 {
            return false;
        }
        let s: BTreeSet<Ipv4Addr> = self
            .tasks
            .iter()
            .filter(|(_, d)| !**d)
            .map(|(a, _)| *a)
            .collect();
        s == *target
    }
}

#[derive(Clone, Debug)]
enum Seen {
    Docker(DockerSeen),
    /// Node j's maps (j 1-based).
    Node(usize, NodeSeen),
    /// Node j's meshd's applied state (`/state`).
    Applied(usize, NodeSeen),
    /// The service's task addresses in node j's own dockerd's ingress
    /// table (what meshd reads for membership).
    Table(usize, BTreeSet<Ipv4Addr>),
}

/// An observation: when the poll that made it returned.
type Obs = (Instant, Seen);

/// `GET path` on a Docker socket (HTTP/1.0: the answer ends with the
/// connection, never chunked): the JSON body.
fn docker_get(sock: &Path, path: &str) -> Result<Value> {
    let mut s =
        UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET {path}: {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(serde_json::from_str(body)?)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A task's address in the ingress network.
fn ingress_addr(task: &Value) -> Option<Ipv4Addr> {
    task["NetworksAttachments"]
        .as_array()?
        .iter()
        .find(|a| a["Network"]["Spec"]["Ingress"] == true)?["Addresses"]
        .as_array()?
        .first()?
        .as_str()?
        .split('/')
        .next()?
        .parse()
        .ok()
}

fn docker_seen(tasks: &Value) -> DockerSeen {
    let mut d = DockerSeen::default();
    for t in tasks.as_array().into_iter().flatten() {
        let want = t["DesiredState"] == "running";
        let runs = t["Status"]["State"] == "running";
        d.desired += usize::from(want);
        if let (true, Some(a)) = (runs, ingress_addr(t)) {
            d.running_any.insert(a);
            if want {
                d.running.insert(a);
            }
        }
    }
    d
}

/// The service's task addresses in an ingress network inspected verbose.
fn table_seen(net: &Value) -> BTreeSet<Ipv4Addr> {
    net["Services"][SERVICE]["Tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["EndpointIP"].as_str()?.parse().ok())
        .collect()
}

fn node_seen(state: &Value) -> NodeSeen {
    NodeSeen {
        generation: state["generation"].as_i64().unwrap_or(0),
        tasks: state["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["service"] == SERVICE)
            .filter_map(|t| {
                Some((
                    t["addr"].as_str()?.parse().ok()?,
                    t["draining"].as_bool().unwrap_or(false),
                ))
            })
            .collect(),
        dangling: 0,
    }
}

/// Failed reads of a poller, and the last failure.
type Failed = (u64, Option<String>);

/// The polling threads: stopped and joined when dropped (an error on the
/// way out included), before the swarm they read goes.
struct Pollers {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, std::thread::JoinHandle<Failed>)>,
}

impl Pollers {
    /// Stops every poller; each one's failed reads, by name.
    fn finish(&mut self) -> Result<BTreeMap<String, Failed>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = BTreeMap::new();
        for (name, t) in self.threads.drain(..) {
            let f = t
                .join()
                .map_err(|_| anyhow::anyhow!("poller {name} panicked"))?;
            out.insert(name, f);
        }
        Ok(out)
    }
}

impl Drop for Pollers {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Polls `read` every `every` until `stop`, sending what it sees when it
/// changes (stamped with when the read returned). Failed reads are
/// counted, not sent.
fn poller<T: PartialEq + Clone + Send + 'static>(
    every: Duration,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<Obs>,
    wrap: impl Fn(T) -> Seen + Send + 'static,
    mut read: impl FnMut() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Failed> {
    std::thread::spawn(move || {
        let mut last: Option<T> = None;
        let mut failed = (0u64, None);
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match read() {
                Ok(v) => {
                    let at = Instant::now();
                    if last.as_ref() != Some(&v) {
                        last = Some(v.clone());
                        if tx.send((at, wrap(v))).is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    failed.0 += 1;
                    failed.1 = Some(format!("{e:#}"));
                }
            }
            next += every;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        failed
    })
}

/// The latest observation of each source, and this change's history.
struct Watch {
    rx: mpsc::Receiver<Obs>,
    docker: Option<(Instant, DockerSeen)>,
    nodes: Vec<Option<(Instant, NodeSeen)>>,
    applied: Vec<Option<(Instant, NodeSeen)>>,
    tables: Vec<Option<(Instant, BTreeSet<Ipv4Addr>)>>,
    history: Vec<Obs>,
}

impl Watch {
    /// Takes what the pollers sent, waiting up to `wait` for the first.
    fn pump(&mut self, wait: Duration) {
        let mut first = true;
        loop {
            let o = if first {
                self.rx.recv_timeout(wait).ok()
            } else {
                self.rx.try_recv().ok()
            };
            first = false;
            let Some(o) = o else { return };
            match &o.1 {
                Seen::Docker(d) => self.docker = Some((o.0, d.clone())),
                Seen::Node(j, n) => self.nodes[j - 1] = Some((o.0, n.clone())),
                Seen::Applied(j, n) => self.applied[j - 1] = Some((o.0, n.clone())),
                Seen::Table(j, t) => self.tables[j - 1] = Some((o.0, t.clone())),
            }
            self.history.push(o);
        }
    }

    /// Docker reports `n` tasks running, and every node holds exactly them.
    fn settled(&self, n: usize) -> Option<BTreeSet<Ipv4Addr>> {
        let d = &self.docker.as_ref()?.1;
        if !d.done(n) {
            return None;
        }
        self.nodes
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s.1.holds(&d.running)))
            .then(|| d.running.clone())
    }

    /// What Docker and each node's maps show now, for a time-out's message.
    fn describe(&self) -> String {
        let mut s = match &self.docker {
            Some((_, d)) => format!(
                "Docker wants {} tasks, reports {:?} running",
                d.desired, d.running_any
            ),
            None => "Docker's tasks API not read yet".into(),
        };
        for (k, n) in self.nodes.iter().enumerate() {
            s += &match n {
                Some((_, n)) => format!(
                    "; node {}'s maps: {:?} (true: shutting down){}",
                    k + 1,
                    n.tasks,
                    if n.dangling > 0 {
                        format!(", {} dangling entries", n.dangling)
                    } else {
                        String::new()
                    }
                ),
                None => format!("; node {}'s maps not read yet", k + 1),
            };
        }
        s
    }

    /// Starts a change's history with what each source shows now.
    fn restart(&mut self) {
        self.history.clear();
        if let Some((at, d)) = &self.docker {
            self.history.push((*at, Seen::Docker(d.clone())));
        }
        for (k, s) in self.nodes.iter().enumerate() {
            if let Some((at, n)) = s {
                self.history.push((*at, Seen::Node(k + 1, n.clone())));
            }
        }
        for (k, s) in self.applied.iter().enumerate() {
            if let Some((at, n)) = s {
                self.history.push((*at, Seen::Applied(k + 1, n.clone())));
            }
        }
        for (k, s) in self.tables.iter().enumerate() {
            if let Some((at, t)) = s {
                self.history.push((*at, Seen::Table(k + 1, t.clone())));
            }
        }
    }

    /// When the last streak of observations of `which` satisfying `f`
    /// began (None: the latest does not satisfy it).
    fn since<F: Fn(&Seen) -> bool>(&self, which: impl Fn(&Seen) -> bool, f: F) -> Option<Instant> {
        let mut start = None;
        for (at, s) in self.history.iter().filter(|o| which(&o.1)) {
            if f(s) {
                start.get_or_insert(*at);
            } else {
                start = None;
            }
        }
        start
    }
}

fn ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64() * 1e3
    } else {
        -((from - to).as_secs_f64() * 1e3)
    }
}

/// CPU time (user + system) of a process, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(t as f64 / crate::proc::hz())
}

/// A random-enough fraction in [0, 1) (the clock's nanoseconds): only to
/// spread changes over meshd's periodic reads.
fn jitter() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (n.wrapping_mul(2_654_435_761) % 1_000_000) as f64 / 1e6
}

/// p50, p99 and max of `v` (ms, one decimal), and how many samples.
fn stats(v: &[f64]) -> Value {
    if v.is_empty() {
        return json!({"n": 0});
    }
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    json!({
        "n": v.len(),
        "p50": r1(median(v)),
        "p99": r1(quantile(v, 0.99)),
        "max": r1(max),
    })
}

fn role(j: usize) -> &'static str {
    if j == 1 { "manager" } else { "worker" }
}

/// One node's figures for one change.
#[derive(Clone, Copy, Debug, Default)]
struct NodeTimes {
    /// From Docker's report to the maps holding the target.
    ours: Option<f64>,
    /// From t0 to the maps holding the target.
    total: Option<f64>,
    /// From t0 to meshd's `/state` holding the target.
    applied: Option<f64>,
    /// From t0 until new flows go only to the target.
    new_flows: Option<f64>,
    /// From t0 until the node's own dockerd's ingress table lists exactly
    /// the target.
    table: Option<f64>,
}

impl NodeTimes {
    /// From the table to the maps: meshd's own part.
    fn meshd_own(&self) -> Option<f64> {
        Some(self.total? - self.table?)
    }
}

/// One change's figures.
struct Change {
    /// t0 on the wall clock (ms since the epoch), to find the change in
    /// meshd's log.
    t0_unix_ms: u128,
    up: bool,
    to: usize,
    cli_ms: f64,
    /// Until Docker wants exactly the new count running.
    scheduled_ms: Option<f64>,
    docker_ms: Option<f64>,
    /// Per node.
    nodes: Vec<NodeTimes>,
    converged: bool,
}

impl Change {
    fn json(&self) -> Value {
        let last = self
            .nodes
            .iter()
            .map(|n| n.total)
            .collect::<Option<Vec<f64>>>()
            .map(|v| v.into_iter().fold(f64::MIN, f64::max));
        json!({
            "t0_unix_ms": self.t0_unix_ms,
            "direction": if self.up { "up" } else { "down" },
            "to": self.to,
            "converged": self.converged,
            "cli_ms": r1(self.cli_ms),
            "docker_scheduled_ms": self.scheduled_ms.map(r1),
            "docker_ms": self.docker_ms.map(r1),
            "ours_every_node_ms": last.zip(self.docker_ms).map(|(l, d)| r1(l - d)),
            "total_ms": last.map(r1),
            "nodes": self.nodes.iter().enumerate().map(|(k, n)| json!({
                "node": k + 1,
                "role": role(k + 1),
                "ours_ms": n.ours.map(r1),
                "total_ms": n.total.map(r1),
                "new_flows_only_to_target_ms": n.new_flows.map(r1),
                "ingress_table_ms": n.table.map(r1),
                "meshd_own_ms": n.meshd_own().map(r1),
                "state_after_maps_ms": n.applied.zip(n.total).map(|(s, m)| r1(s - m)),
            })).collect::<Vec<_>>(),
        })
    }
}

pub fn run(a: &Args) -> Result<Value> {
    ensure!(a.rounds >= 1, "at least one round");
    ensure!(a.nodes >= 2, "a manager and at least one worker");
    ensure!(
        a.low >= 1 && a.high > a.low,
        "--high must be above --low (and --low at least 1)"
    );
    let started = Instant::now();
    let machine_start = util::machine();
    let meshd = mesh_tests::lab::meshd_path()?;
    ensure!(
        2 * a.high < BACKEND_SLOTS_READ,
        "--high {}: more backends than the maps reader covers",
        a.high
    );
    let mut swarm = Swarm::start(a.nodes)?;
    swarm.meshd_log = a.meshd_log.clone();
    swarm.create_web_service(SERVICE, a.low, PORT, &[])?;
    let watch_ms = a.watch_interval_ms.to_string();
    for j in 1..=a.nodes {
        // After the lab's own flags: this one wins.
        swarm.start_meshd(j, &meshd, &["--watch-interval-ms", &watch_ms])?;
    }
    let pids: Vec<u32> = (1..=a.nodes)
        .map(|j| swarm.meshd(j).map(|m| m.pid()))
        .collect::<Result<_>>()?;

    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_millis(a.poll_ms.max(1));
    let mut pollers = Pollers {
        stop: stop.clone(),
        threads: Vec::new(),
    };
    let sock = swarm.nodes[0].sock();
    let path = format!(
        "/v1.41/tasks?filters={}",
        encode(&format!(r#"{{"service":["{SERVICE}"]}}"#))
    );
    pollers.threads.push((
        "docker".to_string(),
        poller(every, stop.clone(), tx.clone(), Seen::Docker, move || {
            docker_get(&sock, &path).map(|t| docker_seen(&t))
        }),
    ));
    for j in 1..=a.nodes {
        let sock = swarm.nodes[j - 1].sock();
        pollers.threads.push((
            format!("node {j}'s ingress table"),
            poller(
                every,
                stop.clone(),
                tx.clone(),
                move |t| Seen::Table(j, t),
                move || {
                    docker_get(&sock, "/v1.41/networks/ingress?verbose=true")
                        .map(|n| table_seen(&n))
                },
            ),
        ));
    }
    for j in 1..=a.nodes {
        let mut m = maps::NodeMaps::of(pids[j - 1], BACKEND_SLOTS_READ)
            .with_context(|| format!("node {j}'s maps"))?;
        pollers.threads.push((
            format!("node {j}'s maps"),
            poller(
                every,
                stop.clone(),
                tx.clone(),
                move |n| Seen::Node(j, n),
                move || m.read(PORT).map(NodeSeen::from_maps),
            ),
        ));
    }
    for j in 1..=a.nodes {
        let ns = swarm.nodes[j - 1].ns.clone();
        let (stop, tx) = (stop.clone(), tx.clone());
        let mut entered = false;
        pollers.threads.push((
            format!("node {j}'s /state"),
            poller(
                every,
                stop,
                tx,
                move |n| Seen::Applied(j, n),
                move || {
                    if !entered {
                        sys::enter_netns(&ns)?;
                        entered = true;
                    }
                    let body = http_get(ADMIN, "/state")?;
                    Ok(node_seen(&serde_json::from_str(&body)?))
                },
            ),
        ));
    }
    drop(tx);
    let mut w = Watch {
        rx,
        docker: None,
        nodes: vec![None; a.nodes],
        applied: vec![None; a.nodes],
        tables: vec![None; a.nodes],
        history: Vec::new(),
    };
    let settle = |w: &mut Watch, n: usize, what: &str| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
        while w.settled(n).is_none() {
            ensure!(
                Instant::now() < deadline,
                "{what}: not settled at {n} tasks within {} s: {}",
                a.timeout_secs,
                w.describe()
            );
            w.pump(Duration::from_millis(200));
        }
        Ok(())
    };
    settle(&mut w, a.low, "before the first change")?;
    let cpu0: Vec<Option<f64>> = pids.iter().map(|p| cpu_secs(*p)).collect();
    // dockerd's too: the pollers ask it 1000 / poll_ms times a second.
    let dockerds: Vec<Option<u32>> = swarm
        .nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(n.dir.join("docker.pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    let dcpu0: Vec<Option<f64>> = dockerds.iter().map(|p| cpu_secs((*p)?)).collect();
    let t_measure = Instant::now();

    let mut changes: Vec<Change> = Vec::new();
    let mut count = a.low;
    for round in 0..a.rounds {
        for up in [true, false] {
            let to = if up { a.high } else { a.low };
            let pause = a.pause_ms as f64 + jitter() * a.watch_interval_ms as f64;
            let until = Instant::now() + Duration::from_secs_f64(pause / 1e3);
            while Instant::now() < until {
                w.pump(until.saturating_duration_since(Instant::now()));
            }
            w.pump(Duration::ZERO);
            w.restart();
            let t0 = Instant::now();
            let t0_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            swarm.docker(1, &["service", "scale", "-d", &format!("{SERVICE}={to}")])?;
            let cli_ms = ms(t0, Instant::now());
            let deadline = t0 + Duration::from_secs(a.timeout_secs);
            let target = loop {
                w.pump(Duration::from_millis(50));
                if let Some(t) = w.settled(to) {
                    // The /state pollers' next reads (meshd sets it just
                    // after the maps).
                    let until = Instant::now() + 3 * every;
                    while Instant::now() < until {
                        w.pump(until.saturating_duration_since(Instant::now()));
                    }
                    break Some(t);
                }
                if Instant::now() > deadline {
                    break None;
                }
            };
            let is_docker = |s: &Seen| matches!(s, Seen::Docker(_));
            let docker_at = w.since(is_docker, |s| matches!(s, Seen::Docker(d) if d.done(to)));
            let scheduled_at = w.since(
                is_docker,
                |s| matches!(s, Seen::Docker(d) if d.desired == to),
            );
            let target = target.or_else(|| w.docker.as_ref().map(|d| d.1.running.clone()));
            let nodes = (1..=a.nodes)
                .map(|j| {
                    let Some(t) = &target else {
                        return NodeTimes::default();
                    };
                    let mine = |s: &Seen| matches!(s, Seen::Node(k, _) if *k == j);
                    let held = w.since(mine, |s| matches!(s, Seen::Node(_, n) if n.holds(t)));
                    let serves = w.since(mine, |s| matches!(s, Seen::Node(_, n) if n.serves(t)));
                    let applied = w.since(
                        |s| matches!(s, Seen::Applied(k, _) if *k == j),
                        |s| matches!(s, Seen::Applied(_, n) if n.holds(t)),
                    );
                    let table = w.since(
                        |s| matches!(s, Seen::Table(k, _) if *k == j),
                        |s| matches!(s, Seen::Table(_, x) if x == t),
                    );
                    NodeTimes {
                        ours: held.zip(docker_at).map(|(h, d)| ms(d, h)),
                        total: held.map(|h| ms(t0, h)),
                        applied: applied.map(|x| ms(t0, x)),
                        new_flows: serves.map(|s| ms(t0, s)),
                        table: table.map(|x| ms(t0, x)),
                    }
                })
                .collect();
            let c = Change {
                t0_unix_ms,
                up,
                to,
                cli_ms,
                scheduled_ms: scheduled_at.map(|s| ms(t0, s)),
                docker_ms: docker_at.map(|d| ms(t0, d)),
                nodes,
                converged: target.is_some() && w.settled(to).is_some(),
            };
            eprintln!(
                "round {}/{} {:>4} {count}->{to}: Docker {} ms, then ours {} ms{}",
                round + 1,
                a.rounds,
                if up { "up" } else { "down" },
                c.docker_ms.map_or("?".into(), |d| format!("{d:.0}")),
                c.nodes
                    .iter()
                    .map(|n| n.ours.map_or("?".into(), |o| format!("{o:.0}")))
                    .collect::<Vec<_>>()
                    .join(" / "),
                if c.converged { "" } else { " (NOT CONVERGED)" }
            );
            let converged = c.converged;
            changes.push(c);
            count = to;
            if !converged {
                settle(&mut w, to, "after a change that did not converge")?;
            }
        }
    }
    let measured_secs = t_measure.elapsed().as_secs_f64();
    let dcpu: Vec<Option<f64>> = dockerds
        .iter()
        .zip(&dcpu0)
        .map(|(p, c0)| Some((cpu_secs((*p)?)? - (*c0)?) / measured_secs * 100.0))
        .collect();
    let cpu: Vec<Option<f64>> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| Some((cpu_secs(*p)? - (*c0)?) / measured_secs * 100.0))
        .collect();
    let failed_polls: BTreeMap<String, Value> = pollers
        .finish()?
        .into_iter()
        .map(|(name, (n, last))| (name, json!({"failed": n, "last_error": last})))
        .collect();
    let generations: Vec<i64> = w
        .applied
        .iter()
        .map(|n| n.as_ref().map_or(0, |n| n.1.generation))
        .collect();
    let meshd_logs: Vec<String> = (1..=a.nodes)
        .map(|j| swarm.meshd(j).map(|m| m.log_text()).unwrap_or_default())
        .collect();
    drop(swarm);
    if let Some(dir) = &a.logs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (j, l) in meshd_logs.iter().enumerate() {
            let f = dir.join(format!("meshd-{}.log", j + 1));
            std::fs::write(&f, l).with_context(|| format!("writing {}", f.display()))?;
        }
    }
    let machine_end = util::machine();

    // Figures.
    let pick = |dir: Option<bool>| {
        changes
            .iter()
            .filter(move |c| dir.is_none_or(|u| c.up == u))
    };
    let summary = |dir: Option<bool>| -> Value {
        let docker: Vec<f64> = pick(dir).filter_map(|c| c.docker_ms).collect();
        let sched: Vec<f64> = pick(dir).filter_map(|c| c.scheduled_ms).collect();
        let cli: Vec<f64> = pick(dir).map(|c| c.cli_ms).collect();
        // Per-node figures of the nodes of role `r`; `f` gets Docker's
        // part too.
        let per_role = |r: &str, f: &dyn Fn(&NodeTimes, Option<f64>) -> Option<f64>| -> Vec<f64> {
            pick(dir)
                .flat_map(|c| c.nodes.iter().enumerate().map(move |n| (c.docker_ms, n)))
                .filter(|(_, (k, _))| role(k + 1) == r)
                .filter_map(|(d, (_, n))| f(n, d))
                .collect()
        };
        let by_role = |f: &dyn Fn(&NodeTimes, Option<f64>) -> Option<f64>| -> Value {
            json!({
                "manager": stats(&per_role("manager", f)),
                "worker": stats(&per_role("worker", f)),
            })
        };
        let every: Vec<f64> = pick(dir)
            .filter_map(|c| c.json()["ours_every_node_ms"].as_f64())
            .collect();
        let total: Vec<f64> = pick(dir)
            .filter_map(|c| c.json()["total_ms"].as_f64())
            .collect();
        json!({
            "changes": pick(dir).count(),
            "not_converged": pick(dir).filter(|c| !c.converged).count(),
            "cli_ms": stats(&cli),
            "docker_scheduled_ms": stats(&sched),
            "docker_ms": stats(&docker),
            "ours_ms": {
                "manager": stats(&per_role("manager", &|n, _| n.ours)),
                "worker": stats(&per_role("worker", &|n, _| n.ours)),
                "every_node": stats(&every),
            },
            "total_ms": {
                "manager": stats(&per_role("manager", &|n, _| n.total)),
                "worker": stats(&per_role("worker", &|n, _| n.total)),
                "every_node": stats(&total),
            },
            "ours_split": {
                "ingress_table_after_docker_ms": by_role(&|n, d| Some(n.table? - d?)),
                "meshd_own_ms": by_role(&|n, _| n.meshd_own()),
            },
            "new_flows_only_to_target_after_docker_ms": by_role(&|n, d| Some(n.new_flows? - d?)),
            "state_after_maps_ms": by_role(&|n, _| Some(n.applied? - n.total?)),
        })
    };
    let all = summary(None);
    let up = summary(Some(true));
    let down = summary(Some(false));
    let not_converged = changes.iter().filter(|c| !c.converged).count();

    let p = |v: &Value| v["p99"].as_f64();
    let mut goals = Vec::new();
    for r in ["manager", "worker"] {
        let s = &all["ours_ms"][r];
        let (measured, met) = match (p(s), not_converged) {
            (Some(x), 0) => (
                format!(
                    "{x:.0} ms (p50 {:.0}, max {:.0}; n={})",
                    s["p50"].as_f64().unwrap_or(f64::NAN),
                    s["max"].as_f64().unwrap_or(f64::NAN),
                    s["n"]
                ),
                Some(x <= GOAL_OURS_MS),
            ),
            (_, n) if n > 0 => (format!("{n} changes did not converge"), Some(false)),
            _ => ("no sample".to_string(), None),
        };
        goals.push(Goal::new(
            "converge",
            format!("ours (Docker's report to the maps), p99, {r}s"),
            "<= 1000 ms",
            measured,
            met,
        ));
    }
    for (name, v) in [
        (
            "Docker's part (scale to tasks reported), p99",
            &all["docker_ms"],
        ),
        (
            "total (scale issued to every node's maps), p99",
            &all["total_ms"]["every_node"],
        ),
    ] {
        goals.push(Goal::new(
            "converge",
            name,
            "reported",
            p(v).map_or("no sample".into(), |x| format!("{x:.0} ms")),
            None,
        ));
    }

    println!();
    println!(
        "mesh converge: {} nodes (1 manager), {SERVICE} scaled {}<->{} x {} rounds, meshd --watch-interval-ms {}, polled every {} ms",
        a.nodes, a.low, a.high, a.rounds, a.watch_interval_ms, a.poll_ms
    );
    println!(
        "{:<6} {:>8} {:>22} {:>22} {:>22} {:>22}",
        "",
        "changes",
        "Docker p50/p99/max",
        "ours mgr p50/p99/max",
        "ours wkr p50/p99/max",
        "total p50/p99/max"
    );
    let cell = |v: &Value| {
        format!(
            "{:.0}/{:.0}/{:.0}",
            v["p50"].as_f64().unwrap_or(f64::NAN),
            v["p99"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN)
        )
    };
    for (name, s) in [("up", &up), ("down", &down), ("all", &all)] {
        println!(
            "{:<6} {:>8} {:>22} {:>22} {:>22} {:>22}",
            name,
            s["changes"],
            cell(&s["docker_ms"]),
            cell(&s["ours_ms"]["manager"]),
            cell(&s["ours_ms"]["worker"]),
            cell(&s["total_ms"]["every_node"]),
        );
    }
    println!();
    println!(
        "ours, split: Docker's report -> the node's own ingress table -> the node's maps (meshd's own)"
    );
    println!(
        "{:<6} {:>24} {:>24} {:>24} {:>24}",
        "",
        "table mgr p50/p99/max",
        "table wkr p50/p99/max",
        "meshd mgr p50/p99/max",
        "meshd wkr p50/p99/max"
    );
    for (name, s) in [("up", &up), ("down", &down), ("all", &all)] {
        let x = &s["ours_split"];
        println!(
            "{:<6} {:>24} {:>24} {:>24} {:>24}",
            name,
            cell(&x["ingress_table_after_docker_ms"]["manager"]),
            cell(&x["ingress_table_after_docker_ms"]["worker"]),
            cell(&x["meshd_own_ms"]["manager"]),
            cell(&x["meshd_own_ms"]["worker"]),
        );
    }
    println!(
        "\nmeshd's /state after the maps (a check of the maps reader; about 0): manager {}, workers {} ms (p50/p99/max)",
        cell(&all["state_after_maps_ms"]["manager"]),
        cell(&all["state_after_maps_ms"]["worker"]),
    );
    let pct = |v: &[Option<f64>]| {
        v.iter()
            .map(|c| c.map_or("?".into(), |c| format!("{c:.0}%")))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "CPU of one core, node 1 / 2 / 3: meshd {}, dockerd {}",
        pct(&cpu),
        pct(&dcpu)
    );
    util::print_goals(&goals);
    eprintln!("total {:.0} s", started.elapsed().as_secs_f64());

    Ok(json!({
        "bench": "converge",
        "summary": {"all": all, "up": up, "down": down},
        "meshd_cpu_percent_of_one_cpu": (1..=a.nodes).map(|j| json!({
            "node": j, "role": role(j), "percent": cpu[j - 1].map(r1),
        })).collect::<Vec<_>>(),
        "dockerd_cpu_percent_of_one_cpu": (1..=a.nodes).map(|j| json!({
            "node": j, "role": role(j), "percent": dcpu[j - 1].map(r1),
        })).collect::<Vec<_>>(),
        "state_generations_at_end": generations,
        "failed_polls": failed_polls,
        "changes": changes.iter().map(Change::json).collect::<Vec<_>>(),
        "goals": goals.iter().map(|g| g.json()).collect::<Vec<_>>(),
        "config": {
            "nodes": a.nodes, "managers": 1, "rounds": a.rounds, "low": a.low, "high": a.high,
            "poll_ms": a.poll_ms, "meshd_watch_interval_ms": a.watch_interval_ms,
            "pause_ms": a.pause_ms, "timeout_secs": a.timeout_secs,
            "measured_secs": measured_secs.round(),
            "machine": machine_start,
            "machine_at_end": machine_end,
        },
        "meshd_log_tail": meshd_logs.iter().map(|l| {
            let lines: Vec<&str> = l.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        }).collect::<Vec<_>>(),
        "notes": [
            "A real swarm on this machine (tests' lab::swarm): every node its own namespaces, containerd and dockerd (Debian's docker.io 20.10, API 1.41); node 1 is the manager, the others workers. meshd runs on every node as `meshd run --docker` (plus the lab's small table sizes), with the watch interval in config.",
            "t0: the instant `docker service scale -d` is issued; cli_ms is when it returned (inside Docker's part).",
            "Docker's part: until the manager's tasks API reports the change done: as many tasks as asked running, and no other task of the service running (scaling up: the new tasks running; scaling down: the removed ones stopped). docker_scheduled_ms: until the API lists exactly the asked number of tasks Docker wants running.",
            "Ours, per node: from Docker's report until the node's BPF maps hold exactly Docker's running tasks (by ingress address): the published port's entry, its service's active Maglev table and the backends it names, and no other backend slot in use (a task shutting down keeps its slot for its established flows, out of the table). The maps are read from outside meshd: opened by id from the descriptors meshd holds (/proc/PID/fdinfo; meshd does not pin them), the port and Maglev arrays memory-mapped, the backend slots read in one batch, a local backend's identity from MESH_LOCAL4_V1. Negative: the node got there before the manager's API said so (a task's endpoint reaches the ingress table, which meshd reads, before its running state reaches the manager; a stopped task leaves the table before the manager reports it stopped).",
            "state_after_maps_ms: from the maps holding the target to meshd's /state saying so (meshd sets /state right after the map writes): a check of the maps reader; within a poll or two of 0.",
            "new_flows_only_to_target_after_docker_ms: when new flows went only to Docker's running set (tasks shutting down keep established flows): scaling down, meshd stops new flows to removed tasks as soon as Docker wants them shut down, before they stop.",
            "total: from t0 until the node (every_node: the last node) got there.",
            "ours_split: each node's own dockerd's ingress table (GET /networks/ingress?verbose=true, what meshd reads for membership, filled by Docker's gossip) is polled too. ingress_table_after_docker_ms: from Docker's report until that table lists exactly Docker's running set (Docker's gossip, relative to the manager's report; negative when the table was first). meshd_own_ms: from the table to the maps (meshd's periodic read, its read of the rest, planning and map writes).",
            "Each instant is when a poll (every poll_ms, from a thread per source: the manager's tasks API, each node's ingress table, maps and /state) first saw it, if every later poll of the change saw it too: late by up to one poll, for Docker and meshd alike. p50 is the median; p99 the nearest rank (with fewer than 100 samples, the largest or close to it).",
            "The next change starts once Docker and every node have settled, after pause_ms plus up to one watch interval at random.",
            "meshd_cpu_percent_of_one_cpu, dockerd_cpu_percent_of_one_cpu: each process's CPU time over the changes, per second of wall time (dockerd's includes answering the benchmark's polls).",
        ],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn docker_and_node_sets() {
        let tasks = json!([
            {"DesiredState": "running", "Status": {"State": "running"},
             "NetworksAttachments": [{"Network": {"Spec": {"Ingress": true}}, "Addresses": ["198.18.24.6/24"]}]},
            {"DesiredState": "shutdown", "Status": {"State": "running"},
             "NetworksAttachments": [{"Network": {"Spec": {"Ingress": true}}, "Addresses": ["198.18.24.7/24"]}]},
            {"DesiredState": "running", "Status": {"State": "starting"},
             "NetworksAttachments": [{"Network": {"Spec": {"Ingress": true}}, "Addresses": ["198.18.24.8/24"]}]},
        ]);
        let d = docker_seen(&tasks);
        assert_eq!(d.running, [a("198.18.24.6")].into());
        assert_eq!(d.running_any.len(), 2);
        assert_eq!(d.desired, 2);
        assert!(!d.done(2));
        let st = json!({"generation": 4, "tasks": [
            {"service": SERVICE, "addr": "198.18.24.6", "draining": false},
            {"service": SERVICE, "addr": "198.18.24.7", "draining": true},
            {"service": "other", "addr": "198.18.24.9", "draining": false},
        ]});
        let n = node_seen(&st);
        let t: BTreeSet<Ipv4Addr> = [a("198.18.24.6")].into();
        assert!(n.serves(&t));
        assert!(!n.holds(&t), "a task shutting down is still in the maps");
        assert_eq!(encode(r#"{"a":["b"]}"#), "%7B%22a%22%3A%5B%22b%22%5D%7D");
    }

    #[test]
    fn maps_seen_as_tasks() {
        let target: BTreeSet<Ipv4Addr> = [a("198.18.24.6"), a("198.18.24.8")].into();
        // A task shutting down: its slot stays, out of the table.
        let m = maps::PortInMaps {
            table: target.clone(),
            backends: [a("198.18.24.6"), a("198.18.24.7"), a("198.18.24.8")].into(),
            dangling: 0,
        };
        let n = NodeSeen::from_maps(m.clone());
        assert!(n.tasks[&a("198.18.24.7")], "shutting down");
        assert!(n.serves(&target));
        assert!(!n.holds(&target));
        let done = maps::PortInMaps {
            backends: target.clone(),
            ..m.clone()
        };
        assert!(NodeSeen::from_maps(done.clone()).holds(&target));
        // An entry naming no task is never a match.
        let odd = maps::PortInMaps {
            dangling: 1,
            ..done
        };
        assert!(!NodeSeen::from_maps(odd.clone()).holds(&target));
        assert!(!NodeSeen::from_maps(odd).serves(&target));
    }
}
