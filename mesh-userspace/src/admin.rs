//! The admin endpoint: `/metrics` (Prometheus text), `/ready` (200 once the
//! programs are attached and the maps filled; the body says when the state
//! source is unavailable and the last good state is being served), `/live`,
//! `/state` (the state applied now, as JSON), and the health answers of
//! [`crate::health`] (`/healthz`, `/service/NAME`), which the health port
//! serves alone, for load balancers. It reads the counter maps
//! through its own [`StatsReader`] and the rest from the last snapshot the
//! daemon published: it never waits for the daemon's writes.

use std::sync::{Arc, Mutex, RwLock};

use anyhow::Result;
use mesh_common::abi::Counter;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::dataplane::StatsReader;
use crate::dataplane::stats::ServiceIndex;
use crate::health::{Answer, Health};
use crate::model::State;

/// The state as `/state` shows it (what `meshd status` reads).
pub fn state_json(s: &State, generation: i64) -> serde_json::Value {
    use serde_json::json;
    json!({
        "generation": generation,
        "local_node": s.local_node,
        "nodes": s.nodes.iter().map(|n| json!({
            "name": n.name,
            "addr": n.addr.to_string(),
            "availability": n.availability.as_str(),
            "status": n.status.as_str(),
        })).collect::<Vec<_>>(),
        "services": s.services.iter().map(|v| json!({
            "name": v.name,
            "ports": v.ports.iter().map(|p| json!({
                "protocol": p.protocol.to_string(),
                "published": p.published,
                "target": p.target,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "tasks": s.tasks.iter().map(|t| json!({
            "service": t.service,
            "node": t.node,
            "addr": t.addr.to_string(),
            "local_addr": t.local_addr.map(|a| a.to_string()),
            "draining": t.draining,
        })).collect::<Vec<_>>(),
    })
}

/// What the admin endpoint serves from.
pub struct Admin {
    pub metrics: Metrics,
    stats: StatsReader,
    health: Arc<Health>,
    services: RwLock<ServiceIndex>,
    /// The applied state as JSON (`/state`).
    state: RwLock<String>,
    /// The applied state and its generation (`/status`).
    applied: RwLock<Option<(Arc<State>, i64)>>,
    /// This node's name (`--node`, or what the source says).
    node: RwLock<String>,
    /// Why the state source is unavailable now, if it is.
    source_down: RwLock<Option<String>>,
}

impl Admin {
    pub fn new(stats: StatsReader, health: Arc<Health>) -> Result<Self> {
        Ok(Self {
            metrics: Metrics::new()?,
            stats,
            health,
            services: RwLock::default(),
            state: RwLock::new("null\n".into()),
            applied: RwLock::default(),
            node: RwLock::default(),
            source_down: RwLock::default(),
        })
    }

    /// The state applied now, and its generation.
    pub fn set_state(&self, state: &State, generation: i64) {
        let mut j = serde_json::to_string_pretty(&state_json(state, generation))
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        j.push('\n');
        *self.state.write().unwrap() = j;
        *self.applied.write().unwrap() = Some((Arc::new(state.clone()), generation));
    }

    /// This node's name, as the state calls it.
    pub fn set_node(&self, name: &str) {
        *self.node.write().unwrap() = name.to_string();
    }

    /// `/status`: what this node serves (see [`crate::status`]).
    pub fn status(&self) -> Result<serde_json::Value> {
        let Some((state, generation)) = self.applied.read().unwrap().clone() else {
            anyhow::bail!("no state applied yet");
        };
        let index = self.services.read().unwrap().clone();
        let node = self.node.read().unwrap().clone();
        crate::status::of_daemon(&state, &node, generation, &index, &self.stats, &self.health)
    }

    /// Whether the state source answers (`None`), or why not.
    pub fn set_source_down(&self, why: Option<String>) {
        self.metrics.source_up.set(i64::from(why.is_none()));
        *self.source_down.write().unwrap() = why;
    }

    /// `/ready`: whether it is, and the body.
    fn ready(&self) -> (bool, String) {
        let down = self.source_down.read().unwrap().clone();
        let generation = self.metrics.state_generation.get();
        match (self.metrics.ready.get() == 1, down) {
            (true, None) => (true, "ready\n".into()),
            (true, Some(why)) => (
                true,
                format!(
                    "ready (serving generation {generation}; the state source is unavailable: {why})\n"
                ),
            ),
            (false, Some(why)) => (
                false,
                format!("not ready: waiting for the state source: {why}\n"),
            ),
            (false, None) => (false, "not ready\n".into()),
        }
    }

    /// The services applied now (names for the counters' labels).
    pub fn set_services(&self, index: ServiceIndex) {
        *self.services.write().unwrap() = index;
    }

    /// Brings the counters up to the maps' values and renders them.
    pub fn render(&self) -> Result<String> {
        let index = self.services.read().unwrap().clone();
        let m = &self.metrics;
        m.healthy.set(i64::from(self.health.healthy()));
        m.drained.set(i64::from(self.health.is_drained()));
        if let Some(at) = self.health.last_sync() {
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            m.last_sync.set(unix - at.elapsed().as_secs_f64());
        }
        self.metrics.render(&self.stats, &index)
    }
}

pub struct Metrics {
    registry: Registry,
    svc_packets: IntCounterVec,
    svc_bytes: IntCounterVec,
    svc_flows: IntCounterVec,
    drops: IntCounterVec,
    /// One per `Counter`, in its order.
    forwarding: Vec<IntCounter>,
    pub state_generation: IntGauge,
    pub state_rejected: IntCounter,
    pub source_errors: IntCounter,
    pub map_update_errors: IntCounter,
    conntrack_entries: prometheus::IntGaugeVec,
    conntrack_capacity: prometheus::IntGaugeVec,
    /// Entries the sweeper removed, by table (`dataplane::sweep`).
    pub conntrack_swept: IntCounterVec,
    pub ready: IntGauge,
    pub source_up: IntGauge,
    /// Seconds each apply took (plan and map writes).
    pub sync_duration: prometheus::Histogram,
    /// The last time the node was in sync with its source (Unix seconds).
    last_sync: prometheus::Gauge,
    healthy: IntGauge,
    drained: IntGauge,
    /// 1 when this meshd adopted a pinned dataplane, 0 when it made one.
    pub adopted: IntGauge,
    live: Mutex<std::collections::BTreeSet<[String; 3]>>,
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let labels = &["service", "protocol", "port"];
        let svc_packets = IntCounterVec::new(
            Opts::new(
                "mesh_service_packets_total",
                "Packets the dataplane delivered to a service's tasks.",
            ),
            labels,
        )?;
        let svc_bytes = IntCounterVec::new(
            Opts::new(
                "mesh_service_bytes_total",
                "Bytes (whole frames) delivered to a service's tasks.",
            ),
            labels,
        )?;
        let svc_flows = IntCounterVec::new(
            Opts::new(
                "mesh_service_new_flows_total",
                "Flows assigned a backend by Maglev (new or moved).",
            ),
            labels,
        )?;
        let drops = IntCounterVec::new(
            Opts::new("mesh_drops_total", "Packets dropped, by reason."),
            &["reason"],
        )?;
        let state_generation =
            IntGauge::new("mesh_state_generation", "State files applied since start.")?;
        let state_rejected = IntCounter::new(
            "mesh_state_rejected_total",
            "State files refused as invalid.",
        )?;
        let source_errors = IntCounter::new(
            "mesh_source_errors_total",
            "Times the state source could not be read (the state in use stays).",
        )?;
        let map_update_errors = IntCounter::new(
            "mesh_map_update_errors_total",
            "Map writes the kernel failed (the state is retried with backoff).",
        )?;
        let conntrack_entries = prometheus::IntGaugeVec::new(
            Opts::new(
                "mesh_conntrack_entries",
                "Flows a conntrack table holds (tcp, udp: confirmed; unconfirmed: not answered yet; forwarded: flows other nodes forwarded to this node's tasks).",
            ),
            &["table"],
        )?;
        let conntrack_capacity = prometheus::IntGaugeVec::new(
            Opts::new(
                "mesh_conntrack_capacity",
                "Flows a conntrack table can hold (least recently used are forgotten beyond).",
            ),
            &["table"],
        )?;
        let ready = IntGauge::new(
            "mesh_ready",
            "1 once programs are attached and maps filled.",
        )?;
        let source_up = IntGauge::new(
            "mesh_source_up",
            "1 while the state source answers (the state file reads, Docker answers); 0 while the last good state is kept.",
        )?;
        let sync_duration = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "mesh_sync_duration_seconds",
                "Time to apply a state from the source: planning and map writes.",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 4.0, 9)?),
        )?;
        let last_sync = prometheus::Gauge::new(
            "mesh_last_sync_timestamp_seconds",
            "When the node was last in sync with its state source (the source read and found valid, the dataplane holding it), in Unix seconds.",
        )?;
        let healthy = IntGauge::new(
            "mesh_node_healthy",
            "1 while the health endpoint answers 200 (attached, filled, recently synced, not drained).",
        )?;
        let drained = IntGauge::new(
            "mesh_node_drained",
            "1 while the node is drained (meshd drain, or drained in the swarm).",
        )?;
        let adopted = IntGauge::new(
            "mesh_dataplane_adopted",
            "1 when this meshd adopted the pinned dataplane of a previous one (connection tracking kept), 0 when it made it anew.",
        )?;
        let build = prometheus::IntGaugeVec::new(
            Opts::new("mesh_build_info", "meshd's version (always 1)."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let start = prometheus::Gauge::new(
            "mesh_start_time_seconds",
            "When this meshd started, in Unix seconds.",
        )?;
        start.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        for c in [&healthy, &drained, &adopted] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(sync_duration.clone()))?;
        registry.register(Box::new(last_sync.clone()))?;
        registry.register(Box::new(build))?;
        registry.register(Box::new(start))?;
        let forwarding = Counter::ALL
            .iter()
            .map(|c| IntCounter::new(c.metric(), c.help()))
            .collect::<Result<Vec<_>, _>>()?;
        for c in &forwarding {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(source_up.clone()))?;
        for c in [&svc_packets, &svc_bytes, &svc_flows, &drops] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(state_generation.clone()))?;
        registry.register(Box::new(state_rejected.clone()))?;
        registry.register(Box::new(source_errors.clone()))?;
        registry.register(Box::new(map_update_errors.clone()))?;
        registry.register(Box::new(conntrack_entries.clone()))?;
        registry.register(Box::new(conntrack_capacity.clone()))?;
        let conntrack_swept = IntCounterVec::new(
            Opts::new(
                "mesh_conntrack_swept_total",
                "Conntrack entries removed because their flow's lifetime ended (tcp, udp, unconfirmed; see --ct-sweep-interval).",
            ),
            &["table"],
        )?;
        registry.register(Box::new(conntrack_swept.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        Ok(Self {
            registry,
            svc_packets,
            svc_bytes,
            svc_flows,
            drops,
            forwarding,
            state_generation,
            state_rejected,
            source_errors,
            map_update_errors,
            conntrack_entries,
            conntrack_capacity,
            conntrack_swept,
            ready,
            source_up,
            sync_duration,
            last_sync,
            healthy,
            drained,
            adopted,
            live: Mutex::default(),
        })
    }

    /// Brings the counters up to the maps' values and renders them.
    pub fn render(&self, reader: &StatsReader, index: &ServiceIndex) -> Result<String> {
        fn catch_up(c: &IntCounter, v: u64) {
            let cur = c.get();
            if v > cur {
                c.inc_by(v - cur);
            }
        }
        let stats = reader.services(index)?;
        // A published port that went away takes its series with it (its
        // counters restart at zero if it comes back).
        let mut live = self.live.lock().unwrap();
        let now: std::collections::BTreeSet<[String; 3]> = stats
            .iter()
            .map(|(n, p, port, _)| [n.clone(), p.to_string(), port.to_string()])
            .collect();
        for gone in live.difference(&now) {
            let l = [gone[0].as_str(), gone[1].as_str(), gone[2].as_str()];
            for c in [&self.svc_packets, &self.svc_bytes, &self.svc_flows] {
                let _ = c.remove_label_values(&l);
            }
        }
        *live = now;
        drop(live);
        for (name, proto, port, s) in stats {
            let (p, port) = (proto.to_string(), port.to_string());
            let l = [name.as_str(), p.as_str(), port.as_str()];
            catch_up(&self.svc_packets.with_label_values(&l), s.packets);
            catch_up(&self.svc_bytes.with_label_values(&l), s.bytes);
            catch_up(&self.svc_flows.with_label_values(&l), s.new_flows);
        }
        for u in reader.conntrack()? {
            self.conntrack_entries
                .with_label_values(&[u.table])
                .set(u.entries as i64);
            self.conntrack_capacity
                .with_label_values(&[u.table])
                .set(u.capacity as i64);
        }
        for ((_, n), c) in reader.counters()?.into_iter().zip(&self.forwarding) {
            catch_up(c, n);
        }
        for (reason, n) in reader.drops()? {
            if reason as u32 != 0 {
                catch_up(&self.drops.with_label_values(&[reason.name()]), n);
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }
}

const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Admin connections served at once. More wait in the kernel's accept
/// queue: a flood of probes cannot take the descriptors the daemon needs.
pub const MAX_ADMIN_CONNS: usize = 16;

/// An HTTP answer.
pub struct Response {
    pub status: u16,
    pub ctype: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: String) -> Response {
        Response {
            status,
            ctype: "text/plain; charset=utf-8",
            body,
        }
    }
}

impl From<Answer> for Response {
    fn from(a: Answer) -> Response {
        Response::text(a.status, a.body)
    }
}

/// What answers a path.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The admin endpoint: `/metrics`, `/ready`, `/live`, `/state`, and the
/// health answers (`/healthz`, `/service/NAME`) that the health port also
/// serves.
pub fn admin_routes(admin: Arc<Admin>, health: Arc<Health>) -> Handler {
    Arc::new(move |path: &str| match path {
        "/live" => Response::text(200, "live\n".into()),
        "/ready" => {
            let (ok, body) = admin.ready();
            Response::text(if ok { 200 } else { 503 }, body)
        }
        "/state" => Response {
            status: 200,
            ctype: "application/json",
            body: admin.state.read().unwrap().clone(),
        },
        "/status" => match admin.status() {
            Ok(v) => Response {
                status: 200,
                ctype: "application/json",
                body: format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()),
            },
            Err(e) => Response::text(503, format!("{e:#}\n")),
        },
        "/metrics" => match admin.render() {
            Ok(b) => Response {
                status: 200,
                ctype: "text/plain; version=0.0.4",
                body: b,
            },
            Err(e) => {
                warn!("metrics: {e:#}");
                Response::text(500, format!("{e:#}\n"))
            }
        },
        p => health_answer(&health, p).unwrap_or_else(|| Response::text(404, "not found\n".into())),
    })
}

/// The health port: only the health answers, for load balancers.
pub fn health_routes(health: Arc<Health>) -> Handler {
    Arc::new(move |path: &str| {
        health_answer(&health, path).unwrap_or_else(|| {
            Response::text(
                404,
                "not found: GET /healthz (this node) or /service/NAME (a service)\n".into(),
            )
        })
    })
}

fn health_answer(health: &Health, path: &str) -> Option<Response> {
    match path {
        "/" | "/healthz" => Some(health.node().into()),
        p => p
            .strip_prefix("/service/")
            .filter(|n| !n.is_empty())
            .map(|n| health.service(n).into()),
    }
}

/// Serves `handler` on `listener` until the process exits: HTTP/1.x GET,
/// one request per connection, at most [`MAX_ADMIN_CONNS`] at once, 5 s
/// to send the request.
pub async fn serve(listener: TcpListener, handler: Handler) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNS));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                sock
            }
            Err(e) => {
                // Out of descriptors (or memory): retrying at once would
                // spin. Wait, longer each time, until one is free.
                if backoff == ACCEPT_BACKOFF_MIN {
                    warn!("admin endpoint: accept failed ({e}); backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let mut words = req.split_whitespace();
            let method = words.next().unwrap_or("GET");
            // The path without a query string.
            let path = words.next().unwrap_or("/");
            let path = path.split('?').next().unwrap_or(path);
            let head = method == "HEAD";
            let r = if method == "GET" || head {
                handler(path)
            } else {
                Response::text(405, "only GET and HEAD\n".into())
            };
            let resp = format!(
                "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                r.status,
                reason(r.status),
                r.ctype,
                r.body.len(),
                if head { "" } else { r.body.as_str() }
            );
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                debug!("admin: {e}");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every metric meshd serves, by name (vectors given a child, so that
    /// they are gathered).
    fn served() -> BTreeSet<String> {
        let m = Metrics::new().unwrap();
        for v in [&m.svc_packets, &m.svc_bytes, &m.svc_flows] {
            v.with_label_values(&["web", "tcp", "30080"]).inc();
        }
        m.drops.with_label_values(&["no_backend"]).inc();
        m.conntrack_entries.with_label_values(&["tcp"]).set(1);
        m.conntrack_capacity.with_label_values(&["tcp"]).set(1);
        m.registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect()
    }

    /// `mesh_*` names in `text`, histogram series turned into the
    /// histogram's name.
    fn names_in(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let b = text.as_bytes();
        let mut i = 0;
        while let Some(k) = text[i..].find("mesh_") {
            let start = i + k;
            let mut end = start;
            while end < b.len()
                && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
            {
                end += 1;
            }
            let n = &text[start..end];
            let n = n.strip_suffix("_bucket").unwrap_or(n);
            // Not a metric: a prefix ("mesh_service_*"), mesh_xdp and
            // mesh_tc_* (programs).
            if !n.ends_with('_') && !n.starts_with("mesh_xdp") && !n.starts_with("mesh_tc_") {
                out.insert(n.to_string());
            }
            i = end.max(start + 5);
        }
        out
    }

    /// docs/metrics.md documents exactly what is served, and the Grafana
    /// dashboard asks only for what is served.
    #[test]
    fn the_metrics_reference_and_the_dashboard_match_what_is_served() {
        let served = served();
        assert!(served.iter().all(|n| n.starts_with("mesh_")), "{served:?}");
        // Prometheus conventions: counters end in _total, times are in
        // seconds.
        let m = Metrics::new().unwrap();
        for f in m.registry.gather() {
            let counter = f.get_field_type() == prometheus::proto::MetricType::COUNTER;
            assert_eq!(counter, f.name().ends_with("_total"), "{}", f.name());
        }
        assert!(!served.iter().any(|n| n.contains("millis")));
        let docs = names_in(include_str!("../../docs/metrics.md"));
        assert_eq!(
            docs, served,
            "docs/metrics.md and what /metrics serves differ"
        );
        let dash = names_in(include_str!("../../packaging/grafana/mesh.json"));
        let unknown: Vec<_> = dash.difference(&served).collect();
        assert!(unknown.is_empty(), "the dashboard asks for {unknown:?}");
        // It shows most of them.
        assert!(dash.len() * 10 >= served.len() * 8, "{dash:?}");
    }
}
