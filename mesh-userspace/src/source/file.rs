//! The state file: TOML, read whole and validated whole. A bad file is
//! refused with an error naming the file, the field and the value, and the
//! daemon keeps its last good state.
//!
//! ```toml
//! [[nodes]]
//! name = "node1"
//! addr = "198.18.128.1"
//!
//! [[services]]
//! name = "web"
//! ports = [
//!   { protocol = "tcp", published = 30080, target = 8080 },
//!   { protocol = "udp", target = 5353 },   # published: next free in the range
//! ]
//!
//! [[tasks]]
//! service = "web"
//! node = "node1"
//! addr = "198.18.129.2"
//! ```
//!
//! The watcher polls the file and compares the bytes it parsed with the
//! bytes it parsed last time (never a second read: a change that lands
//! between two reads is not missed), and reloads on demand.

use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use super::ports::{self, PortMemory, Wanted};
use super::{Beat, Update, Updates};
use crate::model::{
    Cidr4, Invalid, Port, Proto, ReplyMode, Service, State, Task, Traffic, check_affinity_timeout,
    parse_affinity,
};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file cannot be read now: missing, unreadable, descriptors
    /// exhausted. Not a judgement on its content.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// Not something a state file can be (a FIFO, a device, too large).
    #[error("{file}: {message}")]
    NotAFile { file: String, message: String },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

// The file's shape. Unknown fields are refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    tasks: Vec<RawTask>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    addr: String,
    /// "active" (the default), "pause" or "drain", as Docker's node
    /// availability: the tasks of a paused or drained node get no new
    /// flows, and a drained node's health answer is 503.
    availability: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    ports: Vec<RawPort>,
    /// "via-ingress" or "direct".
    reply: Option<String>,
    /// "cluster" (the default) or "local".
    traffic: Option<String>,
    /// CIDRs allowed to reach the service; left out: every source.
    source_ranges: Option<Vec<String>>,
    /// "client" (client-address affinity) or "none" (the default).
    affinity: Option<String>,
    /// Seconds a client keeps its task past its last new flow (with
    /// `affinity = "client"` only; default 10800).
    affinity_timeout: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    protocol: String,
    published: Option<i64>,
    target: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    service: String,
    node: String,
    addr: String,
}

/// Parses and validates state text; `file` names it in errors. Ports left
/// out are assigned afresh (see [`FileSource`] for assignments that last).
pub fn parse(text: &str, file: &str, range: &RangeInclusive<u16>) -> Result<State, StateError> {
    parse_with(text, file, range, &PortMemory::default()).map(|(s, _)| s)
}

/// As [`parse`], keeping the ports `memory` assigned before; returns what
/// to remember of this state's assignments.
pub fn parse_with(
    text: &str,
    file: &str,
    range: &RangeInclusive<u16>,
    memory: &PortMemory,
) -> Result<(State, PortMemory), StateError> {
    let raw: RawState = toml::from_str(text).map_err(|e| StateError::Syntax {
        file: file.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let invalid = |e: Invalid| StateError::Invalid {
        file: file.to_string(),
        field: e.field,
        message: e.message,
    };
    from_raw(raw, range, memory).map_err(invalid)
}

fn from_raw(
    raw: RawState,
    range: &RangeInclusive<u16>,
    memory: &PortMemory,
) -> Result<(State, PortMemory), Invalid> {
    let mut state = State::default();
    for (i, n) in raw.nodes.into_iter().enumerate() {
        let addr = parse_v4(&n.addr).map_err(|m| Invalid::new(format!("nodes[{i}].addr"), m))?;
        let availability = match &n.availability {
            None => Default::default(),
            Some(a) => crate::model::Availability::parse(a).ok_or_else(|| {
                Invalid::new(
                    format!("nodes[{i}].availability"),
                    format!("{a:?} is not \"active\", \"pause\" or \"drain\""),
                )
            })?,
        };
        state.nodes.push(crate::model::Node {
            name: n.name,
            addr,
            availability,
            status: Default::default(),
        });
    }
    // What the file says of each port, then the published ports it left
    // out, assigned from the range.
    let mut wanted = Vec::new();
    for (i, s) in raw.services.iter().enumerate() {
        for (j, p) in s.ports.iter().enumerate() {
            let field = format!("services[{i}].ports[{j}]");
            let protocol = Proto::parse(&p.protocol).ok_or_else(|| {
                Invalid::new(
                    format!("{field}.protocol"),
                    format!("{:?} is not \"tcp\" or \"udp\"", p.protocol),
                )
            })?;
            let target =
                check_port(p.target).map_err(|m| Invalid::new(format!("{field}.target"), m))?;
            let published = p
                .published
                .map(|v| check_port(v).map_err(|m| Invalid::new(format!("{field}.published"), m)))
                .transpose()?;
            wanted.push(Wanted {
                service: &s.name,
                protocol,
                published,
                target,
                field,
            });
        }
    }
    let (published, remembered) = ports::assign(range, &wanted, memory)?;
    let mut published = published.into_iter();
    let mut wanted = wanted.into_iter();
    for (i, s) in raw.services.iter().enumerate() {
        let ports = s
            .ports
            .iter()
            .map(|_| {
                let w = wanted.next().expect("one per port");
                Port {
                    protocol: w.protocol,
                    published: published.next().expect("one per port"),
                    target: w.target,
                }
            })
            .collect();
        let reply = match &s.reply {
            None => None,
            Some(r) => Some(ReplyMode::parse(r).ok_or_else(|| {
                Invalid::new(
                    format!("services[{i}].reply"),
                    format!("{r:?} is not \"via-ingress\" or \"direct\""),
                )
            })?),
        };
        let traffic = match &s.traffic {
            None => Traffic::Cluster,
            Some(t) => Traffic::parse(t).ok_or_else(|| {
                Invalid::new(
                    format!("services[{i}].traffic"),
                    format!("{t:?} is not \"cluster\" or \"local\""),
                )
            })?,
        };
        let source_ranges = match &s.source_ranges {
            None => Vec::new(),
            Some(v) if v.is_empty() => {
                return Err(Invalid::new(
                    format!("services[{i}].source_ranges"),
                    "an empty list would refuse every client; leave it out to allow every source",
                ));
            }
            Some(v) => {
                let mut out = v
                    .iter()
                    .enumerate()
                    .map(|(j, c)| {
                        Cidr4::parse(c).map_err(|m| {
                            Invalid::new(format!("services[{i}].source_ranges[{j}]"), m)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                out.sort();
                out.dedup();
                out
            }
        };
        let client = match &s.affinity {
            None => false,
            Some(a) => {
                parse_affinity(a).map_err(|m| Invalid::new(format!("services[{i}].affinity"), m))?
            }
        };
        let affinity = match (client, s.affinity_timeout) {
            (false, None) => None,
            (false, Some(_)) => {
                // Never ignored: a timeout alone most likely means the
                // affinity line was forgotten.
                return Err(Invalid::new(
                    format!("services[{i}].affinity_timeout"),
                    "is set without affinity = \"client\"",
                ));
            }
            (true, None) => Some(mesh_common::abi::DEFAULT_AFFINITY_TIMEOUT_SECS),
            (true, Some(t)) => Some(
                check_affinity_timeout(t)
                    .map_err(|m| Invalid::new(format!("services[{i}].affinity_timeout"), m))?,
            ),
        };
        state.services.push(Service {
            name: s.name.clone(),
            ports,
            reply,
            traffic,
            source_ranges,
            affinity,
        });
    }
    for (i, t) in raw.tasks.into_iter().enumerate() {
        let addr = parse_v4(&t.addr).map_err(|m| Invalid::new(format!("tasks[{i}].addr"), m))?;
        state.tasks.push(Task {
            service: t.service,
            node: t.node,
            addr,
            local_addr: None,
            draining: false,
        });
    }
    state.validate()?;
    Ok((state, remembered))
}

fn check_port(p: i64) -> Result<u16, String> {
    if (1..=65535).contains(&p) {
        Ok(p as u16)
    } else {
        Err(format!("{p} is not a port (1-65535)"))
    }
}

fn parse_v4(s: &str) -> Result<Ipv4Addr, String> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err(format!("{s:?}: IPv6 is not supported by the dataplane yet")),
        Err(_) => Err(format!("{s:?} is not an IPv4 address")),
    }
}

/// A state file, the range its missing published ports come from, and the
/// ports assigned so far (kept in a directory when one is given, so that
/// a restarted daemon assigns the same).
#[derive(Clone, Debug)]
pub struct FileSource {
    pub path: PathBuf,
    pub port_range: RangeInclusive<u16>,
    memory: PortMemory,
    memory_dir: Option<PathBuf>,
    /// Save the memory after each valid read (`run`), or only use it
    /// (`check`).
    save: bool,
}

/// One read of the file: what was there (the watcher compares it with
/// the next read) and the state it holds.
pub struct Read {
    pub seen: Seen,
    pub state: Result<State, StateError>,
}

/// What a read found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A regular file with these bytes.
    Bytes(Vec<u8>),
    /// Something that is not a state file (why).
    NotAFile(String),
    /// Nothing readable.
    Unreadable,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>, port_range: RangeInclusive<u16>) -> Self {
        Self {
            path: path.into(),
            port_range,
            memory: PortMemory::default(),
            memory_dir: None,
            save: false,
        }
    }

    /// Keeps port assignments in `dir`: loads them now, saves them after
    /// every valid read. An unreadable memory starts afresh, with a warning.
    pub fn remember_in(mut self, dir: &Path) -> Self {
        match PortMemory::load(dir) {
            Ok(m) => self.memory = m,
            Err(e) => warn!("assigned ports: {e}; assigning afresh"),
        }
        self.memory_dir = Some(dir.to_path_buf());
        self.save = true;
        self
    }

    /// Uses the assignments kept in `dir` without changing them.
    pub fn recall_from(mut self, dir: &Path) -> Self {
        self = self.remember_in(dir);
        self.save = false;
        self
    }

    /// The published ports assigned for the last valid read, by entry
    /// (`service/protocol/target/n`).
    pub fn assigned(&self) -> Vec<(String, u16)> {
        self.memory.entries()
    }

    /// Reads and validates the file once.
    pub fn read(&mut self) -> Read {
        let (r, memory) = read(&self.path, &self.port_range, &self.memory);
        if let Some(m) = memory
            && m != self.memory
        {
            self.memory = m;
            if let (true, Some(dir)) = (self.save, &self.memory_dir)
                && let Err(e) = self.memory.save(dir)
            {
                warn!(
                    "keeping assigned ports in {}: {e}; they are kept in memory only",
                    dir.display()
                );
            }
        }
        r
    }

    /// Follows the file: every `interval`, and whenever `reload` is
    /// notified (then the state is sent even if the file did not change).
    /// `current` is the word the daemon starts from, read from `seen`.
    /// Every read that finds a valid state, changed or not, beats `beat`.
    pub fn spawn(
        mut self,
        seen: Seen,
        current: Update,
        interval: Duration,
        reload: Arc<Notify>,
        beat: Beat,
    ) -> Updates {
        let (tx, rx) = watch::channel(current);
        tokio::spawn(async move {
            let mut last = seen;
            // In an outage (unreadable), said once.
            let mut outage = false;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    _ = reload.notified() => true,
                    _ = tx.closed() => return,
                };
                let mut src = self;
                let Ok((r, back)) = tokio::task::spawn_blocking(move || (src.read(), src)).await
                else {
                    return;
                };
                self = back;
                if r.state.is_ok() {
                    beat.beat();
                }
                let u = match r.state {
                    Err(e @ StateError::Read { .. }) => {
                        if outage && !forced {
                            continue;
                        }
                        outage = true;
                        Update::Unavailable(e.to_string().into())
                    }
                    state => {
                        // An unchanged file says nothing, unless it comes
                        // back after an outage: then the daemon must hear
                        // that the source answers again.
                        let back = std::mem::replace(&mut outage, false);
                        if !forced && !back && r.seen == last {
                            continue;
                        }
                        debug!(file = %self.path.display(), forced, "state file read");
                        last = r.seen;
                        match state {
                            Ok(s) => Update::State(Arc::new(s)),
                            Err(e) => Update::Refused(e.to_string().into()),
                        }
                    }
                };
                if tx.send(u).is_err() {
                    return;
                }
            }
        });
        rx
    }
}

/// The largest state file read: 64 MiB (a swarm of 100,000 tasks fits
/// in a tenth of it).
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// The file's bytes, if it is a regular file of at most
/// [`MAX_STATE_BYTES`]. Opened without blocking and judged on the open file
/// (not the name, which may be replaced in between): a FIFO would block a
/// plain open or read forever, a device such as /dev/zero never ends.
fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read as _};
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a state file is replaced whole: write a new file, then rename it over the old)",
        ));
    }
    let too_big = || {
        Error::new(
            ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_STATE_BYTES >> 20),
        )
    };
    if meta.len() > MAX_STATE_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_STATE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(too_big());
    }
    Ok(bytes)
}

fn read(
    path: &Path,
    range: &RangeInclusive<u16>,
    memory: &PortMemory,
) -> (Read, Option<PortMemory>) {
    let file = path.display().to_string();
    let r = match read_regular(path) {
        Ok(bytes) => {
            let parsed = match std::str::from_utf8(&bytes) {
                Ok(text) => parse_with(text, &file, range, memory),
                Err(e) => Err(StateError::Syntax {
                    file,
                    message: format!("not UTF-8 text: {e}"),
                }),
            };
            let (state, memory) = match parsed {
                Ok((s, m)) => (Ok(s), Some(m)),
                Err(e) => (Err(e), None),
            };
            return (
                Read {
                    seen: Seen::Bytes(bytes),
                    state,
                },
                memory,
            );
        }
        Err(source)
            if matches!(
                source.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            ) =>
        {
            // What read_regular refuses: not a state file at all.
            Read {
                seen: Seen::NotAFile(source.to_string()),
                state: Err(StateError::NotAFile {
                    file,
                    message: source.to_string(),
                }),
            }
        }
        Err(source) => Read {
            seen: Seen::Unreadable,
            state: Err(StateError::Read { file, source }),
        },
    };
    (r, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ports::DEFAULT_PORT_RANGE;

    const GOOD: &str = r#"
[[nodes]]
name = "n1"
addr = "198.18.128.1"
[[nodes]]
name = "n2"
addr = "198.18.128.2"

[[services]]
name = "web"
ports = [ { protocol = "tcp", published = 30080, target = 8080 },
          { protocol = "udp", target = 53 } ]
[[services]]
name = "dns"
ports = [ { protocol = "udp", target = 53 } ]

[[tasks]]
service = "web"
node = "n1"
addr = "198.18.129.2"
"#;

    fn err(text: &str) -> String {
        parse(text, "s.toml", &DEFAULT_PORT_RANGE)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_file_parses_and_assigns_ports_in_order() {
        let s = parse(GOOD, "s.toml", &DEFAULT_PORT_RANGE).unwrap();
        assert_eq!(s.services[0].ports[0].published, 30080);
        assert_eq!(s.services[0].ports[1].published, 30000);
        assert_eq!(s.services[1].ports[0].published, 30001);
        assert_eq!(s.tasks[0].addr, Ipv4Addr::new(198, 18, 129, 2));
    }

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let e = err(&GOOD.replace("name = \"dns\"", "name = \"dns\"\nreplicas = 3"));
        assert!(e.starts_with("s.toml: ") && e.contains("replicas"), "{e}");
    }

    #[test]
    fn duplicate_published_port_names_both() {
        let e = err(&GOOD.replace(
            "name = \"dns\"\nports = [ { protocol = \"udp\", target = 53 } ]",
            "name = \"dns\"\nports = [ { protocol = \"tcp\", published = 30080, target = 53 } ]",
        ));
        assert!(
            e.contains("services[1].ports[0].published")
                && e.contains("30080")
                && e.contains("\"web\""),
            "{e}"
        );
    }

    #[test]
    fn port_out_of_range() {
        let e = err(&GOOD.replace("published = 30080", "published = 70000"));
        assert!(
            e.contains("services[0].ports[0].published: 70000 is not a port"),
            "{e}"
        );
        let e = err(&GOOD.replace("target = 8080", "target = 0"));
        assert!(
            e.contains("services[0].ports[0].target: 0 is not a port"),
            "{e}"
        );
    }

    #[test]
    fn bad_address() {
        let e = err(&GOOD.replace("198.18.129.2", "198.18.129.300"));
        assert!(
            e.contains("tasks[0].addr: \"198.18.129.300\" is not an IPv4 address"),
            "{e}"
        );
        let e = err(&GOOD.replace("198.18.128.2", "2001:2::1"));
        assert!(e.contains("nodes[1].addr") && e.contains("IPv6"), "{e}");
    }

    #[test]
    fn task_on_unknown_node_or_service() {
        let e = err(&GOOD.replace("node = \"n1\"", "node = \"n9\""));
        assert!(e.contains("tasks[0].node: \"n9\" is not a node"), "{e}");
        let e = err(&GOOD.replace("service = \"web\"", "service = \"db\""));
        assert!(
            e.contains("tasks[0].service: \"db\" is not a service"),
            "{e}"
        );
    }

    #[test]
    fn affinity_defaults_its_timeout_and_bad_values_are_refused() {
        let with =
            |extra: &str| GOOD.replace("name = \"dns\"", &format!("name = \"dns\"\n{extra}"));
        let s = parse(
            &with("affinity = \"client\""),
            "s.toml",
            &DEFAULT_PORT_RANGE,
        )
        .unwrap();
        assert_eq!(s.services[1].affinity, Some(10_800));
        assert_eq!(s.services[0].affinity, None);
        let s = parse(
            &with("affinity = \"client\"\naffinity_timeout = 60"),
            "s.toml",
            &DEFAULT_PORT_RANGE,
        )
        .unwrap();
        assert_eq!(s.services[1].affinity, Some(60));
        let s = parse(&with("affinity = \"none\""), "s.toml", &DEFAULT_PORT_RANGE).unwrap();
        assert_eq!(s.services[1].affinity, None);
        let e = err(&with("affinity = \"clientip\""));
        assert!(
            e.contains("services[1].affinity: \"clientip\" is not"),
            "{e}"
        );
        let e = err(&with("affinity = \"client\"\naffinity_timeout = 0"));
        assert!(e.contains("services[1].affinity_timeout: 0 is not"), "{e}");
        let e = err(&with("affinity = \"client\"\naffinity_timeout = 86401"));
        assert!(e.contains("services[1].affinity_timeout"), "{e}");
        let e = err(&with("affinity_timeout = 60"));
        assert!(
            e.contains("services[1].affinity_timeout: is set without affinity"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_file_names_it() {
        let r = FileSource::new("/nonexistent/mesh.toml", DEFAULT_PORT_RANGE).read();
        assert_eq!(r.seen, Seen::Unreadable);
        let e = r.state.unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/mesh.toml: cannot read"), "{e}");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = err("[[nodes]]\nname = \"n1\"\naddr = 198.18.0.1\n");
        assert!(e.starts_with("s.toml: ") && e.contains("line 3"), "{e}");
    }

    /// Defect 2: auto-assigned ports followed the file's order, so a
    /// service inserted before another took its port. A port once assigned
    /// stays with its service until the service goes.
    #[test]
    fn assigned_ports_stay_with_their_service() {
        let file = |names: &[&str]| {
            let mut t = String::from("[[nodes]]\nname = \"n1\"\naddr = \"198.18.128.1\"\n");
            for n in names {
                t += &format!(
                    "[[services]]\nname = \"{n}\"\nports = [ {{ protocol = \"tcp\", target = 80 }} ]\n"
                );
            }
            t
        };
        let dir = std::env::temp_dir().join(format!("mesh-ports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.toml");
        let ports_of = |src: &mut FileSource, names: &[&str]| {
            std::fs::write(&path, file(names)).unwrap();
            let s = src.read().state.unwrap();
            s.services
                .iter()
                .map(|s| (s.name.clone(), s.ports[0].published))
                .collect::<Vec<_>>()
        };
        let mut src = FileSource::new(&path, DEFAULT_PORT_RANGE).remember_in(&dir);
        assert_eq!(
            ports_of(&mut src, &["a", "b"]),
            [("a".into(), 30000), ("b".into(), 30001)]
        );
        // A service inserted before b takes the next free port, not b's.
        assert_eq!(
            ports_of(&mut src, &["a", "new", "b"]),
            [
                ("a".into(), 30000),
                ("new".into(), 30002),
                ("b".into(), 30001)
            ]
        );
        // a goes: its port is free again, and the others keep theirs.
        assert_eq!(
            ports_of(&mut src, &["new", "b", "c"]),
            [
                ("new".into(), 30002),
                ("b".into(), 30001),
                ("c".into(), 30000)
            ]
        );
        // A restarted daemon remembers.
        let mut again = FileSource::new(&path, DEFAULT_PORT_RANGE).remember_in(&dir);
        assert_eq!(
            ports_of(&mut again, &["c", "b", "new"]),
            [
                ("c".into(), 30000),
                ("b".into(), 30001),
                ("new".into(), 30002)
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn range_exhaustion() {
        let r = ports::parse_range("30000-30000").unwrap();
        let e = parse(GOOD, "s.toml", &r).unwrap_err().to_string();
        assert!(
            e.contains("services[1].ports[0].published") && e.contains("no udp port is free"),
            "{e}"
        );
    }
}
