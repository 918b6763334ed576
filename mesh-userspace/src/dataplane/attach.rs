//! Attaching the loaded programs: XDP and the delivery TC program on the
//! uplink, the reply program on every port that leads to local tasks, and
//! the program for the node's own flows on the loopback device.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::programs::links::LinkOrder;
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use mesh_common::abi::*;
use tracing::{debug, info, warn};

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

/// The loaded object's programs and where they are attached. Dropping it
/// detaches everything (and removes the clsact qdiscs meshd added, when
/// nothing else uses them).
pub struct Programs {
    ebpf: Option<Ebpf>,
    /// Interfaces with the reply program, and their ifindex then.
    task_ifaces: BTreeMap<String, u32>,
    tc: TcAttach,
    /// Interfaces whose clsact qdisc meshd added.
    clsact_added: BTreeSet<String>,
}

impl Programs {
    /// `tc` is the TC attach mode (`Auto` is resolved for this kernel).
    pub fn new(ebpf: Ebpf, tc: TcAttach) -> Self {
        Self {
            ebpf: Some(ebpf),
            task_ifaces: BTreeMap::new(),
            tc: tc.resolve(),
            clsact_added: BTreeSet::new(),
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
                }
                // It exists already (someone's, or a previous meshd's).
                Err(aya::programs::tc::TcError::NetlinkError(e))
                    if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("adding a clsact qdisc to {iface}"));
                }
            }
        }
        let tc: &mut SchedClassifier = self
            .ebpf
            .as_mut()
            .expect("present until dropped")
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing"))?
            .try_into()?;
        match mode {
            TcAttach::Tcx | TcAttach::Auto => {
                tc.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )?;
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
                if let Err(e) = replaced {
                    debug!(%iface, "no filter of ours to replace ({e:#}); adding one");
                    tc.attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::Netlink(NlOptions {
                            priority: TC_PRIORITY,
                            handle,
                            classid: None,
                        }),
                    )?;
                }
            }
        }
        Ok(())
    }

    pub fn ebpf(&self) -> &Ebpf {
        self.ebpf_ref()
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        self.ebpf.as_mut().expect("present until dropped")
    }

    /// Attaches the intercept to the uplink: XDP (in `mode`) and the
    /// delivery TC program, or the TC program that does it all.
    pub fn attach_uplink(
        &mut self,
        iface: &str,
        intercept: Intercept,
        mode: XdpAttach,
    ) -> Result<()> {
        if intercept == Intercept::Tc {
            self.attach_tc(PROG_TC_INGRESS, iface)
                .with_context(|| format!("attaching TC ingress ({:?}) to {iface}", self.tc))?;
            info!(%iface, tc = ?self.tc, "attached the intercept at TC ingress to the uplink (no XDP)");
            return Ok(());
        }
        let prog: &mut Xdp = self.ebpf_mut().program_mut(PROG_XDP).unwrap().try_into()?;
        match mode {
            XdpAttach::Native => {
                prog.attach(iface, XdpMode::Driver)
                    .with_context(|| format!("attaching XDP (native) to {iface}"))?;
            }
            XdpAttach::Generic => {
                prog.attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
            }
            XdpAttach::Auto => {
                if let Err(e) = prog.attach(iface, XdpMode::Driver) {
                    warn!(%iface, "native XDP unavailable ({e}); using generic XDP");
                    prog.attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP to {iface}"))?;
                }
            }
        }
        self.attach_tc(PROG_TC_UPLINK, iface)
            .with_context(|| format!("attaching TC ingress ({:?}) to {iface}", self.tc))?;
        info!(%iface, tc = ?self.tc, "attached XDP and TC to the uplink");
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

impl Drop for Programs {
    fn drop(&mut self) {
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
fn remove_clsact_if_unused(iface: &str) -> Result<bool> {
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
