//! What the maps should hold, computed from a validated [`State`] for one
//! node. Pure: no kernel involved, so it is unit-tested on the host.
//!
//! Nodes and backends are named by what identifies them in the swarm (a
//! node's name; a task's address and target port), never by a position in
//! the state: the planner gives them map slots that stay put while they
//! exist, whatever else comes and goes.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use anyhow::{Result, bail};

use crate::model::{Proto, State, Task};

/// A backend: a task's address and the target port of one published port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The node the task runs on (its name).
    pub node: String,
    /// The task runs on this node.
    pub local: bool,
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
    /// Sorted.
    pub backends: Vec<BackendKey>,
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
}

impl Desired {
    /// What node `node` should hold for `state`; `extra_addrs` are more
    /// addresses it answers on. Refused when `node` is not in the state.
    pub fn compute(state: &State, node: &str, extra_addrs: &[Ipv4Addr]) -> Result<Desired> {
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
            tasks_of.entry(t.service.as_str()).or_default().push(t);
        }
        let mut services = BTreeMap::new();
        for s in &state.services {
            let tasks = tasks_of
                .get(s.name.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            for p in &s.ports {
                let mut backends: Vec<BackendKey> = tasks
                    .iter()
                    .map(|t| BackendKey {
                        addr: t.addr,
                        port: p.target,
                        node: t.node.clone(),
                        local: t.node == node,
                    })
                    .collect();
                backends.sort();
                services.insert(
                    (p.protocol, p.published),
                    DesiredService {
                        name: s.name.clone(),
                        target: p.target,
                        backends,
                    },
                );
            }
        }
        Ok(Desired {
            node_addrs,
            nodes,
            services,
            task_ports: BTreeMap::new(),
        })
    }

    /// Addresses of tasks on this node (to find the interfaces they sit behind).
    pub fn local_task_addrs(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self
            .services
            .values()
            .flat_map(|s| s.backends.iter().filter(|b| b.local).map(|b| b.addr))
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
}
