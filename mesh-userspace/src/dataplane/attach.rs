//! Attaching the loaded programs: XDP and the delivery TC program on the
//! uplink, the reply program on every port that leads to local tasks.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use mesh_common::abi::*;
use tracing::{info, warn};

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

/// The loaded object's programs and where they are attached. Dropping it
/// detaches everything.
pub struct Programs {
    ebpf: Ebpf,
    /// Interfaces with the reply program, and their ifindex then.
    task_ifaces: BTreeMap<String, u32>,
}

impl Programs {
    pub fn new(ebpf: Ebpf) -> Self {
        Self {
            ebpf,
            task_ifaces: BTreeMap::new(),
        }
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches XDP and the delivery TC program to the uplink.
    pub fn attach_uplink(&mut self, iface: &str, mode: XdpAttach) -> Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut(PROG_XDP).unwrap().try_into()?;
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
        let tc: &mut SchedClassifier = self.ebpf.program_mut(PROG_TC_UPLINK).unwrap().try_into()?;
        tc.attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching TC ingress to {iface}"))?;
        info!(%iface, "attached XDP and TC to the uplink");
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
                .ebpf
                .program_mut(PROG_TC_TASK)
                .context("program missing")
                .and_then(|p| {
                    let tc: &mut SchedClassifier = p.try_into()?;
                    tc.attach(iface, TcAttachType::Ingress)
                        .with_context(|| format!("attaching TC ingress (replies) to {iface}"))?;
                    Ok(())
                });
            match r {
                Ok(()) => {
                    info!(%iface, "attached the reply program");
                    self.task_ifaces.insert(iface.clone(), *ifindex);
                }
                Err(e) => warn!("{e:#}"),
            }
        }
    }

    pub fn floor_map(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>> {
        Ok(BpfHashMap::try_from(
            self.ebpf.map_mut(MAP_FLOOR).context("no floor map")?,
        )?)
    }
}
