//! `meshd explain`: runs the XDP program on a packet against a copy of the
//! live maps (see [`crate::explain`]) and says what happened.

use anyhow::anyhow;

use crate::cli::{ExplainArgs, ExplainProto};
use crate::daemon::Failed;
use crate::dataplane::pin::PIN_DIR;
use crate::explain::{self, Question};
use crate::model::Proto;

pub fn run(a: &ExplainArgs) -> Result<(), Failed> {
    let tcp_flags = a.tcp_flags().map_err(Failed::Config)?;
    let root = a.bpffs.join(PIN_DIR);
    if !root.join("maps").is_dir() {
        return Err(Failed::Node(anyhow!(
            "nothing is pinned under {}: no dataplane to explain (--bpffs as meshd run's)",
            root.display()
        )));
    }
    let iface = match &a.iface {
        Some(i) => i.clone(),
        None => crate::net::iface_with_addr(*a.dst.ip()).map_err(|e| {
            Failed::Config(crate::config::ConfigError(
                e.context("the interface the packet arrives on (pass --iface)"),
            ))
        })?,
    };
    let q = Question {
        proto: match a.proto {
            ExplainProto::Tcp => Proto::Tcp,
            ExplainProto::Udp => Proto::Udp,
        },
        src: a.src,
        dst: a.dst,
        tcp_flags,
    };
    let v = explain::explain(&root, &iface, &q)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", explain::render(&v));
    }
    Ok(())
}
