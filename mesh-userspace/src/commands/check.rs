//! `meshd check`: validates a state for this node and prints what the node
//! would serve; touches nothing.

use anyhow::Result;

use crate::config::{CheckConfig, ConfigError, OrConfig, SourceConfig};
use crate::plan;
use crate::source::file::FileSource;

pub fn run(cfg: CheckConfig) -> Result<(), ConfigError> {
    let SourceConfig::File {
        path,
        port_range,
        state_dir,
        ..
    } = &cfg.source
    else {
        return Err(ConfigError(anyhow::anyhow!(
            "meshd check reads a state file (--state FILE)"
        )));
    };
    let mut source = FileSource::new(path, port_range.clone()).recall_from(state_dir);
    let state = source.read().state.or_config()?;
    let node = &cfg.node;
    let d = plan::vet(&state, node, &cfg.node_addrs, &cfg.forwarding, &cfg.limits).or_config()?;
    println!(
        "{}: valid; node {node} answers on {:?}",
        path.display(),
        d.node_addrs
    );
    for ((proto, port), svc) in &d.services {
        let local = svc.backends.iter().filter(|b| b.local).count();
        let reply = match svc.reply.unwrap_or(cfg.forwarding.reply) {
            crate::model::ReplyMode::ViaIngress => "via-ingress",
            crate::model::ReplyMode::Direct => "direct",
        };
        let mut extra = String::new();
        if svc.local {
            extra.push_str(", traffic local");
        }
        if !svc.source_ranges.is_empty() {
            let r: Vec<String> = svc.source_ranges.iter().map(|c| c.to_string()).collect();
            extra.push_str(&format!(", sources {}", r.join(" ")));
        }
        if let Some(t) = svc.affinity {
            extra.push_str(&format!(", affinity client for {t}s"));
        }
        println!(
            "  {proto}/{port} -> {} target {} ({} tasks, {local} on this node), replies {reply}{extra}",
            svc.name,
            svc.target,
            svc.backends.len()
        );
    }
    let assigned = source.assigned();
    if !assigned.is_empty() {
        println!(
            "  ports assigned from --port-range (kept in {} once meshd run applies them):",
            state_dir.display()
        );
        for (entry, port) in assigned {
            println!("    {entry} -> {port}");
        }
    }
    Ok(())
}
