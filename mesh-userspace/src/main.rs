//! meshd: the mesh node daemon.
//!
//! Parses and validates the whole configuration first, then builds the
//! pieces: the dataplane (load, fill, attach), the state watcher and the
//! admin endpoint.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_userspace::admin::{self, Metrics};
use mesh_userspace::dataplane::{Dataplane, XdpAttach};
use mesh_userspace::desired::Desired;
use mesh_userspace::net;
use mesh_userspace::plan::Limits;
use mesh_userspace::state::{self, State};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// The mesh node daemon: makes this node answer every published port of a
/// Docker Swarm (or of a state file) and carries each connection to a task.
#[derive(Parser)]
#[command(name = "meshd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the dataplane, fill it from the state file, and keep
    /// it in sync as the file changes (checked every --watch-interval-ms and
    /// on SIGHUP). SIGTERM or SIGINT detaches everything and exits.
    #[command(
        args_override_self = true,
        after_long_help = "Example:\n  meshd run --state /etc/mesh/state.toml --iface eth0 --node node1\n\n\
        Needs root (BPF), IPv4 forwarding on the uplink and the tasks' interfaces, and iproute2.\n\
        Readiness: GET /ready on --admin-addr answers 200 once programs are attached and maps filled."
    )]
    Run(RunArgs),
    /// Validate a state file and print what this node would serve; touches
    /// nothing.
    #[command(
        after_long_help = "Example:\n  meshd check --state /etc/mesh/state.toml --node node1"
    )]
    Check(CheckArgs),
}

#[derive(clap::Args)]
struct StateArgs {
    /// The state file (TOML: nodes, services with their ports, tasks; see
    /// the README). A file that fails validation is refused whole.
    #[arg(long, value_name = "FILE")]
    state: PathBuf,
    /// This node's name in the state file [default: the host name].
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// Range that published ports left out of the state file are assigned
    /// from (in file order, lowest free first). Ports given explicitly may
    /// lie outside it, as in Docker.
    #[arg(long, value_name = "LOW-HIGH", default_value = "30000-32767", value_parser = state::parse_range)]
    port_range: RangeInclusive<u16>,
}

#[derive(clap::Args)]
struct CheckArgs {
    #[command(flatten)]
    state: StateArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    state: StateArgs,
    /// The uplink: the interface clients' packets arrive on. XDP and TC
    /// programs are attached to it.
    #[arg(long, value_name = "IF")]
    iface: String,
    /// Another address this node answers published ports on, besides its
    /// address in the state file (repeatable; 16 addresses in all).
    #[arg(long = "node-addr", value_name = "ADDR")]
    node_addrs: Vec<Ipv4Addr>,
    /// Interfaces leading to local tasks, where the reply program is
    /// attached (a bridge: each of its ports, as ports come and go). By
    /// default: the interface the route to each local task uses.
    #[arg(long = "task-iface", value_name = "IF")]
    task_ifaces: Vec<String>,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpAttach::Auto)]
    xdp_mode: XdpAttach,
    /// Entries in each service's Maglev table: a prime, at least 100 times
    /// the largest service's task count for at most 1% imbalance.
    #[arg(long, value_name = "PRIME", default_value_t = mesh_common::abi::DEFAULT_MAGLEV_SIZE)]
    maglev_size: u32,
    /// Published ports (service, protocol, port) the maps can hold. The
    /// Maglev tables take 8 x max-services x maglev-size bytes (two tables
    /// per published port, for hitless updates).
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Backends (task address and target port) the maps can hold.
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Flows connection tracking holds, one entry per flow. LRU with
    /// per-CPU lists: when full, each CPU forgets its least recently used
    /// flows (a forgotten flow is re-hashed by Maglev, to the same task if
    /// the service has not changed).
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_CT_ENTRIES)]
    ct_entries: u32,
    /// Where /metrics, /ready and /live are served.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9469")]
    admin_addr: SocketAddr,
    /// How often the state file is checked for changes.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    watch_interval_ms: u64,
    /// Most verbose level of the BPF programs' own log lines (bridged into
    /// this daemon's log). Anything above info may log per packet.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Info)]
    bpf_log_level: BpfLogLevel,
}

#[derive(Clone, Copy, ValueEnum)]
enum BpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Check(a) => check(a),
        Cmd::Run(a) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|rt| rt.block_on(run(a))),
    };
    if let Err(e) = r {
        eprintln!("meshd: error: {e:#}");
        std::process::exit(1);
    }
}

fn node_name(a: &StateArgs) -> Result<String> {
    if let Some(n) = &a.node {
        return Ok(n.clone());
    }
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (pass --node)")?;
    Ok(h.trim().to_string())
}

/// Reads the state file once; returns its bytes (what a later change is
/// compared with) and, when they are valid for this node, the state.
fn read_state(a: &StateArgs, node: &str) -> (Option<Vec<u8>>, Result<State>) {
    let (bytes, state) = State::read(&a.state, &a.port_range);
    (
        bytes,
        state
            .map_err(anyhow::Error::from)
            .and_then(|s| check_node(a, s, node)),
    )
}

fn load_state(a: &StateArgs, node: &str) -> Result<State> {
    read_state(a, node).1
}

fn check_node(a: &StateArgs, s: State, node: &str) -> Result<State> {
    if s.node(node).is_none() {
        bail!(
            "{}: this node ({node:?}) is not in nodes[] (pass --node NAME; nodes are: {})",
            a.state.display(),
            s.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(s)
}

fn check(a: CheckArgs) -> Result<()> {
    let node = node_name(&a.state)?;
    let s = load_state(&a.state, &node)?;
    let d = Desired::compute(&s, &node, &[]);
    println!(
        "{}: valid; node {node} answers on {:?}",
        a.state.state.display(),
        d.node_addrs
    );
    for ((proto, port), svc) in &d.services {
        let local = svc.backends.iter().filter(|b| b.local).count();
        println!(
            "  {proto}/{port} -> {} target {} ({} tasks, {local} on this node)",
            svc.name,
            svc.target,
            svc.backends.len()
        );
    }
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    // Everything that can be checked is checked before the kernel is
    // touched: the configuration first, then the host it meets.
    let node = node_name(&a.state)?;
    let limits = Limits {
        maglev_size: a.maglev_size,
        max_services: a.max_services,
        max_backends: a.max_backends,
        ct_entries: a.ct_entries,
    };
    limits.validate()?;
    let (mut last, state) = read_state(&a.state, &node);
    let state = state?;
    net::check_iface(&a.iface)?;
    net::check_forwarding(&a.iface)?;
    for i in &a.task_ifaces {
        net::check_iface(i)?;
    }
    let desired = Desired::compute(&state, &node, &a.node_addrs);
    let mut task_links = task_links(&a, &desired);
    let listener = tokio::net::TcpListener::bind(a.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint {}", a.admin_addr))?;
    let metrics = Arc::new(Metrics::new()?);

    // Load (the verifier runs), fill, then attach: the first packet the
    // programs see already finds the maps filled.
    info!(
        "loading: {} published ports x Maglev {} ({:.1} MiB of tables), {} backends, {} tracked flows",
        limits.max_services,
        limits.maglev_size,
        8.0 * limits.max_services as f64 * limits.maglev_size as f64 / (1 << 20) as f64,
        limits.max_backends,
        limits.ct_entries
    );
    let mut dp = Dataplane::load(limits, a.bpf_log_level as u8)?;
    let report = dp.apply(&desired)?;
    dp.attach_task_ifaces(&net::reply_ifaces(&task_links));
    dp.attach_uplink(&a.iface, a.xdp_mode)?;
    metrics.state_generation.set(1);
    metrics.ready.set(1);
    info!(
        node = %node, iface = %a.iface, services = desired.services.len(), addrs = ?desired.node_addrs,
        "meshd ready: generation 1 applied ({report:?}); admin on http://{}", a.admin_addr
    );
    let log_fd = dp.log_fd();
    let dp = Arc::new(Mutex::new(dp));
    tokio::spawn(admin::serve(listener, dp.clone(), metrics.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_millis(a.watch_interval_ms.max(50)));
    let log_fd = match log_fd {
        // SAFETY: the fd is the aya-log ring buffer owned by the dataplane,
        // which outlives this registration (dropped first, below).
        Some(fd) => Some(
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
            .map_err(|e| anyhow::anyhow!("watching the BPF log buffer: {}", e))?,
        ),
        None => None,
    };
    let mut generation = 1i64;
    loop {
        let forced = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => true,
            _ = tick.tick() => false,
            r = async { match &log_fd { Some(fd) => fd.readable().await.map(Some), None => std::future::pending().await } } => {
                if let Ok(Some(mut g)) = r {
                    dp.lock().unwrap().flush_logs();
                    g.clear_ready();
                }
                continue;
            }
        };
        // The bytes compared are the bytes parsed: a change that lands
        // between two reads is never missed.
        let (now, state) = read_state(&a.state, &node);
        if !forced && now == last {
            let mut dp = dp.lock().unwrap();
            if let Err(e) = dp.expire() {
                warn!("expiring reply entries: {e:#}");
            }
            // Bridge ports come and go with containers: attach to new ones.
            dp.attach_task_ifaces(&net::reply_ifaces(&task_links));
            continue;
        }
        last = now;
        match state.and_then(|s| reload(&a, &node, &s, &dp)) {
            Ok((report, links)) => {
                task_links = links;
                generation += 1;
                metrics.state_generation.set(generation);
                info!("state applied: generation {generation} ({report:?})");
            }
            Err(e) => {
                metrics.state_rejected.inc();
                error!("state refused, keeping generation {generation}: {e:#}");
            }
        }
    }
    info!("shutting down: detaching programs");
    metrics.ready.set(0);
    drop(log_fd);
    drop(dp);
    Ok(())
}

/// Applies a new state; returns what changed and the links to its tasks.
fn reload(
    a: &RunArgs,
    node: &str,
    state: &State,
    dp: &Arc<Mutex<Dataplane>>,
) -> Result<(mesh_userspace::plan::Report, BTreeSet<String>)> {
    let desired = Desired::compute(state, node, &a.node_addrs);
    let links = task_links(a, &desired);
    let mut dp = dp.lock().unwrap();
    // Replies first: a task that gets flows can already answer them.
    dp.attach_task_ifaces(&net::reply_ifaces(&links));
    Ok((dp.apply(&desired)?, links))
}

/// The links that lead to this node's tasks (`--task-iface`, or the
/// device of the route to each local task). A bridge stands for its ports.
fn task_links(a: &RunArgs, d: &Desired) -> BTreeSet<String> {
    if !a.task_ifaces.is_empty() {
        return a.task_ifaces.iter().cloned().collect();
    }
    let mut set = BTreeSet::new();
    for addr in d.local_task_addrs() {
        match net::route_dev(addr) {
            Ok(dev) if dev == a.iface => {
                warn!(
                    "task {addr} is reached through the uplink {dev}; its replies are not rewritten"
                );
            }
            Ok(dev) => {
                set.insert(dev);
            }
            Err(e) => warn!("{e:#}; its flows will be dropped until a route appears"),
        }
    }
    set
}
