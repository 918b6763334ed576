//! The Docker source: follows a real swarm through the Engine API (bollard,
//! with API version negotiation, so it talks 1.41 to Debian's docker.io
//! 20.10), on managers and on workers alike, with nothing to configure.
//!
//! Every node asks its own dockerd (see [`view`] for what each read gives):
//! - `/info`: which node this is (its swarm address), whether it is a
//!   manager, where the managers are, where the swarm certificates are;
//! - the ingress network's service table: which services and tasks there
//!   are, at which addresses, on which nodes (Docker's gossip keeps it on
//!   every node, workers included);
//! - its own containers and `docker_gwbridge`: where it delivers its own
//!   tasks.
//!
//! What only managers can read (protocols, node availability and status,
//! tasks shutting down) is the [`view::SwarmView`]: a manager reads it
//! (`/services`, `/nodes`, `/tasks`) and serves it to workers
//! ([`peer`]); a worker follows it from a manager, failing over between
//! them. Both then build their state the same way ([`merge`]).
//!
//! When: at once after (re)connecting, on events (service and node events
//! on managers, container and network events everywhere; Docker has no
//! task events), and every `interval`, which catches what events do not
//! show (tasks starting or stopping on other nodes). A state equal to the
//! last one sent is not sent again. Docker unreachable: the source says
//! so ([`Update::Unavailable`], once per reason) and retries with backoff;
//! the daemon keeps its last good state.

pub mod merge;
pub mod peer;
pub mod tls;
pub mod view;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::query_parameters::{
    EventsOptions, InspectNetworkOptions, ListContainersOptions, ListNodesOptions,
    ListServicesOptions, ListTasksOptions,
};
use futures_util::StreamExt;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use self::merge::{Known, Me};
use self::peer::{Followed, Managers, Served};
use self::tls::SwarmPki;
use self::view::{IngressTable, SwarmView, TASK_LABEL};
use super::{Beat, Update, Updates};
use crate::model::State;

/// The default Engine API address.
pub const DEFAULT_URL: &str = "unix:///var/run/docker.sock";
/// The default port of the managers' view stream.
pub const DEFAULT_PEER_PORT: u16 = 9470;

/// Reconnecting to dockerd: first after this, then twice as long each time.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Events come in bursts (a service update: several); one resync per burst.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often `/info` is asked again (roles and managers change seldom).
const INFO_EVERY: Duration = Duration::from_secs(10);
/// A request to dockerd that takes longer fails.
const API_TIMEOUT_SECS: u64 = 10;

#[derive(Clone, Debug)]
pub struct DockerConfig {
    /// `unix:///path`, `tcp://host:port` or `http://host:port`.
    pub url: String,
    /// Full resync period.
    pub interval: Duration,
    /// The port managers serve their view on (on their swarm address),
    /// and workers follow it on.
    pub peer_port: u16,
}

/// Refuses what is not a Docker address meshd can use.
pub fn check_url(url: &str) -> Result<()> {
    let ok = ["unix:///", "tcp://", "http://"]
        .iter()
        .any(|p| url.len() > p.len() && url.starts_with(p));
    if !ok {
        bail!(
            "--docker {url:?}: not a Docker address (unix:///path, tcp://host:port or http://host:port)"
        );
    }
    Ok(())
}

/// Connects to dockerd at `url` and negotiates the API version.
pub async fn connect(url: &str) -> Result<Docker> {
    check_url(url)?;
    let d = if let Some(path) = url.strip_prefix("unix://") {
        Docker::connect_with_unix(path, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else if url.starts_with("tcp://") || url.starts_with("http://") {
        Docker::connect_with_http(url, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else {
        bail!("{url:?}: not a Docker address (unix:///path, tcp://host:port or http://host:port)");
    }
    .with_context(|| format!("Docker at {url}"))?;
    d.negotiate_version()
        .await
        .with_context(|| format!("Docker at {url}: asking its API version"))
}

/// What `/info` says about this node's place in the swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub hostname: String,
    pub addr: Ipv4Addr,
    pub manager: bool,
    /// The managers' swarm addresses (their raft address's host).
    pub managers: Vec<Ipv4Addr>,
    pub data_root: PathBuf,
}

/// Asks `/info`; fails unless this dockerd is an active swarm node.
pub async fn node_info(d: &Docker) -> Result<NodeInfo> {
    let i = d.info().await.context("GET /info")?;
    let swarm = i.swarm.unwrap_or_default();
    let state = swarm
        .local_node_state
        .map(|s| s.to_string())
        .unwrap_or_default();
    if state != "active" {
        bail!(
            "this dockerd is not an active swarm node (Swarm.LocalNodeState is {state:?}{})",
            swarm
                .error
                .filter(|e| !e.is_empty())
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    let addr = swarm
        .node_addr
        .as_deref()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "Swarm.NodeAddr {:?} is not an IPv4 address",
                swarm.node_addr
            )
        })?;
    let managers = swarm
        .remote_managers
        .iter()
        .flatten()
        .filter_map(|m| {
            let a = m.addr.as_deref()?;
            a.rsplit_once(':').map_or(a, |(h, _)| h).parse().ok()
        })
        .collect();
    Ok(NodeInfo {
        id: swarm.node_id.unwrap_or_default(),
        hostname: i.name.unwrap_or_default(),
        addr,
        manager: swarm.control_available.unwrap_or(false),
        managers,
        data_root: i.docker_root_dir.unwrap_or_default().into(),
    })
}

/// Starts following Docker; the first word is "unavailable" until the
/// first state is read. Every resync that reads a state that holds
/// together, changed or not, beats `beat`.
pub fn spawn(cfg: DockerConfig, reload: Arc<Notify>, beat: Beat) -> Updates {
    let (tx, rx) = watch::channel(Update::Unavailable(
        format!("waiting for Docker at {}", cfg.url).into(),
    ));
    tokio::spawn(Source::new(cfg, tx, beat).run(reload));
    rx
}

struct Source {
    cfg: DockerConfig,
    tx: watch::Sender<Update>,
    /// The last state sent (not sent again unless a reload asks).
    last: Option<State>,
    /// What the last resync skipped (logged when it changes).
    skipped: Vec<String>,
    /// A manager's own latest view (kept when its reads fail).
    own_view: Option<Arc<SwarmView>>,
    /// Why a manager's own read fails now (said once).
    view_failing: Option<String>,
    /// The manager side of the view stream, once started.
    served: Option<watch::Sender<Served>>,
    /// The worker side, once started.
    followed: Option<(watch::Sender<Option<Managers>>, watch::Receiver<Followed>)>,
    beat: Beat,
}

impl Source {
    fn new(cfg: DockerConfig, tx: watch::Sender<Update>, beat: Beat) -> Self {
        Self {
            beat,
            cfg,
            tx,
            last: None,
            skipped: Vec::new(),
            own_view: None,
            view_failing: None,
            served: None,
            followed: None,
        }
    }

    async fn run(mut self, reload: Arc<Notify>) {
        let mut backoff = RETRY_MIN;
        loop {
            match self.session(&reload).await {
                Ok(()) => backoff = RETRY_MIN,
                Err(e) => {
                    self.unavailable(format!("{e:#}"));
                    if let Some(s) = &self.served {
                        let _ = s.send_replace(Err(format!("{e:#}").into()));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn unavailable(&self, why: String) {
        let same = matches!(&*self.tx.borrow(), Update::Unavailable(w) if **w == *why);
        if !same {
            self.tx.send_replace(Update::Unavailable(why.into()));
        }
    }

    /// One connection to dockerd: resyncs until it fails (an error) or
    /// this node's place in the swarm changes (Ok: start again).
    async fn session(&mut self, reload: &Notify) -> Result<()> {
        let d = connect(&self.cfg.url).await?;
        let me = node_info(&d).await?;
        info!(
            "following Docker at {}: node {} ({}, id {}), a {}",
            self.cfg.url,
            me.addr,
            me.hostname,
            me.id,
            if me.manager { "manager" } else { "worker" }
        );
        self.start_peer(&me).await;
        let mut types = vec!["container", "network"];
        if me.manager {
            types.extend(["service", "node"]);
        }
        let filters = HashMap::from([(
            "type".to_string(),
            types.iter().map(|t| t.to_string()).collect(),
        )]);
        let mut events = d.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        let mut followed = self.followed.as_ref().map(|f| f.1.clone());
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut info_tick = tokio::time::interval(INFO_EVERY);
        info_tick.tick().await;
        let mut due: Option<tokio::time::Instant> = None;
        self.resync(&d, &me, false).await?;
        loop {
            let mut force = false;
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::daemon::until(due) => { due = None; }
                e = events.next() => {
                    match e {
                        Some(Ok(_)) => {
                            due.get_or_insert_with(|| tokio::time::Instant::now() + DEBOUNCE);
                            continue;
                        }
                        Some(Err(e)) => return Err(anyhow!(e).context("the event stream failed")),
                        None => bail!("the event stream ended"),
                    }
                }
                r = changed(&mut followed) => { r?; }
                _ = reload.notified() => { force = true; }
                _ = info_tick.tick() => {
                    let now = node_info(&d).await?;
                    if now.addr != me.addr || now.manager != me.manager || now.id != me.id {
                        info!("this node's place in the swarm changed: starting again");
                        return Ok(());
                    }
                    if now.managers != me.managers {
                        self.set_managers(&now);
                    }
                    continue;
                }
            }
            self.resync(&d, &me, force).await?;
        }
    }

    /// Starts serving the view (a manager) or following it (a worker),
    /// once; later sessions only update where managers are.
    async fn start_peer(&mut self, me: &NodeInfo) {
        let pki = SwarmPki::under(&me.data_root);
        if me.manager && self.served.is_none() {
            let (tx, rx) = watch::channel::<Served>(Err("no read of the swarm yet".into()));
            let at = SocketAddr::from((me.addr, self.cfg.peer_port));
            match tokio::net::TcpListener::bind(at).await {
                Ok(l) => {
                    info!(
                        "serving the swarm view to workers on {at} (mutual TLS, swarm PKI in {})",
                        pki.dir.display()
                    );
                    tokio::spawn(peer::serve(l, pki.clone(), rx));
                }
                Err(e) => warn!(
                    "cannot serve the swarm view on {at}: {e}; workers will follow other managers"
                ),
            }
            self.served = Some(tx);
        }
        if !me.manager {
            if self.followed.is_none() {
                let (mtx, mrx) = watch::channel(None);
                let (ftx, frx) = watch::channel(Followed::default());
                tokio::spawn(peer::follow(mrx, ftx));
                self.followed = Some((mtx, frx));
            }
            self.set_managers(me);
        }
        if let Some(s) = &self.served
            && !me.manager
        {
            let _ = s.send_replace(Err("this node is no longer a manager".into()));
        }
    }

    fn set_managers(&self, me: &NodeInfo) {
        if let Some((tx, _)) = &self.followed {
            tx.send_replace(Some(Managers {
                addrs: me
                    .managers
                    .iter()
                    .map(|a| SocketAddr::from((*a, self.cfg.peer_port)))
                    .collect(),
                pki: SwarmPki::under(&me.data_root),
            }));
        }
    }

    /// Reads everything, builds the state and sends it if it changed (or
    /// `force`). An error means dockerd failed us (reconnect); a read that
    /// does not fit together is refused, and the next resync tries again.
    async fn resync(&mut self, d: &Docker, me: &NodeInfo, force: bool) -> Result<()> {
        let mut skipped = Vec::new();
        let known: Option<(Arc<SwarmView>, bool)> = if me.manager {
            match read_view(d).await {
                Ok(Ok((v, view_skipped))) => {
                    let v = Arc::new(v);
                    if let Some(s) = &self.served {
                        s.send_if_modified(|cur| {
                            let same = matches!(cur, Ok(c) if **c == *v);
                            if !same {
                                *cur = Ok(v.clone());
                            }
                            !same
                        });
                    }
                    self.own_view = Some(v.clone());
                    if self.view_failing.take().is_some() {
                        info!("reading the swarm as a manager works again");
                    }
                    skipped.extend(view_skipped);
                    Some((v, true))
                }
                Ok(Err(inconsistent)) => {
                    self.refuse(inconsistent);
                    return Ok(());
                }
                Err(e) => {
                    // A manager without quorum still follows its own
                    // dockerd's table, with its last view.
                    let why = format!("{e:#}");
                    if let Some(s) = &self.served {
                        let _ = s.send_replace(Err(why.clone().into()));
                    }
                    if self.view_failing.as_deref() != Some(why.as_str()) {
                        warn!(
                            "reading the swarm as a manager failed ({why}); following this node's own table with the last view"
                        );
                        self.view_failing = Some(why);
                    }
                    self.own_view.clone().map(|v| (v, false))
                }
            }
        } else {
            let f = self.followed.as_ref().map(|f| f.1.borrow().clone());
            f.and_then(|f| Some((f.view?, f.live)))
        };
        let net = d
            .inspect_network(
                "ingress",
                Some(InspectNetworkOptions {
                    verbose: true,
                    scope: None,
                }),
            )
            .await
            .context("GET /networks/ingress?verbose=true")?;
        let (table, table_skipped) = IngressTable::from_api(&net);
        skipped.extend(table_skipped);
        let containers = d
            .list_containers(Some(ListContainersOptions {
                filters: Some(HashMap::from([(
                    "label".to_string(),
                    vec![TASK_LABEL.to_string()],
                )])),
                ..Default::default()
            }))
            .await
            .context("GET /containers/json")?;
        let gw = d
            .inspect_network("docker_gwbridge", None::<InspectNetworkOptions>)
            .await
            .context("GET /networks/docker_gwbridge")?;
        let local = view::local_tasks(&containers, &gw);
        let merged = merge::merge(
            &Me { addr: me.addr },
            &table,
            known.as_ref().map(|(v, live)| Known {
                view: v,
                live: *live,
            }),
            &local,
        );
        match merged {
            Ok((state, more)) => {
                skipped.extend(more);
                self.note_skipped(skipped);
                self.beat.beat();
                if force || self.last.as_ref() != Some(&state) {
                    self.last = Some(state.clone());
                    self.tx.send_replace(Update::State(Arc::new(state)));
                } else if !matches!(&*self.tx.borrow(), Update::State(_)) {
                    // Back after an outage with nothing changed: say so.
                    self.tx.send_replace(Update::State(Arc::new(state)));
                }
            }
            Err(e) => self.refuse(format!("the swarm's state does not hold together: {e}")),
        }
        Ok(())
    }

    fn refuse(&self, why: String) {
        let same = matches!(&*self.tx.borrow(), Update::Refused(w) if **w == *why);
        if !same {
            self.tx.send_replace(Update::Refused(why.into()));
        }
    }

    /// Logs what a resync skipped, each entry when it first appears (the
    /// rest was applied).
    fn note_skipped(&mut self, skipped: Vec<String>) {
        for s in &skipped {
            if !self.skipped.contains(s) {
                warn!("skipped (the rest is applied): {s}");
            }
        }
        self.skipped = skipped;
    }
}

/// One manager read: `/services`, `/nodes`, `/tasks`. The outer error is
/// the API failing; the inner one a read that does not fit together.
async fn read_view(d: &Docker) -> Result<Result<(SwarmView, Vec<String>), String>> {
    let services = d
        .list_services(None::<ListServicesOptions>)
        .await
        .context("GET /services")?;
    let nodes = d
        .list_nodes(None::<ListNodesOptions>)
        .await
        .context("GET /nodes")?;
    let tasks = d
        .list_tasks(None::<ListTasksOptions>)
        .await
        .context("GET /tasks")?;
    Ok(SwarmView::from_api(&services, &nodes, &tasks))
}

/// Resolves when the followed view changes; never without one.
async fn changed(f: &mut Option<watch::Receiver<Followed>>) -> Result<()> {
    match f {
        Some(rx) => rx.changed().await.context("the view follower stopped"),
        None => std::future::pending().await,
    }
}
