//! A lab of network namespaces on this machine: clients, nodes running
//! meshd, and task hosts behind a bridge on each node (as Docker's
//! docker_gwbridge). Follows ../shared/LAB.md: a guard route first, only
//! 198.18.0.0/15 addresses, no default routes, everything removed when the
//! lab is dropped (also when a test panics).
//!
//! - `topology`: the network, built for any number of nodes, clients and
//!   tasks; its module doc holds the address plan and the names.
//! - `cluster`: a lab of several nodes with task servers, one meshd per
//!   node and requests from a chosen client address to a chosen node.
//! - `Lab` (here): the single-node lab most tests use, one client and one
//!   node, built as a one-node `Cluster`.
//! - `task`: the task servers and their line protocol; `meshd`: the meshd
//!   process, its command line and admin endpoint; `state`: state files;
//!   `shell`: commands, namespaces, the guard routes.
//! - `swarm`: a real Docker swarm (a containerd and a dockerd per node),
//!   in 198.18.0.0/17, apart from the labs above.

pub mod cluster;
pub mod meshd;
pub mod shell;
pub mod state;
pub mod swarm;
pub mod task;
pub mod topology;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use anyhow::Result;

pub use cluster::Cluster;
pub use meshd::{
    ADMIN, HEALTH_PORT, Meshd, MeshdRun, attached_programs, http_get, http_status, intercept,
    intercept_override, maps_of, meshd_path, parse_metric, tc_mode, uplink_programs,
};
pub use shell::{
    answers_again_within_two_units, exec, guard_routes, in_netns, ip, mount_bpffs, retry, sh,
    slot_namespaces, umount,
};
pub use state::{StateFile, WEB_TCP, WEB_UDP};
pub use task::{Conn, TCP_TARGET, TaskServer, UDP_TARGET};
pub use topology::{Topology, TopologyBuilder};

/// One client, one node ("n1", uplink `up0`, task bridge `br0`, task
/// ports `vt<i>`) and its task hosts.
pub struct Lab {
    pub slot: u32,
    pub node_ns: String,
    pub client_ns: String,
    pub task_ns: Vec<String>,
    pub node_addr: Ipv4Addr,
    pub client_addr: Ipv4Addr,
    pub dir: PathBuf,
    /// RUST_LOG for meshd.
    pub meshd_log: String,
    /// Environment variables (NAME=VALUE) for the meshd started next.
    pub meshd_env: Vec<String>,
    cluster: Cluster,
}

/// The lab's one node.
const NODE: usize = 1;

impl Lab {
    /// Brings up a client, a node and `tasks` task hosts (not yet serving;
    /// see `start_task`). The node's FORWARD policy is DROP, as on a Docker
    /// host, with bridged frames going through iptables.
    pub fn new(tasks: usize) -> Result<Lab> {
        Self::create(Topology::builder().node(tasks).client(1))
    }

    /// As `new`, with a router between the client and the node whose link
    /// towards the client has MTU `mtu` (the client's own link stays at
    /// 1500, so it advertises a large MSS): replies larger than `mtu` make
    /// the router send "fragmentation needed" to the node address.
    pub fn new_routed(tasks: usize, mtu: u32) -> Result<Lab> {
        Self::create(Topology::builder().node(tasks).routed_client(1, mtu))
    }

    fn create(spec: TopologyBuilder) -> Result<Lab> {
        let cluster = Cluster::build(spec)?;
        let (topo, node) = (&cluster.topo, cluster.node(NODE));
        Ok(Lab {
            slot: topo.slot,
            node_ns: node.ns.clone(),
            client_ns: topo.clients[0].ns.clone(),
            task_ns: node.tasks.iter().map(|t| t.ns.clone()).collect(),
            node_addr: node.addr,
            client_addr: topo.clients[0].addrs[0],
            dir: topo.dir.clone(),
            meshd_log: "info".into(),
            meshd_env: Vec::new(),
            cluster,
        })
    }

    /// The lab as a one-node cluster, for what `Lab` does not wrap.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Adds one more task host behind the node's bridge; returns its index.
    pub fn add_task_host(&mut self) -> Result<usize> {
        let i = self.cluster.add_task_host(NODE)?;
        self.task_ns.push(self.cluster.task(NODE, i).ns.clone());
        Ok(i)
    }

    /// Address of task host `i` (1-based), whether or not it exists yet.
    pub fn task_addr(&self, i: usize) -> Ipv4Addr {
        self.cluster.node(NODE).task_addr(i)
    }

    /// Starts the TCP (8080) and UDP (5353) servers on task host `i`; each
    /// answers with its name, "task<i>".
    pub fn start_task(&mut self, i: usize) -> Result<()> {
        self.cluster.start_task_as(NODE, i, &format!("task{i}"))
    }

    /// A state file with node n1 (this node) and the web service
    /// (tcp 30080 -> 8080, udp 30053 -> 5353) on the given task hosts.
    pub fn state_toml(&self, tasks: &[usize]) -> String {
        let tasks: Vec<(usize, usize)> = tasks.iter().map(|&i| (NODE, i)).collect();
        self.cluster.state(&tasks).render()
    }

    pub fn state_path(&self) -> PathBuf {
        self.cluster.state_path(NODE)
    }

    /// Replaces the state file atomically (meshd never reads half of it).
    pub fn write_state(&self, text: &str) -> Result<()> {
        self.cluster.write_state(NODE, text)
    }

    /// Starts meshd on the node with the current state file and waits
    /// until it reports ready.
    pub fn start_meshd(&mut self, meshd: &Path, extra: &[&str]) -> Result<()> {
        self.cluster.meshd_log = self.meshd_log.clone();
        self.cluster.meshd_env = self.meshd_env.clone();
        self.cluster.start_meshd(NODE, meshd, extra)
    }

    pub fn meshd(&self) -> Result<&Meshd> {
        self.cluster.meshd(NODE)
    }

    /// Kills meshd with SIGKILL (it cleans up nothing) and waits until it
    /// is gone.
    pub fn kill_meshd(&mut self) -> Result<()> {
        self.cluster.kill_meshd(NODE)
    }

    /// The node's BPF filesystem (meshd's --bpffs).
    pub fn bpffs(&self) -> &Path {
        self.cluster.bpffs(NODE)
    }

    /// Stops meshd with SIGTERM and waits for it to exit; returns its status.
    pub fn stop_meshd(&mut self) -> Result<std::process::ExitStatus> {
        self.cluster.stop_meshd(NODE)
    }

    /// GET a path from meshd's admin endpoint.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        self.cluster.admin_get(NODE, path)
    }

    /// Sum of a metric's samples whose label set contains `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> Result<u64> {
        self.cluster.metric(NODE, name, labels)
    }

    /// GET `path` from the node's health port, from the client, as a load
    /// balancer would; the status and the body.
    pub fn health(&self, path: &str) -> Result<(u16, String)> {
        self.cluster.health(NODE, path)
    }

    /// Runs `meshd <args>` (a command other than `run`) in the node's
    /// namespace; its exit code, stdout and stderr.
    pub fn meshd_cmd(&self, meshd: &Path, args: &[&str]) -> Result<(i32, String, String)> {
        self.cluster.meshd_cmd(NODE, meshd, args)
    }

    /// The node's state directory (meshd's --state-dir in the lab).
    pub fn state_dir(&self) -> PathBuf {
        self.cluster.state_dir(NODE)
    }

    /// One TCP request from the client: connect, send a line, read a line.
    pub fn tcp_request(&self, port: u16, line: &str) -> Result<String> {
        self.cluster.tcp_request(self.client_addr, NODE, port, line)
    }

    /// One TCP request from a process of the node itself to its own
    /// address and `port` (a flow that starts on the node).
    pub fn node_tcp_request(&self, port: u16, line: &str) -> Result<String> {
        let to = SocketAddr::from((self.node_addr, port));
        self.cluster.tcp_connect_in(&self.node_ns, to)?.ask(line)
    }

    /// A TCP connection from the client to the node's `port`.
    pub fn tcp_connect(&self, port: u16) -> Result<Conn> {
        self.cluster.tcp_connect(self.client_addr, NODE, port)
    }

    /// One UDP request from the client; returns the answer and the address
    /// it came from.
    pub fn udp_request(&self, port: u16, msg: &str) -> Result<(String, SocketAddr)> {
        self.cluster.udp_request(self.client_addr, NODE, port, msg)
    }

    /// A UDP socket in the client namespace (each is its own flow for as
    /// long as it is kept).
    pub fn udp_socket(&self) -> Result<UdpSocket> {
        self.cluster.udp_socket(self.client_addr)
    }

    /// A UDP socket in the client namespace connected to the node's `port`
    /// (so ICMP errors about its flow surface as errors on it).
    pub fn udp_connected(&self, port: u16) -> Result<UdpSocket> {
        self.cluster.udp_connected(self.client_addr, NODE, port)
    }

    /// One UDP request on `sock`.
    pub fn udp_ask(&self, sock: &UdpSocket, port: u16, msg: &str) -> Result<(String, SocketAddr)> {
        self.cluster.udp_ask(sock, NODE, port, msg)
    }
}
