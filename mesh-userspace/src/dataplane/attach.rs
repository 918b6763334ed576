//! Attaching the loaded programs: XDP and the delivery TC program on the
//! uplink, the reply program on every port that leads to local tasks, and
//! the program for the node's own flows on the loopback device.
//!
//! With a pin directory ([`super::pin`]), attachments outlive the process:
//! XDP and TCX links are pinned (a new meshd swaps its programs into them
//! atomically), netlink TC filters stay (a new meshd replaces them in
//! place). Whether they go when meshd exits is [`OnExit`]'s to say.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::xdp::XdpLink;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use mesh_common::abi::*;
use tracing::{debug, info, warn};

use super::pin::{self, PinDir};

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// Native (driver) mode, falling back to generic where the driver has none.
    Auto,
    /// Native (driver) mode only; fail where the driver has none.
    Native,
    /// Generic (skb) mode: any device, at the cost of an skb per packet.
    Generic,
}

/// Where the mesh takes clients' packets on the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Intercept {
    /// At XDP (`mesh_xdp`), before the kernel builds a socket buffer; TC
    /// ingress (`mesh_tc_uplink`) hands local tasks their packets. An XDP
    /// program changes what the kernel does with all of the uplink's
    /// traffic (on a veth, the peer's TSO is turned off).
    Xdp,
    /// At TC ingress alone (`mesh_tc_ingress`): no XDP program on the
    /// uplink, so it keeps its offloads (TSO, GRO) for all traffic, and
    /// one program run serves every segment of a GRO packet.
    Tc,
}

/// meshd's intercept unless told otherwise (chosen from the benchmark:
/// see the README's Performance section).
pub const DEFAULT_INTERCEPT: Intercept = Intercept::Tc;

impl Intercept {
    pub fn name(self) -> &'static str {
        match self {
            Intercept::Xdp => "xdp",
            Intercept::Tc => "tc",
        }
    }
}

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links where the kernel has them (6.6 and later), netlink
    /// filters on a clsact qdisc before.
    Auto,
    /// TCX links (kernel 6.6 or later).
    Tcx,
    /// Netlink filters on a clsact qdisc (any kernel meshd runs on).
    Netlink,
}

impl TcAttach {
    pub fn as_str(self) -> &'static str {
        match self {
            TcAttach::Auto => "auto",
            TcAttach::Tcx => "tcx",
            TcAttach::Netlink => "netlink",
        }
    }

    /// Auto decided for this kernel.
    pub fn resolve(self) -> TcAttach {
        match self {
            TcAttach::Auto if tcx_available() => TcAttach::Tcx,
            TcAttach::Auto => TcAttach::Netlink,
            m => m,
        }
    }
}

fn tcx_available() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Netlink filters meshd owns: this priority (before most others) and
/// handle ("me":"sh") on each interface, so that a restarted meshd finds
/// its own filter and replaces it in place.
pub const TC_PRIORITY: u16 = 1;
pub const TC_HANDLE: (u16, u16) = (0x6d65, 0x7368);

/// The loopback device (`abi::LOOPBACK_IFINDEX`), in every namespace.
pub const LOOPBACK: &str = "lo";

/// What becomes of a pinned dataplane when meshd exits (SIGTERM, SIGINT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// It stays attached and keeps serving the last state (a restarted or
    /// upgraded meshd adopts it; `meshd cleanup` removes it).
    Keep,
    /// Everything is detached and unpinned, as `meshd cleanup` does.
    Detach,
}

/// The loaded object's programs and where they are attached. Without a
/// pin directory, dropping it detaches everything (and removes the clsact
/// qdiscs meshd added, when nothing else uses them); with one, it does as
/// [`OnExit`] says.
pub struct Programs {
    ebpf: Option<Ebpf>,
    /// Interfaces with the reply program, and their ifindex then.
    task_ifaces: BTreeMap<String, u32>,
    tc: TcAttach,
    /// Interfaces whose clsact qdisc meshd added.
    clsact_added: BTreeSet<String>,
    pins: Option<PinDir>,
    on_exit: OnExit,
    /// (program, interface) attached by this process.
    attached: BTreeSet<(String, String)>,
}

impl Programs {
    /// `tc` is the TC attach mode (`Auto` is resolved for this kernel).
    pub fn new(ebpf: Ebpf, tc: TcAttach) -> Self {
        Self {
            ebpf: Some(ebpf),
            task_ifaces: BTreeMap::new(),
            tc: tc.resolve(),
            clsact_added: BTreeSet::new(),
            pins: None,
            on_exit: OnExit::Detach,
            attached: BTreeSet::new(),
        }
    }

    /// Pins attachments under `pins` from now on, and does as `on_exit`
    /// says when dropped. The clsact qdiscs a previous meshd added are
    /// taken over.
    pub fn pinned(mut self, pins: PinDir, on_exit: OnExit) -> Self {
        self.clsact_added.extend(pins.clsacts());
        self.pins = Some(pins);
        self.on_exit = on_exit;
        self
    }

    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// Removes pinned links this process did not attach (to interfaces it
    /// no longer serves, or that went away, or from a mode no longer
    /// used): they would run programs of an older meshd.
    pub fn prune_pinned_links(&mut self) {
        let Some(pins) = &self.pins else { return };
        for (prog, iface) in pins.links() {
            let mine = self.attached.contains(&(prog.clone(), iface.clone()));
            let alive = crate::net::ifindex(&iface)
                .is_some_and(|i| pin::pinned_link_on(&pins.link(&prog, &iface), i));
            if mine && alive {
                continue;
            }
            let p = pins.link(&prog, &iface);
            match std::fs::remove_file(&p) {
                Ok(()) if alive => {
                    info!(%iface, "detached {prog}: no longer attached by this meshd")
                }
                Ok(()) => {
                    debug!(%iface, "removed the pinned link of {prog}: its interface is gone")
                }
                Err(e) => warn!("removing {}: {e}", p.display()),
            }
            self.attached.remove(&(prog, iface));
        }
    }

    /// How TC programs are attached here.
    pub fn tc_mode(&self) -> TcAttach {
        self.tc
    }

    fn ebpf_ref(&self) -> &Ebpf {
        self.ebpf.as_ref().expect("present until dropped")
    }

    /// Attaches TC program `prog` at ingress of `iface`, as the mode says.
    fn attach_tc(&mut self, prog: &str, iface: &str) -> Result<()> {
        let mode = self.tc;
        if mode == TcAttach::Netlink {
            match aya::programs::tc::qdisc_add_clsact(iface) {
                Ok(()) => {
                    self.clsact_added.insert(iface.to_string());
                    if let Some(p) = &self.pins {
                        p.mark_clsact(iface, true);
                    }
                }
                // It exists already (someone's, or a previous meshd's).
                Err(aya::programs::tc::TcError::NetlinkError(e))
                    if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("adding a clsact qdisc to {iface}"));
                }
            }
        }
        let pin_path = self.pins.as_ref().map(|p| p.link(prog, iface));
        let tc: &mut SchedClassifier = self
            .ebpf
            .as_mut()
            .expect("present until dropped")
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing"))?
            .try_into()?;
        match mode {
            TcAttach::Tcx | TcAttach::Auto => {
                let Some(path) = pin_path else {
                    tc.attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )?;
                    return Ok(());
                };
                // The link a previous meshd pinned, with this program
                // swapped in; or a new one, pinned.
                let adopted = adoptable(&path, iface)
                    .and_then(|l| SchedClassifierLink::try_from(l).ok())
                    .and_then(|l| match tc.attach_to_link(l) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            warn!(%iface, "the pinned link of {prog} is unusable ({e}); attaching anew");
                            None
                        }
                    });
                let id = match adopted {
                    Some(id) => {
                        info!(%iface, "swapped {prog} into its pinned TCX link");
                        id
                    }
                    None => {
                        let _ = std::fs::remove_file(&path);
                        tc.attach_with_options(
                            iface,
                            TcAttachType::Ingress,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )?
                    }
                };
                let link: FdLink = tc.take_link(id)?.try_into()?;
                if !path.exists() {
                    link.pin(&path)
                        .with_context(|| format!("pinning {}", path.display()))?;
                }
                // A netlink filter of ours left from --tc-attach netlink
                // would run after this one: take it away.
                if let Ok(l) = SchedClassifierLink::attached(
                    iface,
                    TcAttachType::Ingress,
                    TC_PRIORITY,
                    TcHandle::new(TC_HANDLE.0, TC_HANDLE.1),
                    None,
                ) {
                    drop(l);
                }
            }
            TcAttach::Netlink => {
                let handle = TcHandle::new(TC_HANDLE.0, TC_HANDLE.1);
                // A filter of ours left by a meshd that did not exit
                // cleanly is replaced in place, never removed and added
                // (which would leave a moment without it).
                let replaced = SchedClassifierLink::attached(
                    iface,
                    TcAttachType::Ingress,
                    TC_PRIORITY,
                    handle,
                    None,
                )
                .map_err(anyhow::Error::from)
                .and_then(|l| Ok(tc.attach_to_link(l)?));
                let id = match replaced {
                    Ok(id) => id,
                    Err(e) => {
                        debug!(%iface, "no filter of ours to replace ({e:#}); adding one");
                        tc.attach_with_options(
                            iface,
                            TcAttachType::Ingress,
                            TcAttachOptions::Netlink(NlOptions {
                                priority: TC_PRIORITY,
                                handle,
                                classid: None,
                            }),
                        )?
                    }
                };
                if let Some(path) = pin_path {
                    // The filter outlives this process (forgotten, never
                    // detached on drop); a pinned TCX link of ours from
                    // --tc-attach tcx would run before it: take it away.
                    std::mem::forget(tc.take_link(id)?);
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        self.attached.insert((prog.to_string(), iface.to_string()));
        Ok(())
    }

    pub fn ebpf(&self) -> &Ebpf {
        self.ebpf_ref()
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        self.ebpf.as_mut().expect("present until dropped")
    }

    /// The intercept a pinned dataplane on `iface` already has: XDP when
    /// a pinned XDP link is attached there (a previous meshd's, kept
    /// across its exit), TC when its TC intercept link is; None without
    /// pins or either.
    pub fn pinned_intercept(&self, iface: &str) -> Option<Intercept> {
        let pins = self.pins.as_ref()?;
        let ifindex = crate::net::ifindex(iface)?;
        let on = |prog: &str| pin::pinned_link_on(&pins.link(prog, iface), ifindex);
        if on(PROG_XDP) {
            Some(Intercept::Xdp)
        } else if on(PROG_TC_INGRESS) {
            Some(Intercept::Tc)
        } else {
            None
        }
    }

    /// Attaches the intercept to the uplink: XDP (in `mode`) and the
    /// delivery TC program, or the TC program that does it all. (Links a
    /// previous meshd pinned for the other intercept are left to
    /// [`Self::prune_pinned_links`], once everything is attached: until
    /// then both serve, harmlessly, as the new one passes what the old one
    /// already rewrote.)
    pub fn attach_uplink(
        &mut self,
        iface: &str,
        intercept: Intercept,
        mode: XdpAttach,
    ) -> Result<()> {
        if intercept == Intercept::Tc {
            self.attach_tc(PROG_TC_INGRESS, iface).with_context(|| {
                format!("attaching TC ingress ({}) to {iface}", self.tc.as_str())
            })?;
            info!(%iface, tc = self.tc.as_str(), "attached the intercept at TC ingress to the uplink (no XDP)");
            return Ok(());
        }
        let pin_path = self.pins.as_ref().map(|p| p.link(PROG_XDP, iface));
        let prog: &mut Xdp = self.ebpf_mut().program_mut(PROG_XDP).unwrap().try_into()?;
        // The XDP link a previous meshd pinned, with this program swapped
        // in (atomically: no packet meets the device without one). Its
        // mode is the one it was attached with.
        let adopted = pin_path
            .as_deref()
            .and_then(|p| adoptable(p, iface))
            .and_then(|l| XdpLink::try_from(l).ok())
            .and_then(|l| match prog.attach_to_link(l) {
                Ok(id) => Some(id),
                Err(e) => {
                    warn!(%iface, "the pinned XDP link is unusable ({e}); attaching anew");
                    None
                }
            });
        let id = match adopted {
            Some(id) => {
                info!(%iface, "swapped mesh_xdp into its pinned XDP link");
                id
            }
            None => {
                if let Some(p) = &pin_path {
                    let _ = std::fs::remove_file(p);
                }
                match mode {
                    XdpAttach::Native => prog
                        .attach(iface, XdpMode::Driver)
                        .with_context(|| format!("attaching XDP (native) to {iface}"))?,
                    XdpAttach::Generic => prog
                        .attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP (generic) to {iface}"))?,
                    XdpAttach::Auto => match prog.attach(iface, XdpMode::Driver) {
                        Ok(id) => id,
                        Err(e) => {
                            warn!(%iface, "native XDP unavailable ({e}); using generic XDP");
                            prog.attach(iface, XdpMode::Skb)
                                .with_context(|| format!("attaching XDP to {iface}"))?
                        }
                    },
                }
            }
        };
        if let Some(path) = pin_path {
            match FdLink::try_from(prog.take_link(id)?) {
                Ok(link) if !path.exists() => {
                    link.pin(&path)
                        .with_context(|| format!("pinning {}", path.display()))?;
                }
                Ok(_) => {}
                // Attached through netlink (kernels without XDP links): it
                // stays attached once this process is gone anyway.
                Err(_) => {}
            }
        }
        self.attached
            .insert((PROG_XDP.to_string(), iface.to_string()));
        self.attach_tc(PROG_TC_UPLINK, iface)
            .with_context(|| format!("attaching TC ingress ({}) to {iface}", self.tc.as_str()))?;
        info!(%iface, tc = self.tc.as_str(), "attached XDP and TC to the uplink");
        Ok(())
    }

    /// Attaches the program for flows the node's own processes start to the
    /// loopback device: their packets to the node's own addresses pass
    /// there, never through the uplink.
    pub fn attach_loopback(&mut self) -> Result<()> {
        self.attach_tc(PROG_TC_HOST, LOOPBACK)
            .with_context(|| format!("attaching TC ingress ({:?}) to {LOOPBACK}", self.tc))?;
        info!(
            iface = LOOPBACK,
            "attached the program for the node's own flows"
        );
        Ok(())
    }

    /// Attaches the reply program to every interface in `ifaces` (name and
    /// ifindex) that does not have it yet, or got a new ifindex since.
    /// Failures are logged, not fatal: one broken port must not stop the
    /// others from being served.
    pub fn attach_task_ifaces(&mut self, ifaces: &BTreeMap<String, u32>) {
        for (iface, ifindex) in ifaces {
            if self.task_ifaces.get(iface) == Some(ifindex) {
                continue;
            }
            if let Err(e) = crate::net::check_forwarding(iface) {
                warn!("{e:#}: replies from tasks behind it will be dropped");
            }
            let r = self
                .attach_tc(PROG_TC_TASK, iface)
                .with_context(|| format!("attaching TC ingress (replies) to {iface}"));
            match r {
                Ok(()) => {
                    info!(%iface, "attached the reply program");
                    self.task_ifaces.insert(iface.clone(), *ifindex);
                }
                Err(e) => warn!("{e:#}"),
            }
        }
    }
}

/// The link pinned at `path`, if it is attached to `iface` now (a link
/// whose device went away, or that another device's name took, is not).
fn adoptable(path: &std::path::Path, iface: &str) -> Option<FdLink> {
    let ifindex = crate::net::ifindex(iface)?;
    if !pin::pinned_link_on(path, ifindex) {
        return None;
    }
    PinnedLink::from_pin(path).ok().map(FdLink::from)
}

impl Drop for Programs {
    fn drop(&mut self) {
        if let Some(pins) = self.pins.take() {
            drop(self.ebpf.take());
            match self.on_exit {
                OnExit::Keep => info!(
                    "the dataplane stays attached and pinned under {}; meshd cleanup removes it",
                    pins.root.display()
                ),
                OnExit::Detach => {
                    for line in super::cleanup::remove_all(Some(&pins), false) {
                        info!("{line}");
                    }
                }
            }
            return;
        }
        // Detach everything first (dropping the object does), then remove
        // the clsact qdiscs meshd added where nothing else is attached.
        drop(self.ebpf.take());
        for iface in std::mem::take(&mut self.clsact_added) {
            match remove_clsact_if_unused(&iface) {
                Ok(true) => info!(%iface, "removed the clsact qdisc meshd added"),
                Ok(false) => {}
                Err(e) => warn!(%iface, "removing the clsact qdisc meshd added: {e:#}"),
            }
        }
    }
}

/// Removes `iface`'s clsact qdisc if no filter is left on it; says whether
/// it did. (The interface may be gone: then so is the qdisc.)
pub(crate) fn remove_clsact_if_unused(iface: &str) -> Result<bool> {
    if crate::net::ifindex(iface).is_none() {
        return Ok(false);
    }
    for dir in ["ingress", "egress"] {
        let out = std::process::Command::new("tc")
            .args(["filter", "show", "dev", iface, dir])
            .output()
            .context("running tc (iproute2)")?;
        if !out.status.success() {
            bail!(
                "tc filter show: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if !out.stdout.is_empty() {
            return Ok(false);
        }
    }
    let out = std::process::Command::new("tc")
        .args(["qdisc", "del", "dev", iface, "clsact"])
        .output()
        .context("running tc (iproute2)")?;
    if !out.status.success() {
        bail!(
            "tc qdisc del: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(true)
}
