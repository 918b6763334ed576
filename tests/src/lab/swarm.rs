//! A real Docker swarm on this machine: each node its own network, UTS and
//! mount namespace with its own containerd and dockerd (Debian's docker.io,
//! API 1.41), joined into one swarm, with a client namespace beside them.
//! What it had to work around is in ../shared/swarm-lab/NOTES.md: cgroup
//! mounts hidden by `ip netns exec` (re-mounted by the launcher), containerd
//! and dockerd sharing one mount namespace (one launcher starts both), the
//! segment's bridge in a namespace of its own (the host's FORWARD chain
//! would drop bridged frames).
//!
//! ```text
//!  client ms<k>c eth0 ─┐  segment ms<k>s br0   ┌─ eth0 node ms<k>n1 (manager): containerd, dockerd, meshd
//!                      └─ (ports c, n<j>) ─────┼─ eth0 node ms<k>n2 (worker)
//!                                              └─ eth0 node ms<k>n3 (worker)
//! ```
//!
//! # Address plan (LAB.md: Docker's tests take 198.18.0.0/17)
//!
//! Slot `k` (0..4) owns 198.18.`32k`.0/19:
//! - 198.18.`32k`.0/24, the segment: node `j` at .`10+j`, the client at .100;
//! - 198.18.`32k+j`.1/24, node `j`'s docker0 (`--bip`);
//! - 198.18.`32k+10+j`.0/24, node `j`'s docker_gwbridge (made before the
//!   swarm, as Docker would pick its own subnet otherwise);
//! - 198.18.`32k+20`.0/22, every node's pool for local networks;
//! - 198.18.`32k+24`.0/21, the swarm's address pool: the ingress network is
//!   its first /24.
//!
//! Nothing has a default route; the guard route of LAB.md is in place
//! before anything is sent. Everything is stopped by the PIDs the lab
//! started (dockerd, containerd, and what is left in the lab's namespaces
//! and cgroups), also when a test fails, and removed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::meshd::{ADMIN, Meshd, MeshdRun, READY_TIMEOUT, http_get};
use super::shell::{
    ensure_guard_routes, exec, in_netns, ip, mount_bpffs, netns_add, netns_del, pass_xdp, sh,
    umount, wire_checksums,
};

/// Swarm labs that can exist side by side.
pub const SLOTS: u32 = 4;
/// Nodes per swarm lab.
pub const MAX_NODES: usize = 8;

pub const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
const CONTAINERD: &str = "/usr/bin/containerd";
/// The image every node imports (built from busybox-static).
pub const IMAGE: &str = "mesh/busybox:latest";
/// The port the lab's services' tasks serve HTTP on.
pub const HTTP_TARGET: u16 = 8080;

/// A node of the swarm.
pub struct SwarmNode {
    /// 1-based.
    pub index: usize,
    pub ns: String,
    pub hostname: String,
    pub addr: Ipv4Addr,
    pub dir: PathBuf,
    dockerd: Option<Child>,
}

impl SwarmNode {
    /// Its dockerd's socket.
    pub fn sock(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `unix://` and its socket.
    pub fn url(&self) -> String {
        format!("unix://{}", self.sock().display())
    }

    fn containerd_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("containerd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn cgroup_parent(&self) -> String {
        format!("mesh-{}", self.ns)
    }
}

pub struct Swarm {
    pub slot: u32,
    pub dir: PathBuf,
    pub nodes: Vec<SwarmNode>,
    pub client_ns: String,
    pub client_addr: Ipv4Addr,
    segment_ns: String,
    /// RUST_LOG for the meshd processes started from now on.
    pub meshd_log: String,
    meshds: Vec<Option<Meshd>>,
    /// XDP_PASS on the segment's ports, detached with them.
    segment_xdp: Option<aya::Ebpf>,
}

/// Node `n`'s BPF filesystem, mounted the first time it is asked for
/// (unmounted when the swarm goes).
fn node_bpffs(n: &SwarmNode) -> Result<PathBuf> {
    let b = n.dir.join("bpf");
    if !b.exists() {
        mount_bpffs(&b)?;
    }
    Ok(b)
}

fn slot_base(slot: u32) -> u8 {
    (32 * slot) as u8
}

impl Swarm {
    /// A swarm of `nodes` nodes: node 1 its manager, the others workers.
    pub fn start(nodes: usize) -> Result<Swarm> {
        ensure!(
            (1..=MAX_NODES).contains(&nodes),
            "1..={MAX_NODES} nodes, not {nodes}"
        );
        for tool in [DOCKER, DOCKERD, CONTAINERD, "/bin/busybox"] {
            ensure!(
                Path::new(tool).exists(),
                "{tool} is missing: `cargo xtask setup` installs docker.io and busybox-static"
            );
        }
        ensure_guard_routes()?;
        let start = std::process::id() % SLOTS;
        let mut slot = None;
        for i in 0..SLOTS {
            let k = (start + i) % SLOTS;
            if netns_add(&format!("ms{k}s"))? {
                slot = Some(k);
                break;
            }
        }
        let slot = slot.context("every swarm lab slot is taken")?;
        let dir = std::env::temp_dir().join(format!("mesh-swarm{slot}-{}", std::process::id()));
        let mut s = Swarm {
            slot,
            dir,
            nodes: Vec::new(),
            client_ns: format!("ms{slot}c"),
            client_addr: Ipv4Addr::new(198, 18, slot_base(slot), 100),
            segment_ns: format!("ms{slot}s"),
            meshd_log: "info".into(),
            meshds: Vec::new(),
            segment_xdp: None,
        };
        s.build(nodes)?;
        Ok(s)
    }

    fn seg(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, slot_base(self.slot), host)
    }

    fn net(&self, off: u8) -> u8 {
        slot_base(self.slot) + off
    }

    fn build(&mut self, n: usize) -> Result<()> {
        let t0 = Instant::now();
        std::fs::create_dir_all(&self.dir)?;
        build_image(&self.dir.join("busybox.tar"))?;
        let seg = self.segment_ns.clone();
        ip(&seg, "link set lo up")?;
        ip(&seg, "link add br0 type bridge")?;
        ip(&seg, "link set br0 up")?;
        // The client.
        let c = self.client_ns.clone();
        ensure!(netns_add(&c)?, "namespace {c} exists already");
        ip(&c, "link set lo up")?;
        ip(
            &c,
            &format!("link add eth0 type veth peer name c netns {seg}"),
        )?;
        ip(&seg, "link set c master br0 up")?;
        ip(&c, &format!("addr add {}/24 dev eth0", self.client_addr))?;
        ip(&c, "link set eth0 up")?;
        // As from a wire: a partial checksum would reach a node's XDP as
        // it is, and be carried on to another node broken.
        wire_checksums(&c, "eth0")?;
        for j in 1..=n {
            let ns = format!("ms{}n{j}", self.slot);
            ensure!(netns_add(&ns)?, "namespace {ns} exists already");
            let addr = self.seg(10 + j as u8);
            ip(&ns, "link set lo up")?;
            ip(
                &ns,
                &format!("link add eth0 type veth peer name n{j} netns {seg}"),
            )?;
            ip(&seg, &format!("link set n{j} master br0 up"))?;
            ip(&ns, &format!("addr add {addr}/24 dev eth0"))?;
            ip(&ns, "link set eth0 up")?;
            let dir = self.dir.join(format!("n{j}"));
            self.nodes.push(SwarmNode {
                index: j,
                hostname: format!("ms{}-node{j}", self.slot),
                ns,
                addr,
                dir,
                dockerd: None,
            });
            self.meshds.push(None);
        }
        // Nodes forward to each other with XDP_TX: see `shell::pass_xdp`.
        let ports = (1..=n).map(|j| format!("n{j}")).collect();
        self.segment_xdp = Some(pass_xdp(&seg, ports)?);
        for node in &self.nodes {
            wire_checksums(&node.ns, "eth0")?;
        }
        for j in 1..=n {
            self.start_dockerd(j)?;
        }
        for j in 1..=n {
            self.wait_dockerd(j)?;
            let gw = self.net(10 + j as u8);
            self.docker(
                j,
                &[
                    "network",
                    "create",
                    "--driver",
                    "bridge",
                    "--subnet",
                    &format!("198.18.{gw}.0/24"),
                    "--gateway",
                    &format!("198.18.{gw}.1"),
                    "--opt",
                    "com.docker.network.bridge.name=docker_gwbridge",
                    "--opt",
                    "com.docker.network.bridge.enable_icc=false",
                    "--opt",
                    "com.docker.network.bridge.enable_ip_masquerade=true",
                    "docker_gwbridge",
                ],
            )?;
            let tar = self.dir.join("busybox.tar");
            self.docker(
                j,
                &[
                    "import",
                    "-c",
                    "CMD [\"/bin/sh\"]",
                    tar.to_str().unwrap(),
                    IMAGE,
                ],
            )?;
        }
        let a1 = self.nodes[0].addr;
        self.docker(
            1,
            &[
                "swarm",
                "init",
                "--advertise-addr",
                &format!("{a1}:2377"),
                "--listen-addr",
                &format!("{a1}:2377"),
                "--data-path-addr",
                &a1.to_string(),
                "--default-addr-pool",
                &format!("198.18.{}.0/21", self.net(24)),
                "--default-addr-pool-mask-length",
                "24",
            ],
        )?;
        let token = self.docker(1, &["swarm", "join-token", "-q", "worker"])?;
        for j in 2..=n {
            let a = self.nodes[j - 1].addr;
            self.docker(
                j,
                &[
                    "swarm",
                    "join",
                    "--token",
                    token.trim(),
                    "--advertise-addr",
                    &format!("{a}:2377"),
                    "--listen-addr",
                    &format!("{a}:2377"),
                    "--data-path-addr",
                    &a.to_string(),
                    &format!("{a1}:2377"),
                ],
            )?;
        }
        self.wait(Duration::from_secs(30), "every node ready", || {
            let out = self.docker(1, &["node", "ls", "--format", "{{.Status}}"])?;
            Ok(out.lines().filter(|l| *l == "Ready").count() == n)
        })?;
        eprintln!(
            "swarm lab {}: {n} nodes up in {:.1?} (in {})",
            self.slot,
            t0.elapsed(),
            self.dir.display()
        );
        Ok(())
    }

    fn start_dockerd(&mut self, j: usize) -> Result<()> {
        let (bip, pool) = (self.net(j as u8), self.net(20));
        let node = &mut self.nodes[j - 1];
        let d = node.dir.clone();
        let dd = d.display();
        for sub in ["data", "exec", "ctd/root", "ctd/state", "ctd/opt"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        std::fs::write(
            d.join("ctd/config.toml"),
            format!(
                "version = 2\nroot = \"{dd}/ctd/root\"\nstate = \"{dd}/ctd/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{dd}/ctd/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{dd}/ctd/containerd.sock.ttrpc\"\n\
                 [debug]\n  address = \"{dd}/ctd/debug.sock\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{dd}/ctd/opt\"\n"
            ),
        )?;
        // Its own config file keeps /etc/docker/daemon.json out, and its
        // own key its own engine id.
        std::fs::write(
            d.join("daemon.json"),
            format!("{{\"deprecated-key-path\": \"{dd}/key.json\"}}\n"),
        )?;
        let launch = d.join("launch.sh");
        std::fs::write(
            &launch,
            format!(
                r#"#!/bin/sh
set -e
hostname {host}
# `ip netns exec` mounted a fresh /sys here, hiding the cgroup mounts.
if ! grep -q ' /sys/fs/cgroup/devices ' /proc/self/mounts; then
  mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
  grep -E '^[^ ]+ /sys/fs/cgroup/[^ ]+ cgroup2? ' /proc/1/mounts | while read -r src mp typ opts _; do
    mkdir -p "$mp"; mount -t "$typ" -o "$opts" "$src" "$mp"
  done
fi
set +e
{CONTAINERD} --config {dd}/ctd/config.toml --log-level warn >>{dd}/containerd.log 2>&1 </dev/null &
echo $! >{dd}/containerd.pid
i=0; while [ ! -S {dd}/ctd/containerd.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
export DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1
exec {DOCKERD} --config-file {dd}/daemon.json --data-root {dd}/data --exec-root {dd}/exec \
  --pidfile {dd}/docker.pid -H unix://{dd}/docker.sock --containerd {dd}/ctd/containerd.sock \
  --cgroup-parent /{cg} --bip 198.18.{bip}.1/24 \
  --default-address-pool base=198.18.{pool}.0/22,size=24 \
  --storage-driver overlay2 --log-level warn
"#,
                host = node.hostname,
                cg = node.cgroup_parent(),
            ),
        )?;
        sh(&["chmod", "+x", launch.to_str().unwrap()])?;
        let log = std::fs::File::create(d.join("dockerd.log"))?;
        // setsid and `ip netns exec` and unshare all exec: the child's pid
        // ends up dockerd's.
        let child = Command::new("setsid")
            .args(["ip", "netns", "exec", &node.ns, "unshare", "--uts", "--"])
            .arg(&launch)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        node.dockerd = Some(child);
        Ok(())
    }

    fn wait_dockerd(&mut self, j: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .docker(j, &["version", "--format", "{{.Server.APIVersion}}"])
                .is_ok()
            {
                return Ok(());
            }
            let node = &mut self.nodes[j - 1];
            let exited = node
                .dockerd
                .as_mut()
                .map(|c| c.try_wait().ok().flatten().is_some())
                .unwrap_or(true);
            if exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(node.dir.join("dockerd.log")).unwrap_or_default();
                bail!(
                    "dockerd of node {j} did not come up; its log ends:\n{}",
                    log.lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `docker -H <node j's socket> args...`: its stdout.
    pub fn docker(&self, j: usize, args: &[&str]) -> Result<String> {
        let sock = format!("unix://{}", self.nodes[j - 1].sock().display());
        let out = Command::new(DOCKER)
            .args(["-H", &sock])
            .args(args)
            .output()
            .context("running docker")?;
        if !out.status.success() {
            bail!(
                "docker {args:?} on node {j}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A service whose tasks serve HTTP on [`HTTP_TARGET`], published in
    /// ingress mode on `published`; each task answers `/` with its host
    /// name and `/cgi-bin/peer` with its host name and the client's
    /// address as it sees it. `extra` goes before the image (more
    /// `--publish`, say).
    pub fn create_web_service(
        &self,
        name: &str,
        replicas: usize,
        published: u16,
        extra: &[&str],
    ) -> Result<()> {
        let publish = format!("published={published},target={HTTP_TARGET}");
        let replicas = replicas.to_string();
        let mut args = vec![
            "service",
            "create",
            "-d",
            "--quiet",
            "--name",
            name,
            "--replicas",
            &replicas,
            "--publish",
            &publish,
            "--no-resolve-image",
            "--init",
            "--stop-grace-period",
            "1s",
            "--hostname",
            "{{.Node.Hostname}}-{{.Service.Name}}-{{.Task.Slot}}",
        ];
        args.extend_from_slice(extra);
        let cmd = format!("hostname > /www/index.html; exec httpd -f -p {HTTP_TARGET} -h /www");
        args.extend([IMAGE, "sh", "-c", &cmd]);
        self.docker(1, &args).map(drop)
    }

    /// Starts meshd on node `j`, following its dockerd, and waits until it
    /// reports ready.
    pub fn start_meshd(&mut self, j: usize, meshd: &Path, extra: &[&str]) -> Result<()> {
        ensure!(
            self.meshds[j - 1].is_none(),
            "meshd runs on node {j} already"
        );
        let node = &self.nodes[j - 1];
        let run = MeshdRun::docker(&node.url(), &node.hostname)
            .extra(extra)
            .bpffs(&node_bpffs(node)?);
        let m = Meshd::start(&node.ns, meshd, &run, &self.meshd_log)?;
        m.wait_ready(READY_TIMEOUT)
            .with_context(|| format!("meshd on node {j}"))?;
        self.meshds[j - 1] = Some(m);
        Ok(())
    }

    /// Starts meshd on node `j` without waiting for it to be ready.
    pub fn spawn_meshd(&mut self, j: usize, meshd: &Path, url: &str) -> Result<()> {
        let node = &self.nodes[j - 1];
        let run = MeshdRun::docker(url, &node.hostname).bpffs(&node_bpffs(node)?);
        self.meshds[j - 1] = Some(Meshd::start(&node.ns, meshd, &run, &self.meshd_log)?);
        Ok(())
    }

    pub fn meshd(&self, j: usize) -> Result<&Meshd> {
        self.meshds[j - 1]
            .as_ref()
            .with_context(|| format!("meshd is not running on node {j}"))
    }

    /// Stops node `j`'s meshd (SIGTERM) and returns its exit status.
    pub fn stop_meshd(&mut self, j: usize) -> Result<std::process::ExitStatus> {
        let mut m = self.meshds[j - 1]
            .take()
            .with_context(|| format!("meshd is not running on node {j}"))?;
        m.terminate(Duration::from_secs(10))
    }

    /// GET `path` from node `j`'s meshd admin endpoint (any status): the
    /// status line's code and the body.
    /// The interface each of node `j`'s reply entries trusts its task's
    /// replies from (0: not found yet), read from the pinned map.
    pub fn reply_ports(&self, j: usize) -> Result<Vec<u32>> {
        let map = node_bpffs(&self.nodes[j - 1])?
            .join("mesh/maps")
            .join(mesh_common::abi::MAP_REPLY4);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&map)
            .output()
            .context("running bpftool")?;
        ensure!(
            out.status.success(),
            "bpftool map dump {}: {}{}",
            map.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut ports = Vec::new();
        for e in v.as_array().context("a JSON array")? {
            let bytes: Vec<u8> = e["value"]
                .as_array()
                .context("raw value bytes")?
                .iter()
                .filter_map(|b| b.as_str())
                .filter_map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).ok())
                .collect();
            // ReplyValue4: backend_id, backend_gen, count, ifindex, ...
            ensure!(bytes.len() >= 16, "a reply value of {} bytes", bytes.len());
            ports.push(u32::from_ne_bytes(bytes[12..16].try_into().unwrap()));
        }
        Ok(ports)
    }

    pub fn admin(&self, j: usize, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        in_netns(&self.nodes[j - 1].ns, move || raw_get(ADMIN, &path))?
    }

    /// Node `j`'s meshd's applied state (`/state`).
    pub fn state(&self, j: usize) -> Result<serde_json::Value> {
        let path = "/state".to_string();
        let body = in_netns(&self.nodes[j - 1].ns, move || http_get(ADMIN, &path))??;
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until node `j`'s applied state satisfies `f`; returns it.
    pub fn wait_state(
        &self,
        j: usize,
        timeout: Duration,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.state(j);
            if let Ok(s) = &s
                && f(s)
            {
                return Ok(s.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {j}: {what}: not within {timeout:?}; its state: {}",
                    s.map(|s| s.to_string())
                        .unwrap_or_else(|e| format!("{e:#}"))
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `f` holds (checked every 100 ms).
    pub fn wait(&self, timeout: Duration, what: &str, f: impl Fn() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = f();
            if matches!(r, Ok(true)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {timeout:?} ({r:?})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An HTTP GET from the client to node `j`'s `port`: the body. Each
    /// call is a new connection (a new source port: its own Maglev pick).
    pub fn curl(&self, j: usize, port: u16, path: &str) -> Result<String> {
        let url = format!("http://{}:{port}{path}", self.nodes[j - 1].addr);
        exec(&self.client_ns, &format!("curl -sS -m 3 {url}"))
    }

    /// Kills node `j`'s dockerd with SIGKILL (its containerd and the
    /// containers stay, as when dockerd crashes).
    pub fn kill_dockerd(&mut self, j: usize) -> Result<()> {
        let node = &mut self.nodes[j - 1];
        let mut c = node.dockerd.take().context("dockerd is not running")?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }
}

/// A GET that returns any status.
fn raw_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    Ok((code, body.to_string()))
}

/// The image's root: busybox-static and its applets, and a web root whose
/// `cgi-bin/peer` tells who the client is.
fn build_image(tar: &Path) -> Result<()> {
    let root = tar.with_extension("rootfs");
    for d in ["bin", "tmp", "www/cgi-bin", "etc", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    let list = sh(&["/bin/busybox", "--list"])?;
    for applet in list.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    add_udp_echo(&root)?;
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(
        root.join("www/cgi-bin/peer"),
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s %s:%s\\n' \"$(hostname)\" \"$REMOTE_ADDR\" \"$REMOTE_PORT\"\n",
    )?;
    sh(&[
        "chmod",
        "0755",
        root.join("www/cgi-bin/peer").to_str().unwrap(),
    ])?;
    sh(&["chmod", "1777", root.join("tmp").to_str().unwrap()])?;
    sh(&[
        "tar",
        "-C",
        root.to_str().unwrap(),
        "-cf",
        tar.to_str().unwrap(),
        ".",
    ])?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

/// The UDP server the lab's UDP services run (`/bin/mesh-udp-echo PORT`,
/// busybox has none), built beside meshd, with the shared libraries it
/// needs.
pub const UDP_ECHO: &str = "/bin/mesh-udp-echo";

fn add_udp_echo(root: &Path) -> Result<()> {
    let meshd = super::meshd::meshd_path()?;
    let bin = meshd.with_file_name("mesh-udp-echo");
    ensure!(
        bin.is_file(),
        "{} not found (cargo build -p mesh-tests --bins)",
        bin.display()
    );
    std::fs::copy(&bin, root.join("bin/mesh-udp-echo"))?;
    // Its libraries, at the paths the loader looks for them.
    let ldd = sh(&["ldd", bin.to_str().unwrap()])?;
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
    }
    Ok(())
}

/// Signals `pid` and waits up to `timeout` for it to go; SIGKILL after.
fn stop_pid(pid: i32, timeout: Duration) {
    let alive = |p: i32| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(p);
    // SAFETY: signalling a process this lab started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + timeout;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for m in self.meshds.iter_mut().filter_map(Option::take) {
            let mut m = m;
            let _ = m.terminate(Duration::from_secs(10));
        }
        // Every dockerd at once (each stops its containers), then wait.
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &self.nodes {
            if let Some(c) = &n.dockerd {
                // SAFETY: our child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.dockerd.take() {
                while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for n in &self.nodes {
            if let Some(p) = n.containerd_pid() {
                stop_pid(p, Duration::from_secs(10));
            }
        }
        // What is left in the nodes' namespaces (containerd's shims) and
        // cgroups (containers): started by what the lab started.
        for n in &self.nodes {
            let pids = sh(&["ip", "netns", "pids", &n.ns]).unwrap_or_default();
            for p in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                stop_pid(p, Duration::from_secs(2));
            }
            for ctl in [
                "pids", "memory", "cpu", "cpuacct", "blkio", "cpuset", "devices", "freezer",
                "systemd",
            ] {
                let cg = Path::new("/sys/fs/cgroup")
                    .join(ctl)
                    .join(n.cgroup_parent());
                if !cg.exists() {
                    continue;
                }
                if ctl == "pids"
                    && let Ok(rd) = std::fs::read_dir(&cg)
                {
                    for e in rd.flatten().filter(|e| e.path().is_dir()) {
                        let procs = std::fs::read_to_string(e.path().join("cgroup.procs"))
                            .unwrap_or_default();
                        for p in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                            stop_pid(p, Duration::from_secs(1));
                        }
                    }
                }
                if let Ok(rd) = std::fs::read_dir(&cg) {
                    for e in rd.flatten().filter(|e| e.path().is_dir()) {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
                let _ = std::fs::remove_dir(&cg);
            }
        }
        for n in &self.nodes {
            netns_del(&n.ns);
            let b = n.dir.join("bpf");
            if b.exists() {
                umount(&b);
            }
        }
        netns_del(&self.client_ns);
        netns_del(&self.segment_ns);
        if std::env::var_os("MESH_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
