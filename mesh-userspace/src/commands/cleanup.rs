//! `meshd cleanup`: removes everything the mesh installed on this node
//! (see [`crate::dataplane::cleanup`]) and puts back the reserved ports
//! and loopback `accept_local` settings a meshd left in force; says what
//! it removed.

use anyhow::anyhow;

use crate::config::CleanupConfig;
use crate::daemon::Failed;
use crate::dataplane::cleanup;
use crate::dataplane::pin::{OpenError, PinDir};
use crate::net;

pub fn run(cfg: CleanupConfig) -> Result<(), Failed> {
    let pins = match PinDir::existing(&cfg.bpffs) {
        Ok(p) => p,
        Err(OpenError::Busy(root)) => {
            return Err(Failed::Node(anyhow!(
                "a meshd is running with the dataplane pinned at {} (it holds the lock): stop \
                 it first (with --on-exit detach it removes everything itself)",
                root.display()
            )));
        }
        Err(OpenError::Other(e)) => return Err(Failed::Node(e)),
    };
    let mut lines = cleanup::remove_all(pins.as_ref(), cfg.dry_run);
    // The settings a meshd left in force with its dataplane: (restore,
    // the sysctl, what putting it back undoes).
    type Restore = fn(&std::path::Path, bool) -> anyhow::Result<bool>;
    let settings: [(Restore, &str, &str); 2] = [
        (
            net::restore_reserved_ports,
            "net.ipv4.ip_local_reserved_ports",
            "the published ports reserved there",
        ),
        (
            net::restore_accept_local,
            "net.ipv4.conf.lo.accept_local",
            "the loopback taking replies with a local source",
        ),
    ];
    for (restore, sysctl, undoes) in settings {
        match restore(&cfg.state_dir, cfg.dry_run) {
            Ok(true) => lines.push(format!(
                "{} {sysctl} as meshd found it ({undoes})",
                if cfg.dry_run {
                    "would put back"
                } else {
                    "put back"
                }
            )),
            Ok(false) => {}
            Err(e) => lines.push(format!("failed to put back {sysctl}: {e:#}")),
        }
    }
    if lines.is_empty() {
        println!("nothing of the mesh is installed here");
        return Ok(());
    }
    for l in &lines {
        println!("{l}");
    }
    let failed = lines.iter().filter(|l| l.starts_with("failed")).count();
    if failed > 0 {
        return Err(Failed::Node(anyhow!(
            "{failed} of {} could not be removed",
            lines.len()
        )));
    }
    Ok(())
}
