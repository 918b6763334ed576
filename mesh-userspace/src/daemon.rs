//! The daemon: checks the configuration and the host, loads and fills the
//! dataplane, attaches it, then follows its state source. It owns the
//! whole chain source -> desired -> plan -> writer; the admin endpoint and
//! the log pump run beside it and share nothing it writes.
//!
//! Startup order: everything that can be checked is checked before the
//! kernel is touched (the flags, the first state and whether it fits the
//! maps, the interfaces); then load (the verifier runs), fill, and only
//! then attach, so the first packet the programs see finds the maps filled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::admin::{self, Admin};
use crate::config::{ConfigError, OrConfig, RunConfig, SourceConfig};
use crate::dataplane::{Applier, ApplyError, Dataplane, Programs, load::Logger};
use crate::desired::Desired;
use crate::model::State;
use crate::net;
use crate::plan::{self, Report};
use crate::source::docker;
use crate::source::file::FileSource;
use crate::source::{Update, Updates};

/// How meshd run ends badly.
#[derive(Debug)]
pub enum Failed {
    /// Refused before the kernel was touched (exit 64).
    Config(ConfigError),
    /// The node failed (exit 1).
    Node(anyhow::Error),
}

impl From<ConfigError> for Failed {
    fn from(e: ConfigError) -> Self {
        Failed::Config(e)
    }
}

impl From<anyhow::Error> for Failed {
    fn from(e: anyhow::Error) -> Self {
        Failed::Node(e)
    }
}

/// How often attachments and reply entries are looked after: bridge ports
/// that appeared (containers started) get the reply program, reply entries
/// whose grace period ended are deleted.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// Retries of a state the kernel failed to take: first after this, then
/// twice as long each time, up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// How often local tasks whose port is not known are looked for again.
const PORT_SCAN_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(cfg: RunConfig) -> Result<(), Failed> {
    // The first state, and whether it fits, before the host (a source that
    // cannot give one at once, Docker, is waited for once the programs
    // are loaded and the admin endpoint says why it is not ready).
    let reload = Arc::new(Notify::new());
    let (first, mut updates) = start_source(&cfg, reload.clone())?;
    let mut uplink = cfg.iface.clone();
    if let Some(first) = &first {
        plan::vet(
            first,
            &cfg.node,
            &cfg.node_addrs,
            &cfg.forwarding,
            &cfg.limits,
        )
        .or_config()?;
        if uplink.is_none() {
            uplink = Some(uplink_of(&cfg, first).or_config()?);
        }
    }
    net::check_kernel(cfg.tc_attach).or_config()?;
    if let Some(iface) = &cfg.iface {
        net::check_iface(iface).or_config()?;
        net::check_forwarding(iface).or_config()?;
    }
    for i in &cfg.task_ifaces {
        net::check_iface(i).or_config()?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint {}", cfg.admin_addr))?;

    let lim = &cfg.limits;
    info!(
        "loading: {} published ports, Maglev tables of up to {} entries ({:.1} MiB of tables), {} backends, {} tracked flows",
        lim.max_services,
        lim.maglev_size,
        4.0 * lim.maglev_entries() as f64 / (1 << 20) as f64,
        lim.max_backends,
        lim.ct_entries
    );
    let (programs, applier, stats, logger) =
        Dataplane::load_with(cfg.limits.clone(), cfg.bpf_log_level, cfg.tc_attach)?.into_parts();
    let admin = Arc::new(Admin::new(stats)?);
    tokio::spawn(admin::serve(listener, admin.clone()));
    let first = match first {
        Some(s) => s,
        None => match wait_first(&cfg, &mut updates, &admin).await? {
            Some(s) => s,
            None => return Ok(()),
        },
    };
    let iface = match uplink {
        Some(i) => i,
        None => uplink_of(&cfg, &first).or_config()?,
    };
    let mut cfg = cfg;
    if cfg.forwarding.mtu == 0 {
        cfg.forwarding.mtu = net::mtu(&iface).or_config()?;
    }
    info!(
        "forwarding to other nodes: UDP port {}, MTU {} ({} bytes of it encapsulation), replies {}",
        cfg.forwarding.port,
        cfg.forwarding.mtu,
        mesh_common::abi::ENCAP_LEN,
        match cfg.forwarding.reply {
            crate::model::ReplyMode::ViaIngress => "via the ingress node",
            crate::model::ReplyMode::Direct => "direct",
        }
    );
    let mut d = Daemon {
        cfg,
        iface,
        programs,
        applier,
        admin: admin.clone(),
        generation: 0,
        task_links: BTreeSet::new(),
        pending: None,
        retry: RETRY_MIN,
        applied: None,
        task_ports: Default::default(),
        task_devs: Default::default(),
        ports_scanned: None,
        reserved: net::ReservedPorts::new(),
        neighbours: crate::neigh::Neighbours::default(),
        accept_local: None,
    };
    let report = d.apply(&first).map_err(|e| anyhow::anyhow!(e))?;
    d.programs
        .attach_uplink(&d.iface, d.cfg.intercept, d.cfg.xdp_mode)?;
    // The node's own flows: replies to them are handed in through the
    // loopback, which must take them first.
    match net::AcceptLocal::enable() {
        Ok(a) => d.accept_local = Some(a),
        Err(e) => warn!(
            "{e:#}: replies to flows this node's own processes start will be dropped by its stack"
        ),
    }
    d.programs.attach_loopback()?;
    d.generation = 1;
    admin.metrics.state_generation.set(1);
    admin.set_state(&first, 1);
    admin.set_source_down(None);
    admin.metrics.ready.set(1);
    let desired =
        Desired::compute(&first, &d.cfg.node, &d.cfg.node_addrs).map_err(|e| anyhow::anyhow!(e))?;
    info!(
        node = %first.local_node.as_deref().unwrap_or(&d.cfg.node), iface = %d.iface,
        intercept = d.cfg.intercept.name(),
        services = desired.services.len(), addrs = ?desired.node_addrs,
        "meshd ready: generation 1 applied ({report:?}); admin on http://{}", d.cfg.admin_addr
    );
    if let Some(l) = logger {
        tokio::spawn(pump_logs(l));
    }
    d.follow(updates, reload).await?;
    info!("shutting down: detaching programs");
    admin.metrics.ready.set(0);
    drop(d);
    Ok(())
}

/// Reads the first state (refusing a bad one) and starts following the
/// source from it. A source that cannot answer at once gives none yet.
fn start_source(
    cfg: &RunConfig,
    reload: Arc<Notify>,
) -> Result<(Option<Arc<State>>, Updates), Failed> {
    match &cfg.source {
        SourceConfig::File {
            path,
            port_range,
            interval,
            state_dir,
        } => {
            let mut source = FileSource::new(path, port_range.clone()).remember_in(state_dir);
            let read = source.read();
            let state = Arc::new(read.state.or_config()?);
            let updates = source.spawn(read.seen, Update::State(state.clone()), *interval, reload);
            Ok((Some(state), updates))
        }
        SourceConfig::Docker {
            url,
            interval,
            peer_port,
        } => {
            let cfg = docker::DockerConfig {
                url: url.clone(),
                interval: *interval,
                peer_port: *peer_port,
            };
            Ok((None, docker::spawn(cfg, reload)))
        }
    }
}

/// Waits for the source's first state that fits the maps, saying why
/// there is none while there is none (log, metric, `/ready`). `None`: a
/// signal to stop came first.
async fn wait_first(
    cfg: &RunConfig,
    updates: &mut Updates,
    admin: &Admin,
) -> Result<Option<Arc<State>>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let u = updates.borrow_and_update().clone();
        match u {
            Update::State(s) => {
                match plan::vet(&s, &cfg.node, &cfg.node_addrs, &cfg.forwarding, &cfg.limits) {
                    Ok(_) => return Ok(Some(s)),
                    Err(e) => {
                        admin.metrics.state_rejected.inc();
                        admin.set_source_down(Some(format!("its state is refused: {e:#}")));
                        error!("state refused, waiting for another: {e:#}");
                    }
                }
            }
            Update::Refused(why) => {
                admin.metrics.state_rejected.inc();
                admin.set_source_down(Some(format!("its state is refused: {why}")));
                error!("state refused, waiting for another: {why}");
            }
            Update::Unavailable(why) => {
                admin.metrics.source_errors.inc();
                admin.set_source_down(Some(why.to_string()));
                warn!("no state yet: {why}");
            }
        }
        tokio::select! {
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
            r = updates.changed() => r.context("the state source stopped")?,
        }
    }
}

/// The interface that holds this node's address in `state`: the uplink
/// when `--iface` is not given.
fn uplink_of(cfg: &RunConfig, state: &State) -> Result<String> {
    let name = state.local_node.as_deref().unwrap_or(&cfg.node);
    let node = state
        .node(name)
        .with_context(|| format!("this node ({name:?}) is not in the state"))?;
    let iface = net::iface_with_addr(node.addr).with_context(|| {
        format!(
            "finding the uplink: no interface holds this node's address {} (pass --iface)",
            node.addr
        )
    })?;
    net::check_forwarding(&iface)?;
    info!(%iface, addr = %node.addr, "the uplink is the interface that holds this node's address");
    Ok(iface)
}

struct Daemon {
    cfg: RunConfig,
    /// The uplink.
    iface: String,
    programs: Programs,
    applier: Applier,
    admin: Arc<Admin>,
    generation: i64,
    /// The links that lead to this node's tasks.
    task_links: BTreeSet<String>,
    /// A state the kernel failed to take, and when to try it again.
    pending: Option<(Arc<State>, tokio::time::Instant)>,
    /// The wait before the next retry.
    retry: Duration,
    /// What the maps hold now.
    applied: Option<Desired>,
    /// The port each local task sits behind, as found so far.
    task_ports: BTreeMap<std::net::Ipv4Addr, u32>,
    /// Each local task's link (delivery without a FIB lookup), as found
    /// so far.
    task_devs: BTreeMap<std::net::Ipv4Addr, crate::desired::TaskLink>,
    /// When tasks' ports were last looked for.
    ports_scanned: Option<tokio::time::Instant>,
    /// Published ports kept out of the node's own local ports.
    reserved: net::ReservedPorts,
    /// Next hops to the other nodes, kept resolved for XDP.
    neighbours: crate::neigh::Neighbours,
    /// The loopback's `accept_local`, on while the programs run (after
    /// `programs` here, so it is put back once they are detached).
    accept_local: Option<net::AcceptLocal>,
}

impl Daemon {
    /// Follows the source until SIGTERM or SIGINT.
    async fn follow(&mut self, mut updates: Updates, reload: Arc<Notify>) -> Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = hup.recv() => reload.notify_one(),
                r = updates.changed() => {
                    r.context("the state source stopped")?;
                    let u = updates.borrow_and_update().clone();
                    self.on_update(u);
                }
                _ = until(self.pending.as_ref().map(|p| p.1)) => {
                    if let Some((s, _)) = self.pending.take() {
                        self.try_apply(s);
                    }
                }
                _ = tick.tick() => self.housekeeping(),
            }
        }
    }

    fn on_update(&mut self, u: Update) {
        match u {
            Update::State(s) => {
                self.admin.set_source_down(None);
                // A newer word replaces any retry, which starts afresh.
                self.pending = None;
                self.retry = RETRY_MIN;
                self.try_apply(s);
            }
            Update::Refused(why) => {
                self.admin.metrics.state_rejected.inc();
                error!(
                    "state refused, keeping generation {}: {why}",
                    self.generation
                );
            }
            Update::Unavailable(why) => {
                self.admin.metrics.source_errors.inc();
                self.admin.set_source_down(Some(why.to_string()));
                warn!(
                    "state source unavailable, keeping generation {}: {why}",
                    self.generation
                );
            }
        }
    }

    fn try_apply(&mut self, s: Arc<State>) {
        match self.apply(&s) {
            Ok(report) => {
                self.generation += 1;
                self.retry = RETRY_MIN;
                self.admin.metrics.state_generation.set(self.generation);
                self.admin.set_state(&s, self.generation);
                info!("state applied: generation {} ({report:?})", self.generation);
            }
            Err(ApplyError::Refused(e)) => {
                self.admin.metrics.state_rejected.inc();
                error!(
                    "state refused, keeping generation {}: {e:#}",
                    self.generation
                );
            }
            Err(ApplyError::Kernel(e)) => {
                // What was written stays and the planner knows it; the
                // rest is written by the retry (or by a newer state).
                self.admin.metrics.map_update_errors.inc();
                error!(
                    "the kernel failed a map write after generation {} (retrying in {:?}): {e:#}",
                    self.generation, self.retry
                );
                self.pending = Some((s, tokio::time::Instant::now() + self.retry));
                self.retry = (self.retry * 2).min(RETRY_MAX);
            }
        }
    }

    /// Makes the dataplane hold `state`.
    fn apply(&mut self, state: &State) -> Result<Report, ApplyError> {
        let mut desired = Desired::compute(state, &self.cfg.node, &self.cfg.node_addrs)
            .map_err(ApplyError::Refused)?;
        let links = task_links(&self.cfg, &self.iface, &desired);
        // Replies first: a task that gets flows can already answer them.
        self.programs.attach_task_ifaces(&net::reply_ifaces(&links));
        self.find_task_ports(&desired.local_task_addrs());
        desired.task_ports = self.task_ports.clone();
        desired.task_links = self.task_devs.clone();
        desired.forwarding = self.cfg.forwarding;
        let report = self.applier.apply(&desired)?;
        let others: Vec<std::net::Ipv4Addr> = desired
            .nodes
            .values()
            .filter(|n| !n.local)
            .map(|n| n.addr)
            .collect();
        self.neighbours.follow(&others);
        self.task_links = links;
        self.admin.set_services(self.applier.service_index());
        self.reserve_ports(&desired);
        self.applied = Some(desired);
        Ok(report)
    }

    /// Finds the ports of local tasks not found yet (or whose port went);
    /// says whether anything changed.
    fn find_task_ports(&mut self, tasks: &[std::net::Ipv4Addr]) -> bool {
        let before = (self.task_ports.clone(), self.task_devs.clone());
        // Forget tasks that left, and ports that went (a container
        // replaced under the same address gets another port, and link).
        self.task_ports
            .retain(|t, i| tasks.contains(t) && net::ifname(*i).is_some());
        let ports = &self.task_ports;
        self.task_devs
            .retain(|t, l| ports.get(t) == Some(&l.ifindex));
        let missing: Vec<_> = tasks
            .iter()
            .copied()
            .filter(|t| !self.task_ports.contains_key(t))
            .collect();
        if !missing.is_empty() {
            for (t, f) in net::find_tasks(&missing) {
                self.task_ports.insert(t, f.port);
                if let Some(l) = f.link {
                    self.task_devs.insert(t, l);
                }
            }
            self.ports_scanned = Some(tokio::time::Instant::now());
        }
        (self.task_ports.clone(), self.task_devs.clone()) != before
    }

    /// Keeps the published ports (and the range they come from) out of
    /// the node's own local ports.
    fn reserve_ports(&mut self, d: &Desired) {
        let range = match &self.cfg.source {
            SourceConfig::File { port_range, .. } => Some(port_range.clone()),
            // Swarm assigns from its own range, the same by default.
            SourceConfig::Docker { .. } => Some(crate::source::ports::DEFAULT_PORT_RANGE),
        };
        let ports: Vec<u16> = d.services.keys().map(|(_, p)| *p).collect();
        self.reserved.reserve(range.as_ref(), &ports);
    }

    fn housekeeping(&mut self) {
        if let Err(e) = self.applier.expire() {
            warn!("expiring reply entries: {e:#}");
        }
        // Tasks whose port is not known yet (their container not started,
        // or just replaced): look again now and then; once found, their
        // replies are trusted only from there.
        let due = self
            .ports_scanned
            .is_none_or(|t| t.elapsed() >= PORT_SCAN_INTERVAL);
        let tasks = match &self.applied {
            Some(d) if due => d.local_task_addrs(),
            _ => Vec::new(),
        };
        if due {
            self.ports_scanned = Some(tokio::time::Instant::now());
        }
        let unknown = tasks.iter().any(|t| !self.task_ports.contains_key(t));
        let gone = due && self.task_ports.values().any(|i| net::ifname(*i).is_none());
        if (unknown || gone)
            && self.find_task_ports(&tasks)
            && let Some(mut d) = self.applied.take()
        {
            d.task_ports = self.task_ports.clone();
            d.task_links = self.task_devs.clone();
            match self.applier.apply(&d) {
                Ok(_) => debug!(ports = ?self.task_ports, "tasks' ports updated"),
                Err(e) => warn!("updating tasks' ports: {e:#}"),
            }
            self.applied = Some(d);
        }
        // Bridge ports come and go with containers: attach to new ones.
        self.programs
            .attach_task_ifaces(&net::reply_ifaces(&self.task_links));
    }
}

/// Docker's bridge for the containers of a swarm node.
const DOCKER_GWBRIDGE: &str = "docker_gwbridge";

/// The links that lead to this node's tasks (`--task-iface`, or the
/// device of the route to each local task, and on a swarm node
/// docker_gwbridge, where every task container sits: those of services
/// that publish nothing call published ports through the node too). A
/// bridge stands for its ports.
fn task_links(cfg: &RunConfig, uplink: &str, d: &Desired) -> BTreeSet<String> {
    if !cfg.task_ifaces.is_empty() {
        return cfg.task_ifaces.iter().cloned().collect();
    }
    let mut set = BTreeSet::new();
    if matches!(cfg.source, SourceConfig::Docker { .. }) && net::ifindex(DOCKER_GWBRIDGE).is_some()
    {
        set.insert(DOCKER_GWBRIDGE.to_string());
    }
    for addr in d.local_task_addrs() {
        match net::route_dev(addr) {
            Ok(dev) if dev == uplink => {
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

/// Resolves at `at`, or never.
pub(crate) async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Drains the programs' aya-log records into this process's log as they
/// arrive.
async fn pump_logs(logger: Logger) {
    // SAFETY: the AsyncFd owns the logger, and so its ring buffer's fd,
    // for as long as the registration lives.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("watching the BPF log buffer: {e}; BPF log lines are lost");
            return;
        }
    };
    loop {
        let Ok(mut g) = fd.readable_mut().await else {
            return;
        };
        g.get_inner_mut().flush();
        g.clear_ready();
    }
}
