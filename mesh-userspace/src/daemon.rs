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
use crate::dataplane::pin::{self, OpenError, PinDir};
use crate::dataplane::{
    Applier, ApplyError, DEFAULT_INTERCEPT, Dataplane, OnExit, Programs, load::Logger,
};
use crate::desired::Desired;
use crate::health::{self, Health, SvcHealth};
use crate::model::State;
use crate::net;
use crate::plan::{self, Report};
use crate::source::docker;
use crate::source::file::FileSource;
use crate::source::{Beat, Update, Updates};

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

/// The signals meshd answers, taken over before anything else happens: a
/// SIGTERM that arrives the moment meshd says it is ready (or earlier)
/// ends it as it should, never by the default action.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

pub async fn run(cfg: RunConfig) -> Result<(), Failed> {
    let mut signals = Signals::new().map_err(|e| Failed::Node(e.context("handling signals")))?;
    // The first state, and whether it fits, before the host (a source that
    // cannot give one at once, Docker, is waited for once the programs
    // are loaded and the admin endpoint says why it is not ready).
    let reload = Arc::new(Notify::new());
    let beat = Beat::default();
    let (first, mut updates) = start_source(&cfg, reload.clone(), beat.clone())?;
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
    let health_listener = match cfg.health_addr {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the health endpoint {a} (--health-addr)"))?,
        ),
        None => None,
    };
    let health = Arc::new(Health::new(cfg.health_max_sync_age));
    let drained = read_drain(&cfg);
    health.set_drain(drained.clone());
    if let Some(d) = &drained {
        warn!(
            "this node is drained (meshd drain, {:?}): the health answer is 503 until meshd undrain",
            d.reason
        );
    }

    let lim = &cfg.limits;
    info!(
        "loading: {} published ports, Maglev tables of up to {} entries ({:.1} MiB of tables), {} backends, {} tracked flows",
        lim.max_services,
        lim.maglev_size,
        4.0 * lim.maglev_entries() as f64 / (1 << 20) as f64,
        lim.max_backends,
        lim.ct_entries
    );
    let pins = PinDir::open(&cfg.bpffs).map_err(|e| match e {
        OpenError::Busy(_) => Failed::Node(anyhow::anyhow!(e)),
        OpenError::Other(e) => Failed::Node(e.context("the pin directory (--bpffs)")),
    })?;
    let pin_root = pins.root.clone();
    let (dataplane, adoption) = Dataplane::load_pinned(
        cfg.limits.clone(),
        cfg.bpf_log_level,
        cfg.tc_attach,
        pins,
        cfg.on_exit,
    )?;
    let (programs, applier, stats, logger) = dataplane.into_parts();
    let sweeper = match cfg.ct_sweep_interval {
        Some(every) => Some((stats.sweeper(cfg.limits.ct_lifetimes)?, every)),
        None => None,
    };
    let admin = Arc::new(Admin::new(stats, health.clone())?);
    if let Some((sweeper, every)) = sweeper {
        let swept = admin.metrics.conntrack_swept.clone();
        std::thread::Builder::new()
            .name("ct-sweep".into())
            .spawn(move || sweeper.run(every, swept))
            .context("starting the conntrack sweeper")?;
    }
    admin.metrics.adopted.set(i64::from(adoption.state));
    tokio::spawn(admin::serve(
        listener,
        admin::admin_routes(admin.clone(), health.clone()),
    ));
    if let Some(l) = health_listener {
        info!(
            "health answers for load balancers on http://{}/healthz and /service/NAME",
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        tokio::spawn(admin::serve(l, admin::health_routes(health.clone())));
    }
    let first = match first {
        Some(s) => s,
        None => match wait_first(&cfg, &mut updates, &admin, &health, &mut signals).await? {
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
    let applier = adopt(&cfg, &pin_root, &adoption, applier, &first)?;
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
    let reserved = net::ReservedPorts::kept_in(&cfg.state_dir);
    let mut d = Daemon {
        cfg,
        iface,
        programs,
        applier,
        admin: admin.clone(),
        health: health.clone(),
        beat,
        drained,
        generation: 0,
        task_links: BTreeSet::new(),
        pending: None,
        retry: RETRY_MIN,
        applied: None,
        task_ports: Default::default(),
        task_devs: Default::default(),
        ports_scanned: None,
        scanner: Scanner::new(),
        reserved,
        neighbours: crate::neigh::Neighbours::default(),
        accept_local: None,
    };
    let report = d.apply(&first).map_err(|e| anyhow::anyhow!(e))?;
    // Unless told, the intercept stays what a pinned dataplane has:
    // switching it detaches XDP, and the device drops what is in flight.
    let intercept = match d.cfg.intercept {
        Some(i) => i,
        None => match d.programs.pinned_intercept(&d.iface) {
            Some(i) => {
                if i != DEFAULT_INTERCEPT {
                    info!(
                        iface = %d.iface,
                        "keeping the intercept the pinned dataplane has, {} (changing it drops packets in flight; --intercept chooses)",
                        i.name()
                    );
                }
                i
            }
            None => DEFAULT_INTERCEPT,
        },
    };
    d.programs
        .attach_uplink(&d.iface, intercept, d.cfg.xdp_mode)?;
    // The node's own flows: replies to them are handed in through the
    // loopback, which must take them first.
    match net::AcceptLocal::enable(&d.cfg.state_dir) {
        Ok(a) => d.accept_local = Some(a),
        Err(e) => warn!(
            "{e:#}: replies to flows this node's own processes start will be dropped by its stack"
        ),
    }
    d.programs.attach_loopback()?;
    // Whatever a previous meshd attached that this one did not take over
    // goes, and so do the maps of layouts this one does not have.
    d.programs.prune_pinned_links();
    if let Some(p) = d.programs.pins() {
        pin::remove_foreign(p, &adoption.foreign);
    }
    if let Err(e) = d.applier.writer_mut().record_object() {
        warn!("recording the programs in the pinned maps: {e:#}");
    }
    d.generation = 1;
    admin.metrics.state_generation.set(1);
    admin.set_state(&first, 1);
    admin.set_node(first.local_node.as_deref().unwrap_or(&d.cfg.node));
    admin.set_source_down(None);
    admin.metrics.ready.set(1);
    d.health_applied(&first);
    let desired =
        Desired::compute(&first, &d.cfg.node, &d.cfg.node_addrs).map_err(|e| anyhow::anyhow!(e))?;
    info!(
        node = %first.local_node.as_deref().unwrap_or(&d.cfg.node), iface = %d.iface,
        intercept = intercept.name(),
        services = desired.services.len(),
        addrs = %desired.node_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
        "meshd ready: generation 1 applied ({report}); admin on http://{}", d.cfg.admin_addr
    );
    if let Some(l) = logger {
        tokio::spawn(pump_logs(l));
    }
    d.follow(updates, reload, &mut signals).await?;
    admin.metrics.ready.set(0);
    match d.cfg.on_exit {
        OnExit::Keep => {
            info!(
                "exiting: the dataplane keeps serving generation {} (pinned under {}); a new \
                 meshd adopts it, meshd cleanup removes it",
                d.generation,
                pin_root.display()
            );
            d.reserved.keep();
            d.neighbours.keep();
            // The kept programs still hand replies in through the
            // loopback.
            if let Some(a) = &mut d.accept_local {
                a.keep();
            }
        }
        OnExit::Detach => info!("exiting: detaching and removing the dataplane (--on-exit detach)"),
    }
    drop(d);
    Ok(())
}

/// The applier for the first state: one whose planner knows what the
/// adopted maps hold (when the state maps were adopted), or `applier` as it
/// is (a fresh dataplane). Says which in the log.
fn adopt(
    cfg: &RunConfig,
    root: &std::path::Path,
    adoption: &pin::Adoption,
    applier: Applier,
    first: &State,
) -> Result<Applier, Failed> {
    if !adoption.state {
        if adoption.adopt.is_empty() {
            info!("a fresh dataplane, pinned under {}", root.display());
        } else {
            warn!(
                "a fresh dataplane, pinned under {}: the pinned state maps could not be adopted \
                 (see above); connection tracking starts empty, and flows are matched again by \
                 Maglev (the same task while a service is unchanged)",
                root.display()
            );
        }
        return Ok(applier);
    }
    let snap = applier
        .writer()
        .snapshot()
        .context("reading the pinned maps")?;
    let mut desired =
        Desired::compute(first, &cfg.node, &cfg.node_addrs).map_err(|e| anyhow::anyhow!(e))?;
    desired.forwarding = cfg.forwarding;
    let (planner, report) = crate::plan::Planner::adopt(cfg.limits.clone(), &snap, &desired);
    let programs = if snap.meta.object_hash == crate::dataplane::load::object_hash() {
        "the same programs"
    } else {
        "new programs (an upgrade)"
    };
    info!(
        "adopting the dataplane pinned under {} with {programs}: {} published ports ({} known \
         by name: their flows are kept), {} backends, {} nodes, {} reply entries; connection \
         tracking kept",
        root.display(),
        report.ports,
        report.named,
        report.backends,
        report.nodes,
        report.replies
    );
    Ok(Applier::with_planner(planner, applier.into_writer()))
}

/// Reads the first state (refusing a bad one) and starts following the
/// source from it. A source that cannot answer at once gives none yet.
/// The source beats `beat` whenever it reads a valid state.
fn start_source(
    cfg: &RunConfig,
    reload: Arc<Notify>,
    beat: Beat,
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
            beat.beat();
            let updates = source.spawn(
                read.seen,
                Update::State(state.clone()),
                *interval,
                reload,
                beat,
            );
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
            Ok((None, docker::spawn(cfg, reload, beat)))
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
    health: &Health,
    signals: &mut Signals,
) -> Result<Option<Arc<State>>> {
    loop {
        let u = updates.borrow_and_update().clone();
        match u {
            Update::State(s) => {
                match plan::vet(&s, &cfg.node, &cfg.node_addrs, &cfg.forwarding, &cfg.limits) {
                    Ok(_) => return Ok(Some(s)),
                    Err(e) => {
                        admin.metrics.state_rejected.inc();
                        admin.set_source_down(Some(format!("its state is refused: {e:#}")));
                        health.waiting(&format!("the state source's state is refused: {e:#}"));
                        error!("state refused, waiting for another: {e:#}");
                    }
                }
            }
            Update::Refused(why) => {
                admin.metrics.state_rejected.inc();
                admin.set_source_down(Some(format!("its state is refused: {why}")));
                health.waiting(&format!("the state source's state is refused: {why}"));
                error!("state refused, waiting for another: {why}");
            }
            Update::Unavailable(why) => {
                admin.metrics.source_errors.inc();
                admin.set_source_down(Some(why.to_string()));
                health.waiting(&format!("waiting for the state source: {why}"));
                warn!("no state yet: {why}");
            }
        }
        tokio::select! {
            _ = signals.term.recv() => return Ok(None),
            _ = signals.int.recv() => return Ok(None),
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
    health: Arc<Health>,
    /// When the source last read a valid state.
    beat: Beat,
    /// The drain `meshd drain` set, as last read.
    drained: Option<health::Drain>,
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
    /// Looks for them off the event loop.
    scanner: Scanner,
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
    async fn follow(
        &mut self,
        mut updates: Updates,
        reload: Arc<Notify>,
        signals: &mut Signals,
    ) -> Result<()> {
        let Signals { term, int, hup } = signals;
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
                self.health.source_problem(None);
                // A newer word replaces any retry, which starts afresh.
                self.pending = None;
                self.retry = RETRY_MIN;
                self.try_apply(s);
            }
            Update::Refused(why) => {
                self.admin.metrics.state_rejected.inc();
                self.health
                    .source_problem(Some(&format!("the state source's state is refused: {why}")));
                error!(
                    "state refused, keeping generation {}: {why}",
                    self.generation
                );
            }
            Update::Unavailable(why) => {
                self.admin.metrics.source_errors.inc();
                self.admin.set_source_down(Some(why.to_string()));
                self.health
                    .source_problem(Some(&format!("the state source is unavailable: {why}")));
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
                self.health_applied(&s);
                info!(
                    generation = self.generation,
                    "state applied: generation {} ({report})", self.generation
                );
            }
            Err(ApplyError::Refused(e)) => {
                self.admin.metrics.state_rejected.inc();
                self.health
                    .unsynced(&format!("the latest state is refused: {e:#}"));
                error!(
                    "state refused, keeping generation {}: {e:#}",
                    self.generation
                );
            }
            Err(ApplyError::Kernel(e)) => {
                // What was written stays and the planner knows it; the
                // rest is written by the retry (or by a newer state).
                self.admin.metrics.map_update_errors.inc();
                self.health
                    .unsynced(&format!("the kernel failed a map write; retrying: {e:#}"));
                error!(
                    "the kernel failed a map write after generation {} (retrying in {:.1} s): {e:#}",
                    self.generation,
                    self.retry.as_secs_f64()
                );
                self.pending = Some((s, tokio::time::Instant::now() + self.retry));
                self.retry = (self.retry * 2).min(RETRY_MAX);
            }
        }
    }

    /// Makes the dataplane hold `state` (timed: `mesh_sync_duration_seconds`).
    fn apply(&mut self, state: &State) -> Result<Report, ApplyError> {
        let t = std::time::Instant::now();
        let r = self.apply_untimed(state);
        self.admin
            .metrics
            .sync_duration
            .observe(t.elapsed().as_secs_f64());
        r
    }

    fn apply_untimed(&mut self, state: &State) -> Result<Report, ApplyError> {
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

    /// Finds the ports (and links) of local tasks not found yet, or whose
    /// port went; says whether anything changed now. Before the first
    /// state is in (meshd not ready yet) the scan is waited for, so every
    /// task that runs is held to its port from the start; after that it
    /// runs off the event loop ([`Scanner`]) and `housekeeping` takes in
    /// what it finds.
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
            if self.applied.is_none() {
                let found = net::find_tasks(&missing);
                self.take_found(found, tasks);
            } else {
                self.scanner.start(missing);
            }
            self.ports_scanned = Some(tokio::time::Instant::now());
        }
        (self.task_ports.clone(), self.task_devs.clone()) != before
    }

    /// Takes in what a scan found, for the tasks in `tasks` (those that
    /// left meanwhile are not ours any more); says whether anything
    /// changed.
    fn take_found(
        &mut self,
        found: BTreeMap<std::net::Ipv4Addr, net::TaskFound>,
        tasks: &[std::net::Ipv4Addr],
    ) -> bool {
        let mut changed = false;
        for (t, f) in found {
            if !tasks.contains(&t) {
                continue;
            }
            changed |= self.task_ports.insert(t, f.port) != Some(f.port);
            if let Some(l) = f.link {
                changed |= self.task_devs.insert(t, l) != Some(l);
            }
        }
        changed
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

    /// The health answers after generation `self.generation` of `state`
    /// was applied: in sync, drained in the swarm or not, and per service
    /// its tasks that get new flows.
    fn health_applied(&self, state: &State) {
        let me = state.local_node.as_deref().unwrap_or(&self.cfg.node);
        let swarm_drained = state
            .node(me)
            .is_some_and(|n| n.availability == crate::model::Availability::Drain);
        let mut services: BTreeMap<String, SvcHealth> = BTreeMap::new();
        if let Some(d) = &self.applied {
            for s in d.services.values() {
                let table = s.table_backends();
                let e = services.entry(s.name.clone()).or_default();
                e.local = s.local;
                // The most any of its ports has (they share their tasks).
                e.tasks = e.tasks.max(table.len());
                e.local_tasks = e.local_tasks.max(table.iter().filter(|b| b.local).count());
            }
        }
        self.health
            .applied(self.generation, swarm_drained, services);
    }

    /// Follows `meshd drain`: its file is read again on every tick.
    fn follow_drain(&mut self) {
        let now = read_drain(&self.cfg);
        if now == self.drained {
            return;
        }
        match &now {
            Some(d) => warn!(
                "drained by meshd drain ({:?}): the health answer is 503, flows are still served",
                d.reason
            ),
            None => {
                info!("the drain ended (meshd undrain): the health answer follows the node again")
            }
        }
        self.health.set_drain(now.clone());
        self.drained = now;
    }

    fn housekeeping(&mut self) {
        self.follow_drain();
        // In sync as long as the source keeps reading valid states that
        // the dataplane holds.
        if self.pending.is_none()
            && let Some(at) = self.beat.last()
        {
            self.health.source_beat(at);
        }
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
        let mut changed = (unknown || gone) && self.find_task_ports(&tasks);
        // What the last scan found, once it ended.
        if let Some(found) = self.scanner.poll()
            && let Some(d) = &self.applied
        {
            let now = d.local_task_addrs();
            changed |= self.take_found(found, &now);
        }
        if changed && let Some(mut d) = self.applied.take() {
            d.task_ports = self.task_ports.clone();
            d.task_links = self.task_devs.clone();
            match self.applier.apply(&d) {
                Ok(_) => debug!(tasks = self.task_ports.len(), "tasks' ports updated"),
                Err(e) => warn!("updating tasks' ports: {e:#}"),
            }
            self.applied = Some(d);
        }
        // Bridge ports come and go with containers: attach to new ones.
        self.programs
            .attach_task_ifaces(&net::reply_ifaces(&self.task_links));
    }
}

/// Looks for local tasks' ports and links on a thread of its own: a scan
/// enters every network namespace it may find them in (one `nsenter` each)
/// and took up to 800 ms on a loaded node, while states, signals and health
/// answers must not wait for it. One scan at a time; a scan asked for
/// while one runs is left to the next housekeeping round.
struct Scanner {
    ask: std::sync::mpsc::Sender<Vec<std::net::Ipv4Addr>>,
    found: std::sync::mpsc::Receiver<BTreeMap<std::net::Ipv4Addr, net::TaskFound>>,
    busy: bool,
}

impl Scanner {
    fn new() -> Scanner {
        let (ask, asked) = std::sync::mpsc::channel::<Vec<std::net::Ipv4Addr>>();
        let (tell, found) = std::sync::mpsc::channel();
        // Ends when the daemon (the asking end) goes.
        let spawned = std::thread::Builder::new()
            .name("task-scan".into())
            .spawn(move || {
                for tasks in asked {
                    if tell.send(net::find_tasks(&tasks)).is_err() {
                        break;
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("starting the task scan thread: {e}; tasks' ports are found only at start");
        }
        Scanner {
            ask,
            found,
            busy: false,
        }
    }

    /// Starts a scan for `tasks`, unless one runs.
    fn start(&mut self, tasks: Vec<std::net::Ipv4Addr>) {
        if !self.busy && self.ask.send(tasks).is_ok() {
            self.busy = true;
        }
    }

    /// What the running scan found, once it ended.
    fn poll(&mut self) -> Option<BTreeMap<std::net::Ipv4Addr, net::TaskFound>> {
        let r = self.found.try_recv().ok();
        if r.is_some() {
            self.busy = false;
        }
        r
    }
}

/// Docker's bridge for the containers of a swarm node.
const DOCKER_GWBRIDGE: &str = "docker_gwbridge";
/// The drain `meshd drain` left in the state directory, if any (an
/// unreadable file is logged and taken as no drain).
fn read_drain(cfg: &RunConfig) -> Option<health::Drain> {
    match health::read_drain(&cfg.state_dir) {
        Ok(d) => d,
        Err(e) => {
            warn!("{e:#}; taken as not drained");
            None
        }
    }
}

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
