//! What the maps should hold, computed from a validated [`State`] for one
//! node. Pure: no kernel involved, so it is unit-tested on the host.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use crate::state::{Proto, State, Task};

/// A backend: a task's address and the target port of one published port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Index of the task's node in the state's node list.
    pub node_id: u32,
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

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Desired {
    /// Addresses this node answers published ports on.
    pub node_addrs: Vec<Ipv4Addr>,
    pub services: BTreeMap<(Proto, u16), DesiredService>,
}

impl Desired {
    /// `node` must be a node of `state` (checked by the caller).
    pub fn compute(state: &State, node: &str, extra_addrs: &[Ipv4Addr]) -> Desired {
        let mut node_addrs: Vec<Ipv4Addr> = state.node(node).map(|n| n.addr).into_iter().collect();
        for a in extra_addrs {
            if !node_addrs.contains(a) {
                node_addrs.push(*a);
            }
        }
        // Indexes first: linear in the state's size, not services x tasks.
        let node_index: HashMap<&str, u32> = state
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i as u32))
            .collect();
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
                        node_id: node_index.get(t.node.as_str()).copied().unwrap_or(0),
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
        Desired {
            node_addrs,
            services,
        }
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
