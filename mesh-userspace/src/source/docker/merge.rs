//! One node's [`State`] from what its own dockerd says (the ingress
//! table, its own tasks' delivery addresses) and what managers know (the
//! [`SwarmView`]). The same function on managers (their view is their own
//! read) and workers (their view comes from a manager), so that every node
//! builds its tables from the same kind of input. Pure, unit-tested.
//!
//! - Membership and addresses come from the ingress table: a service is
//!   served when it is there, with the (target, published) pairs it lists;
//!   a task is a backend when it is listed there, at its ingress address,
//!   on the node whose address its entry names.
//! - The view adds what the table lacks: each pair's protocol(s); each
//!   node's availability (paused, drained: its tasks get no new flows) and
//!   status (down: its tasks leave); which tasks are shutting down (no new
//!   flows).
//! - Without a view, or with one no manager vouches for now (every manager
//!   lost), the node keeps following its own dockerd: availability and
//!   shutting-down tasks as the last view said (they only hold flows back),
//!   nodes taken as up (a stale "down" would keep a node out for good),
//!   and a port the view does not know is taken as TCP, Docker's default,
//!   unless another service publishes the same number (then it waits).
//! - Odd input is skipped and named (a task on a node the live view does
//!   not list, a local task without a delivery address); the rest applies.
//!   A result that does not validate is refused whole.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::view::{IngressTable, LocalTasks, SwarmView};
use crate::model::{
    Availability, Cidr4, Invalid, Node, NodeStatus, Port, Proto, Service, State, Task, Traffic,
    check_affinity_timeout, parse_affinity,
};

/// The node meshd runs on, as its dockerd says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Me {
    /// Its swarm address (`Swarm.NodeAddr`).
    pub addr: Ipv4Addr,
}

/// A view and whether a manager vouches for it now.
#[derive(Clone, Copy, Debug)]
pub struct Known<'a> {
    pub view: &'a SwarmView,
    /// From a manager's read that succeeded just now (a manager's own, or
    /// a stream a worker follows); false: the last one before managers
    /// were lost.
    pub live: bool,
}

/// A node's name in the state: its address (unique, known to every node
/// from the ingress table alone, stable whether or not a view is there).
pub fn node_name(a: Ipv4Addr) -> String {
    a.to_string()
}

/// The state for node `me`, and what was skipped (with why).
/// A service's mesh labels, checked.
#[derive(Debug, Default)]
struct Policy {
    traffic: Traffic,
    source_ranges: Vec<Cidr4>,
    affinity: Option<u32>,
}

/// A service's mesh labels, checked.
fn read_policy(p: &super::view::ViewPolicy) -> Result<Policy, String> {
    use super::view::{LABEL_AFFINITY, LABEL_AFFINITY_TIMEOUT, LABEL_SOURCE_RANGES, LABEL_TRAFFIC};
    let traffic = match &p.traffic {
        None => Traffic::Cluster,
        Some(t) => Traffic::parse(t.trim()).ok_or_else(|| {
            format!("label {LABEL_TRAFFIC}={t:?} is not \"cluster\" or \"local\"")
        })?,
    };
    let mut ranges = Vec::new();
    if let Some(r) = &p.source_ranges {
        for c in r.split([',', ' ']).filter(|c| !c.is_empty()) {
            ranges.push(Cidr4::parse(c).map_err(|e| format!("label {LABEL_SOURCE_RANGES}: {e}"))?);
        }
        if ranges.is_empty() {
            return Err(format!(
                "label {LABEL_SOURCE_RANGES} is empty (it would refuse every client; remove it to \
                 allow every source)"
            ));
        }
        ranges.sort();
        ranges.dedup();
    }
    let client = match &p.affinity {
        None => false,
        Some(a) => parse_affinity(a.trim()).map_err(|e| format!("label {LABEL_AFFINITY}: {e}"))?,
    };
    let affinity = match (&p.affinity_timeout, client) {
        (None, false) => None,
        (Some(_), false) => {
            return Err(format!(
                "label {LABEL_AFFINITY_TIMEOUT} is set without {LABEL_AFFINITY}=client"
            ));
        }
        (None, true) => Some(mesh_common::abi::DEFAULT_AFFINITY_TIMEOUT_SECS),
        (Some(t), true) => Some(
            t.trim()
                .parse::<i64>()
                .map_err(|_| format!("{t:?} is not a number of seconds"))
                .and_then(check_affinity_timeout)
                .map_err(|e| format!("label {LABEL_AFFINITY_TIMEOUT}: {e}"))?,
        ),
    };
    Ok(Policy {
        traffic,
        source_ranges: ranges,
        affinity,
    })
}

pub fn merge(
    me: &Me,
    table: &IngressTable,
    known: Option<Known>,
    local: &LocalTasks,
) -> Result<(State, Vec<String>), Invalid> {
    let mut skipped = Vec::new();
    let live = known.filter(|k| k.live).map(|k| k.view);
    let view = known.map(|k| k.view);

    // Nodes: the live view's list, or (without one) every node the table
    // names; this node always.
    let mut addrs: BTreeSet<Ipv4Addr> = BTreeSet::new();
    match live {
        Some(v) => addrs.extend(v.nodes.iter().map(|n| n.addr)),
        None => {
            addrs.extend(&table.nodes);
            addrs.extend(
                table
                    .services
                    .iter()
                    .flat_map(|s| s.tasks.iter().map(|t| t.node)),
            );
        }
    }
    addrs.insert(me.addr);
    let nodes: Vec<Node> = addrs
        .iter()
        .map(|&addr| {
            let vn = view.and_then(|v| v.nodes.iter().find(|n| n.addr == addr));
            let availability = match vn.map(|n| n.availability.as_str()) {
                Some("pause") => Availability::Pause,
                Some("drain") => Availability::Drain,
                _ => Availability::Active,
            };
            let status = match (live.is_some(), vn.map(|n| n.state.as_str())) {
                (true, Some("down" | "disconnected")) => NodeStatus::Down,
                _ => NodeStatus::Ready,
            };
            Node {
                name: node_name(addr),
                addr,
                availability,
                status,
            }
        })
        .collect();

    // How many services publish each number, for ports of unknown protocol.
    let mut publishers: BTreeMap<u16, BTreeSet<&str>> = BTreeMap::new();
    for s in &table.services {
        for &(_, published) in &s.ports {
            publishers.entry(published).or_default().insert(&s.name);
        }
    }

    let mut services = Vec::new();
    let mut tasks = Vec::new();
    for s in &table.services {
        let mut ports = Vec::new();
        for &(target, published) in &s.ports {
            let protos: Vec<Proto> = view
                .and_then(|v| v.services.get(&s.name))
                .map(|vp| {
                    vp.iter()
                        .filter(|p| p.target == target && p.published == published)
                        .filter_map(|p| Proto::parse(&p.protocol))
                        .collect()
                })
                .unwrap_or_default();
            if !protos.is_empty() {
                ports.extend(protos.into_iter().map(|protocol| Port {
                    protocol,
                    published,
                    target,
                }));
            } else if publishers[&published].len() > 1 {
                skipped.push(format!(
                    "service {}: port {published}->{target}: its protocol is not known yet (no manager has said) \
                     and another service publishes {published} too: left out until a manager says",
                    s.name
                ));
            } else {
                if view.is_some() {
                    skipped.push(format!(
                        "service {}: port {published}->{target}: not in the managers' view yet; taken as tcp",
                        s.name
                    ));
                }
                ports.push(Port {
                    protocol: Proto::Tcp,
                    published,
                    target,
                });
            }
        }
        if ports.is_empty() {
            continue;
        }
        for t in &s.tasks {
            if !addrs.contains(&t.node) {
                skipped.push(format!(
                    "service {}: task {}: on node {}, which the managers do not list",
                    s.name, t.id, t.node
                ));
                continue;
            }
            let local_addr = if t.node == me.addr {
                match local.get(&t.id) {
                    Some(a) => Some(*a),
                    None => {
                        skipped.push(format!(
                            "service {}: task {} runs here but has no docker_gwbridge address (yet)",
                            s.name, t.id
                        ));
                        continue;
                    }
                }
            } else {
                None
            };
            tasks.push(Task {
                service: s.name.clone(),
                node: node_name(t.node),
                addr: t.addr,
                local_addr,
                draining: view.is_some_and(|v| v.draining.contains(&t.id)),
            });
        }
        let policy = view.and_then(|v| v.policies.get(&s.name));
        let policy = match policy.map(read_policy).transpose() {
            Ok(p) => p.unwrap_or_default(),
            Err(why) => {
                // An allow list that cannot be read is not ignored (that
                // would serve everyone): the service is not served. Nor
                // is any other label that cannot be read: a service
                // served otherwise than it asks would look served as
                // asked.
                skipped.push(format!("service {}: {why}: not served", s.name));
                tasks.retain(|t: &Task| t.service != s.name);
                continue;
            }
        };
        services.push(Service {
            name: s.name.clone(),
            ports,
            // The service's label, else the node's --reply-mode.
            reply: view.and_then(|v| v.reply.get(&s.name).copied()),
            traffic: policy.traffic,
            source_ranges: policy.source_ranges,
            affinity: policy.affinity,
        });
    }
    let state = State {
        nodes,
        services,
        tasks,
        local_node: Some(node_name(me.addr)),
    };
    state.validate()?;
    Ok((state, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::docker::view::{IngressService, IngressTask, ViewNode, ViewPort};

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const N1: &str = "198.18.0.11";
    const N2: &str = "198.18.0.12";
    const N3: &str = "198.18.0.13";

    fn task(id: &str, addr: &str, node: &str) -> IngressTask {
        IngressTask {
            id: id.into(),
            addr: a(addr),
            node: a(node),
        }
    }

    /// web (8080 <- 30080) with tasks on n1 and n2; dns (5353 <- 30053)
    /// with a task on n3; as a worker's dockerd lists them.
    fn table() -> IngressTable {
        IngressTable {
            services: vec![
                IngressService {
                    name: "dns".into(),
                    ports: vec![(5353, 30053)],
                    tasks: vec![task("d1", "198.19.0.9", N3)],
                },
                IngressService {
                    name: "web".into(),
                    ports: vec![(8080, 30080)],
                    tasks: vec![task("w1", "198.19.0.6", N1), task("w2", "198.19.0.7", N2)],
                },
            ],
            nodes: [a(N1), a(N2), a(N3)].into(),
        }
    }

    fn view() -> SwarmView {
        let node = |id: &str, addr: &str, state: &str, availability: &str| ViewNode {
            id: id.into(),
            hostname: format!("host-{id}"),
            addr: a(addr),
            state: state.into(),
            availability: availability.into(),
        };
        let port = |protocol: &str, published, target| ViewPort {
            protocol: protocol.into(),
            published,
            target,
        };
        SwarmView {
            services: [
                ("web".to_string(), vec![port("tcp", 30080, 8080)]),
                (
                    "dns".to_string(),
                    vec![port("tcp", 30053, 5353), port("udp", 30053, 5353)],
                ),
            ]
            .into(),
            nodes: vec![
                node("i1", N1, "ready", "active"),
                node("i2", N2, "ready", "active"),
                node("i3", N3, "ready", "active"),
            ],
            draining: BTreeSet::new(),
            reply: [("dns".to_string(), crate::model::ReplyMode::Direct)].into(),
            policies: BTreeMap::new(),
        }
    }

    /// Labels ask for a traffic mode and an allow list; a label that cannot
    /// be read leaves its service out (never served to everyone instead).
    #[test]
    fn labels_set_traffic_and_source_ranges_and_a_bad_one_is_not_ignored() {
        use crate::source::docker::view::ViewPolicy;
        let (me, local) = me();
        let mut v = view();
        v.policies.insert(
            "web".into(),
            ViewPolicy {
                traffic: Some("local".into()),
                source_ranges: Some("198.18.0.0/16, 198.19.1.0/24".into()),
                ..Default::default()
            },
        );
        let known = Known {
            view: &v,
            live: true,
        };
        let (s, skipped) = merge(&me, &table(), Some(known), &local).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let web = s.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.traffic, Traffic::Local);
        assert_eq!(
            web.source_ranges,
            vec![
                Cidr4::parse("198.18.0.0/16").unwrap(),
                Cidr4::parse("198.19.1.0/24").unwrap()
            ]
        );
        v.policies.get_mut("web").unwrap().source_ranges = Some("198.18.0.1/16".into());
        let known = Known {
            view: &v,
            live: true,
        };
        let (s, skipped) = merge(&me, &table(), Some(known), &local).unwrap();
        assert!(s.services.iter().all(|s| s.name != "web"));
        assert!(s.tasks.iter().all(|t| t.service != "web"));
        assert!(
            skipped
                .iter()
                .any(|m| m.contains("service web: label mesh.source-ranges")
                    && m.contains("host bits")
                    && m.contains("not served")),
            "{skipped:?}"
        );
    }

    /// mesh.affinity=client (with mesh.affinity-timeout) asks for client
    /// affinity; a value that cannot be read, or a timeout without the
    /// affinity, leaves the service out, as any label that cannot be read.
    #[test]
    fn labels_set_affinity_and_a_bad_one_is_not_ignored() {
        use crate::source::docker::view::ViewPolicy;
        let (me, local) = me();
        let run = |p: ViewPolicy| {
            let mut v = view();
            v.policies.insert("web".into(), p);
            let known = Known {
                view: &v,
                live: true,
            };
            merge(&me, &table(), Some(known), &local).unwrap()
        };
        let policy = |a: Option<&str>, t: Option<&str>| ViewPolicy {
            affinity: a.map(Into::into),
            affinity_timeout: t.map(Into::into),
            ..Default::default()
        };
        let web = |s: &State| s.services.iter().find(|s| s.name == "web").cloned();
        let (s, skipped) = run(policy(Some("client"), None));
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(web(&s).unwrap().affinity, Some(10_800));
        let (s, _) = run(policy(Some("client"), Some(" 600 ")));
        assert_eq!(web(&s).unwrap().affinity, Some(600));
        let (s, _) = run(policy(Some("none"), None));
        assert_eq!(web(&s).unwrap().affinity, None);
        for (p, why) in [
            (
                policy(Some("sticky"), None),
                "label mesh.affinity: \"sticky\"",
            ),
            (
                policy(Some("client"), Some("3h")),
                "label mesh.affinity-timeout: \"3h\"",
            ),
            (
                policy(Some("client"), Some("0")),
                "label mesh.affinity-timeout: 0",
            ),
            (
                policy(None, Some("60")),
                "mesh.affinity-timeout is set without",
            ),
        ] {
            let (s, skipped) = run(p);
            assert!(web(&s).is_none() && s.tasks.iter().all(|t| t.service != "web"));
            assert!(
                skipped.iter().any(|m| m.contains("service web: ")
                    && m.contains(why)
                    && m.contains("not served")),
                "{why}: {skipped:?}"
            );
        }
    }

    /// n2 is this node; its task w2 is delivered at its gwbridge address.
    fn me() -> (Me, LocalTasks) {
        (
            Me { addr: a(N2) },
            [("w2".to_string(), a("198.18.22.3"))].into(),
        )
    }

    fn ports(s: &State, name: &str) -> Vec<(Proto, u16, u16)> {
        s.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| {
                s.ports
                    .iter()
                    .map(|p| (p.protocol, p.published, p.target))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn task_of<'s>(s: &'s State, addr: &str) -> &'s Task {
        s.tasks.iter().find(|t| t.addr == a(addr)).unwrap()
    }

    #[test]
    fn membership_from_the_table_protocols_from_the_view() {
        let (me, local) = me();
        let v = view();
        let known = Known {
            view: &v,
            live: true,
        };
        let (s, skipped) = merge(&me, &table(), Some(known), &local).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(s.local_node.as_deref(), Some(N2));
        assert_eq!(
            ports(&s, "dns"),
            [(Proto::Tcp, 30053, 5353), (Proto::Udp, 30053, 5353)]
        );
        assert_eq!(ports(&s, "web"), [(Proto::Tcp, 30080, 8080)]);
        // The reply mode a service's label chose; the node's otherwise.
        let reply = |n: &str| s.services.iter().find(|x| x.name == n).unwrap().reply;
        assert_eq!(
            (reply("dns"), reply("web")),
            (Some(crate::model::ReplyMode::Direct), None)
        );
        assert_eq!(s.tasks.len(), 3);
        // Its own task is delivered at its gwbridge address; others at
        // nothing this node knows.
        let w2 = task_of(&s, "198.19.0.7");
        assert_eq!(
            (w2.node.as_str(), w2.local_addr),
            (N2, Some(a("198.18.22.3")))
        );
        assert_eq!(task_of(&s, "198.19.0.6").local_addr, None);
        // A task the view does not know yet is served all the same: the
        // table is what Docker's own mesh follows.
        let mut t = table();
        t.services[1].tasks.push(task("w3", "198.19.0.8", N3));
        let (s, _) = merge(&me, &t, Some(known), &local).unwrap();
        assert_eq!(s.tasks.len(), 4);
    }

    #[test]
    fn drain_down_and_shutting_down_come_from_the_view() {
        let (me, local) = me();
        let mut v = view();
        v.nodes[0].availability = "drain".into();
        v.nodes[2].state = "down".into();
        v.draining.insert("w2".into());
        let (s, _) = merge(
            &me,
            &table(),
            Some(Known {
                view: &v,
                live: true,
            }),
            &local,
        )
        .unwrap();
        let node = |n: &str| s.node(n).unwrap();
        assert_eq!(node(N1).availability, Availability::Drain);
        assert_eq!(node(N3).status, NodeStatus::Down);
        assert!(task_of(&s, "198.19.0.7").draining);
        assert!(!task_of(&s, "198.19.0.6").draining);

        // The managers lost: drain and shutting down as last said, but a
        // node is not kept down on old word.
        let (s, _) = merge(
            &me,
            &table(),
            Some(Known {
                view: &v,
                live: false,
            }),
            &local,
        )
        .unwrap();
        assert_eq!(s.node(N1).unwrap().availability, Availability::Drain);
        assert_eq!(s.node(N3).unwrap().status, NodeStatus::Ready);
        assert!(task_of(&s, "198.19.0.7").draining);
    }

    #[test]
    fn without_a_view_ports_are_tcp_unless_the_number_is_shared() {
        let (me, local) = me();
        let (s, skipped) = merge(&me, &table(), None, &local).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(ports(&s, "dns"), [(Proto::Tcp, 30053, 5353)]);
        assert_eq!(s.nodes.len(), 3);
        // A UDP service on 30080 beside web's TCP: no one can tell which is
        // which without a manager; both wait rather than guess.
        let mut t = table();
        t.services.push(IngressService {
            name: "syslog".into(),
            ports: vec![(514, 30080)],
            tasks: vec![task("s1", "198.19.0.20", N1)],
        });
        let (s, skipped) = merge(&me, &t, None, &local).unwrap();
        assert_eq!(ports(&s, "web"), []);
        assert_eq!(ports(&s, "syslog"), []);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("another service publishes 30080"));
        // With the view, each gets its protocol.
        let mut v = view();
        v.services.insert(
            "syslog".into(),
            vec![ViewPort {
                protocol: "udp".into(),
                published: 30080,
                target: 514,
            }],
        );
        let (s, _) = merge(
            &me,
            &t,
            Some(Known {
                view: &v,
                live: false,
            }),
            &local,
        )
        .unwrap();
        assert_eq!(ports(&s, "web"), [(Proto::Tcp, 30080, 8080)]);
        assert_eq!(ports(&s, "syslog"), [(Proto::Udp, 30080, 514)]);
    }

    #[test]
    fn odd_entries_are_skipped_by_name_and_the_rest_applies() {
        let (me, _) = me();
        let v = view();
        let mut t = table();
        // A task on a node the managers do not list.
        t.services[0]
            .tasks
            .push(task("d9", "198.19.0.30", "198.18.0.99"));
        // This node's own task without a gwbridge address.
        let (s, skipped) = merge(
            &me,
            &t,
            Some(Known {
                view: &v,
                live: true,
            }),
            &LocalTasks::new(),
        )
        .unwrap();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("d9") && s.contains("198.18.0.99"))
        );
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("w2") && s.contains("docker_gwbridge"))
        );
        assert_eq!(s.tasks.len(), 2);
    }

    #[test]
    fn a_table_that_does_not_validate_is_refused_whole() {
        let (me, local) = me();
        let mut t = table();
        // Two tasks at one ingress address: a table caught mid-change.
        t.services[0].tasks.push(task("d2", "198.19.0.6", N3));
        let e = merge(&me, &t, None, &local).unwrap_err();
        assert!(
            e.to_string().contains("198.19.0.6 is already the address"),
            "{e}"
        );
    }
}
