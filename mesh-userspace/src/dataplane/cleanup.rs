//! Removing everything the mesh installed on this node (`meshd cleanup`,
//! and `meshd run --on-exit detach` at exit): pinned links (which detaches
//! their programs), netlink TC filters of meshd's priority and handle, XDP
//! programs of meshd attached without a link, the clsact qdiscs meshd
//! added (when nothing else uses them), pinned maps, the pin directory.
//! Only this network namespace's interfaces are looked at.

use std::process::Command;

use anyhow::{Context, Result};
use aya::programs::TcAttachType;
use aya::programs::links::Link;
use aya::programs::tc::{SchedClassifierLink, TcHandle};

use super::attach::{TC_HANDLE, TC_PRIORITY, remove_clsact_if_unused};
use super::pin::PinDir;

/// Removes everything (or, with `dry_run`, only says what it would);
/// returns one line per thing, "removed ..." (or "would remove ...").
/// Failures are lines too: cleanup goes on past them.
pub fn remove_all(pins: Option<&PinDir>, dry_run: bool) -> Vec<String> {
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut out = Vec::new();
    let mut step = |what: String, r: Result<()>| match r {
        Ok(()) => out.push(format!("{verb} {what}")),
        Err(e) => out.push(format!("failed to remove {what}: {e:#}")),
    };
    if let Some(p) = pins {
        for (prog, iface) in p.links() {
            let path = p.link(&prog, &iface);
            step(
                format!("the pinned link of {prog} on {iface} (detached)"),
                rm(&path, dry_run),
            );
        }
    }
    for iface in interfaces() {
        for prog in tc_filters(&iface) {
            let r = if dry_run {
                Ok(())
            } else {
                SchedClassifierLink::attached(
                    &iface,
                    TcAttachType::Ingress,
                    TC_PRIORITY,
                    TcHandle::new(TC_HANDLE.0, TC_HANDLE.1),
                    None,
                )
                .map_err(anyhow::Error::from)
                .and_then(|l| Ok(l.detach()?))
            };
            step(format!("the TC filter of {prog} on {iface}"), r);
        }
        if let Some((prog, generic)) = xdp_attached(&iface) {
            let mode = if generic { "xdpgeneric" } else { "xdpdrv" };
            let r = if dry_run {
                Ok(())
            } else {
                run(&["ip", "link", "set", "dev", &iface, mode, "off"])
            };
            // A link whose pin was just removed goes a moment later (the
            // kernel releases it asynchronously): then there was nothing
            // more to do.
            match r {
                Err(_) if gone_soon(&iface) => {}
                r => step(format!("{prog} (XDP) from {iface}"), r),
            }
        }
    }
    if let Some(p) = pins {
        for iface in p.clsacts() {
            let r = if dry_run {
                Ok(())
            } else {
                remove_clsact_if_unused(&iface).map(|removed| {
                    p.mark_clsact(&iface, false);
                    let _ = removed;
                })
            };
            step(
                format!("the clsact qdisc meshd added to {iface} (if nothing else uses it)"),
                r,
            );
        }
        for name in p.maps() {
            step(format!("the pinned map {name}"), rm(&p.map(&name), dry_run));
        }
        if !dry_run {
            for sub in ["maps", "links", "clsact", ""] {
                let _ = std::fs::remove_dir(p.root.join(sub));
            }
        }
    }
    out
}

fn rm(p: &std::path::Path, dry_run: bool) -> Result<()> {
    if dry_run {
        return Ok(());
    }
    std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        anyhow::bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// This namespace's interfaces.
fn interfaces() -> Vec<String> {
    crate::net::dir_names(std::path::Path::new("/sys/class/net"))
}

fn json(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// meshd's netlink filters (its priority, a program named `mesh_*`) at
/// ingress of `iface`, by program name.
fn tc_filters(iface: &str) -> Vec<String> {
    let Some(v) = json(&["tc", "-j", "filter", "show", "dev", iface, "ingress"]) else {
        return Vec::new();
    };
    let mut out: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f.get("pref").and_then(|p| p.as_u64()) == Some(TC_PRIORITY as u64))
        .filter_map(|f| {
            let o = f.get("options")?;
            let name = o
                .get("bpf_name")
                .or_else(|| o.get("prog").and_then(|p| p.get("name")))?
                .as_str()?;
            name.starts_with("mesh_").then(|| name.to_string())
        })
        .collect();
    out.dedup();
    out
}

/// The XDP program of meshd attached to `iface`, if any: its name, and
/// whether it is in generic mode.
fn xdp_attached(iface: &str) -> Option<(String, bool)> {
    let v = json(&["ip", "-j", "-d", "link", "show", "dev", iface])?;
    let xdp = v.get(0)?.get("xdp")?;
    let name = xdp.get("prog")?.get("name")?.as_str()?;
    if !name.starts_with("mesh_") {
        return None;
    }
    // XDP_ATTACHED_SKB is 2.
    Some((
        name.to_string(),
        xdp.get("mode").and_then(|m| m.as_u64()) == Some(2),
    ))
}

/// Whether meshd's XDP program leaves `iface` within a second.
fn gone_soon(iface: &str) -> bool {
    for _ in 0..20 {
        if xdp_attached(iface).is_none() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}
