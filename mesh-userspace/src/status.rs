//! `meshd status`: what a node serves, in one JSON document that the
//! running daemon builds (`GET /status` on the admin endpoint) or, when no
//! daemon answers, one built from the pinned maps (which keep serving
//! while no meshd runs); and that document as tables for people.
//!
//! ```json
//! { "from": "...", "node": "n1", "generation": 3,
//!   "health": { "status": 200, "answer": "ok: ..." },
//!   "services": [ { "name", "protocol", "port", "target", "traffic", "source_ranges",
//!                   "affinity", "tasks", "local_tasks", "new_flows", "packets", "bytes" } ],
//!   "nodes": [ { "name", "addr", "availability", "status", "tasks" } ],
//!   "conntrack": [ { "table", "entries", "capacity" } ],
//!   "counters": { "mesh_forwarded_packets_total": 0, ... },
//!   "drops": { "no_backend": 1 } }
//! ```
//! Fields the pinned maps do not hold (targets, node names and status,
//! the health answer) are null there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use mesh_common::abi::*;
use serde_json::{Value, json};

use crate::dataplane::stats::{ServiceIndex, StatsReader};
use crate::health::Health;
use crate::model::{Proto, State};

/// A service's affinity as status shows it: "none", or "client/SECONDSs"
/// (one word, for the table).
pub fn affinity_text(a: Option<u32>) -> String {
    match a {
        None => "none".into(),
        Some(t) => format!("client/{t}s"),
    }
}

/// The status of a running daemon.
pub fn of_daemon(
    state: &State,
    node: &str,
    generation: i64,
    index: &ServiceIndex,
    stats: &StatsReader,
    health: &Health,
) -> Result<Value> {
    let svc_health = health.services();
    let stats_by: BTreeMap<(Proto, u16), SvcStats> = stats
        .services(index)?
        .into_iter()
        .map(|(_, p, port, s)| ((p, port), s))
        .collect();
    let me = state.local_node.clone().unwrap_or_else(|| node.to_string());
    let mut services = Vec::new();
    for s in &state.services {
        let h = svc_health.get(&s.name).cloned().unwrap_or_default();
        for p in &s.ports {
            let st = stats_by
                .get(&(p.protocol, p.published))
                .copied()
                .unwrap_or_default();
            services.push(json!({
                "name": s.name,
                "protocol": p.protocol.to_string(),
                "port": p.published,
                "target": p.target,
                "traffic": s.traffic.as_str(),
                "source_ranges": s.source_ranges.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "affinity": affinity_text(s.affinity),
                "tasks": h.tasks,
                "local_tasks": h.local_tasks,
                "new_flows": st.new_flows,
                "packets": st.packets,
                "bytes": st.bytes,
            }));
        }
    }
    let nodes: Vec<Value> = state
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "addr": n.addr.to_string(),
                "availability": n.availability.as_str(),
                "status": n.status.as_str(),
                "tasks": state.tasks.iter().filter(|t| t.node == n.name).count(),
                "this": me == n.name,
            })
        })
        .collect();
    let answer = health.node();
    Ok(json!({
        "from": "the running meshd",
        "node": me,
        "generation": generation,
        "health": { "status": answer.status, "answer": answer.body.trim() },
        "services": services,
        "nodes": nodes,
        "conntrack": conntrack(stats)?,
        "counters": counters(stats)?,
        "drops": drops(stats)?,
    }))
}

fn conntrack(stats: &StatsReader) -> Result<Vec<Value>> {
    Ok(stats
        .conntrack()?
        .into_iter()
        .map(|u| json!({ "table": u.table, "entries": u.entries, "capacity": u.capacity }))
        .collect())
}

fn counters(stats: &StatsReader) -> Result<Value> {
    Ok(Value::Object(
        stats
            .counters()?
            .into_iter()
            .map(|(c, n)| (c.metric().to_string(), json!(n)))
            .collect(),
    ))
}

fn drops(stats: &StatsReader) -> Result<Value> {
    Ok(Value::Object(
        stats
            .drops()?
            .into_iter()
            .filter(|(r, n)| *r as u32 != 0 && *n > 0)
            .map(|(r, n)| (r.name().to_string(), json!(n)))
            .collect(),
    ))
}

/// The status as the pinned maps under `root` (`<bpffs>/mesh`) tell it:
/// what the dataplane serves while no meshd runs. Read only; no lock taken
/// (a meshd starting meanwhile is not held up).
pub fn of_pins(root: &Path) -> Result<Value> {
    let map = |name: &str| {
        let p = root.join("maps").join(name);
        MapData::from_pin(&p).with_context(|| format!("opening {}", p.display()))
    };
    let ports: Array<MapData, [u32; 2]> = Array::try_from(aya::maps::Map::Array(map(MAP_PORTS)?))?;
    let svcs: Array<MapData, SvcValue> =
        Array::try_from(aya::maps::Map::Array(map(MAP_SERVICES)?))?;
    let names: BpfHashMap<MapData, SvcKey, SvcName> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(map(MAP_SVC_NAMES)?))?;
    let svcst: PerCpuArray<MapData, SvcStats> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map(MAP_SVC_STATS)?))?;
    let nodes: Array<MapData, NodeValue> = Array::try_from(aya::maps::Map::Array(map(MAP_NODES)?))?;
    let mut services = Vec::new();
    for i in 0..ports.len() {
        let pair = ports.get(&i, 0)?;
        for (k, slot) in pair.iter().enumerate() {
            if *slot == 0 {
                continue;
            }
            let idx = 2 * i + k as u32;
            let (proto, port) = if idx < 65536 {
                (Proto::Tcp, idx as u16)
            } else {
                (Proto::Udp, (idx - 65536) as u16)
            };
            let v = svcs.get(&(slot - 1), 0)?;
            let key = SvcKey::new(port, proto.number());
            let name = names
                .get(&key, 0)
                .ok()
                .filter(|n| n.svc_id == v.svc_id && n.gen_ == v.gen_)
                .map(|n| n.name().to_string());
            let st = svcst
                .get(&v.svc_id, 0)
                .map(|per_cpu| {
                    per_cpu.iter().fold(SvcStats::default(), |a, s| SvcStats {
                        packets: a.packets + s.packets,
                        bytes: a.bytes + s.bytes,
                        new_flows: a.new_flows + s.new_flows,
                    })
                })
                .unwrap_or_default();
            services.push(json!({
                "name": name,
                "protocol": proto.to_string(),
                "port": port,
                "target": null,
                "traffic": if v.flags & SVC_F_LOCAL_ONLY != 0 { "local" } else { "cluster" },
                "source_ranges": if v.flags & SVC_F_SRC_RANGES != 0 { json!(["(set)"]) } else { json!([]) },
                // The pinned maps hold the timeout in coarse clock units
                // only: the setting, not the seconds the state gave.
                "affinity": if v.flags & SVC_F_AFFINITY != 0 { "client" } else { "none" },
                "tasks": v.backend_count,
                "local_tasks": null,
                "new_flows": st.new_flows,
                "packets": st.packets,
                "bytes": st.bytes,
            }));
        }
    }
    let mut node_list = Vec::new();
    for slot in 0..nodes.len() {
        let n = nodes.get(&slot, 0)?;
        if n.gen_ == 0 {
            continue;
        }
        node_list.push(json!({
            "name": null,
            "addr": std::net::Ipv4Addr::from(n.addr[0].to_ne_bytes()).to_string(),
            "availability": null,
            "status": null,
            "tasks": null,
            "this": n.flags & NODE_F_SELF != 0,
        }));
    }
    let stats = StatsReader::from_pins(root)?;
    Ok(json!({
        "from": format!("the pinned maps under {} (no meshd answers)", root.display()),
        "node": null,
        "generation": null,
        "health": null,
        "services": services,
        "nodes": node_list,
        "conntrack": conntrack(&stats)?,
        "counters": counters(&stats)?,
        "drops": drops(&stats)?,
    }))
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "any".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(" "),
        v => v.to_string(),
    }
}

/// Rows as aligned columns under `head`.
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<width$}  ", width = w[i]);
            }
        }
        l
    };
    let _ = writeln!(out, "{}", line(head.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

/// The status, as tables.
pub fn render(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "from {}", cell(&v["from"]));
    if !v["node"].is_null() {
        let _ = writeln!(
            out,
            "node {}, generation {}",
            cell(&v["node"]),
            cell(&v["generation"])
        );
    }
    if !v["health"].is_null() {
        let _ = writeln!(
            out,
            "health {}: {}",
            cell(&v["health"]["status"]),
            cell(&v["health"]["answer"])
        );
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                cell(&s["name"]),
                format!("{}/{}", cell(&s["protocol"]), cell(&s["port"])),
                cell(&s["target"]),
                cell(&s["traffic"]),
                cell(&s["source_ranges"]),
                cell(&s["affinity"]),
                cell(&s["tasks"]),
                cell(&s["local_tasks"]),
                cell(&s["new_flows"]),
                cell(&s["packets"]),
                cell(&s["bytes"]),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "SERVICE",
            "PORT",
            "TARGET",
            "TRAFFIC",
            "SOURCES",
            "AFFINITY",
            "TASKS",
            "LOCAL",
            "NEW FLOWS",
            "PACKETS",
            "BYTES",
        ],
        &rows,
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let name = if n["this"] == true {
                format!("{} (this)", cell(&n["name"]))
            } else {
                cell(&n["name"])
            };
            vec![
                name,
                cell(&n["addr"]),
                cell(&n["availability"]),
                cell(&n["status"]),
                cell(&n["tasks"]),
            ]
        })
        .collect();
    table(
        &mut out,
        &["NODE", "ADDRESS", "AVAILABILITY", "STATUS", "TASKS"],
        &rows,
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = v["conntrack"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| vec![cell(&c["table"]), cell(&c["entries"]), cell(&c["capacity"])])
        .collect();
    table(&mut out, &["CONNTRACK", "ENTRIES", "CAPACITY"], &rows);
    out.push('\n');
    let kv = |o: &Value| -> String {
        let items: Vec<String> = o
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if items.is_empty() {
            "none".into()
        } else {
            items.join(", ")
        }
    };
    let _ = writeln!(out, "drops: {}", kv(&v["drops"]));
    let _ = writeln!(out, "counters: {}", kv(&v["counters"]));
    out
}
