//! The swarm as the mesh sees it: nodes, services with their published
//! ports, and tasks. A [`State`] is whole and validated; state sources
//! (the state file, Docker) build one with [`StateBuilder`] and never hand
//! out anything else. Nothing here knows where a state came from.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;

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

    /// "tcp" or "udp".
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
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

/// A validated state. Lists keep the order their source gave, so that an
/// error can name an entry by its place (`services[1].ports[0]`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct State {
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub tasks: Vec<Task>,
    /// The node this state was read on, when the source knows it (Docker
    /// tells each node which one it is); `None`: the daemon's `--node`.
    pub local_node: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addr: Ipv4Addr,
    /// Whether the node takes new work (Docker's node availability).
    pub availability: Availability,
    /// Whether the node is up (Docker's node status).
    pub status: NodeStatus,
}

/// A node's availability, as Docker's: tasks on a node that is paused or
/// drained get no new flows; flows they already have continue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub enum Availability {
    #[default]
    Active,
    Pause,
    Drain,
}

/// Whether a node is up, as Docker says. The tasks of a node that is down
/// are not backends at all (their flows cannot be served).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub enum NodeStatus {
    #[default]
    Ready,
    Down,
}

impl Availability {
    /// "active", "pause" or "drain".
    pub fn parse(s: &str) -> Option<Availability> {
        match s {
            "active" => Some(Availability::Active),
            "pause" => Some(Availability::Pause),
            "drain" => Some(Availability::Drain),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        }
    }
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Down => "down",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub ports: Vec<Port>,
    /// How replies of flows forwarded to another node's task go back;
    /// `None`: the node's default (`meshd run --reply-mode`).
    pub reply: Option<ReplyMode>,
    /// Which tasks a node sends the service's new flows to.
    pub traffic: Traffic,
    /// The sources allowed to reach it (sorted, no duplicates); empty:
    /// every source.
    pub source_ranges: Vec<Cidr4>,
    /// Client-address affinity: the timeout in seconds past a client's
    /// last new flow for which it keeps its task; `None`: none (each flow
    /// is picked on its own).
    pub affinity: Option<u32>,
}

/// The affinity a service asks for: "none" (the default) or "client"
/// (kube-proxy's `sessionAffinity: ClientIP`).
pub fn parse_affinity(s: &str) -> Result<bool, String> {
    match s {
        "none" => Ok(false),
        "client" => Ok(true),
        _ => Err(format!("{s:?} is not \"client\" or \"none\"")),
    }
}

/// An affinity timeout in seconds, from 1 to a day (Kubernetes' bounds).
pub fn check_affinity_timeout(secs: i64) -> Result<u32, String> {
    let max = mesh_common::abi::MAX_AFFINITY_TIMEOUT_SECS;
    u32::try_from(secs)
        .ok()
        .filter(|s| (1..=max).contains(s))
        .ok_or_else(|| format!("{secs} is not a number of seconds from 1 to {max}"))
}

/// Which tasks a node sends a service's new flows to (kube-proxy's
/// `externalTrafficPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub enum Traffic {
    /// Every task of the service, on whatever node (forwarded there).
    #[default]
    Cluster,
    /// Only tasks on the node that received the flow: no forwarding (one
    /// hop less, the client's address kept without any encapsulation);
    /// a node without a task of the service drops its new flows, and its
    /// per-service health answer is 503 so that load balancers skip it.
    Local,
}

impl Traffic {
    /// "cluster" or "local".
    pub fn parse(s: &str) -> Option<Traffic> {
        match s {
            "cluster" => Some(Traffic::Cluster),
            "local" => Some(Traffic::Local),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Traffic::Cluster => "cluster",
            Traffic::Local => "local",
        }
    }
}

/// An IPv4 range: an address and a prefix length, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr4 {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr4 {
    /// "198.18.0.0/15" (or a bare address, a /32). Refuses a range with
    /// host bits set: "198.18.0.1/15" is most likely a typo, and which
    /// range was meant is not for meshd to guess.
    pub fn parse(s: &str) -> Result<Cidr4, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("{s:?}: the prefix length is not 0-32"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 range (ADDR/LEN)"))?;
        let c = Cidr4 { addr, len };
        if c.network() != addr {
            return Err(format!(
                "{s:?} has host bits set: the range is {}",
                Cidr4 {
                    addr: c.network(),
                    len
                }
            ));
        }
        Ok(c)
    }

    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len as u32)
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl fmt::Display for Cidr4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// How the replies of a flow forwarded to a task on another node reach the
/// client.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ReplyMode {
    /// Back through the node the client sent to, which sends them from the
    /// address and port the client used. Works where the network drops
    /// packets with a source address not their sender's (most clouds).
    #[default]
    ViaIngress,
    /// Straight from the task's node to the client, with the source
    /// address and port the client used (not the sender's own): one hop
    /// less, for networks without source address checks.
    Direct,
}

impl ReplyMode {
    /// "via-ingress" or "direct".
    pub fn parse(s: &str) -> Option<ReplyMode> {
        match s {
            "via-ingress" => Some(ReplyMode::ViaIngress),
            "direct" => Some(ReplyMode::Direct),
            _ => None,
        }
    }
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
    /// The task's identity, the same on every node: what Maglev hashes (on
    /// a swarm, its address in the ingress network).
    pub addr: Ipv4Addr,
    /// Where its own node delivers its packets, when that is not `addr`
    /// (on a swarm, its docker_gwbridge address, known only to its node).
    pub local_addr: Option<Ipv4Addr>,
    /// Its desired state is no longer running but it still runs (it is
    /// shutting down, or being removed): no new flows, established flows
    /// continue.
    pub draining: bool,
}

impl Task {
    /// Where its own node sends its packets.
    pub fn delivery_addr(&self) -> Ipv4Addr {
        self.local_addr.unwrap_or(self.addr)
    }
}

/// Why a state is not valid: the field (a path into the state, such as
/// `services[1].ports[0].published`) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl State {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Checks everything a state must satisfy whatever its source: names,
    /// unicast addresses, nothing listed twice, every task on a known node
    /// for a known service, every (protocol, published port) published once.
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut node_names = HashSet::new();
        let mut node_addrs: HashMap<Ipv4Addr, &str> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let field = |f: &str| format!("nodes[{i}].{f}");
            check_name(&n.name).map_err(|m| Invalid::new(field("name"), m))?;
            if !node_names.insert(n.name.as_str()) {
                return Err(Invalid::new(
                    field("name"),
                    format!("{:?} is listed twice", n.name),
                ));
            }
            check_unicast(n.addr).map_err(|m| Invalid::new(field("addr"), m))?;
            if let Some(other) = node_addrs.insert(n.addr, &n.name) {
                return Err(Invalid::new(
                    field("addr"),
                    format!("{} is already the address of node {other:?}", n.addr),
                ));
            }
        }
        let mut service_names = HashSet::new();
        let mut published: BTreeMap<(Proto, u16), &str> = BTreeMap::new();
        for (i, s) in self.services.iter().enumerate() {
            check_name(&s.name).map_err(|m| Invalid::new(format!("services[{i}].name"), m))?;
            if !service_names.insert(s.name.as_str()) {
                return Err(Invalid::new(
                    format!("services[{i}].name"),
                    format!("{:?} is listed twice", s.name),
                ));
            }
            if s.ports.is_empty() {
                return Err(Invalid::new(
                    format!("services[{i}].ports"),
                    "a service needs at least one port",
                ));
            }
            for (j, p) in s.ports.iter().enumerate() {
                let field = |f: &str| format!("services[{i}].ports[{j}].{f}");
                if p.target == 0 {
                    return Err(Invalid::new(field("target"), "0 is not a port (1-65535)"));
                }
                if p.published == 0 {
                    return Err(Invalid::new(
                        field("published"),
                        "0 is not a port (1-65535)",
                    ));
                }
                if let Some(owner) = published.insert((p.protocol, p.published), &s.name) {
                    return Err(Invalid::new(
                        field("published"),
                        format!(
                            "{} port {} is already published by service {owner:?}",
                            p.protocol, p.published
                        ),
                    ));
                }
            }
        }
        if let Some(n) = &self.local_node
            && !node_names.contains(n.as_str())
        {
            return Err(Invalid::new(
                "local_node",
                format!("{n:?} is not a node in this state"),
            ));
        }
        let mut task_addrs: HashMap<Ipv4Addr, usize> = HashMap::new();
        let mut local_addrs: HashMap<(&str, Ipv4Addr), usize> = HashMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if !service_names.contains(t.service.as_str()) {
                return Err(Invalid::new(
                    format!("tasks[{i}].service"),
                    format!("{:?} is not a service in this state", t.service),
                ));
            }
            if !node_names.contains(t.node.as_str()) {
                return Err(Invalid::new(
                    format!("tasks[{i}].node"),
                    format!("{:?} is not a node in this state", t.node),
                ));
            }
            check_unicast(t.addr).map_err(|m| Invalid::new(format!("tasks[{i}].addr"), m))?;
            if let Some(j) = task_addrs.insert(t.addr, i) {
                return Err(Invalid::new(
                    format!("tasks[{i}].addr"),
                    format!("{} is already the address of tasks[{j}]", t.addr),
                ));
            }
            if let Some(a) = t.local_addr {
                let field = format!("tasks[{i}].local_addr");
                check_unicast(a).map_err(|m| Invalid::new(&field, m))?;
                if let Some(j) = local_addrs.insert((t.node.as_str(), a), i) {
                    return Err(Invalid::new(
                        field,
                        format!("{a} is already where tasks[{j}] is delivered on its node"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Builds a [`State`] entry by entry and validates it whole.
///
/// ```
/// use mesh_userspace::model::{Proto, StateBuilder};
/// let s = StateBuilder::new()
///     .node("n1", [198, 18, 128, 1])
///     .service("web", &[(Proto::Tcp, 30080, 8080)])
///     .task("web", "n1", [198, 18, 129, 2])
///     .build()
///     .unwrap();
/// assert_eq!(s.tasks.len(), 1);
/// ```
#[derive(Clone, Debug, Default)]
pub struct StateBuilder {
    state: State,
}

impl StateBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn node(mut self, name: &str, addr: impl Into<Ipv4Addr>) -> Self {
        self.state.nodes.push(Node {
            name: name.into(),
            addr: addr.into(),
            availability: Availability::Active,
            status: NodeStatus::Ready,
        });
        self
    }

    /// Sets the availability of node `name` (listed before).
    pub fn availability(mut self, name: &str, a: Availability) -> Self {
        if let Some(n) = self.state.nodes.iter_mut().find(|n| n.name == name) {
            n.availability = a;
        }
        self
    }

    /// Sets the status of node `name` (listed before).
    pub fn status(mut self, name: &str, s: NodeStatus) -> Self {
        if let Some(n) = self.state.nodes.iter_mut().find(|n| n.name == name) {
            n.status = s;
        }
        self
    }

    /// Says which node the state was read on.
    pub fn local_node(mut self, name: &str) -> Self {
        self.state.local_node = Some(name.into());
        self
    }

    /// A service with its ports as (protocol, published, target).
    pub fn service(mut self, name: &str, ports: &[(Proto, u16, u16)]) -> Self {
        self.state.services.push(Service {
            name: name.into(),
            reply: None,
            traffic: Traffic::Cluster,
            source_ranges: Vec::new(),
            affinity: None,
            ports: ports
                .iter()
                .map(|&(protocol, published, target)| Port {
                    protocol,
                    published,
                    target,
                })
                .collect(),
        });
        self
    }

    /// The traffic mode of service `name` (added before).
    pub fn traffic(mut self, name: &str, t: Traffic) -> Self {
        if let Some(s) = self.state.services.iter_mut().find(|s| s.name == name) {
            s.traffic = t;
        }
        self
    }

    /// Client affinity for service `name` (added before), with a timeout
    /// in seconds.
    pub fn affinity(mut self, name: &str, timeout_secs: u32) -> Self {
        if let Some(s) = self.state.services.iter_mut().find(|s| s.name == name) {
            s.affinity = Some(timeout_secs);
        }
        self
    }

    /// The allow list of service `name` (added before).
    pub fn source_ranges(mut self, name: &str, ranges: &[Cidr4]) -> Self {
        if let Some(s) = self.state.services.iter_mut().find(|s| s.name == name) {
            s.source_ranges = ranges.to_vec();
            s.source_ranges.sort();
            s.source_ranges.dedup();
        }
        self
    }

    /// How the replies of service `name` (added before) go back.
    pub fn reply(mut self, name: &str, mode: ReplyMode) -> Self {
        if let Some(s) = self.state.services.iter_mut().find(|s| s.name == name) {
            s.reply = Some(mode);
        }
        self
    }

    pub fn task(mut self, service: &str, node: &str, addr: impl Into<Ipv4Addr>) -> Self {
        self.state.tasks.push(Task {
            service: service.into(),
            node: node.into(),
            addr: addr.into(),
            local_addr: None,
            draining: false,
        });
        self
    }

    /// Gives the task listed last a delivery address of its own.
    pub fn delivered_at(mut self, local_addr: impl Into<Ipv4Addr>) -> Self {
        if let Some(t) = self.state.tasks.last_mut() {
            t.local_addr = Some(local_addr.into());
        }
        self
    }

    /// Marks the task listed last as draining (shutting down).
    pub fn draining(mut self) -> Self {
        if let Some(t) = self.state.tasks.last_mut() {
            t.draining = true;
        }
        self
    }

    /// Tasks of `service` on `node` at each of `addrs`.
    pub fn tasks<A: Into<Ipv4Addr>>(
        mut self,
        service: &str,
        node: &str,
        addrs: impl IntoIterator<Item = A>,
    ) -> Self {
        for a in addrs {
            self = self.task(service, node, a);
        }
        self
    }

    pub fn build(self) -> Result<State, Invalid> {
        self.state.validate()?;
        Ok(self.state)
    }
}

pub fn check_name(name: &str) -> Result<(), String> {
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

fn check_unicast(a: Ipv4Addr) -> Result<(), String> {
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
        return Err(format!("{a} is not a unicast address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> StateBuilder {
        StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .node("n2", [198, 18, 128, 2])
            .service("web", &[(Proto::Tcp, 30080, 8080), (Proto::Udp, 30000, 53)])
            .service("dns", &[(Proto::Udp, 30001, 53)])
            .task("web", "n1", [198, 18, 129, 2])
    }

    fn err(b: StateBuilder) -> String {
        b.build().unwrap_err().to_string()
    }

    #[test]
    fn a_good_state_builds() {
        let s = good().build().unwrap();
        assert_eq!(s.services.len(), 2);
        assert_eq!(s.node("n2").unwrap().addr, Ipv4Addr::new(198, 18, 128, 2));
    }

    #[test]
    fn published_twice_names_the_owner() {
        let e = err(good().service("admin", &[(Proto::Tcp, 30080, 80)]));
        assert_eq!(
            e,
            "services[2].ports[0].published: tcp port 30080 is already published by service \"web\""
        );
        // The same number for the other protocol is another port.
        good()
            .service("admin", &[(Proto::Udp, 30080, 80)])
            .build()
            .unwrap();
    }

    #[test]
    fn references_and_duplicates() {
        assert!(err(good().task("db", "n1", [198, 18, 129, 3])).contains("tasks[1].service"));
        assert!(err(good().task("web", "n9", [198, 18, 129, 3])).contains("tasks[1].node"));
        assert!(
            err(good().task("web", "n2", [198, 18, 129, 2]))
                .contains("198.18.129.2 is already the address of tasks[0]")
        );
        assert!(err(good().node("n1", [198, 18, 128, 3])).contains("nodes[2].name"));
        assert!(err(good().node("n3", [198, 18, 128, 1])).contains("nodes[2].addr"));
        assert!(err(good().node("n3", [224, 0, 0, 1])).contains("not a unicast address"));
        assert!(err(good().service("x y", &[(Proto::Tcp, 1, 1)])).contains("is not a name"));
        assert!(err(good().service("x", &[])).contains("at least one port"));
        assert!(err(good().service("x", &[(Proto::Tcp, 1, 0)])).contains("target: 0 is not"));
        assert!(err(good().local_node("n9")).contains("local_node"));
    }

    #[test]
    fn ranges_parse_and_refuse_host_bits() {
        let c = Cidr4::parse("198.18.0.0/15").unwrap();
        assert!(c.contains(Ipv4Addr::new(198, 19, 255, 1)));
        assert!(!c.contains(Ipv4Addr::new(198, 20, 0, 1)));
        assert_eq!(Cidr4::parse("198.18.128.2").unwrap().len, 32);
        assert_eq!(Cidr4::parse("0.0.0.0/0").unwrap().len, 0);
        let e = Cidr4::parse("198.18.0.1/15").unwrap_err();
        assert!(
            e.contains("host bits set: the range is 198.18.0.0/15"),
            "{e}"
        );
        assert!(Cidr4::parse("198.18.0.0/33").is_err());
        assert!(Cidr4::parse("fe80::/10").is_err());
    }

    #[test]
    fn delivery_addresses_are_unique_per_node_only() {
        let g = [198, 18, 22, 3];
        // Two nodes may deliver to the same (node-local) address.
        good()
            .delivered_at(g)
            .task("web", "n2", [198, 18, 129, 3])
            .delivered_at(g)
            .build()
            .unwrap();
        let e = err(good()
            .delivered_at(g)
            .task("web", "n1", [198, 18, 129, 3])
            .delivered_at(g));
        assert!(e.contains("tasks[1].local_addr"), "{e}");
        assert_eq!(
            good().delivered_at(g).build().unwrap().tasks[0].delivery_addr(),
            Ipv4Addr::from(g)
        );
    }
}
