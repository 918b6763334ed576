//! A lab of network namespaces on this machine: a client, one node running
//! meshd, and task hosts behind a bridge on the node (as Docker's
//! docker_gwbridge). Follows ../shared/LAB.md: a guard route first, only
//! 198.18.0.0/15 addresses, no default routes, everything removed when the
//! `Lab` is dropped (also when a test panics).
//!
//! Address plan for lab slot `k` (0..64), out of 198.18.128.0/17:
//! - uplink 198.18.(128+2k).0/24: node .1 (`up0`), client .2 (`eth0`);
//! - tasks  198.18.(129+2k).0/24: bridge `br0` .1 on the node, task i at .(1+i).
//!
//! The slot is claimed by creating the node namespace `mk<k>n`: creation
//! fails if another lab holds it, so labs can run side by side.
//!
//! - `shell`: commands, namespaces, the guard routes;
//! - `task`: the task servers, their line protocol, `Conn`;
//! - `meshd`: the meshd process, its command line, its admin endpoint.

pub mod meshd;
pub mod shell;
pub mod task;

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

pub use meshd::{ADMIN, Meshd, MeshdRun, READY_TIMEOUT, http_get, meshd_path, parse_metric};
pub use shell::{exec, guard_routes, in_netns, ip, sh, slot_namespaces};
pub use task::{Conn, TCP_TARGET, TaskServer, UDP_TARGET};

pub const WEB_TCP: u16 = 30080;
pub const WEB_UDP: u16 = 30053;

pub struct Lab {
    pub slot: u32,
    pub node_ns: String,
    pub client_ns: String,
    pub task_ns: Vec<String>,
    pub node_addr: Ipv4Addr,
    pub client_addr: Ipv4Addr,
    pub dir: PathBuf,
    servers: Vec<TaskServer>,
    meshd: Option<Meshd>,
    extra_ns: Vec<String>,
    /// RUST_LOG for meshd.
    pub meshd_log: String,
}

impl Lab {
    /// Brings up a client, a node and `tasks` task hosts (not yet serving;
    /// see `start_task`). The node's FORWARD policy is DROP, as on a Docker
    /// host, with bridged frames going through iptables.
    pub fn new(tasks: usize) -> Result<Lab> {
        Self::create(tasks, None)
    }

    /// As `new`, with a router between the client and the node whose link
    /// towards the client has MTU `mtu` (the client's own link stays at
    /// 1500, so it advertises a large MSS): replies larger than `mtu` make
    /// the router send "fragmentation needed" to the node address.
    ///
    /// Addresses: node 198.18.b.1 and router 198.18.b.2 in 198.18.b.0/25;
    /// router 198.18.b.129 and client 198.18.b.130 in 198.18.b.128/25.
    pub fn new_routed(tasks: usize, mtu: u32) -> Result<Lab> {
        Self::create(tasks, Some(mtu))
    }

    fn create(tasks: usize, router_mtu: Option<u32>) -> Result<Lab> {
        guard_routes();
        let mut slot = None;
        for k in 0..64u32 {
            let ns = format!("mk{k}n");
            let ok = Command::new("ip")
                .args(["netns", "add", &ns])
                .stderr(Stdio::null())
                .status()?
                .success();
            if ok {
                slot = Some(k);
                break;
            }
        }
        let k = slot.context("no free lab slot (64 labs exist? see `ip netns`)")?;
        let b = 128 + 2 * k;
        let dir = std::env::temp_dir().join(format!("mesh-lab-{k}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            slot: k,
            node_ns: format!("mk{k}n"),
            client_ns: format!("mk{k}c"),
            task_ns: Vec::new(),
            node_addr: Ipv4Addr::new(198, 18, b as u8, 1),
            client_addr: Ipv4Addr::new(
                198,
                18,
                b as u8,
                if router_mtu.is_some() { 130 } else { 2 },
            ),
            dir,
            servers: Vec::new(),
            meshd: None,
            extra_ns: Vec::new(),
            meshd_log: "info".into(),
        };
        lab.build(tasks, router_mtu)
            .with_context(|| format!("building lab slot {k}"))?;
        Ok(lab)
    }

    fn build(&mut self, tasks: usize, router_mtu: Option<u32>) -> Result<()> {
        let b = 128 + 2 * self.slot;
        let (n, c) = (self.node_ns.clone(), self.client_ns.clone());
        sh(&["ip", "netns", "add", &c])?;
        self.extra_ns.push(c.clone());
        ip(&n, "link set lo up")?;
        ip(&c, "link set lo up")?;
        if let Some(mtu) = router_mtu {
            let r = format!("mk{}r", self.slot);
            sh(&["ip", "netns", "add", &r])?;
            self.extra_ns.push(r.clone());
            ip(&r, "link set lo up")?;
            ip(
                &n,
                &format!("link add up0 type veth peer name rt0 netns {r}"),
            )?;
            ip(&n, &format!("addr add 198.18.{b}.1/25 dev up0"))?;
            ip(&r, &format!("addr add 198.18.{b}.2/25 dev rt0"))?;
            ip(
                &r,
                &format!("link add rt1 type veth peer name eth0 netns {c}"),
            )?;
            ip(&r, &format!("addr add 198.18.{b}.129/25 dev rt1"))?;
            ip(&r, &format!("link set rt1 mtu {mtu}"))?;
            ip(&c, &format!("addr add 198.18.{b}.130/25 dev eth0"))?;
            for (ns, dev) in [(&n, "up0"), (&r, "rt0"), (&r, "rt1"), (&c, "eth0")] {
                ip(ns, &format!("link set {dev} up"))?;
            }
            exec(&r, "sysctl -qw net.ipv4.ip_forward=1")?;
            ip(&n, &format!("route add 198.18.{b}.128/25 via 198.18.{b}.2"))?;
            ip(&c, &format!("route add 198.18.{b}.0/25 via 198.18.{b}.129"))?;
            exec(&c, "ethtool -K eth0 tx off")?;
            return self.build_node(tasks);
        }
        ip(
            &n,
            &format!("link add up0 type veth peer name eth0 netns {c}"),
        )?;
        ip(&n, &format!("addr add 198.18.{b}.1/24 dev up0"))?;
        ip(&c, &format!("addr add 198.18.{b}.2/24 dev eth0"))?;
        ip(&n, "link set up0 up")?;
        ip(&c, "link set eth0 up")?;
        // Packets from a wire carry complete checksums; make the client's
        // do too, so the tasks' kernels judge the DNAT's checksum updates.
        exec(&c, "ethtool -K eth0 tx off")?;
        self.build_node(tasks)
    }

    /// The node's bridge for the tasks, its forwarding and firewall, and
    /// the task hosts.
    fn build_node(&mut self, tasks: usize) -> Result<()> {
        let b = 128 + 2 * self.slot;
        let n = self.node_ns.clone();
        ip(&n, "link add br0 type bridge")?;
        ip(&n, &format!("addr add 198.18.{}.1/24 dev br0", b + 1))?;
        ip(&n, "link set br0 up")?;
        exec(&n, "sysctl -qw net.ipv4.ip_forward=1")?;
        // As dockerd leaves a host: bridged frames through iptables, FORWARD DROP.
        let _ = exec(&n, "sysctl -qw net.bridge.bridge-nf-call-iptables=1");
        exec(&n, "iptables -P FORWARD DROP")?;
        for _ in 0..tasks {
            self.add_task_host()?;
        }
        Ok(())
    }

    /// Adds one more task host behind the node's bridge; returns its index.
    pub fn add_task_host(&mut self) -> Result<usize> {
        let i = self.task_ns.len() + 1;
        let b = 128 + 2 * self.slot;
        let (n, t) = (self.node_ns.clone(), format!("mk{}t{i}", self.slot));
        sh(&["ip", "netns", "add", &t])?;
        self.task_ns.push(t.clone());
        ip(&t, "link set lo up")?;
        ip(
            &n,
            &format!("link add vt{i} type veth peer name eth0 netns {t}"),
        )?;
        ip(&n, &format!("link set vt{i} master br0 up"))?;
        ip(&t, &format!("addr add {}/24 dev eth0", self.task_addr(i)))?;
        ip(&t, "link set eth0 up")?;
        ip(
            &t,
            &format!("route add 198.18.{b}.0/24 via 198.18.{}.1", b + 1),
        )?;
        if i.is_multiple_of(2) {
            // Half the tasks send complete checksums, half leave them partial
            // (as containers do on veth): both reply rewrites are exercised.
            exec(&t, "ethtool -K eth0 tx off")?;
        }
        Ok(i)
    }

    /// Address of task host `i` (1-based).
    pub fn task_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, (129 + 2 * self.slot) as u8, (1 + i) as u8)
    }

    /// Starts the TCP (8080) and UDP (5353) servers on task host `i`; each
    /// answers with its name, "task<i>".
    pub fn start_task(&mut self, i: usize) -> Result<()> {
        let s = TaskServer::start(&self.task_ns[i - 1], &format!("task{i}"))?;
        self.servers.push(s);
        Ok(())
    }

    /// A state file with node n1 (this node) and the web service
    /// (tcp 30080 -> 8080, udp 30053 -> 5353) on the given task hosts.
    pub fn state_toml(&self, tasks: &[usize]) -> String {
        let mut s = format!(
            "# written by the mesh test lab\n[[nodes]]\nname = \"n1\"\naddr = \"{}\"\n\n[[services]]\nname = \"web\"\n\
             ports = [ {{ protocol = \"tcp\", published = {WEB_TCP}, target = {TCP_TARGET} }},\n          \
             {{ protocol = \"udp\", published = {WEB_UDP}, target = {UDP_TARGET} }} ]\n",
            self.node_addr
        );
        for &i in tasks {
            s += &format!(
                "\n[[tasks]]\nservice = \"web\"\nnode = \"n1\"\naddr = \"{}\"\n",
                self.task_addr(i)
            );
        }
        s
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.toml")
    }

    /// Replaces the state file atomically (meshd never reads half of it).
    pub fn write_state(&self, text: &str) -> Result<()> {
        let tmp = self.dir.join("state.toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.state_path())?;
        Ok(())
    }

    /// Starts meshd on the node with the current state file and waits
    /// until it reports ready.
    pub fn start_meshd(&mut self, meshd: &Path, extra: &[&str]) -> Result<()> {
        let run = MeshdRun::new(&self.state_path(), "up0", "n1").extra(extra);
        let m = Meshd::start(&self.node_ns, meshd, &run, &self.meshd_log)?;
        self.meshd = Some(m);
        self.meshd()?.wait_ready(READY_TIMEOUT)?;
        Ok(())
    }

    pub fn meshd(&self) -> Result<&Meshd> {
        self.meshd.as_ref().context("meshd is not running")
    }

    /// Stops meshd with SIGTERM and waits for it to exit; returns its status.
    pub fn stop_meshd(&mut self) -> Result<std::process::ExitStatus> {
        let mut m = self.meshd.take().context("meshd is not running")?;
        m.terminate(Duration::from_secs(10))
    }

    /// GET a path from meshd's admin endpoint.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let path = path.to_string();
        in_netns(&self.node_ns, move || http_get(ADMIN, &path))?
    }

    /// Sum of a metric's samples whose label set contains `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> Result<u64> {
        let text = self.admin_get("/metrics")?;
        Ok(parse_metric(&text, name, labels))
    }

    /// One TCP request from the client: connect, send a line, read a line.
    pub fn tcp_request(&self, port: u16, line: &str) -> Result<String> {
        let mut c = self.tcp_connect(port)?;
        c.ask(line)
    }

    /// A TCP connection from the client to the node's `port`.
    pub fn tcp_connect(&self, port: u16) -> Result<Conn> {
        let addr = SocketAddr::from((self.node_addr, port));
        let s = in_netns(&self.client_ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        })??;
        Conn::new(s)
    }

    /// One UDP request from the client; returns the answer and the address
    /// it came from.
    pub fn udp_request(&self, port: u16, msg: &str) -> Result<(String, SocketAddr)> {
        self.udp_ask(&self.udp_socket()?, port, msg)
    }

    /// A UDP socket in the client namespace (each is its own flow for as
    /// long as it is kept).
    pub fn udp_socket(&self) -> Result<UdpSocket> {
        let sock = in_netns(&self.client_ns, || UdpSocket::bind("0.0.0.0:0"))??;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(sock)
    }

    /// A UDP socket in the client namespace connected to the node's `port`
    /// (so ICMP errors about its flow surface as errors on it).
    pub fn udp_connected(&self, port: u16) -> Result<UdpSocket> {
        let to = SocketAddr::from((self.node_addr, port));
        let sock = in_netns(&self.client_ns, move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(to)?;
            Ok(s)
        })??;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(sock)
    }

    /// One UDP request on `sock`.
    pub fn udp_ask(&self, sock: &UdpSocket, port: u16, msg: &str) -> Result<(String, SocketAddr)> {
        let to = SocketAddr::from((self.node_addr, port));
        sock.send_to(msg.as_bytes(), to)?;
        let mut buf = [0u8; 1500];
        let (n, from) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("no UDP answer from {to}"))?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut m) = self.meshd.take() {
            let _ = m.terminate(Duration::from_secs(10));
        }
        for s in &mut self.servers {
            s.stop();
        }
        self.servers.clear();
        for ns in self
            .task_ns
            .iter()
            .chain(self.extra_ns.iter())
            .chain(std::iter::once(&self.node_ns))
        {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
