//! What the maps should hold, computed from a validated [`State`] for one
//! node. Pure: no kernel involved, so it is unit-tested on the host.
//!
//! Nodes and backends are named by what identifies them in the swarm (a
//! node's name; a task's address and target port), never by a position in
//! the state: the planner gives them map slots that stay put while they
//! exist, whatever else comes and goes.
//!
//! Which tasks get flows:
//! - a task on a node that is down is no backend at all (Docker has given
//!   up on it; its flows cannot be served);
//! - a task that is draining (shutting down), or on a node that is paused
//!   or drained, stays a backend, so that its established flows still find
//!   it through conntrack, but is left out of every Maglev table: it gets
//!   no new flows ([`DesiredService::draining`]);
//! - every other task is in its services' tables.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use anyhow::{Result, bail};

use crate::model::{Availability, Cidr4, NodeStatus, Proto, ReplyMode, State, Task, Traffic};

/// A backend: a task's address and the target port of one published port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// The task's identity, the same on every node (what Maglev hashes).
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The node the task runs on (its name).
    pub node: String,
    /// The task runs on this node.
    pub local: bool,
    /// Where this node sends the task's packets: for a local task its
    /// delivery address ([`Task::delivery_addr`]: what XDP DNATs to and
    /// what its replies come from), for a remote one `addr`.
    pub deliver: Ipv4Addr,
}

impl BackendKey {
    /// The name Maglev hashes: the same on every node.
    pub fn maglev_key(&self) -> String {
        format!("{}:{}", self.addr, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    pub target: u16,
    /// Every backend the maps keep for this port, sorted: those in the
    /// Maglev table and those kept only for their established flows.
    pub backends: Vec<BackendKey>,
    /// The backends of `backends` that get no new flows (draining tasks,
    /// tasks on paused or drained nodes), sorted: kept in the backend map,
    /// left out of the table.
    pub draining: Vec<BackendKey>,
    /// How replies of flows forwarded to other nodes go back, if the
    /// service says ([`Forwarding::reply`] otherwise).
    pub reply: Option<ReplyMode>,
    /// Traffic mode `local`: only this node's tasks get new flows (the
    /// others stay in `backends`, draining, for the flows they have).
    pub local: bool,
    /// The sources allowed (sorted); empty: every source.
    pub source_ranges: Vec<Cidr4>,
    /// Client-address affinity, with its timeout in seconds.
    pub affinity: Option<u32>,
}

impl DesiredService {
    /// The backends new flows are spread over, sorted.
    pub fn table_backends(&self) -> Vec<BackendKey> {
        self.backends
            .iter()
            .filter(|b| self.draining.binary_search(b).is_err())
            .cloned()
            .collect()
    }
}

/// A node of the swarm, as the dataplane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredNode {
    pub addr: Ipv4Addr,
    /// This node.
    pub local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Desired {
    /// Addresses this node answers published ports on.
    pub node_addrs: Vec<Ipv4Addr>,
    /// Every node, by name.
    pub nodes: BTreeMap<String, DesiredNode>,
    pub services: BTreeMap<(Proto, u16), DesiredService>,
    /// The interface (ifindex) each local task sits behind, where known
    /// (the daemon finds them): replies are trusted only from there.
    pub task_ports: BTreeMap<Ipv4Addr, u32>,
    /// Each local task's link, by delivery address, where known (the
    /// daemon finds them): its packets are delivered there without a FIB
    /// lookup.
    pub task_links: BTreeMap<Ipv4Addr, TaskLink>,
    /// How this node carries flows to other nodes (the daemon's settings).
    pub forwarding: Forwarding,
}

/// A local task's link, as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskLink {
    /// The host's end of the link (a bridge port, or the link itself).
    pub ifindex: u32,
    /// The link is a veth whose other end, the task's, lies in another
    /// network namespace: packets can go straight to that end's ingress.
    pub peer: bool,
    /// The task's end's Ethernet address.
    pub task_mac: [u8; 6],
    /// The address the task's packets come from on the host's side: the
    /// bridge's (its gateway), or the host end's.
    pub gateway_mac: [u8; 6],
}

/// How a node carries flows to the nodes that run their tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarding {
    /// The UDP port of encapsulated packets.
    pub port: u16,
    /// The uplink's MTU: an encapsulated packet must fit in it.
    pub mtu: u32,
    /// How replies go back, for services that do not say.
    pub reply: ReplyMode,
}

impl Default for Forwarding {
    fn default() -> Self {
        Self {
            port: mesh_common::abi::DEFAULT_ENCAP_PORT,
            mtu: 1500,
            reply: ReplyMode::ViaIngress,
        }
    }
}

impl Desired {
    /// What node `node` should hold for `state`; `extra_addrs` are more
    /// addresses it answers on. A state that says which node it was read on
    /// ([`State::local_node`]) is computed for that node instead. Refused
    /// when the node is not in the state.
    pub fn compute(state: &State, node: &str, extra_addrs: &[Ipv4Addr]) -> Result<Desired> {
        let node = state.local_node.as_deref().unwrap_or(node);
        let Some(me) = state.node(node) else {
            bail!(
                "this node ({node:?}) is not in nodes[] (pass --node NAME; nodes are: {})",
                state
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let node_of: HashMap<&str, &crate::model::Node> =
            state.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let mut node_addrs = vec![me.addr];
        for a in extra_addrs {
            if !node_addrs.contains(a) {
                node_addrs.push(*a);
            }
        }
        let nodes = state
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    DesiredNode {
                        addr: n.addr,
                        local: n.name == node,
                    },
                )
            })
            .collect();
        // Tasks indexed by service first: linear in the state's size.
        let mut tasks_of: HashMap<&str, Vec<&Task>> = HashMap::new();
        for t in &state.tasks {
            // A node that is down takes its tasks out of the backend set.
            if node_of
                .get(t.node.as_str())
                .is_some_and(|n| n.status == NodeStatus::Down)
            {
                continue;
            }
            tasks_of.entry(t.service.as_str()).or_default().push(t);
        }
        let no_new_flows = |t: &Task| {
            t.draining
                || node_of
                    .get(t.node.as_str())
                    .is_some_and(|n| n.availability != Availability::Active)
        };
        let mut services = BTreeMap::new();
        for s in &state.services {
            let tasks = tasks_of
                .get(s.name.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            for p in &s.ports {
                let key = |t: &Task| {
                    let local = t.node == node;
                    BackendKey {
                        addr: t.addr,
                        port: p.target,
                        node: t.node.clone(),
                        local,
                        deliver: if local { t.delivery_addr() } else { t.addr },
                    }
                };
                let mut backends: Vec<BackendKey> = tasks.iter().map(|t| key(t)).collect();
                backends.sort();
                let local = s.traffic == Traffic::Local;
                // In local mode, tasks on other nodes get no new flows
                // from this one (those they have go on).
                let mut draining: Vec<BackendKey> = tasks
                    .iter()
                    .filter(|t| no_new_flows(t) || (local && t.node != node))
                    .map(|t| key(t))
                    .collect();
                draining.sort();
                services.insert(
                    (p.protocol, p.published),
                    DesiredService {
                        name: s.name.clone(),
                        target: p.target,
                        backends,
                        draining,
                        reply: s.reply,
                        local,
                        source_ranges: s.source_ranges.clone(),
                        affinity: s.affinity,
                    },
                );
            }
        }
        Ok(Desired {
            node_addrs,
            nodes,
            services,
            task_ports: BTreeMap::new(),
            task_links: BTreeMap::new(),
            forwarding: Forwarding::default(),
        })
    }

    /// Delivery addresses of tasks on this node (to find the interfaces
    /// they sit behind).
    pub fn local_task_addrs(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self
            .services
            .values()
            .flat_map(|s| s.backends.iter().filter(|b| b.local).map(|b| b.deliver))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StateBuilder;

    #[test]
    fn a_node_missing_from_the_state_is_refused_naming_the_others() {
        let s = StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .node("n2", [198, 18, 128, 2])
            .build()
            .unwrap();
        let e = Desired::compute(&s, "n9", &[]).unwrap_err().to_string();
        assert!(
            e.contains("this node (\"n9\") is not in nodes[]") && e.contains("n1, n2"),
            "{e}"
        );
    }

    #[test]
    fn backends_name_their_node_not_its_position() {
        let b = |nodes: &[&str]| {
            let mut s = StateBuilder::new();
            for (i, n) in nodes.iter().enumerate() {
                s = s.node(n, [198, 18, 128, 1 + i as u8]);
            }
            let s = s
                .service("web", &[(Proto::Tcp, 30080, 8080)])
                .task("web", "n2", [198, 18, 129, 2])
                .build()
                .unwrap();
            Desired::compute(&s, "n1", &[]).unwrap().services[&(Proto::Tcp, 30080)]
                .backends
                .clone()
        };
        // A node added in front of n2 renumbers nothing.
        assert_eq!(b(&["n1", "n2"]), b(&["n0", "n1", "n2"]));
    }

    fn web(s: StateBuilder, me: &str) -> DesiredService {
        let s = s.build().unwrap();
        Desired::compute(&s, me, &[]).unwrap().services[&(Proto::Tcp, 30080)].clone()
    }

    fn two_nodes() -> StateBuilder {
        StateBuilder::new()
            .node("n1", [198, 18, 128, 1])
            .node("n2", [198, 18, 128, 2])
            .service("web", &[(Proto::Tcp, 30080, 8080)])
            .task("web", "n1", [198, 19, 0, 6])
            .delivered_at([198, 18, 21, 3])
            .task("web", "n2", [198, 19, 0, 7])
            .delivered_at([198, 18, 22, 3])
    }

    #[test]
    fn a_local_task_is_delivered_at_its_local_address_and_hashed_by_its_identity() {
        let s = web(two_nodes(), "n1");
        let (me, other) = (&s.backends[0], &s.backends[1]);
        assert_eq!(
            (me.local, me.deliver),
            (true, Ipv4Addr::new(198, 18, 21, 3))
        );
        assert_eq!(me.maglev_key(), "198.19.0.6:8080");
        // Another node's delivery address means nothing here.
        assert_eq!(
            (other.local, other.deliver),
            (false, Ipv4Addr::new(198, 19, 0, 7))
        );
        // Node n2 hashes the same keys.
        let keys = |s: &DesiredService| {
            s.table_backends()
                .iter()
                .map(BackendKey::maglev_key)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&s), keys(&web(two_nodes(), "n2")));
    }

    /// In local mode a node sends new flows only to its own tasks; the
    /// others' stay backends (draining) for the flows they have.
    #[test]
    fn a_local_service_spreads_new_flows_over_this_nodes_tasks_only() {
        let s = web(two_nodes().traffic("web", Traffic::Local), "n1");
        assert!(s.local);
        assert_eq!(s.backends.len(), 2);
        let table = s.table_backends();
        assert_eq!(table.len(), 1);
        assert!(table[0].local);
        let s2 = web(two_nodes().traffic("web", Traffic::Local), "n2");
        assert_eq!(s2.table_backends()[0].node, "n2");
    }

    #[test]
    fn drained_paused_and_draining_tasks_keep_their_backends_out_of_the_table() {
        let all = web(two_nodes(), "n1");
        assert!(all.draining.is_empty());
        assert_eq!(all.table_backends(), all.backends);
        for s in [
            two_nodes().availability("n2", Availability::Drain),
            two_nodes().availability("n2", Availability::Pause),
            two_nodes().draining(),
        ] {
            let d = web(s, "n1");
            assert_eq!(d.backends, all.backends, "kept for established flows");
            assert_eq!(d.draining, vec![all.backends[1].clone()]);
            assert_eq!(d.table_backends(), vec![all.backends[0].clone()]);
        }
        // A node that is down takes its tasks out altogether.
        let d = web(two_nodes().status("n2", NodeStatus::Down), "n1");
        assert_eq!(d.backends, vec![all.backends[0].clone()]);
        assert!(d.draining.is_empty());
    }
}
