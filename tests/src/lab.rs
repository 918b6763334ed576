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

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub const TCP_TARGET: u16 = 8080;
pub const UDP_TARGET: u16 = 5353;
pub const WEB_TCP: u16 = 30080;
pub const WEB_UDP: u16 = 30053;
pub const ADMIN: &str = "127.0.0.1:9469";

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS <args>` (arguments split on white space).
pub fn ip(ns: &str, args: &str) -> Result<String> {
    let mut v = vec!["ip", "-n", ns];
    v.extend(args.split_whitespace());
    sh(&v)
}

/// `ip netns exec NS <args>` (arguments split on white space).
pub fn exec(ns: &str, args: &str) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend(args.split_whitespace());
    sh(&v)
}

/// Namespaces of lab slot `slot` that still exist.
pub fn slot_namespaces(slot: u32) -> Vec<String> {
    let list = sh(&["ip", "netns", "list"]).unwrap_or_default();
    let prefix = format!("mk{slot}");
    list.split_whitespace()
        .filter(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with(['n', 'c', 't', 'r']))
        })
        .map(str::to_string)
        .collect()
}

/// Runs `f` on a thread inside network namespace `ns` (setns affects only
/// the calling thread). Sockets it creates stay in that namespace.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || {
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow!(
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread in netns panicked"))?
}

/// The guard routes of LAB.md: nothing for the lab ranges leaves the machine.
pub fn guard_routes() {
    let _ = Command::new("ip")
        .args([
            "route",
            "add",
            "unreachable",
            "198.18.0.0/15",
            "metric",
            "4000",
        ])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("ip")
        .args([
            "-6",
            "route",
            "add",
            "unreachable",
            "2001:2::/48",
            "metric",
            "4000",
        ])
        .stderr(Stdio::null())
        .status();
}

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
        let state = self.state_path();
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            self.node_ns.clone(),
            meshd.display().to_string(),
            "run".into(),
            "--state".into(),
            state.display().to_string(),
            "--iface".into(),
            "up0".into(),
            "--node".into(),
            "n1".into(),
            "--maglev-size".into(),
            "1021".into(),
            "--max-services".into(),
            "64".into(),
            "--watch-interval-ms".into(),
            "100".into(),
            "--admin-addr".into(),
            ADMIN.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let m = Meshd::spawn(&args, &self.meshd_log)?;
        self.meshd = Some(m);
        self.meshd()?
            .wait_log("meshd ready", Duration::from_secs(30))?;
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
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.set_write_timeout(Some(Duration::from_secs(3)))?;
        Ok(Conn {
            reader: BufReader::new(s.try_clone()?),
            stream: s,
        })
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

/// A client connection speaking the task servers' line protocol.
pub struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Sends a line, returns the answer line ("task<i> <line>").
    pub fn ask(&mut self, line: &str) -> Result<String> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer)?;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(answer.trim_end().to_string())
    }

    /// The address this connection is connected to.
    pub fn peer(&self) -> Result<SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    /// The local address of this connection (the client's side).
    pub fn local(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// The task that answers on this connection.
    pub fn task(&mut self) -> Result<String> {
        Ok(self
            .ask("who")?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }
}

/// A task host's servers: TCP echo with a name prefix (one thread per
/// connection, lines until the client closes) and UDP likewise.
pub struct TaskServer {
    pub name: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl TaskServer {
    pub fn start(ns: &str, name: &str) -> Result<TaskServer> {
        let tcp = in_netns(ns, || TcpListener::bind(("0.0.0.0", TCP_TARGET)))??;
        let udp = in_netns(ns, || UdpSocket::bind(("0.0.0.0", UDP_TARGET)))??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let mut threads = Vec::new();
        {
            let (stop, name, conns) = (stop.clone(), name.to_string(), conns.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            if let Ok(c) = s.try_clone() {
                                conns.lock().unwrap().push(c);
                            }
                            let name = name.clone();
                            std::thread::spawn(move || serve_tcp(s, &name));
                        }
                        // Nothing to accept: poll the stop flag again.
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        {
            let (stop, name) = (stop.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let a = answer(&name, &String::from_utf8_lossy(&buf[..n]), from);
                        let _ = udp.send_to(a.as_bytes(), from);
                    }
                }
            }));
        }
        Ok(TaskServer {
            name: name.to_string(),
            stop,
            threads,
            conns,
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for TaskServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The line protocol: "peer" is answered with the address the task sees
/// the client at, "big N" with N bytes of 'x'; anything else is echoed.
/// Every answer starts with the task's name.
fn answer(name: &str, line: &str, peer: SocketAddr) -> String {
    if line == "peer" {
        return format!("{name} {peer}");
    }
    if let Some(n) = line
        .strip_prefix("big ")
        .and_then(|n| n.parse::<usize>().ok())
    {
        return format!("{name} {}", "x".repeat(n.min(1 << 20)));
    }
    format!("{name} {line}")
}

fn serve_tcp(s: TcpStream, name: &str) {
    let Ok(read) = s.try_clone() else { return };
    let Ok(peer) = s.peer_addr() else { return };
    let mut w = s;
    for line in BufReader::new(read).lines() {
        let Ok(line) = line else { return };
        if w.write_all(format!("{}\n", answer(name, &line, peer)).as_bytes())
            .is_err()
        {
            return;
        }
    }
}

/// meshd running in the node namespace, its stderr collected line by line.
pub struct Meshd {
    child: Child,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Meshd {
    pub fn spawn(ip_args: &[String], rust_log: &str) -> Result<Meshd> {
        let mut child = Command::new("ip")
            .args(ip_args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting meshd")?;
        let log: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if std::env::var_os("MESH_TEST_VERBOSE").is_some() {
                    eprintln!("meshd| {line}");
                }
                l.0.lock().unwrap().push(line);
                l.1.notify_all();
            }
        });
        Ok(Meshd { child, log })
    }

    /// Waits until a log line contains `pat`; fails with the log so far.
    pub fn wait_log(&self, pat: &str, timeout: Duration) -> Result<String> {
        self.wait_log_after(0, pat, timeout)
    }

    /// As `wait_log`, ignoring the first `skip` lines.
    pub fn wait_log_after(&self, skip: usize, pat: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.log;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().skip(skip).find(|l| l.contains(pat)) {
                return Ok(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "meshd did not log {pat:?} within {timeout:?}; its log:\n{}",
                    lines.join("\n")
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_len(&self) -> usize {
        self.log.0.lock().unwrap().len()
    }

    pub fn log_text(&self) -> String {
        self.log.0.lock().unwrap().join("\n")
    }

    /// SIGTERM, then wait (SIGKILL after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        // `ip netns exec` execs meshd, so the child's pid is meshd's.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let st = self.child.wait()?;
                bail!("meshd did not exit within {timeout:?} of SIGTERM (killed: {st})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.0 GET.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// Sums the samples of `name` whose labels contain `labels` (e.g.
/// `protocol="udp"`); an empty filter matches all.
pub fn parse_metric(text: &str, name: &str, labels: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| labels.is_empty() || l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The meshd binary next to the running test or tool (target/<profile>/),
/// or $MESHD.
pub fn meshd_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESHD") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join("meshd");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "meshd binary not found near {} (build it: cargo build -p mesh-userspace, or set MESHD)",
        exe.display()
    )
}
