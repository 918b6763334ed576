//! A lab of several nodes (see `topology` for the network): task servers
//! in the task hosts, one meshd per node with a state file of its own, and
//! requests from a chosen client address to a chosen node. Nodes and
//! tasks are numbered from 1, as in their names (node `j` is "n<j>").

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::meshd::{
    HEALTH_PORT, Meshd, MeshdRun, READY_TIMEOUT, http_get, http_status, parse_metric,
};
use super::shell::{in_netns, mount_bpffs, umount};
use super::state::{StateFile, write_atomically};
use super::task::{Conn, TaskServer};
use super::topology::{Node, Task, Topology, TopologyBuilder};

pub struct Cluster {
    pub topo: Topology,
    /// RUST_LOG for the meshd processes started from now on.
    pub meshd_log: String,
    /// Environment variables (NAME=VALUE) for the meshds started next.
    pub meshd_env: Vec<String>,
    servers: Vec<TaskServer>,
    /// Per node (index j-1).
    meshds: Vec<Option<Meshd>>,
    /// Per node (index j-1): the BPF filesystem its meshd pins on.
    bpffs: Vec<PathBuf>,
}

impl Cluster {
    /// Nodes with the given numbers of task hosts (not yet serving; see
    /// `start_tasks`), and one client with one address.
    pub fn new(tasks_per_node: &[usize]) -> Result<Cluster> {
        Self::build(Topology::builder().nodes(tasks_per_node).client(1))
    }

    /// The network `spec` describes, with a directory per node for its
    /// state file.
    pub fn build(spec: TopologyBuilder) -> Result<Cluster> {
        let topo = spec.build()?;
        let mut bpffs: Vec<PathBuf> = Vec::new();
        for n in &topo.nodes {
            let d = topo.dir.join(&n.name);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            let b = d.join("bpf");
            if let Err(e) = mount_bpffs(&b) {
                bpffs.iter().for_each(|b: &PathBuf| umount(b));
                return Err(e);
            }
            bpffs.push(b);
        }
        Ok(Cluster {
            bpffs,
            meshds: topo.nodes.iter().map(|_| None).collect(),
            topo,
            meshd_log: "info".into(),
            meshd_env: Vec::new(),
            servers: Vec::new(),
        })
    }

    /// Node `j`.
    pub fn node(&self, j: usize) -> &Node {
        self.topo.node(j)
    }

    /// Task `i` of node `j`.
    pub fn task(&self, j: usize, i: usize) -> &Task {
        self.topo.task(j, i)
    }

    /// Every client address.
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        self.topo.client_addrs()
    }

    /// Every task, as (node, task).
    pub fn tasks(&self) -> Vec<(usize, usize)> {
        (1..=self.topo.nodes.len())
            .flat_map(|j| self.local_tasks(j))
            .collect()
    }

    /// Node `j`'s tasks, as (node, task).
    pub fn local_tasks(&self, j: usize) -> Vec<(usize, usize)> {
        (1..=self.node(j).tasks.len()).map(|i| (j, i)).collect()
    }

    /// The name task `i` of node `j` answers with: "n<j>.task<i>".
    pub fn task_name(j: usize, i: usize) -> String {
        format!("n{j}.task{i}")
    }

    /// Starts the TCP and UDP servers of task `i` on node `j`, answering
    /// as `task_name(j, i)`.
    pub fn start_task(&mut self, j: usize, i: usize) -> Result<()> {
        self.start_task_as(j, i, &Self::task_name(j, i))
    }

    /// As `start_task`, answering as `name`.
    pub fn start_task_as(&mut self, j: usize, i: usize, name: &str) -> Result<()> {
        let s = TaskServer::start(&self.task(j, i).ns, name)
            .with_context(|| format!("starting the servers of task {i} on node {j}"))?;
        self.servers.push(s);
        Ok(())
    }

    /// Starts the servers of every task.
    pub fn start_tasks(&mut self) -> Result<()> {
        for (j, i) in self.tasks() {
            self.start_task(j, i)?;
        }
        Ok(())
    }

    /// Adds one more task host to node `j`; returns its index.
    pub fn add_task_host(&mut self, j: usize) -> Result<usize> {
        self.topo.add_task(j)
    }

    /// A state file listing every node and the lab's web service with the
    /// given (node, task) tasks, each on its own node.
    pub fn state(&self, tasks: &[(usize, usize)]) -> StateFile {
        let mut st = StateFile::new();
        for n in &self.topo.nodes {
            st = st.node(&n.name, n.addr);
        }
        st = st.web();
        for &(j, i) in tasks {
            let n = self.node(j);
            st = st.task("web", &n.name, n.task_addr(i));
        }
        st
    }

    /// Node `j`'s state file.
    pub fn state_path(&self, j: usize) -> PathBuf {
        self.topo.dir.join(&self.node(j).name).join("state.toml")
    }

    /// Replaces node `j`'s state file atomically.
    pub fn write_state(&self, j: usize, text: &str) -> Result<()> {
        write_atomically(&self.state_path(j), text)
    }

    /// Gives every node the same state file.
    pub fn write_state_all(&self, text: &str) -> Result<()> {
        for j in 1..=self.topo.nodes.len() {
            self.write_state(j, text)?;
        }
        Ok(())
    }

    /// How meshd runs on node `j`: its state file, its uplink, its name,
    /// its BPF filesystem.
    pub fn meshd_run(&self, j: usize) -> MeshdRun {
        let n = self.node(j);
        MeshdRun::new(&self.state_path(j), &n.uplink, &n.name).bpffs(&self.bpffs[j - 1])
    }

    /// Node `j`'s BPF filesystem (meshd's --bpffs).
    pub fn bpffs(&self, j: usize) -> &Path {
        &self.bpffs[j - 1]
    }

    /// Kills node `j`'s meshd with SIGKILL (no chance to clean up) and
    /// waits for it to be gone.
    pub fn kill_meshd(&mut self, j: usize) -> Result<()> {
        let mut m = self
            .meshds
            .get_mut(j.wrapping_sub(1))
            .and_then(Option::take)
            .with_context(|| format!("meshd is not running on node {j}"))?;
        m.kill()
    }

    /// Starts meshd on node `j` with its current state file and waits
    /// until it reports ready.
    pub fn start_meshd(&mut self, j: usize, meshd: &Path, extra: &[&str]) -> Result<()> {
        self.start_meshds(&[j], meshd, extra)
    }

    /// Starts meshd on each of `nodes` at once, then waits until every one
    /// reports ready.
    pub fn start_meshds(&mut self, nodes: &[usize], meshd: &Path, extra: &[&str]) -> Result<()> {
        for &j in nodes {
            ensure!(
                self.meshd(j).is_err(),
                "meshd is already running on node {j}"
            );
            let run = self.meshd_run(j).extra(extra).env(&self.meshd_env);
            let m = Meshd::start(&self.node(j).ns, meshd, &run, &self.meshd_log)?;
            self.meshds[j - 1] = Some(m);
        }
        for &j in nodes {
            self.meshd(j)?
                .wait_ready(READY_TIMEOUT)
                .with_context(|| format!("meshd on node {j}"))?;
        }
        Ok(())
    }

    /// Starts meshd on every node (see `start_meshds`).
    pub fn start_all_meshds(&mut self, meshd: &Path, extra: &[&str]) -> Result<()> {
        let all: Vec<usize> = (1..=self.topo.nodes.len()).collect();
        self.start_meshds(&all, meshd, extra)
    }

    /// Node `j`'s meshd.
    pub fn meshd(&self, j: usize) -> Result<&Meshd> {
        self.meshds
            .get(j.wrapping_sub(1))
            .and_then(Option::as_ref)
            .with_context(|| format!("meshd is not running on node {j}"))
    }

    /// Stops node `j`'s meshd with SIGTERM and waits for it to exit;
    /// returns its status.
    pub fn stop_meshd(&mut self, j: usize) -> Result<std::process::ExitStatus> {
        let mut m = self
            .meshds
            .get_mut(j.wrapping_sub(1))
            .and_then(Option::take)
            .with_context(|| format!("meshd is not running on node {j}"))?;
        m.terminate(Duration::from_secs(10))
    }

    /// GET a path from node `j`'s meshd admin endpoint.
    pub fn admin_get(&self, j: usize, path: &str) -> Result<String> {
        let (path, admin) = (path.to_string(), self.meshd_run(j).admin);
        in_netns(&self.node(j).ns, move || http_get(&admin, &path))?
    }

    /// GET `path` from node `j`'s health port, as a load balancer would:
    /// from the first client, to the node's address. The status and body.
    pub fn health(&self, j: usize, path: &str) -> Result<(u16, String)> {
        let client = self.topo.clients[0].ns.clone();
        let (addr, path) = (
            format!("{}:{}", self.node(j).addr, HEALTH_PORT),
            path.to_string(),
        );
        in_netns(&client, move || http_status(&addr, &path))?
    }

    /// Runs `meshd <args>` (a command other than `run`) in node `j`'s
    /// namespace; its exit code, stdout and stderr.
    pub fn meshd_cmd(
        &self,
        j: usize,
        meshd: &Path,
        args: &[&str],
    ) -> Result<(i32, String, String)> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.node(j).ns])
            .arg(meshd)
            .args(args)
            .output()
            .context("running meshd")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Node `j`'s state directory (meshd's --state-dir in the lab).
    pub fn state_dir(&self, j: usize) -> PathBuf {
        self.topo.dir.join(&self.node(j).name)
    }

    /// Sum of node `j`'s metric samples whose label set contains `labels`.
    pub fn metric(&self, j: usize, name: &str, labels: &str) -> Result<u64> {
        let text = self.admin_get(j, "/metrics")?;
        Ok(parse_metric(&text, name, labels))
    }

    /// A TCP connection from client address and port `from` to node `j`'s
    /// `port`.
    pub fn tcp_connect_from(&self, from: SocketAddrV4, j: usize, port: u16) -> Result<Conn> {
        let ns = self.topo.client_with(*from.ip())?.ns.clone();
        let to = SocketAddrV4::new(self.node(j).addr, port);
        let s = in_netns(&ns, move || {
            connect_from_port(*from.ip(), from.port(), to, Duration::from_secs(3))
        })?
        .with_context(|| format!("TCP from {from} to {to}"))?;
        Conn::new(s)
    }

    /// A UDP socket bound to client address and port `from`.
    pub fn udp_socket_at(&self, from: SocketAddrV4) -> Result<UdpSocket> {
        let ns = self.topo.client_with(*from.ip())?.ns.clone();
        let sock = in_netns(&ns, move || UdpSocket::bind(from))??;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(sock)
    }

    /// A TCP connection from client address `from` to `to`.
    pub fn tcp_connect_to(&self, from: Ipv4Addr, to: SocketAddr) -> Result<Conn> {
        let ns = self.topo.client_with(from)?.ns.clone();
        let SocketAddr::V4(to4) = to else {
            bail!("the lab is IPv4 only, not {to}");
        };
        let s = in_netns(&ns, move || connect_from(from, to4, Duration::from_secs(3)))?
            .with_context(|| format!("TCP from {from} to {to}"))?;
        Conn::new(s)
    }

    /// A TCP connection from client address `from` to node `j`'s `port`.
    pub fn tcp_connect(&self, from: Ipv4Addr, j: usize, port: u16) -> Result<Conn> {
        self.tcp_connect_to(from, SocketAddr::from((self.node(j).addr, port)))
    }

    /// One TCP request: connect, send a line, read a line.
    pub fn tcp_request(&self, from: Ipv4Addr, j: usize, port: u16, line: &str) -> Result<String> {
        self.tcp_connect(from, j, port)?.ask(line)
    }

    /// A TCP connection to `to` from a process in namespace `ns` (a node's
    /// or a task's), its source address and port chosen by the kernel.
    pub fn tcp_connect_in(&self, ns: &str, to: SocketAddr) -> Result<Conn> {
        let s = in_netns(ns, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(3))
        })?
        .with_context(|| format!("TCP from namespace {ns} to {to}"))?;
        Conn::new(s)
    }

    /// A UDP socket in namespace `ns` (a node's or a task's) bound to the
    /// wildcard address and a port the kernel chooses: each datagram's
    /// source address is chosen by the route to its destination.
    pub fn udp_socket_in(&self, ns: &str) -> Result<UdpSocket> {
        let sock = in_netns(ns, || UdpSocket::bind(("0.0.0.0", 0)))??;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(sock)
    }

    /// A UDP socket bound to client address `from` (each is its own flow
    /// for as long as it is kept).
    pub fn udp_socket(&self, from: Ipv4Addr) -> Result<UdpSocket> {
        let ns = self.topo.client_with(from)?.ns.clone();
        let sock = in_netns(&ns, move || UdpSocket::bind((from, 0)))??;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(sock)
    }

    /// A UDP socket bound to `from` and connected to node `j`'s `port` (so
    /// ICMP errors about its flow surface as errors on it).
    pub fn udp_connected(&self, from: Ipv4Addr, j: usize, port: u16) -> Result<UdpSocket> {
        let sock = self.udp_socket(from)?;
        sock.connect((self.node(j).addr, port))?;
        Ok(sock)
    }

    /// One UDP request on `sock` to node `j`'s `port`; returns the answer
    /// and the address it came from.
    pub fn udp_ask(
        &self,
        sock: &UdpSocket,
        j: usize,
        port: u16,
        msg: &str,
    ) -> Result<(String, SocketAddr)> {
        let to = SocketAddr::from((self.node(j).addr, port));
        sock.send_to(msg.as_bytes(), to)?;
        let mut buf = [0u8; 1500];
        let (n, from) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("no UDP answer from {to}"))?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    }

    /// One UDP request from a new socket on client address `from` to node
    /// `j`'s published `port`: the task that answered, once the answer is
    /// checked to come from the address and port asked, and the task to
    /// have seen the client's own address and port.
    pub fn udp_task(&self, from: Ipv4Addr, j: usize, port: u16) -> Result<String> {
        self.udp_task_on(&self.udp_socket(from)?, j, port)
    }

    /// As [`Self::udp_task`], on socket `sock` (kept by the caller, so that
    /// no later socket gets its port: one flow per socket).
    pub fn udp_task_on(&self, sock: &UdpSocket, j: usize, port: u16) -> Result<String> {
        let (a, reply_from) = self.udp_ask(sock, j, port, "peer")?;
        ensure!(
            reply_from == SocketAddr::from((self.node(j).addr, port)),
            "UDP reply source {reply_from}, not node {j}'s port {port}"
        );
        let (task, seen) = a.split_once(' ').context("an answer \"TASK PEER\"")?;
        let me = sock.local_addr()?.to_string();
        ensure!(seen == me, "the task saw {seen}, the client is {me}");
        Ok(task.to_string())
    }

    /// One UDP request from a fresh socket bound to `from`.
    pub fn udp_request(
        &self,
        from: Ipv4Addr,
        j: usize,
        port: u16,
        msg: &str,
    ) -> Result<(String, SocketAddr)> {
        self.udp_ask(&self.udp_socket(from)?, j, port, msg)
    }
}

/// A TCP connection from `from` (a local address) to `to`, given up after
/// `timeout`. std cannot bind a socket before connecting it, and a client
/// namespace may hold several addresses.
fn connect_from(from: Ipv4Addr, to: SocketAddrV4, timeout: Duration) -> std::io::Result<TcpStream> {
    connect_from_port(from, 0, to, timeout)
}

/// As `connect_from`, from port `sport` (0: any).
fn connect_from_port(
    from: Ipv4Addr,
    sport: u16,
    to: SocketAddrV4,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use std::io::{Error, ErrorKind};
    let sin = |a: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: socket(2) returns a new descriptor (or -1), owned from here on.
    let fd = unsafe {
        OwnedFd::from_raw_fd(check(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?)
    };
    let local = sin(from, sport);
    // SAFETY: a valid descriptor and a sockaddr_in of the length given.
    check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const local).cast(), len) })?;
    // connect(2) gives up after SO_SNDTIMEO with EINPROGRESS (socket(7)).
    let stream = TcpStream::from(fd);
    stream.set_write_timeout(Some(timeout))?;
    let remote = sin(*to.ip(), to.port());
    // SAFETY: as for bind.
    let r = unsafe { libc::connect(stream.as_raw_fd(), (&raw const remote).cast(), len) };
    match check(r) {
        Ok(_) => Ok(stream),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Err(Error::new(
            ErrorKind::TimedOut,
            format!("no connection within {timeout:?}"),
        )),
        Err(e) => Err(e),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first, then (when the fields drop) the namespaces.
        for m in self.meshds.iter_mut().filter_map(Option::take) {
            let mut m = m;
            let _ = m.terminate(Duration::from_secs(10));
        }
        for s in &mut self.servers {
            s.stop();
        }
        self.servers.clear();
        for b in &self.bpffs {
            umount(b);
        }
    }
}
