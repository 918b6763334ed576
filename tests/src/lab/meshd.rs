//! meshd as the lab runs it: its command line (built in one place,
//! `MeshdRun::args`), the process in a node's namespace with its log
//! collected line by line, and the admin endpoint's HTTP and metrics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// meshd's admin address inside each node's namespace (namespaces are
/// separate, so every node can use the same one).
pub const ADMIN: &str = "127.0.0.1:9469";

/// How long meshd may take from start to "meshd ready" (loading the
/// programs runs the verifier).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How the lab runs meshd on one node.
#[derive(Clone, Debug)]
pub struct MeshdRun {
    /// The state file meshd watches (unless `docker` is set).
    pub state: PathBuf,
    /// Follow Docker at this URL (`--docker`) instead of a state file.
    pub docker: Option<String>,
    /// The node's uplink (`--iface`; empty: left to meshd).
    pub iface: String,
    /// The node's name in the state file (`--node`; not with `docker`).
    pub node: String,
    /// The admin endpoint's address inside the node's namespace.
    pub admin: String,
    /// More arguments, after the lab's own (so they win where meshd takes
    /// the last of a repeated flag).
    pub extra: Vec<String>,
    /// Environment variables for meshd alone (NAME=VALUE).
    pub env: Vec<String>,
    /// The BPF filesystem meshd pins its dataplane on (`--bpffs`; the lab
    /// mounts one per node, which outlives meshd).
    pub bpffs: Option<PathBuf>,
}

impl MeshdRun {
    pub fn new(state: &Path, iface: &str, node: &str) -> MeshdRun {
        MeshdRun {
            state: state.to_path_buf(),
            docker: None,
            iface: iface.to_string(),
            node: node.to_string(),
            admin: ADMIN.to_string(),
            extra: Vec::new(),
            env: Vec::new(),
            bpffs: None,
        }
    }

    /// Pins the dataplane on the BPF filesystem at `dir`.
    pub fn bpffs(mut self, dir: &Path) -> MeshdRun {
        self.bpffs = Some(dir.to_path_buf());
        self
    }

    /// meshd following the dockerd at `url`, with nothing else to say about
    /// the node (the label in its log is `label`).
    pub fn docker(url: &str, label: &str) -> MeshdRun {
        MeshdRun {
            docker: Some(url.to_string()),
            ..MeshdRun::new(Path::new(""), "", label)
        }
    }

    /// Environment variables (NAME=VALUE) for this meshd only.
    pub fn env(mut self, env: &[String]) -> MeshdRun {
        self.env.extend(env.iter().cloned());
        self
    }

    pub fn extra(mut self, extra: &[&str]) -> MeshdRun {
        self.extra.extend(extra.iter().map(|s| s.to_string()));
        self
    }

    /// meshd's command line (without the program): the one place that
    /// knows meshd's CLI. Small tables and a quick watcher suit the lab.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into()];
        match &self.docker {
            Some(url) => a.extend(["--docker".to_string(), url.clone()]),
            None => a.extend([
                "--state".to_string(),
                self.state.display().to_string(),
                "--node".to_string(),
                self.node.clone(),
                "--state-dir".to_string(),
                self.state
                    .parent()
                    .unwrap_or(Path::new("."))
                    .display()
                    .to_string(),
            ]),
        }
        if !self.iface.is_empty() {
            a.extend(["--iface".to_string(), self.iface.clone()]);
        }
        a.extend(
            [
                "--maglev-size",
                "1021",
                "--max-services",
                "64",
                "--watch-interval-ms",
                // Docker is read in full each time: spare the dockerds.
                if self.docker.is_some() { "250" } else { "100" },
                "--admin-addr",
                &self.admin,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        if let Some(mode) = tc_attach_override() {
            a.extend(["--tc-attach".to_string(), mode]);
        }
        if let Some(i) = intercept_override() {
            a.extend(["--intercept".to_string(), i]);
        }
        if let Some(b) = &self.bpffs {
            a.extend(["--bpffs".to_string(), b.display().to_string()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// `MESH_TEST_TC_ATTACH` (tcx, netlink): run every lab meshd with that
/// TC attach mode (`cargo xtask test` runs the end-to-end tests in both).
pub fn tc_attach_override() -> Option<String> {
    std::env::var("MESH_TEST_TC_ATTACH")
        .ok()
        .filter(|m| !m.is_empty() && m != "auto")
}

/// How lab meshds attach TC programs: "netlink", or "tcx" (auto on this
/// kernel).
pub fn tc_mode() -> &'static str {
    match tc_attach_override().as_deref() {
        Some("netlink") => "netlink",
        _ => "tcx",
    }
}

/// `MESH_TEST_INTERCEPT` (xdp, tc): run every lab meshd with that
/// intercept; unset, meshd's default (`cargo xtask test` runs the
/// end-to-end tests with both).
pub fn intercept_override() -> Option<String> {
    std::env::var("MESH_TEST_INTERCEPT")
        .ok()
        .filter(|m| !m.is_empty())
}

/// The intercept lab meshds run with.
pub fn intercept() -> mesh_userspace::dataplane::Intercept {
    use mesh_userspace::dataplane::{DEFAULT_INTERCEPT, Intercept};
    match intercept_override().as_deref() {
        Some("xdp") => Intercept::Xdp,
        Some("tc") => Intercept::Tc,
        Some(other) => panic!("MESH_TEST_INTERCEPT={other}: xdp or tc"),
        None => DEFAULT_INTERCEPT,
    }
}

/// What meshd attaches to uplink `dev` with the lab's intercept, as
/// [`attached_programs`] lists it.
pub fn uplink_programs(dev: &str) -> Vec<String> {
    let tc = tc_mode();
    match intercept() {
        mesh_userspace::dataplane::Intercept::Xdp => {
            vec![format!("{dev} xdp"), format!("{dev} {tc} mesh_tc_uplink")]
        }
        mesh_userspace::dataplane::Intercept::Tc => vec![format!("{dev} {tc} mesh_tc_ingress")],
    }
}

/// What is attached in namespace `ns` to each of `devs`: "DEV xdp",
/// "DEV tcx NAME" for TCX links, "DEV netlink NAME" for netlink filters
/// (ingress).
pub fn attached_programs(ns: &str, devs: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for &dev in devs {
        let link = Command::new("ip")
            .args(["-n", ns, "-d", "link", "show", dev])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if link.contains("prog/xdp") {
            out.push(format!("{dev} xdp"));
        }
        let d = dev.to_string();
        let tcx = super::in_netns(ns, move || {
            aya::programs::SchedClassifier::query_tcx(&d, aya::programs::TcAttachType::Ingress).map(
                |(_, progs)| {
                    progs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_string())
                        .collect::<Vec<_>>()
                },
            )
        })
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
        out.extend(tcx.into_iter().map(|n| format!("{dev} tcx {n}")));
        let filters = Command::new("ip")
            .args([
                "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "ingress",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        // One filter per line; its name may be printed more than once.
        for name in filters
            .lines()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("mesh_")))
        {
            out.push(format!("{dev} netlink {name}"));
        }
    }
    out
}

#[derive(Default)]
struct Log {
    lines: Vec<String>,
    /// meshd's stderr is closed: it has exited, nothing more will come.
    closed: bool,
}

/// meshd running in a node namespace, its stderr collected line by line.
pub struct Meshd {
    child: Child,
    log: Arc<(Mutex<Log>, Condvar)>,
}

impl Meshd {
    /// Starts meshd in namespace `ns` as `run` says, with RUST_LOG
    /// `rust_log`; does not wait (see `wait_ready`). With
    /// MESH_TEST_VERBOSE set its log is echoed, each line prefixed with
    /// `label`.
    pub fn start(ns: &str, meshd: &Path, run: &MeshdRun, rust_log: &str) -> Result<Meshd> {
        let mut args = vec!["netns".to_string(), "exec".to_string(), ns.to_string()];
        if !run.env.is_empty() {
            // env execs meshd: the child's pid stays meshd's.
            args.push("env".into());
            args.extend(run.env.iter().cloned());
        }
        args.push(meshd.display().to_string());
        args.extend(run.args());
        Self::spawn_labelled(&args, rust_log, &format!("meshd {}", run.node))
    }

    /// Runs `ip <ip_args>` (which should exec meshd) with its stderr captured.
    pub fn spawn(ip_args: &[String], rust_log: &str) -> Result<Meshd> {
        Self::spawn_labelled(ip_args, rust_log, "meshd")
    }

    fn spawn_labelled(ip_args: &[String], rust_log: &str, label: &str) -> Result<Meshd> {
        let mut child = Command::new("ip")
            .args(ip_args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting meshd")?;
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let err = child.stderr.take().unwrap();
        let (l, label) = (log.clone(), label.to_string());
        std::thread::spawn(move || {
            let verbose = std::env::var_os("MESH_TEST_VERBOSE").is_some();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if verbose {
                    eprintln!("{label}| {line}");
                }
                l.0.lock().unwrap().lines.push(line);
                l.1.notify_all();
            }
            l.0.lock().unwrap().closed = true;
            l.1.notify_all();
        });
        Ok(Meshd { child, log })
    }

    /// Waits until meshd logs that it is ready (programs attached, maps
    /// filled).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.wait_log("meshd ready", timeout).map(drop)
    }

    /// Waits until a log line contains `pat`; fails with the log so far
    /// (at once if meshd has exited).
    pub fn wait_log(&self, pat: &str, timeout: Duration) -> Result<String> {
        self.wait_log_after(0, pat, timeout)
    }

    /// As `wait_log`, ignoring the first `skip` lines.
    pub fn wait_log_after(&self, skip: usize, pat: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.log;
        let mut log = lock.lock().unwrap();
        loop {
            if let Some(l) = log.lines.iter().skip(skip).find(|l| l.contains(pat)) {
                return Ok(l.clone());
            }
            if log.closed {
                bail!(
                    "meshd exited without logging {pat:?}; its log:\n{}",
                    log.lines.join("\n")
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "meshd did not log {pat:?} within {timeout:?}; its log:\n{}",
                    log.lines.join("\n")
                );
            }
            log = cv.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_len(&self) -> usize {
        self.log.0.lock().unwrap().lines.len()
    }

    pub fn log_text(&self) -> String {
        self.log.0.lock().unwrap().lines.join("\n")
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().context("SIGKILL to meshd")?;
        self.child.wait().context("waiting for meshd")?;
        Ok(())
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

/// meshd's health port (its default, `--health-addr 0.0.0.0:9471`), on
/// each node's address.
pub const HEALTH_PORT: u16 = 9471;

/// A minimal HTTP/1.0 GET: the status code and the body, whatever the
/// status (meshd's own client, as `meshd drain` and `status` use it).
pub fn http_status(addr: &str, path: &str) -> Result<(u16, String)> {
    let a: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("{addr}: not an address and port"))?;
    mesh_userspace::commands::drain::get(a, path).with_context(|| format!("GET {path} on {addr}"))
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

/// The BPF maps process `pid` holds, by name (each once, however many
/// descriptors it has of it): a running meshd's own maps, read from
/// outside it.
pub fn maps_of(pid: u32) -> Result<std::collections::HashMap<String, aya::maps::MapData>> {
    let mut out = std::collections::HashMap::new();
    let mut seen = std::collections::BTreeSet::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for fd in std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let m = aya::maps::MapData::from_id(id).with_context(|| format!("opening map {id}"))?;
        if let Some(name) = m.info()?.name_as_str() {
            out.insert(name.to_string(), m);
        }
    }
    Ok(out)
}
