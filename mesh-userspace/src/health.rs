//! The node's health, as a cloud load balancer asks for it, and the drain
//! switch an operator turns before maintenance.
//!
//! A load balancer in front of the swarm's nodes sends new flows only to
//! nodes that answer its probe with 200. This node answers 200 only when
//! all of these hold, and 503 naming every one that does not otherwise:
//! - the programs are attached and the maps filled (the first state is in);
//! - the last sync is recent: the state source was read and found valid,
//!   and the dataplane held what it said, within `--health-max-sync-age`
//!   (a source that stalled, a state refused, a map write the kernel keeps
//!   failing all stop the clock);
//! - the node is not drained: neither by `meshd drain` (a file in the
//!   state directory, so it outlives restarts and reboots) nor in the
//!   swarm (`docker node update --availability drain`, or `availability =
//!   "drain"` in a state file).
//!
//! Draining changes nothing in the dataplane: flows keep being served, new
//! ones included, while the load balancer moves new flows elsewhere and
//! established ones finish.
//!
//! Per service, the answer is 200 only when the node is healthy and the
//! service has a task that gets new flows: on this node for a service in
//! `local` traffic mode (kube-proxy's health-check node port for
//! `externalTrafficPolicy: Local`), anywhere otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The drain file's name in the state directory.
pub const DRAIN_FILE: &str = "drain";

/// A drain set by `meshd drain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// What the operator said (may be empty).
    pub reason: String,
    /// When, in seconds since the Unix epoch.
    pub since_unix: u64,
}

impl Drain {
    pub fn now(reason: &str) -> Drain {
        Drain {
            reason: reason.to_string(),
            since_unix: unix_now(),
        }
    }

    fn describe(&self) -> String {
        let ago = unix_now().saturating_sub(self.since_unix);
        let why = if self.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.reason)
        };
        format!("drained by meshd drain {ago} s ago{why}; meshd undrain ends it")
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the drain of a node whose state directory is `dir` is kept.
pub fn drain_path(dir: &Path) -> PathBuf {
    dir.join(DRAIN_FILE)
}

/// The drain kept in `dir`, if any. A file that cannot be parsed still
/// drains (someone meant it), with its content as the reason.
pub fn read_drain(dir: &Path) -> Result<Option<Drain>> {
    let p = drain_path(dir);
    match std::fs::read(&p) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).unwrap_or_else(|_| {
            Drain {
                reason: String::from_utf8_lossy(&b)
                    .trim()
                    .chars()
                    .take(200)
                    .collect(),
                since_unix: std::fs::metadata(&p)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            }
        }))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Drains the node whose state directory is `dir` (written whole: a
/// reader never sees half a file).
pub fn write_drain(dir: &Path, d: &Drain) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let p = drain_path(dir);
    let tmp = dir.join(format!(".{DRAIN_FILE}.{}", std::process::id()));
    let mut text = serde_json::to_string(d)?;
    text.push('\n');
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("renaming to {}", p.display()))?;
    Ok(())
}

/// Ends the drain; says whether there was one.
pub fn remove_drain(dir: &Path) -> Result<bool> {
    let p = drain_path(dir);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// What one service's health answer needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcHealth {
    /// Served only by tasks on the receiving node (`traffic = "local"`).
    pub local: bool,
    /// Its tasks that get new flows, on this node and in all.
    pub local_tasks: usize,
    pub tasks: usize,
}

/// An answer: 200, 503 or 404, and a one-line body saying why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    fn new(status: u16, body: String) -> Answer {
        Answer { status, body }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Programs attached and maps filled.
    ready: bool,
    /// Why the dataplane is not ready yet.
    waiting: Option<String>,
    generation: i64,
    /// When the node was last in sync with its source.
    last_sync: Option<Instant>,
    /// Why the daemon does not hold what the source said (a state it
    /// refused, map writes being retried); cleared by the next apply.
    unsynced: Option<String>,
    /// What is wrong with the source, while something is.
    source_problem: Option<String>,
    drained: Option<Drain>,
    /// This node's availability is "drain" in the swarm.
    swarm_drained: bool,
    services: BTreeMap<String, SvcHealth>,
}

/// The node's health; shared by the daemon (which updates it) and the
/// endpoints (which answer from it).
#[derive(Debug)]
pub struct Health {
    max_sync_age: Duration,
    inner: Mutex<Inner>,
}

impl Health {
    /// A node not ready yet, whose sync is stale `max_sync_age` after the
    /// last one.
    pub fn new(max_sync_age: Duration) -> Health {
        Health {
            max_sync_age,
            inner: Mutex::new(Inner {
                waiting: Some("loading the dataplane".into()),
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Not ready yet, and why.
    pub fn waiting(&self, why: &str) {
        self.lock().waiting = Some(why.to_string());
    }

    /// The dataplane holds generation `generation`, applied just now: in
    /// sync with the source.
    pub fn applied(
        &self,
        generation: i64,
        swarm_drained: bool,
        services: BTreeMap<String, SvcHealth>,
    ) {
        let mut s = self.lock();
        s.ready = true;
        s.waiting = None;
        s.generation = generation;
        s.last_sync = Some(Instant::now());
        s.unsynced = None;
        s.source_problem = None;
        s.swarm_drained = swarm_drained;
        s.services = services;
    }

    /// The source read a valid state at `at` (changed or not): the node is
    /// in sync then, unless the daemon does not hold what it said.
    pub fn source_beat(&self, at: Instant) {
        let mut s = self.lock();
        if s.ready && s.unsynced.is_none() && s.last_sync.is_none_or(|l| at > l) {
            s.last_sync = Some(at);
        }
    }

    /// The daemon does not hold what the source says (`Some(why)`), until
    /// the next successful apply.
    pub fn unsynced(&self, why: &str) {
        self.lock().unsynced = Some(why.to_string());
    }

    /// What is wrong with the source (said in a stale answer).
    pub fn source_problem(&self, why: Option<&str>) {
        self.lock().source_problem = why.map(str::to_string);
    }

    /// The drain set by `meshd drain`, as read from its file.
    pub fn set_drain(&self, d: Option<Drain>) {
        self.lock().drained = d;
    }

    pub fn drained(&self) -> Option<Drain> {
        self.lock().drained.clone()
    }

    /// Why the node must not get new flows; empty when it may.
    fn problems(&self, s: &Inner, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        if !s.ready {
            out.push(format!(
                "not ready: {}",
                s.waiting.as_deref().unwrap_or("loading the dataplane")
            ));
            return out;
        }
        if let Some(d) = &s.drained {
            out.push(d.describe());
        }
        if s.swarm_drained {
            out.push("drained in the swarm (this node's availability is drain)".into());
        }
        let age = s.last_sync.map(|l| now.saturating_duration_since(l));
        if age.is_none_or(|a| a > self.max_sync_age) {
            let why = s
                .unsynced
                .as_deref()
                .or(s.source_problem.as_deref())
                .unwrap_or("the state source has not been read since");
            out.push(format!(
                "stale: last sync {} ago (at most {} s allowed; serving generation {}): {why}",
                age.map(|a| format!("{:.1} s", a.as_secs_f64()))
                    .unwrap_or_else(|| "never".into()),
                self.max_sync_age.as_secs(),
                s.generation
            ));
        }
        out
    }

    /// The node's answer.
    pub fn node(&self) -> Answer {
        let s = self.lock();
        let now = Instant::now();
        let problems = self.problems(&s, now);
        if problems.is_empty() {
            let age = s
                .last_sync
                .map(|l| now.saturating_duration_since(l).as_secs_f64())
                .unwrap_or(0.0);
            Answer::new(
                200,
                format!(
                    "ok: generation {}, last sync {age:.1} s ago\n",
                    s.generation
                ),
            )
        } else {
            Answer::new(503, format!("unavailable: {}\n", problems.join("; ")))
        }
    }

    /// Service `name`'s answer.
    pub fn service(&self, name: &str) -> Answer {
        let s = self.lock();
        let Some(svc) = s.services.get(name).cloned() else {
            let body = if s.ready {
                format!("no service named {name:?} here\n")
            } else {
                "not ready: no state yet\n".into()
            };
            return Answer::new(if s.ready { 404 } else { 503 }, body);
        };
        let problems = self.problems(&s, Instant::now());
        if !problems.is_empty() {
            return Answer::new(503, format!("unavailable: node: {}\n", problems.join("; ")));
        }
        if svc.local {
            if svc.local_tasks == 0 {
                return Answer::new(
                    503,
                    format!(
                        "unavailable: no task of {name} on this node gets new flows (traffic local)\n"
                    ),
                );
            }
            return Answer::new(
                200,
                format!(
                    "ok: {} tasks of {name} on this node (traffic local)\n",
                    svc.local_tasks
                ),
            );
        }
        if svc.tasks == 0 {
            return Answer::new(
                503,
                format!("unavailable: no task of {name} gets new flows\n"),
            );
        }
        Answer::new(
            200,
            format!(
                "ok: {} tasks of {name}, {} on this node\n",
                svc.tasks, svc.local_tasks
            ),
        )
    }

    /// 1 while the node answers 200.
    pub fn healthy(&self) -> bool {
        let s = self.lock();
        self.problems(&s, Instant::now()).is_empty()
    }

    /// Drained, by `meshd drain` or in the swarm.
    pub fn is_drained(&self) -> bool {
        let s = self.lock();
        s.drained.is_some() || s.swarm_drained
    }

    /// Each service's tasks that get new flows, as last applied.
    pub fn services(&self) -> BTreeMap<String, SvcHealth> {
        self.lock().services.clone()
    }

    /// When the node was last in sync with its source.
    pub fn last_sync(&self) -> Option<Instant> {
        self.lock().last_sync
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(local: bool, local_tasks: usize, tasks: usize) -> BTreeMap<String, SvcHealth> {
        BTreeMap::from([(
            "web".to_string(),
            SvcHealth {
                local,
                local_tasks,
                tasks,
            },
        )])
    }

    #[test]
    fn not_ready_then_ok_then_drained_then_ok() {
        let h = Health::new(Duration::from_secs(30));
        let a = h.node();
        assert_eq!(a.status, 503);
        assert!(a.body.contains("not ready"), "{}", a.body);
        h.waiting("waiting for the state source: Docker is down");
        assert!(h.node().body.contains("Docker is down"));
        h.applied(1, false, web(false, 1, 2));
        assert_eq!(h.node().status, 200, "{}", h.node().body);
        h.set_drain(Some(Drain::now("kernel upgrade")));
        let a = h.node();
        assert_eq!(a.status, 503);
        assert!(a.body.contains("drained by meshd drain") && a.body.contains("kernel upgrade"));
        // A drained node's services answer 503 too: the load balancer
        // stops sending them new flows.
        assert_eq!(h.service("web").status, 503);
        h.set_drain(None);
        assert_eq!(h.node().status, 200);
        h.applied(2, true, web(false, 1, 2));
        assert!(h.node().body.contains("drained in the swarm"));
    }

    #[test]
    fn a_stalled_sync_turns_stale_and_a_beat_brings_it_back() {
        let h = Health::new(Duration::from_millis(50));
        h.applied(1, false, web(false, 1, 1));
        assert_eq!(h.node().status, 200);
        h.source_problem(Some("state.toml: cannot read: No such file"));
        std::thread::sleep(Duration::from_millis(80));
        let a = h.node();
        assert_eq!(a.status, 503);
        assert!(
            a.body.contains("stale: last sync") && a.body.contains("No such file"),
            "{}",
            a.body
        );
        h.source_beat(Instant::now());
        assert_eq!(h.node().status, 200);
        // While the daemon does not hold what the source says, beats do
        // not count.
        h.unsynced("the kernel failed a map write");
        std::thread::sleep(Duration::from_millis(80));
        h.source_beat(Instant::now());
        let a = h.node();
        assert_eq!(a.status, 503);
        assert!(
            a.body.contains("the kernel failed a map write"),
            "{}",
            a.body
        );
    }

    #[test]
    fn a_local_service_is_healthy_only_with_a_local_task() {
        let h = Health::new(Duration::from_secs(30));
        h.applied(1, false, web(true, 0, 3));
        let a = h.service("web");
        assert_eq!(a.status, 503);
        assert!(a.body.contains("no task of web on this node"), "{}", a.body);
        h.applied(2, false, web(true, 2, 3));
        assert_eq!(h.service("web").status, 200);
        assert_eq!(h.service("nope").status, 404);
        // Not local: any task anywhere will do.
        h.applied(3, false, web(false, 0, 3));
        assert_eq!(h.service("web").status, 200);
        h.applied(4, false, web(false, 0, 0));
        assert_eq!(h.service("web").status, 503);
    }

    #[test]
    fn the_drain_file_round_trips_and_a_foreign_one_still_drains() {
        let dir = std::env::temp_dir().join(format!("mesh-drain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read_drain(&dir).unwrap(), None);
        let d = Drain::now("patching");
        write_drain(&dir, &d).unwrap();
        assert_eq!(read_drain(&dir).unwrap(), Some(d));
        std::fs::write(drain_path(&dir), "maintenance by hand\n").unwrap();
        assert_eq!(
            read_drain(&dir).unwrap().unwrap().reason,
            "maintenance by hand"
        );
        assert!(remove_drain(&dir).unwrap());
        assert!(!remove_drain(&dir).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
