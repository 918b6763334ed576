//! The end-to-end lab: clients (one namespace per address), one node, and
//! backends behind the node's bridge, each serving HTTP (nginx) and
//! iperf3; a second node on the same segment with no task of its own (the
//! forwarding paths' ingress node); and the data paths a client can reach
//! the backends by.
//!
//! The node is set up as dockerd leaves a host (FORWARD policy DROP,
//! bridged frames through iptables), plus stateless FORWARD accepts for
//! the backends' subnet, so that the direct path (routed, no NAT) works.
//! Those rules cost the mesh and HAProxy nothing: the mesh's packets never
//! enter FORWARD, HAProxy's are the node's own.
//!
//! Forwarding (`MeshForward`, `MeshForwardDirect`, `MeshForwardXdp`): the
//! clients send to the second node, whose meshd encapsulates to the first
//! (same state on both). With the intercept at TC (meshd's default) the
//! lab stays as it is: socket buffers keep their offloads (TSO, partial
//! checksums) through encapsulation. With the intercept at XDP
//! (`MeshForwardXdp`) the segment needs more, for that turn only: XDP_TX
//! out of a veth reaches the peer only if the peer has an XDP program
//! (the XDP_PASS program on the segment's end of the second node's
//! uplink), and XDP sees bytes, so the clients and the nodes' uplinks send
//! complete checksums (a partial one would be sent on broken; on a veth
//! that also turns TSO off).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_tests::lab::shell::pass_xdp;
use mesh_tests::lab::state::StateFile;
use mesh_tests::lab::topology::{Client, Node};
use mesh_tests::lab::{Cluster, Topology, exec, ip};

use crate::proc::{self, CpuGroup, Proc};

/// The ports the backends serve on.
pub const HTTP_PORT: u16 = 8080;
pub const PERF_PORT: u16 = 5201;

/// meshd's arguments in the lab: its dataplane goes when it stops (the
/// default keeps it attached, serving, for a restart to adopt), so that
/// no other path's turn runs through a leftover XDP program.
const ON_EXIT: &[&str] = &["--on-exit", "detach"];

/// A way from the clients to the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPath {
    /// meshd on the node, intercepting at TC ingress (`--intercept tc`,
    /// its default), published ports.
    MeshTc,
    /// meshd on the node, intercepting at XDP (`--intercept xdp`: XDP and
    /// TC), published ports.
    MeshXdp,
    /// iptables DNAT with conntrack on the node (kube-proxy's iptables
    /// mode, Docker's own port publishing).
    Iptables,
    /// HAProxy on the node, tcp mode (a userspace L4 proxy).
    Haproxy,
    /// Straight to one backend, routed by the node without NAT: the floor.
    Direct,
    /// meshd on both nodes, clients to the second node (no task): it
    /// encapsulates to the first, which delivers; replies back through
    /// the second node (via-ingress, meshd's default).
    MeshForward,
    /// As `MeshForward`, replies straight from the first node to the
    /// client (`--reply-mode direct`).
    MeshForwardDirect,
    /// As `MeshForward`, both meshds intercepting at XDP (`--intercept
    /// xdp`): the second node encapsulates and sends with XDP_TX.
    MeshForwardXdp,
}

impl DataPath {
    pub const ALL: [DataPath; 8] = [
        DataPath::MeshTc,
        DataPath::MeshXdp,
        DataPath::Iptables,
        DataPath::Haproxy,
        DataPath::Direct,
        DataPath::MeshForward,
        DataPath::MeshForwardDirect,
        DataPath::MeshForwardXdp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DataPath::MeshTc => "mesh_tc",
            DataPath::MeshXdp => "mesh_xdp",
            DataPath::Iptables => "iptables",
            DataPath::Haproxy => "haproxy",
            DataPath::Direct => "direct",
            DataPath::MeshForward => "mesh_forward",
            DataPath::MeshForwardDirect => "mesh_forward_direct",
            DataPath::MeshForwardXdp => "mesh_forward_xdp",
        }
    }

    pub fn parse(s: &str) -> Option<DataPath> {
        DataPath::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The published ports of this path (HTTP, iperf3); the direct path
    /// uses the backend's own.
    fn ports(self) -> (u16, u16) {
        match self {
            // Never on together: the same ports (the forwarding paths at
            // the second node).
            DataPath::MeshTc
            | DataPath::MeshXdp
            | DataPath::MeshForward
            | DataPath::MeshForwardDirect
            | DataPath::MeshForwardXdp => (30080, 30201),
            DataPath::Iptables => (31080, 31201),
            DataPath::Haproxy => (32080, 32201),
            DataPath::Direct => (HTTP_PORT, PERF_PORT),
        }
    }

    /// meshd's intercept on this path, if it is the mesh's on one node.
    pub fn intercept(self) -> Option<&'static str> {
        match self {
            DataPath::MeshTc => Some("tc"),
            DataPath::MeshXdp => Some("xdp"),
            _ => None,
        }
    }

    /// Both meshds' intercept on a forwarding path.
    pub fn forward_intercept(self) -> Option<&'static str> {
        match self {
            DataPath::MeshForward | DataPath::MeshForwardDirect => Some("tc"),
            DataPath::MeshForwardXdp => Some("xdp"),
            _ => None,
        }
    }

    /// Whether a forwarding path's replies go straight from the first
    /// node to the client (else back through the second).
    pub fn replies_direct(self) -> bool {
        self == DataPath::MeshForwardDirect
    }

    /// Whether it carries UDP (HAProxy's community edition proxies TCP only).
    pub fn udp(self) -> bool {
        self != DataPath::Haproxy
    }

    /// Whether meshd runs for it (on the first node; the forwarding paths
    /// on both).
    pub fn meshd(self) -> bool {
        matches!(
            self,
            DataPath::MeshTc
                | DataPath::MeshXdp
                | DataPath::MeshForward
                | DataPath::MeshForwardDirect
                | DataPath::MeshForwardXdp
        )
    }

    /// Whether the clients send to the second node, which forwards.
    pub fn forwards(self) -> bool {
        self.forward_intercept().is_some()
    }
}

pub struct E2eLab {
    /// Servers and proxies: stopped first.
    servers: Vec<Proc>,
    pub cluster: Cluster,
    pub node: Node,
    /// The second node: no task, the forwarding paths' ingress node.
    pub forwarder: Node,
    pub clients: Vec<Client>,
    pub backends: Vec<Ipv4Addr>,
    pub dir: PathBuf,
    meshd: PathBuf,
    iptables_rules: Vec<String>,
    /// The XDP_PASS program on the segment's end of the second node's
    /// uplink, during the forwarding paths' turns.
    segment_xdp: Option<aya::Ebpf>,
    /// Last: empty once every process above has stopped.
    pub group: Option<CpuGroup>,
}

impl E2eLab {
    /// `clients` client namespaces (one address each), one node with
    /// `backends` backends, each serving nginx and iperf3, and a second
    /// node without any; HAProxy on the first node (idle until its path is
    /// measured).
    pub fn new(clients: usize, backends: usize, meshd: &Path) -> Result<E2eLab> {
        let mut spec = Topology::builder().node(backends).node(0).plain_segment();
        for _ in 0..clients {
            spec = spec.client(1);
        }
        let cluster = Cluster::build(spec)?;
        let node = cluster.node(1).clone();
        let forwarder = cluster.node(2).clone();
        let clients_v = cluster.topo.clients.clone();
        let backends_v: Vec<Ipv4Addr> = node.tasks.iter().map(|t| t.addr).collect();
        let dir = cluster.topo.dir.clone();
        let mut lab = E2eLab {
            servers: Vec::new(),
            cluster,
            node,
            forwarder,
            clients: clients_v,
            backends: backends_v,
            dir,
            meshd: meshd.to_path_buf(),
            iptables_rules: Vec::new(),
            segment_xdp: None,
            group: CpuGroup::new(),
        };
        lab.setup()?;
        Ok(lab)
    }

    fn setup(&mut self) -> Result<()> {
        let n = &self.node;
        // The direct path: clients route the backends' subnet via the node,
        // the node forwards it (stateless accepts, no conntrack).
        for c in &self.clients {
            ip(
                &c.ns,
                &format!("route add {} via {}", n.task_subnet, n.addr),
            )?;
            // Clients generate load: leave checksums to the veth (offload
            // on, as a real client's NIC would), unlike the tests' clients.
            let _ = exec(&c.ns, "ethtool -K eth0 tx on");
        }
        exec(
            &n.ns,
            &format!("iptables -A FORWARD -d {} -j ACCEPT", n.task_subnet),
        )?;
        exec(
            &n.ns,
            &format!("iptables -A FORWARD -s {} -j ACCEPT", n.task_subnet),
        )?;
        for t in n.tasks.clone() {
            let _ = exec(&t.ns, "ethtool -K eth0 tx on");
            let conf = self.nginx_conf(t.addr, &t.ns)?;
            let p = proc::spawn(
                &t.ns,
                &[
                    "nginx",
                    "-p",
                    &self.dir.display().to_string(),
                    "-c",
                    &conf.display().to_string(),
                    "-g",
                    "daemon off;",
                ],
                &[],
                self.group.as_ref(),
                Some(&self.dir.join(format!("nginx-{}.log", t.index))),
                false,
            )?;
            self.servers.push(p);
            let p = proc::spawn(
                &t.ns,
                &[
                    "iperf3",
                    "-s",
                    "-B",
                    &t.addr.to_string(),
                    "-p",
                    &PERF_PORT.to_string(),
                ],
                &[],
                self.group.as_ref(),
                Some(&self.dir.join(format!("iperf3-{}.log", t.index))),
                false,
            )?;
            self.servers.push(p);
            proc::wait_listening(&t.ns, HTTP_PORT, Duration::from_secs(10))?;
            proc::wait_listening(&t.ns, PERF_PORT, Duration::from_secs(10))?;
        }
        let conf = self.haproxy_conf()?;
        let p = proc::spawn(
            &n.ns,
            &["haproxy", "-db", "-f", &conf.display().to_string()],
            &[],
            self.group.as_ref(),
            Some(&self.dir.join("haproxy.log")),
            false,
        )?;
        self.servers.push(p);
        proc::wait_listening(&n.ns, DataPath::Haproxy.ports().0, Duration::from_secs(10))?;
        // The same state on both nodes.
        let st = self.state().render();
        std::fs::write(self.cluster.state_path(1), &st)?;
        std::fs::write(self.cluster.state_path(2), &st)?;
        Ok(())
    }

    fn nginx_conf(&self, addr: Ipv4Addr, ns: &str) -> Result<PathBuf> {
        let d = self.dir.join(format!("nginx-{ns}"));
        std::fs::create_dir_all(&d)?;
        let mut c = String::new();
        let _ = writeln!(
            c,
            "# written by mesh-bench
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server {{
        listen {addr}:{HTTP_PORT} backlog=4096;
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}",
            d = d.display()
        );
        let path = d.join("nginx.conf");
        std::fs::write(&path, c)?;
        Ok(path)
    }

    fn haproxy_conf(&self) -> Result<PathBuf> {
        let (http, perf) = DataPath::Haproxy.ports();
        let node = self.node.addr;
        let mut c = format!(
            "# written by mesh-bench
global
    maxconn 8000
    pidfile {}/haproxy.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
",
            self.dir.display()
        );
        for (name, port, target) in [("web", http, HTTP_PORT), ("perf", perf, PERF_PORT)] {
            let _ = writeln!(
                c,
                "listen {name}\n    bind {node}:{port}\n    balance roundrobin"
            );
            for (i, b) in self.backends.iter().enumerate() {
                let _ = writeln!(c, "    server b{i} {b}:{target}");
            }
        }
        let path = self.dir.join("haproxy.cfg");
        std::fs::write(&path, c)?;
        Ok(path)
    }

    /// meshd's state: one service publishing HTTP and iperf3 (TCP and UDP)
    /// on every backend.
    fn state(&self) -> StateFile {
        let (http, perf) = DataPath::MeshTc.ports();
        let mut st = StateFile::new()
            .node(&self.node.name, self.node.addr)
            .node(&self.forwarder.name, self.forwarder.addr)
            .service(
                "web",
                &[
                    ("tcp", http, HTTP_PORT),
                    ("tcp", perf, PERF_PORT),
                    ("udp", perf, PERF_PORT),
                ],
            );
        for b in &self.backends {
            st = st.task("web", &self.node.name, *b);
        }
        st
    }

    /// Where a client sends HTTP and iperf3 traffic on `path`.
    pub fn addr(&self, path: DataPath) -> (Ipv4Addr, u16, u16) {
        let (h, p) = path.ports();
        match path {
            DataPath::Direct => (self.backends[0], h, p),
            x if x.forwards() => (self.forwarder.addr, h, p),
            _ => (self.node.addr, h, p),
        }
    }

    /// Makes `path` available (and only it, of those that change the node:
    /// meshd's XDP program slows every packet of the uplink (its TC
    /// program, less), conntrack
    /// every packet of the node).
    pub fn enable(&mut self, path: DataPath) -> Result<()> {
        match path {
            DataPath::MeshTc | DataPath::MeshXdp => {
                let meshd = self.meshd.clone();
                let mode = path.intercept().expect("a mesh path");
                // Detached when it exits: the next path must not run
                // through a dataplane left pinned (meshd keeps it by
                // default, to serve while no meshd runs).
                self.cluster.start_meshd(
                    1,
                    &meshd,
                    &["--intercept", mode, "--on-exit", "detach"],
                )?;
                self.meshd_cpu(&[1])?;
            }
            DataPath::MeshForward | DataPath::MeshForwardDirect | DataPath::MeshForwardXdp => {
                let mode = path.forward_intercept().expect("a forwarding path");
                if mode == "xdp" {
                    self.wire(true)?;
                    let seg = self.cluster.topo.segment_ns.clone();
                    self.segment_xdp =
                        Some(pass_xdp(&seg, vec![self.forwarder.segment_port.clone()])?);
                }
                let mut args = vec!["--intercept", mode];
                args.extend_from_slice(ON_EXIT);
                if path.replies_direct() {
                    args.extend_from_slice(&["--reply-mode", "direct"]);
                }
                let meshd = self.meshd.clone();
                self.cluster.start_meshds(&[1, 2], &meshd, &args)?;
                self.meshd_cpu(&[1, 2])?;
            }
            DataPath::Iptables => {
                let (http, perf) = path.ports();
                let node = self.node.addr;
                let n = self.backends.len();
                let mut rules = Vec::new();
                // kube-proxy's iptables mode: one DNAT per backend, picked
                // with decreasing probabilities.
                for (proto, port, target) in [
                    ("tcp", http, HTTP_PORT),
                    ("tcp", perf, PERF_PORT),
                    ("udp", perf, PERF_PORT),
                ] {
                    for (i, b) in self.backends.iter().enumerate() {
                        let pick = if i + 1 < n {
                            format!(
                                "-m statistic --mode random --probability {:.5} ",
                                1.0 / (n - i) as f64
                            )
                        } else {
                            String::new()
                        };
                        rules.push(format!(
                            "PREROUTING -d {node} -p {proto} --dport {port} {pick}-j DNAT --to-destination {b}:{target}"
                        ));
                    }
                }
                for r in &rules {
                    exec(&self.node.ns, &format!("iptables -t nat -A {r}"))?;
                }
                self.iptables_rules = rules;
            }
            DataPath::Haproxy | DataPath::Direct => {}
        }
        Ok(())
    }

    /// Undoes `enable`.
    pub fn disable(&mut self, path: DataPath) -> Result<()> {
        match path {
            DataPath::MeshTc | DataPath::MeshXdp => {
                let st = self.cluster.stop_meshd(1)?;
                ensure!(st.success(), "meshd exited with {st}");
                let left = mesh_tests::lab::attached_programs(&self.node.ns, &[&self.node.uplink]);
                ensure!(
                    left.is_empty(),
                    "meshd left programs on the uplink: {left:?}"
                );
            }
            DataPath::MeshForward | DataPath::MeshForwardDirect | DataPath::MeshForwardXdp => {
                let (s1, s2) = (self.cluster.stop_meshd(1), self.cluster.stop_meshd(2));
                // Detaches the segment's XDP_PASS program, if any.
                if self.segment_xdp.take().is_some() {
                    self.wire(false)?;
                }
                for (j, st) in [(1, s1?), (2, s2?)] {
                    ensure!(st.success(), "meshd on node {j} exited with {st}");
                }
            }
            DataPath::Iptables => {
                for r in std::mem::take(&mut self.iptables_rules) {
                    exec(&self.node.ns, &format!("iptables -t nat -D {r}"))?;
                }
                // No NAT table, no conntrack for the other paths.
                let _ = exec(&self.node.ns, "nft delete table ip nat");
            }
            DataPath::Haproxy | DataPath::Direct => {}
        }
        Ok(())
    }

    /// Complete checksums from the clients and both nodes' uplinks (on),
    /// or the checksum offload back (off): the clients' as a real client's
    /// NIC would, the uplinks' as the veths come.
    fn wire(&self, on: bool) -> Result<()> {
        let tx = if on { "off" } else { "on" };
        for c in &self.clients {
            exec(&c.ns, &format!("ethtool -K {} tx {tx}", c.iface))?;
        }
        for n in [&self.node, &self.forwarder] {
            exec(&n.ns, &format!("ethtool -K {} tx {tx}", n.uplink))?;
        }
        Ok(())
    }

    /// Puts the meshd of each of `nodes` into the CPU accounting's group
    /// (with its threads), as every other process the lab starts.
    fn meshd_cpu(&self, nodes: &[usize]) -> Result<()> {
        if let Some(g) = &self.group {
            for &j in nodes {
                g.add(self.cluster.meshd(j)?.pid())?;
            }
        }
        Ok(())
    }

    /// A counter of node `j`'s meshd (the sum of its samples).
    pub fn metric(&self, j: usize, name: &str) -> Result<u64> {
        self.cluster
            .metric(j, name, "")
            .with_context(|| format!("reading meshd's metrics on node {j}"))
    }

    /// meshd's counters: drops (must stay 0), over the nodes `path` runs
    /// meshd on.
    pub fn mesh_drops(&self, path: DataPath) -> Result<u64> {
        let mut d = self.metric(1, "mesh_drops_total")?;
        if path.forwards() {
            d += self.metric(2, "mesh_drops_total")?;
        }
        Ok(d)
    }

    /// Whether IPVS exists in this kernel (it does not here: say so).
    pub fn ipvs(&self) -> String {
        match exec(&self.node.ns, "cat /proc/net/ip_vs") {
            Ok(_) => "IPVS is present in this kernel but not measured yet".into(),
            Err(_) => "IPVS (Docker's own routing mesh, kube-proxy's ipvs mode) is missing from this kernel (no /proc/net/ip_vs, and no modules can be loaded): not measured, not faked".into(),
        }
    }
}
