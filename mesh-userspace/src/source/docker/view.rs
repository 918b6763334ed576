//! What the Engine API says, reduced to what the mesh needs, in two parts
//! that come from different places:
//!
//! - [`IngressTable`]: the ingress network's service table, which every
//!   node's own dockerd holds through Docker's gossip (`GET
//!   /networks/ingress?verbose=true`): each ingress-published service, its
//!   (target, published) port pairs without protocol, each of its tasks
//!   with its ingress address and its node's address. Membership and
//!   addresses come from here, on every node.
//! - [`SwarmView`]: what only managers can read (`/services`, `/nodes`,
//!   `/tasks`): each port's protocol, each node's status and availability,
//!   which tasks are shutting down. Managers read it; workers follow it
//!   from meshd on a manager (see [`super::peer`]).
//!
//! Plus, per node, [`LocalTasks`]: where this node delivers each of its own
//! tasks (the docker_gwbridge address, which only this node's dockerd
//! knows). Everything here is pure: built from the API's types, so it is
//! tested on captured API output.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use bollard::models::{ContainerSummary, NetworkInspect, Node, Service, Task};
use serde::{Deserialize, Serialize};

/// The container label that names a container's swarm task.
pub const TASK_LABEL: &str = "com.docker.swarm.task.id";

/// The ingress network's service table, as one node's dockerd holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressTable {
    pub services: Vec<IngressService>,
    /// Addresses of the nodes in the ingress network (their ingress
    /// endpoints and the overlay's peers).
    pub nodes: BTreeSet<Ipv4Addr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressService {
    pub name: String,
    /// (target, published) pairs, in the table's order, each once.
    pub ports: Vec<(u16, u16)>,
    pub tasks: Vec<IngressTask>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressTask {
    /// The swarm task id (the last part of the endpoint's name).
    pub id: String,
    /// Its address in the ingress network.
    pub addr: Ipv4Addr,
    /// Its node's address.
    pub node: Ipv4Addr,
}

/// What managers know that the ingress table does not say. Sent as JSON
/// from managers to workers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmView {
    /// Services with ingress-published ports, by name.
    pub services: BTreeMap<String, Vec<ViewPort>>,
    pub nodes: Vec<ViewNode>,
    /// Tasks that still run although their desired state is no longer
    /// running (shutting down, being removed), by id.
    pub draining: BTreeSet<String>,
    /// Services whose label `mesh.reply` chooses how replies of flows
    /// forwarded to other nodes go back ("direct" or "via-ingress").
    #[serde(default)]
    pub reply: BTreeMap<String, crate::model::ReplyMode>,
    /// What services' labels ask of the mesh, by service name (services
    /// without such labels are left out). Absent in what a manager of an
    /// older meshd sends: then every service is served as by default.
    #[serde(default)]
    pub policies: BTreeMap<String, ViewPolicy>,
}

/// The label that sets a service's traffic mode: `cluster` or `local`.
pub const LABEL_TRAFFIC: &str = "mesh.traffic";
/// The label that sets a service's source-range allow list: CIDRs,
/// separated by commas or spaces.
pub const LABEL_SOURCE_RANGES: &str = "mesh.source-ranges";
/// The label that sets a service's affinity: `client` or `none`.
pub const LABEL_AFFINITY: &str = "mesh.affinity";
/// The label that sets a service's affinity timeout, in seconds.
pub const LABEL_AFFINITY_TIMEOUT: &str = "mesh.affinity-timeout";

/// A service's mesh labels, as given (checked when the state is built).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewPolicy {
    pub traffic: Option<String>,
    pub source_ranges: Option<String>,
    /// Absent in what a manager of an older meshd sends.
    #[serde(default)]
    pub affinity: Option<String>,
    #[serde(default)]
    pub affinity_timeout: Option<String>,
}

/// The service label that chooses a service's reply mode.
pub const REPLY_LABEL: &str = "mesh.reply";

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ViewPort {
    /// "tcp" or "udp".
    pub protocol: String,
    pub published: u16,
    pub target: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewNode {
    pub id: String,
    pub hostname: String,
    pub addr: Ipv4Addr,
    /// Docker's node state: "ready", "down", "disconnected", "unknown".
    pub state: String,
    /// "active", "pause", "drain".
    pub availability: String,
}

/// Where this node delivers each of its own tasks: task id -> its
/// docker_gwbridge address.
pub type LocalTasks = HashMap<String, Ipv4Addr>;

/// An address in CIDR form ("198.19.0.6/24") or bare.
fn parse_addr(s: &str) -> Option<Ipv4Addr> {
    s.split('/').next()?.parse().ok()
}

/// A port as the API gives it (an i64), if it is one.
fn port(v: Option<i64>) -> Option<u16> {
    v.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0)
}

impl SwarmView {
    /// The view from one read of `/services`, `/nodes` and `/tasks`, and
    /// what was skipped as odd. Refused (with why) when the reads do not
    /// fit together: a task that should run for a service the same read
    /// did not return.
    pub fn from_api(
        services: &[Service],
        nodes: &[Node],
        tasks: &[Task],
    ) -> Result<(SwarmView, Vec<String>), String> {
        let mut view = SwarmView::default();
        let mut skipped = Vec::new();
        let mut service_ids = HashSet::new();
        for s in services {
            let id = s.id.clone().unwrap_or_default();
            service_ids.insert(id.clone());
            let name = s.spec.as_ref().and_then(|sp| sp.name.clone());
            let ports = s.endpoint.as_ref().and_then(|e| e.ports.as_ref());
            let (Some(name), Some(ports)) = (name, ports) else {
                continue;
            };
            let label = s
                .spec
                .as_ref()
                .and_then(|sp| sp.labels.as_ref())
                .and_then(|l| l.get(REPLY_LABEL));
            if let Some(v) = label {
                match crate::model::ReplyMode::parse(v) {
                    Some(m) => {
                        view.reply.insert(name.clone(), m);
                    }
                    None => skipped.push(format!(
                        "service {name}: label {REPLY_LABEL}={v:?}: not \"direct\" or \"via-ingress\" (the node's --reply-mode applies)"
                    )),
                }
            }
            let mut mine = Vec::new();
            for p in ports {
                // Host-mode ports are the task's own business.
                let mode = p.publish_mode.map(|m| m.to_string()).unwrap_or_default();
                if !(mode.is_empty() || mode == "ingress") {
                    continue;
                }
                let proto = p
                    .protocol
                    .map(|m| m.to_string())
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "tcp".into());
                let (Some(published), Some(target)) = (port(p.published_port), port(p.target_port))
                else {
                    let shown = |v: Option<i64>| v.map_or("none".to_string(), |v| v.to_string());
                    skipped.push(format!(
                        "service {name}: port {}->{}/{proto}: not a port (1-65535)",
                        shown(p.published_port),
                        shown(p.target_port)
                    ));
                    continue;
                };
                if proto != "tcp" && proto != "udp" {
                    skipped.push(format!(
                        "service {name}: port {published}/{proto}: only tcp and udp are served"
                    ));
                    continue;
                }
                mine.push(ViewPort {
                    protocol: proto,
                    published,
                    target,
                });
            }
            if !mine.is_empty() {
                mine.sort();
                mine.dedup();
                let labels = s.spec.as_ref().and_then(|sp| sp.labels.as_ref());
                let label = |k: &str| labels.and_then(|l| l.get(k)).cloned();
                let policy = ViewPolicy {
                    traffic: label(LABEL_TRAFFIC),
                    source_ranges: label(LABEL_SOURCE_RANGES),
                    affinity: label(LABEL_AFFINITY),
                    affinity_timeout: label(LABEL_AFFINITY_TIMEOUT),
                };
                if policy != ViewPolicy::default() {
                    view.policies.insert(name.clone(), policy);
                }
                view.services.insert(name, mine);
            }
        }
        for n in nodes {
            let id = n.id.clone().unwrap_or_default();
            let hostname = n
                .description
                .as_ref()
                .and_then(|d| d.hostname.clone())
                .unwrap_or_default();
            let status = n.status.as_ref();
            let addr = status.and_then(|s| s.addr.as_deref()).and_then(parse_addr);
            let Some(addr) = addr.filter(|a| !a.is_unspecified()) else {
                skipped.push(format!(
                    "node {id} ({hostname}): no address ({})",
                    status
                        .and_then(|s| s.addr.clone())
                        .unwrap_or_else(|| "none".into())
                ));
                continue;
            };
            view.nodes.push(ViewNode {
                id,
                hostname,
                addr,
                state: status
                    .and_then(|s| s.state)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                availability: n
                    .spec
                    .as_ref()
                    .and_then(|s| s.availability)
                    .map(|a| a.to_string())
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| "active".into()),
            });
        }
        for t in tasks {
            let state = t.status.as_ref().and_then(|s| s.state);
            if state.map(|s| s.to_string()).as_deref() != Some("running") {
                continue;
            }
            let id = t.id.clone().unwrap_or_default();
            let desired = t.desired_state.map(|s| s.to_string()).unwrap_or_default();
            let service = t.service_id.clone().unwrap_or_default();
            if desired == "running" && !service_ids.contains(&service) {
                return Err(format!(
                    "inconsistent read: task {id} runs for service {service}, which the same read did not return"
                ));
            }
            if desired != "running" {
                view.draining.insert(id);
            }
        }
        Ok((view, skipped))
    }
}

/// "Target: 8080, Publish: 30081" -> (8080, 30081).
fn parse_port_pair(s: &str) -> Option<(u16, u16)> {
    let (t, p) = s.split_once(',')?;
    let target = t.trim().strip_prefix("Target:")?.trim().parse().ok()?;
    let published = p.trim().strip_prefix("Publish:")?.trim().parse().ok()?;
    (target != 0 && published != 0).then_some((target, published))
}

/// The shape of one service in the verbose network inspect (the client
/// crate leaves it untyped).
#[derive(Deserialize, Default)]
struct RawService {
    #[serde(rename = "Ports", default)]
    ports: Option<Vec<String>>,
    #[serde(rename = "Tasks", default)]
    tasks: Option<Vec<RawTask>>,
}

#[derive(Deserialize)]
struct RawTask {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "EndpointIP", default)]
    endpoint_ip: String,
    #[serde(rename = "Info", default)]
    info: Option<HashMap<String, String>>,
}

impl IngressTable {
    /// The table from `GET /networks/ingress?verbose=true`, and what was
    /// skipped as odd.
    pub fn from_api(net: &NetworkInspect) -> (IngressTable, Vec<String>) {
        let mut table = IngressTable::default();
        let mut skipped = Vec::new();
        for p in net.peers.iter().flatten() {
            if let Some(a) = p.ip.as_deref().and_then(parse_addr) {
                table.nodes.insert(a);
            }
        }
        let mut services: Vec<(&String, &serde_json::Value)> =
            net.services.iter().flatten().collect();
        services.sort_by_key(|(name, _)| *name);
        for (name, v) in services {
            let raw: RawService = match serde_json::from_value(v.clone()) {
                Ok(r) => r,
                Err(e) => {
                    skipped.push(format!("service {name:?}: unreadable entry ({e})"));
                    continue;
                }
            };
            let mut svc = IngressService {
                name: name.clone(),
                ..Default::default()
            };
            for t in raw.tasks.iter().flatten() {
                let host = t
                    .info
                    .as_ref()
                    .and_then(|i| i.get("Host IP"))
                    .and_then(|h| parse_addr(h));
                if name.is_empty() {
                    // One "ingress-endpoint" per node in the network.
                    if let Some(h) = host {
                        table.nodes.insert(h);
                    }
                    continue;
                }
                let addr = parse_addr(&t.endpoint_ip);
                let id = t.name.rsplit('.').next().unwrap_or_default().to_string();
                match (addr, host) {
                    (Some(addr), Some(node)) if !id.is_empty() => {
                        svc.tasks.push(IngressTask { id, addr, node })
                    }
                    _ => skipped.push(format!(
                        "service {name}: task {}: no usable address ({} on node {})",
                        t.name,
                        t.endpoint_ip,
                        t.info
                            .as_ref()
                            .and_then(|i| i.get("Host IP"))
                            .map_or("none", |h| h.as_str())
                    )),
                }
            }
            if name.is_empty() {
                continue;
            }
            for p in raw.ports.iter().flatten() {
                match parse_port_pair(p) {
                    Some(pair) if !svc.ports.contains(&pair) => svc.ports.push(pair),
                    Some(_) => {}
                    None => skipped.push(format!("service {name}: port {p:?}: not a port pair")),
                }
            }
            svc.tasks.sort_by(|a, b| a.id.cmp(&b.id));
            table.services.push(svc);
        }
        (table, skipped)
    }
}

/// This node's tasks and their docker_gwbridge addresses, from the local
/// containers that carry a swarm task label and the docker_gwbridge
/// network's endpoints.
pub fn local_tasks(containers: &[ContainerSummary], gwbridge: &NetworkInspect) -> LocalTasks {
    let by_container: HashMap<&str, Ipv4Addr> = gwbridge
        .containers
        .iter()
        .flatten()
        .filter_map(|(id, e)| Some((id.as_str(), parse_addr(e.ipv4_address.as_deref()?)?)))
        .collect();
    containers
        .iter()
        .filter_map(|c| {
            let task = c.labels.as_ref()?.get(TASK_LABEL)?;
            let addr = by_container.get(c.id.as_deref()?)?;
            Some((task.clone(), *addr))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from what this machine's dockerd 20.10 (API 1.41) answered on
    /// a worker of a three-node swarm.
    pub const INGRESS: &str = r#"{"Name":"ingress","Id":"6adq7l7vpamp2r7fo1pj6ep9w","Scope":"swarm","Driver":"overlay","Ingress":true,
      "Containers":{"ingress-sbox":{"Name":"ingress-endpoint","IPv4Address":"198.19.0.3/24"}},
      "Peers":[{"Name":"03c4002981fd","IP":"198.18.0.11"},{"Name":"32728e23f126","IP":"198.18.0.13"},{"Name":"4df83b054b7a","IP":"198.18.0.12"}],
      "Services":{
        "":{"VIP":"<nil>","Ports":[],"LocalLBIndex":0,"Tasks":[
          {"Name":"ingress-endpoint","EndpointID":"b09","EndpointIP":"198.19.0.4","Info":{"Host IP":"198.18.0.13"}},
          {"Name":"ingress-endpoint","EndpointID":"f41","EndpointIP":"198.19.0.3","Info":{"Host IP":"198.18.0.12"}}]},
        "slow":{"VIP":"198.19.0.8","Ports":["Target: 8090, Publish: 30090","Target: 8091, Publish: 30090"],"LocalLBIndex":258,"Tasks":[
          {"Name":"slow.3.qy9t2dc8i05qk8gr99fe7dvm1","EndpointID":"a","EndpointIP":"198.19.0.11","Info":{"Host IP":"198.18.0.11"}},
          {"Name":"slow.2.qa93dados9hxhva4ltplggwak","EndpointID":"b","EndpointIP":"198.19.0.10","Info":{"Host IP":"198.18.0.12"}}]},
        "web":{"VIP":"198.19.0.5","Ports":["Target: 8080, Publish: 30080","Target: 0, Publish: 70000"],"LocalLBIndex":257,"Tasks":[
          {"Name":"web.1.6gdcuwn3bsas7govuy1nwmcuv","EndpointID":"c","EndpointIP":"198.19.0.6","Info":{"Host IP":"198.18.0.11"}},
          {"Name":"web.2.j45po2dqwa7jd368ljt9n2fxx","EndpointID":"d","EndpointIP":"","Info":{"Host IP":"198.18.0.12"}}]}}}"#;

    #[test]
    fn the_ingress_table_gives_ports_tasks_and_nodes_and_names_what_it_skips() {
        let net: NetworkInspect = serde_json::from_str(INGRESS).unwrap();
        let (t, skipped) = IngressTable::from_api(&net);
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            t.nodes,
            [a("198.18.0.11"), a("198.18.0.12"), a("198.18.0.13")].into()
        );
        assert_eq!(t.services.len(), 2);
        let slow = &t.services[0];
        assert_eq!(slow.name, "slow");
        assert_eq!(slow.ports, [(8090, 30090), (8091, 30090)]);
        assert_eq!(
            slow.tasks[0],
            IngressTask {
                id: "qa93dados9hxhva4ltplggwak".into(),
                addr: a("198.19.0.10"),
                node: a("198.18.0.12")
            }
        );
        let web = &t.services[1];
        assert_eq!(web.ports, [(8080, 30080)]);
        assert_eq!(web.tasks.len(), 1);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("web.2.j45po2dqwa7jd368ljt9n2fxx"));
        assert!(skipped[1].contains("Target: 0, Publish: 70000"));
    }

    /// A manager's reads, trimmed from real output (the running task
    /// qy9t2d is being removed by a scale-down).
    pub fn manager_reads() -> (Vec<Service>, Vec<Node>, Vec<Task>) {
        let services = r#"[
          {"ID":"rahft","Spec":{"Name":"web"},"Endpoint":{"Ports":[{"Protocol":"tcp","TargetPort":8080,"PublishedPort":30080,"PublishMode":"ingress"}]}},
          {"ID":"j5ch5","Spec":{"Name":"slow","Labels":{"mesh.reply":"direct"}},"Endpoint":{"Ports":[
             {"Protocol":"tcp","TargetPort":8090,"PublishedPort":30090,"PublishMode":"ingress"},
             {"Protocol":"udp","TargetPort":8091,"PublishedPort":30090,"PublishMode":"ingress"},
             {"Protocol":"tcp","TargetPort":22,"PublishedPort":2222,"PublishMode":"host"},
             {"Protocol":"sctp","TargetPort":9,"PublishedPort":30009,"PublishMode":"ingress"}]}},
          {"ID":"back","Spec":{"Name":"backend"},"Endpoint":{}}]"#;
        let nodes = r#"[
          {"ID":"mppvs","Description":{"Hostname":"swl-node1"},"Spec":{"Role":"manager","Availability":"active"},"Status":{"State":"ready","Addr":"198.18.0.11"}},
          {"ID":"i4usn","Description":{"Hostname":"swl-node2"},"Spec":{"Role":"worker","Availability":"drain"},"Status":{"State":"ready","Addr":"198.18.0.12"}},
          {"ID":"qwik8","Description":{"Hostname":"swl-node3"},"Spec":{"Role":"worker","Availability":"active"},"Status":{"State":"down","Addr":"198.18.0.13"}}]"#;
        let tasks = r#"[
          {"ID":"6gdcuwn3bsas7govuy1nwmcuv","ServiceID":"rahft","NodeID":"mppvs","DesiredState":"running","Status":{"State":"running","ContainerStatus":{"ContainerID":"d5c8"}}},
          {"ID":"qy9t2dc8i05qk8gr99fe7dvm1","ServiceID":"j5ch5","NodeID":"mppvs","DesiredState":"remove","Status":{"State":"running"}},
          {"ID":"dsh6lbv1i4k2dg46agqhskm33","ServiceID":"j5ch5","NodeID":"mppvs","DesiredState":"running","Status":{"State":"ready"}},
          {"ID":"old","ServiceID":"gone","NodeID":"mppvs","DesiredState":"shutdown","Status":{"State":"complete"}},
          {"ID":"bk1","ServiceID":"back","NodeID":"i4usn","DesiredState":"running","Status":{"State":"running"}}]"#;
        (
            serde_json::from_str(services).unwrap(),
            serde_json::from_str(nodes).unwrap(),
            serde_json::from_str(tasks).unwrap(),
        )
    }

    #[test]
    fn a_managers_reads_give_protocols_nodes_and_draining_tasks() {
        let (s, n, t) = manager_reads();
        let (v, skipped) = SwarmView::from_api(&s, &n, &t).unwrap();
        assert_eq!(
            v.services.keys().collect::<Vec<_>>(),
            ["slow", "web"],
            "a service without published ports is not ours"
        );
        assert_eq!(
            v.services["slow"],
            [
                ViewPort {
                    protocol: "tcp".into(),
                    published: 30090,
                    target: 8090
                },
                ViewPort {
                    protocol: "udp".into(),
                    published: 30090,
                    target: 8091
                }
            ],
            "host-mode ports are not ours"
        );
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("30009/sctp"));
        assert_eq!(
            v.reply.get("slow"),
            Some(&crate::model::ReplyMode::Direct),
            "the label chooses the reply mode"
        );
        assert!(!v.reply.contains_key("web"));
        assert_eq!(v.nodes.len(), 3);
        assert_eq!(
            (v.nodes[1].availability.as_str(), v.nodes[2].state.as_str()),
            ("drain", "down")
        );
        assert_eq!(v.draining, ["qy9t2dc8i05qk8gr99fe7dvm1".to_string()].into());
    }

    #[test]
    fn a_task_of_a_service_the_same_read_did_not_return_refuses_the_read() {
        let (mut s, n, t) = manager_reads();
        // The service was created after /services was read, its task
        // before /tasks was.
        s.retain(|s| s.id.as_deref() != Some("rahft"));
        let e = SwarmView::from_api(&s, &n, &t).unwrap_err();
        assert!(
            e.contains("inconsistent read") && e.contains("6gdcuwn3bsas7govuy1nwmcuv"),
            "{e}"
        );
    }

    #[test]
    fn local_tasks_are_found_by_container_label_in_docker_gwbridge() {
        let gw: NetworkInspect = serde_json::from_str(
            r#"{"Name":"docker_gwbridge","Containers":{
              "353723dd":{"Name":"gateway_5eb3b2328619","IPv4Address":"198.18.22.3/24"},
              "ingress-sbox":{"Name":"gateway_ingress-sbox","IPv4Address":"198.18.22.2/24"}}}"#,
        )
        .unwrap();
        let containers: Vec<ContainerSummary> = serde_json::from_str(
            r#"[{"Id":"353723dd","Labels":{"com.docker.swarm.task.id":"j45po2dqwa7jd368ljt9n2fxx"}},
                {"Id":"notattached","Labels":{"com.docker.swarm.task.id":"x"}},
                {"Id":"plain","Labels":{}}]"#,
        )
        .unwrap();
        let l = local_tasks(&containers, &gw);
        assert_eq!(
            l,
            [(
                "j45po2dqwa7jd368ljt9n2fxx".to_string(),
                Ipv4Addr::new(198, 18, 22, 3)
            )]
            .into()
        );
    }
}
