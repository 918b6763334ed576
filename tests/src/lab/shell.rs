//! Shell helpers for the lab: run a command, `ip` and `ip netns exec` in a
//! namespace, run Rust code in a namespace, the guard routes of LAB.md, and
//! the namespaces a lab slot still holds.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};

/// Every lab namespace name starts with this, then the slot number, then a
/// letter for its kind (see `slot_namespaces`).
pub const NS_PREFIX: &str = "ml";

/// The letters that follow `NS_PREFIX` and the slot in a lab namespace's
/// name: segment, node (and a node's tasks: `n<j>t<i>`), client, router.
pub const NS_KINDS: [char; 4] = ['s', 'n', 'c', 'r'];

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

/// Creates network namespace `ns`; false if it already exists (or cannot
/// be made). Creation is atomic, so this is how a lab claims its slot.
pub fn netns_add(ns: &str) -> Result<bool> {
    Ok(Command::new("ip")
        .args(["netns", "add", ns])
        .stderr(Stdio::null())
        .status()
        .context("running ip netns add")?
        .success())
}

/// Deletes network namespace `ns`, ignoring failures (teardown).
pub fn netns_del(ns: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Namespaces of lab slot `slot` that still exist.
pub fn slot_namespaces(slot: u32) -> Vec<String> {
    let list = sh(&["ip", "netns", "list"]).unwrap_or_default();
    let prefix = format!("{NS_PREFIX}{slot}");
    list.split_whitespace()
        .filter(|n| {
            // The kind letter after the slot keeps slot 1 from claiming slot 12's.
            n.strip_prefix(&prefix)
                .is_some_and(|rest| rest.starts_with(NS_KINDS))
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

/// `guard_routes`, then checks that the IPv4 guard is in place: a lab
/// sends nothing before it is.
pub fn ensure_guard_routes() -> Result<()> {
    guard_routes();
    let routes = sh(&["ip", "route", "show", "table", "main", "198.18.0.0/15"])?;
    if !routes
        .lines()
        .any(|l| l.starts_with("unreachable 198.18.0.0/15"))
    {
        bail!("the guard route `unreachable 198.18.0.0/15` is missing (ip route: {routes:?})");
    }
    Ok(())
}

/// Calls `f` until it succeeds, for at most `timeout` (every 50 ms); the
/// last error, with what was awaited, if it never does. For conditions
/// with no signal to wait on.
pub fn retry<T>(
    timeout: std::time::Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: still failing after {timeout:?}")));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// For a change the dataplane's caches must follow (they keep an answer
/// for one conntrack time unit, about a second): asks with `ask(timeout
/// in ms)` until an answer comes, bounded (a cache that kept its answer
/// for good never answers again), requires the first within two units
/// (2.15 s) of `changed` with the polling's slack, then twenty more in a
/// row. `what` names the answers.
pub fn answers_again_within_two_units(
    what: &str,
    changed: std::time::Instant,
    ask: impl Fn(u64) -> anyhow::Result<String>,
) {
    retry(
        std::time::Duration::from_secs(6),
        &format!("{what} after the change"),
        || ask(200),
    )
    .unwrap();
    let took = changed.elapsed();
    assert!(
        took < std::time::Duration::from_millis(3000),
        "{what} came again only after {took:?}"
    );
    for i in 0..20 {
        ask(2000).unwrap_or_else(|e| panic!("{what} {i} after the change: {e:#}"));
    }
}

/// An XDP program that passes everything, attached to `ports` of namespace
/// `ns` (the segment's ends of the nodes' uplinks): XDP_TX out of a veth
/// (a node forwarding to another, or sending on a reply another node
/// carried back) reaches the peer only when the peer has an XDP program of
/// its own (LAB.md). Physical NICs need nothing of the kind. Detached when
/// the returned object is dropped or the ports go.
pub fn pass_xdp(ns: &str, ports: Vec<String>) -> anyhow::Result<aya::Ebpf> {
    use anyhow::Context;
    use aya::programs::{Xdp, XdpMode};
    use mesh_common::abi::PROG_FLOOR_PASS;
    use mesh_userspace::dataplane::FLOOR_OBJECT;
    anyhow::ensure!(
        !FLOOR_OBJECT.is_empty(),
        "this build has no BPF objects (MESH_BPF_SKIP=1): a lab of several nodes needs them"
    );
    in_netns(ns, move || -> anyhow::Result<aya::Ebpf> {
        let mut bpf = aya::EbpfLoader::new().load(FLOOR_OBJECT)?;
        let p: &mut Xdp = bpf
            .program_mut(PROG_FLOOR_PASS)
            .context("no pass program")?
            .try_into()?;
        p.load()?;
        for port in &ports {
            p.attach(port, XdpMode::Driver)
                .with_context(|| format!("XDP_PASS on {port}"))?;
        }
        Ok(bpf)
    })?
}

/// Makes `iface` in `ns` send complete checksums, as a wire carries them:
/// a veth hands the next namespace a partial checksum as it is, and XDP
/// there (which sees bytes, not the skb's checksum state) would send it on
/// broken. For node uplinks in labs where nodes forward to each other.
pub fn wire_checksums(ns: &str, iface: &str) -> anyhow::Result<()> {
    exec(ns, &format!("ethtool -K {iface} tx off")).map(|_| ())
}

/// Mounts a BPF filesystem of its own at `dir` (created if missing), in
/// this process's mount namespace: a meshd the lab starts pins its
/// dataplane there, where it outlives that meshd (a bpffs meshd mounted
/// inside `ip netns exec`'s private mount namespace would not).
pub fn mount_bpffs(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    sh(&["mount", "-t", "bpf", "bpf", &dir.display().to_string()])?;
    Ok(())
}

/// Unmounts what is mounted at `dir` (lazily: nothing holds it up),
/// ignoring failures (teardown).
pub fn umount(dir: &std::path::Path) {
    let _ = Command::new("umount")
        .args(["-l", &dir.display().to_string()])
        .stderr(Stdio::null())
        .status();
}
