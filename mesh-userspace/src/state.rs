//! The state file: nodes, services and their published ports, tasks.
//!
//! TOML, read whole and validated whole before anything touches the
//! kernel: a bad file is refused with an error naming the file, the field
//! and the value, and the dataplane keeps its last good state.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::path::Path;

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => mesh_common::abi::IPPROTO_TCP,
            Proto::Udp => mesh_common::abi::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A validated state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub tasks: Vec<Task>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addr: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub ports: Vec<Port>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    pub protocol: Proto,
    pub published: u16,
    pub target: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub service: String,
    pub node: String,
    pub addr: Ipv4Addr,
}

/// The default range for published ports, as in Docker.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    ports: Vec<RawPort>,
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

impl State {
    /// Reads and validates a state file.
    pub fn load(path: &Path, range: &RangeInclusive<u16>) -> Result<State, StateError> {
        Self::read(path, range).1
    }

    /// Reads a state file once: its bytes (what a watcher compares with
    /// the next read), and the state they hold, validated.
    pub fn read(
        path: &Path,
        range: &RangeInclusive<u16>,
    ) -> (Option<Vec<u8>>, Result<State, StateError>) {
        let file = path.display().to_string();
        match std::fs::read(path) {
            Ok(bytes) => {
                let state = match std::str::from_utf8(&bytes) {
                    Ok(text) => Self::parse(text, &file, range),
                    Err(e) => Err(StateError::Syntax {
                        file,
                        message: format!("not UTF-8 text: {e}"),
                    }),
                };
                (Some(bytes), state)
            }
            Err(source) => (None, Err(StateError::Read { file, source })),
        }
    }

    /// Parses and validates state text; `file` names it in errors.
    pub fn parse(text: &str, file: &str, range: &RangeInclusive<u16>) -> Result<State, StateError> {
        let raw: RawState = toml::from_str(text).map_err(|e| StateError::Syntax {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |field: String, message: String| StateError::Invalid {
            file: file.to_string(),
            field,
            message,
        };

        let mut nodes = Vec::new();
        let mut node_names = HashSet::new();
        let mut node_addrs = HashMap::new();
        for (i, n) in raw.nodes.iter().enumerate() {
            check_name(&n.name).map_err(|m| invalid(format!("nodes[{i}].name"), m))?;
            if !node_names.insert(n.name.clone()) {
                return Err(invalid(
                    format!("nodes[{i}].name"),
                    format!("{:?} is listed twice", n.name),
                ));
            }
            let addr = parse_v4(&n.addr).map_err(|m| invalid(format!("nodes[{i}].addr"), m))?;
            if let Some(other) = node_addrs.insert(addr, n.name.clone()) {
                return Err(invalid(
                    format!("nodes[{i}].addr"),
                    format!("{addr} is already the address of node {other:?}"),
                ));
            }
            nodes.push(Node {
                name: n.name.clone(),
                addr,
            });
        }

        // Explicit published ports first, so that auto-assignment (lowest
        // free port in the range, in file order) never takes one of them.
        let mut taken: BTreeMap<(Proto, u16), String> = BTreeMap::new();
        let mut protos = Vec::new();
        let mut service_names = HashSet::new();
        for (i, s) in raw.services.iter().enumerate() {
            check_name(&s.name).map_err(|m| invalid(format!("services[{i}].name"), m))?;
            if !service_names.insert(s.name.clone()) {
                return Err(invalid(
                    format!("services[{i}].name"),
                    format!("{:?} is listed twice", s.name),
                ));
            }
            if s.ports.is_empty() {
                return Err(invalid(
                    format!("services[{i}].ports"),
                    "a service needs at least one port".into(),
                ));
            }
            let mut ps = Vec::new();
            for (j, p) in s.ports.iter().enumerate() {
                let field = |f: &str| format!("services[{i}].ports[{j}].{f}");
                let proto = match p.protocol.as_str() {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    other => {
                        return Err(invalid(
                            field("protocol"),
                            format!("{other:?} is not \"tcp\" or \"udp\""),
                        ));
                    }
                };
                let target = check_port(p.target).map_err(|m| invalid(field("target"), m))?;
                if let Some(published) = p.published {
                    let published =
                        check_port(published).map_err(|m| invalid(field("published"), m))?;
                    if let Some(owner) = taken.insert((proto, published), s.name.clone()) {
                        return Err(invalid(
                            field("published"),
                            format!(
                                "{proto} port {published} is already published by service {owner:?}"
                            ),
                        ));
                    }
                }
                ps.push((proto, p.published, target));
            }
            protos.push(ps);
        }
        let mut services = Vec::new();
        for (i, (s, ps)) in raw.services.iter().zip(protos).enumerate() {
            let mut ports = Vec::new();
            for (j, (protocol, published, target)) in ps.into_iter().enumerate() {
                let published = match published {
                    Some(p) => p as u16,
                    None => {
                        let free = range.clone().find(|p| !taken.contains_key(&(protocol, *p))).ok_or_else(|| {
                            invalid(
                                format!("services[{i}].ports[{j}].published"),
                                format!(
                                    "not given, and no {protocol} port is free in the range {}-{}",
                                    range.start(),
                                    range.end()
                                ),
                            )
                        })?;
                        taken.insert((protocol, free), s.name.clone());
                        free
                    }
                };
                ports.push(Port {
                    protocol,
                    published,
                    target,
                });
            }
            services.push(Service {
                name: s.name.clone(),
                ports,
            });
        }

        let mut tasks = Vec::new();
        let mut seen: HashMap<Ipv4Addr, usize> = HashMap::new();
        for (i, t) in raw.tasks.iter().enumerate() {
            if !service_names.contains(&t.service) {
                return Err(invalid(
                    format!("tasks[{i}].service"),
                    format!("{:?} is not a service in this file", t.service),
                ));
            }
            if !node_names.contains(&t.node) {
                return Err(invalid(
                    format!("tasks[{i}].node"),
                    format!("{:?} is not a node in this file", t.node),
                ));
            }
            let addr = parse_v4(&t.addr).map_err(|m| invalid(format!("tasks[{i}].addr"), m))?;
            if let Some(j) = seen.insert(addr, i) {
                return Err(invalid(
                    format!("tasks[{i}].addr"),
                    format!("{addr} is already the address of tasks[{j}]"),
                ));
            }
            tasks.push(Task {
                service: t.service.clone(),
                node: t.node.clone(),
                addr,
            });
        }
        Ok(State {
            nodes,
            services,
            tasks,
        })
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "{name:?} is not a name (up to 63 of A-Z a-z 0-9 - _ .)"
        ));
    }
    Ok(())
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
        Ok(IpAddr::V4(a))
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() =>
        {
            Err(format!("{s:?} is not a unicast address"))
        }
        Ok(IpAddr::V4(a)) => Ok(a),
        Ok(IpAddr::V6(_)) => Err(format!("{s:?}: IPv6 is not supported by the dataplane yet")),
        Err(_) => Err(format!("{s:?} is not an IPv4 address")),
    }
}

/// Parses a port range such as `30000-32767`.
pub fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range like 30000-32767"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?} is not a range of ports (1 <= low <= high)"));
    }
    Ok(a..=b)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        State::parse(text, "s.toml", &DEFAULT_PORT_RANGE)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn good_file_parses_and_assigns_ports_in_order() {
        let s = State::parse(GOOD, "s.toml", &DEFAULT_PORT_RANGE).unwrap();
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
    fn unreadable_file_names_it() {
        let e = State::load(Path::new("/nonexistent/mesh.toml"), &DEFAULT_PORT_RANGE)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/mesh.toml: cannot read"), "{e}");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = err("[[nodes]]\nname = \"n1\"\naddr = 198.18.0.1\n");
        assert!(e.starts_with("s.toml: ") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn range_exhaustion_and_parse() {
        let r = parse_range("30000-30000").unwrap();
        let e = State::parse(GOOD, "s.toml", &r).unwrap_err().to_string();
        assert!(
            e.contains("services[1].ports[0].published") && e.contains("no udp port is free"),
            "{e}"
        );
        assert!(parse_range("5-4").is_err());
        assert!(parse_range("x").is_err());
    }
}
