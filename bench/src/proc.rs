//! Processes the end-to-end suites run inside lab namespaces (servers,
//! proxies, load generators), stopped by their own PID when dropped, and
//! the CPU time they use.
//!
//! CPU time comes from a cpuacct cgroup of the benchmark's own, which
//! every process started here joins before it runs (so forks such as
//! nginx's workers are in it too): user and system time of the lab's
//! processes, and the kernel's packet work done in their context (on veth
//! pairs, softirqs mostly run in the sender's context). The machine's
//! total from /proc/stat is reported beside it, because the machine is
//! shared: other people's builds land there, not in the cgroup.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The benchmark's cpuacct cgroup (cgroup v1 here; v2 where mounted as
/// the unified hierarchy), removed when dropped.
pub struct CpuGroup {
    dir: PathBuf,
    procs: CString,
    usage: PathBuf,
}

impl CpuGroup {
    /// A fresh group, or `None` where neither hierarchy can be used (then
    /// only the machine-wide figure is reported).
    pub fn new() -> Option<CpuGroup> {
        let name = format!("mesh-bench-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpuacct");
        let v2 = Path::new("/sys/fs/cgroup");
        let (dir, usage) = if v1.join("cpuacct.usage").exists() {
            let d = v1.join(&name);
            (d.clone(), d.join("cpuacct.usage"))
        } else if v2.join("cgroup.controllers").exists() {
            let d = v2.join(&name);
            (d.clone(), d.join("cpu.stat"))
        } else {
            return None;
        };
        std::fs::create_dir_all(&dir).ok()?;
        let procs = CString::new(dir.join("cgroup.procs").to_string_lossy().as_bytes()).ok()?;
        Some(CpuGroup { dir, procs, usage })
    }

    /// Moves a running process (all its threads) into the group: for
    /// processes started elsewhere (meshd, started by the lab's own
    /// code); its children from then on are in it too.
    pub fn add(&self, pid: u32) -> Result<()> {
        let path = Path::new(self.procs.to_str()?);
        std::fs::write(path, pid.to_string())
            .with_context(|| format!("moving {pid} into {}", path.display()))
    }

    /// CPU time used by the group so far, ns.
    pub fn usage_ns(&self) -> Result<u64> {
        let text = std::fs::read_to_string(&self.usage)
            .with_context(|| format!("reading {}", self.usage.display()))?;
        if self.usage.ends_with("cpuacct.usage") {
            return Ok(text.trim().parse()?);
        }
        let us: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .context("cpu.stat has no usage_usec")?
            .trim()
            .parse()?;
        Ok(us * 1000)
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // Empty by now: every process in it has been stopped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Busy and total jiffies of the whole machine (/proc/stat, first line).
pub fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are the 4th and 5th.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Clock ticks per second (for jiffies).
pub fn hz() -> f64 {
    // SAFETY: plain sysconf.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// A process in a lab namespace, stopped (SIGTERM, then SIGKILL) by its PID
/// when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
}

/// Starts `args` in network namespace `ns` (`ip netns exec` execs it, so
/// the child's PID is the program's), in `group` if given, with stdout
/// and stderr to `log` (or piped when `capture`).
pub fn spawn(
    ns: &str,
    args: &[&str],
    env: &[(&str, &str)],
    group: Option<&CpuGroup>,
    log: Option<&Path>,
    capture: bool,
) -> Result<Proc> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    if capture {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
    } else if let Some(log) = log {
        let f =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        c.stdout(f.try_clone()?).stderr(f);
    } else {
        c.stdout(Stdio::null()).stderr(Stdio::null());
    }
    if let Some(g) = group {
        let path = g.procs.clone();
        // SAFETY: runs in the child between fork and exec; only
        // async-signal-safe calls (open, write, close) on data prepared
        // before the fork.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
                Ok(())
            });
        }
    }
    let child = c
        .spawn()
        .with_context(|| format!("starting {} in {ns}", args[0]))?;
    Ok(Proc {
        name: args[0].to_string(),
        child,
    })
}

impl Proc {
    /// Waits for the process to exit within `timeout`; its output.
    pub fn wait_output(self, timeout: Duration) -> Result<(std::process::ExitStatus, String)> {
        let mut me = self;
        let deadline = Instant::now() + timeout;
        loop {
            if me.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{} did not finish within {timeout:?}", me.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        if let Some(mut o) = me.child.stdout.take() {
            std::io::Read::read_to_string(&mut o, &mut out)?;
        }
        if let Some(mut e) = me.child.stderr.take() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut e, &mut err)?;
            out.push_str(&err);
        }
        let st = me.child.wait()?;
        Ok((st, out))
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        if !self.running() {
            return;
        }
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `args` in `ns` to completion (within `timeout`); its output, or an
/// error with it.
pub fn run(
    ns: &str,
    args: &[&str],
    env: &[(&str, &str)],
    group: Option<&CpuGroup>,
    timeout: Duration,
) -> Result<String> {
    let p = spawn(ns, args, env, group, None, true)?;
    let (st, out) = p.wait_output(timeout)?;
    if !st.success() {
        bail!("{args:?} in {ns} failed ({st}): {}", out.trim());
    }
    Ok(out)
}

/// Whether `prog` is on PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Waits until something listens on `addr:port` (TCP) in `ns`.
pub fn wait_listening(ns: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "ss",
                "-Hltn",
                &format!("sport = :{port}"),
            ])
            .output()
            .context("running ss")?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on port {port} in {ns} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
