//! What the daemon asks the host's network configuration.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The interface the kernel routes `addr` out of (`ip route get`).
pub fn route_dev(addr: Ipv4Addr) -> Result<String> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &addr.to_string()])
        .output()
        .context("running `ip route get` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "no route to task {addr}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j route get`")?;
    let dev = v.get(0).and_then(|r| r.get("dev")).and_then(|d| d.as_str());
    match dev {
        Some("lo") => bail!("task {addr} is an address of this host, not behind an interface"),
        Some(d) => Ok(d.to_string()),
        None => bail!("route to task {addr} names no device"),
    }
}

/// The interface that holds `addr` (`ip addr`).
pub fn iface_with_addr(addr: Ipv4Addr) -> Result<String> {
    let out = Command::new("ip")
        .args(["-j", "-4", "addr", "show"])
        .output()
        .context("running `ip addr` (iproute2)")?;
    if !out.status.success() {
        bail!("ip addr: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j addr`")?;
    let want = addr.to_string();
    for link in v.as_array().into_iter().flatten() {
        let holds = link
            .get("addr_info")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
            .any(|i| i.get("local").and_then(|l| l.as_str()) == Some(want.as_str()));
        if holds && let Some(name) = link.get("ifname").and_then(|n| n.as_str()) {
            return Ok(name.to_string());
        }
    }
    bail!("no interface holds {addr}")
}

/// The oldest kernel meshd runs on: `bpf_redirect_neigh` (5.10) is the
/// newest helper the programs call; memory-mapped arrays need 5.5.
pub const MIN_KERNEL: (u8, u8) = (5, 10);

/// Fails on a kernel older than [`MIN_KERNEL`], or one without TCX when
/// TCX is asked for.
pub fn check_kernel(tc: crate::dataplane::TcAttach) -> Result<()> {
    use aya::util::KernelVersion;
    let v = KernelVersion::current().context("reading the kernel version")?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{v:?}"));
    let (major, minor) = MIN_KERNEL;
    if v < KernelVersion::new(major, minor, 0) {
        bail!(
            "kernel {release} is older than {major}.{minor}, the oldest mesh runs on \
             (its programs call bpf_redirect_neigh, new in 5.10)"
        );
    }
    if tc == crate::dataplane::TcAttach::Tcx && v < KernelVersion::new(6, 6, 0) {
        bail!(
            "--tc-attach tcx needs kernel 6.6 or later (this is {release}); use --tc-attach netlink or auto"
        );
    }
    Ok(())
}

/// Fails unless `iface` exists.
pub fn check_iface(iface: &str) -> Result<()> {
    if !std::path::Path::new("/sys/class/net").join(iface).exists() {
        bail!("interface {iface:?} does not exist (see `ip link`)");
    }
    Ok(())
}

/// The FIB lookups the programs make refuse to route for an interface
/// with IPv4 forwarding off; say so before attaching.
pub fn check_forwarding(iface: &str) -> Result<()> {
    let p = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    let v = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    if v.trim() != "1" {
        bail!(
            "IPv4 forwarding is off on {iface}; mesh forwards between the uplink and the tasks' \
             interfaces (Docker hosts have it on). Enable it with: sysctl -w net.ipv4.conf.{iface}.forwarding=1"
        );
    }
    Ok(())
}

/// The interfaces to attach the reply program to for the links that lead
/// to tasks: a bridge's ports (a task's replies are caught where they
/// enter the bridge, before the bridge and its netfilter hooks see them),
/// any other link itself. With each, its current ifindex (a port that was
/// replaced under the same name needs attaching again).
pub fn reply_ifaces(
    links: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeMap<String, u32> {
    let mut out = std::collections::BTreeMap::new();
    for link in links {
        let brif = std::path::Path::new("/sys/class/net")
            .join(link)
            .join("brif");
        let names: Vec<String> = match std::fs::read_dir(&brif) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => vec![link.clone()],
        };
        for n in names {
            if let Some(i) = ifindex(&n) {
                out.insert(n, i);
            }
        }
    }
    out
}

/// An interface's index, if it exists.
pub fn ifindex(iface: &str) -> Option<u32> {
    let p = std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("ifindex");
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}
