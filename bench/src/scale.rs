//! `mesh-bench scale`: what the mesh costs as a swarm grows. From 1 to
//! 10,000 services and 10 to 100,000 backends: the time to program a
//! state into fresh maps (the planner, then the map writes), the maps'
//! memory as the kernel accounts it, Maglev build time against backends,
//! and the per-packet cost against the number of services and of tracked
//! flows, with conntrack's memory per flow.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use aya::maps::MapInfo;
use mesh_common::abi::{
    CT_OPEN, CtValue, MAP_CT4, MAP_MAGLEV, MAP_PORTS, MAP_SERVICES, PROG_FLOOR_PASS, PROG_NAMES,
    PROG_XDP,
};
use mesh_common::maglev;
use mesh_tests::fixtures::Floors;
use mesh_tests::packet::{Spec, TCP_ACK};
use mesh_userspace::desired::{BackendKey, Desired, DesiredService};
use mesh_userspace::model::Proto;
use mesh_userspace::plan::{Limits, Planner, table_size};
use serde_json::{Value, json};

use crate::micro::worlds::{self, CLIENT, Expect, FLOW_SPORT, NODE, WEB_TCP, World};
use crate::util::{self, Goal, median, r1, r3};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Write the results as JSON: a file, or a directory (scale.json in it).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Rounds of the per-packet timings (median reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Test runs per world per round.
    #[arg(long, default_value_t = 20_000)]
    pub calls: usize,
    /// Largest number of tracked flows (confirmed TCP conntrack entries).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_flows: u32,
    /// Pin to this CPU (default: the CPU the benchmark starts on).
    #[arg(long)]
    pub cpu: Option<usize>,
}

/// The service worlds: (services, tasks per service). The first is the
/// smallest, which the per-packet goals compare against.
const SERVICE_WORLDS: &[(usize, usize)] = &[
    (1, 10),
    (10, 10),
    (100, 10),
    (1_000, 10),
    (2_768, 3),
    (10_000, 10),
];
/// Ports of the whole default range, 3 tasks each: the memory goal.
const PORTS_2768: (usize, usize) = (2_768, 3);
/// 100,000 backends: the programming-time goal.
const BACKENDS_100K: (usize, usize) = (10_000, 10);
/// Backends in one service, for Maglev build times (at --maglev-size 65521).
const MAGLEV_BACKENDS: &[usize] = &[1, 10, 100, 1_000, 10_000];

/// `services` tcp services (the measured one on `WEB_TCP` first, the
/// others from port 20000) of `tasks` tasks each, every task its own
/// address in 198.18.0.0/15.
fn desired(services: usize, tasks: usize) -> Desired {
    let mut next = u32::from(Ipv4Addr::new(198, 18, 0, 1));
    let mut d = Desired {
        node_addrs: vec![NODE],
        ..Desired::default()
    };
    d.nodes.insert(
        "n1".into(),
        mesh_userspace::desired::DesiredNode {
            addr: NODE,
            local: true,
        },
    );
    for i in 0..services {
        let port = if i == 0 {
            WEB_TCP
        } else {
            20_000 + i as u16 - 1
        };
        let mut backends: Vec<BackendKey> = (0..tasks)
            .map(|_| {
                let addr = Ipv4Addr::from(next);
                next += 1;
                BackendKey {
                    addr,
                    port: worlds::TARGET_PORT,
                    node: "n1".into(),
                    local: true,
                    deliver: addr,
                }
            })
            .collect();
        backends.sort();
        d.services.insert(
            (Proto::Tcp, port),
            DesiredService {
                name: format!("svc{i}"),
                target: worlds::TARGET_PORT,
                backends,
                draining: Vec::new(),
                reply: None,
                local: false,
                source_ranges: Vec::new(),
                affinity: None,
            },
        );
    }
    d
}

fn limits_for(services: usize, tasks: usize, ct_entries: u32) -> Limits {
    Limits {
        max_services: (services as u32).max(64),
        max_backends: ((services * tasks * 2) as u32)
            .next_power_of_two()
            .max(1024),
        ct_entries,
        ct_new_entries: 65_536,
        ..Limits::default()
    }
}

/// Every map the object's programs use, with the kernel's accounting of
/// its memory (fdinfo memlock), by name.
fn map_memory(w: &World) -> Result<BTreeMap<String, u64>> {
    let mut ids = BTreeSet::new();
    for name in PROG_NAMES {
        let p = w
            .bpf
            .dp
            .ebpf()
            .program(name)
            .with_context(|| format!("no program {name}"))?;
        ids.extend(p.info()?.map_ids()?.unwrap_or_default());
    }
    let mut out = BTreeMap::new();
    for id in ids {
        let info = MapInfo::from_id(id)?;
        let name = info.name_as_str().unwrap_or("?").to_string();
        let fd = info.fd()?;
        out.insert(name, crate::sys::map_memlock(fd.as_fd())?);
    }
    Ok(out)
}

struct ServiceWorld {
    services: usize,
    tasks: usize,
    world: World,
    plan_ms: f64,
    apply_ms: f64,
    memory: BTreeMap<String, u64>,
    maglev_in_use: u32,
    rounds: Vec<f64>,
}

struct FlowWorld {
    flows: u32,
    world: World,
    ct_bytes: u64,
    rounds: Vec<f64>,
    /// meshd's conntrack sweep of the full table, ms: a scan that finds
    /// nothing ended, then one that removes every entry.
    sweep_ms: Option<(f64, f64)>,
}

pub fn run(a: &Args) -> Result<Value> {
    ensure!(
        a.rounds >= 1 && a.calls >= 1,
        "--rounds and --calls must be at least 1"
    );
    let a = a.clone();
    // Pinned: the per-packet timings are per CPU.
    std::thread::spawn(move || run_here(&a))
        .join()
        .map_err(|_| anyhow::anyhow!("the scale benchmark thread panicked"))?
}

fn run_here(a: &Args) -> Result<Value> {
    let started = Instant::now();
    let cpu = a.cpu.unwrap_or_else(util::current_cpu);
    util::pin(cpu)?;
    let machine = util::machine();

    // Maglev build times, one service of n backends (user space only).
    let mut maglev_json = Vec::new();
    for &n in MAGLEV_BACKENDS {
        let keys: Vec<String> = (0..n)
            .map(|i| format!("198.18.{}.{}:80", i / 250, i % 250))
            .collect();
        let size = table_size(n, 65_521);
        let t = Instant::now();
        let reps = (200_000 / size.max(1) as usize).clamp(1, 50);
        for _ in 0..reps {
            std::hint::black_box(maglev::table(&keys, size));
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        maglev_json.push(json!({"backends": n, "table_size": size, "build_ms": r3(ms)}));
        eprintln!("maglev: {n} backends, table {size}: {ms:.3} ms");
    }

    // Service worlds: programmed into fresh maps (timed), then measured.
    let mut sw: Vec<ServiceWorld> = Vec::new();
    for &(s, t) in SERVICE_WORLDS {
        let d = desired(s, t);
        let lim = limits_for(s, t, 65_536);
        let tp = Instant::now();
        Planner::new(lim.clone()).plan(&d)?;
        let plan_ms = tp.elapsed().as_secs_f64() * 1e3;
        let mut dp = mesh_userspace::dataplane::Dataplane::load(lim.clone(), 0)
            .context("loading the BPF object (needs root)")?;
        let ta = Instant::now();
        dp.apply(&d)?;
        let apply_ms = ta.elapsed().as_secs_f64() * 1e3;
        let tasks: Vec<Ipv4Addr> = d.services[&(Proto::Tcp, WEB_TCP)]
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        let mut world = World {
            name: "scale",
            bpf: mesh_tests::fixtures::BpfWorld { dp },
            floors: None,
            limits: lim.clone(),
            services: s,
            backends: s * t,
            tasks: tasks.clone(),
            prefilled: 0,
            ifindex: 0,
            floor_tc: None,
        };
        world.track((CLIENT, FLOW_SPORT), NODE, tasks[0])?;
        let memory = map_memory(&world)?;
        let maglev_in_use = world.bpf.dp.applier.planner().maglev_use().0;
        eprintln!(
            "{s} services x {t} tasks ({} backends): planned in {plan_ms:.1} ms, planned and written in {apply_ms:.1} ms; Maglev map {:.1} MiB, all maps {:.1} MiB",
            s * t,
            memory.get(MAP_MAGLEV).copied().unwrap_or(0) as f64 / (1 << 20) as f64,
            memory.values().sum::<u64>() as f64 / (1 << 20) as f64,
        );
        sw.push(ServiceWorld {
            services: s,
            tasks: t,
            world,
            plan_ms,
            apply_ms,
            memory,
            maglev_in_use,
            rounds: Vec::new(),
        });
    }

    // Flow worlds: one service, the confirmed table holding that many flows.
    let mut fw: Vec<FlowWorld> = Vec::new();
    let mut sizes = vec![1u32 << 16, 1 << 17, 1 << 18];
    let mut f = 1u32 << 19;
    while f <= a.max_flows {
        sizes.push(f);
        f <<= 1;
    }
    sizes.dedup();
    for (k, &n) in sizes.iter().enumerate() {
        let d = desired(1, 10);
        let lim = limits_for(1, 10, n);
        let tasks: Vec<Ipv4Addr> = d.services[&(Proto::Tcp, WEB_TCP)]
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        let mut world = worlds::load("flows", lim, &d, &tasks)?;
        // The smallest world tracks only the measured flow.
        if k > 0 {
            let v = CtValue {
                state: CT_OPEN,
                ..CtValue::default()
            };
            world.prefill(MAP_CT4, n as usize - 1, v)?;
        }
        world.track((CLIENT, FLOW_SPORT), NODE, tasks[0])?;
        let ct_bytes = map_memory(&world)?.get(MAP_CT4).copied().unwrap_or(0);
        fw.push(FlowWorld {
            flows: if k > 0 { n } else { 1 },
            world,
            ct_bytes,
            rounds: Vec::new(),
            sweep_ms: None,
        });
    }

    // Per-packet: the confirmed flow's ACK through mesh_xdp, over
    // floor_pass, every world once per round, round-robin.
    let floors = Floors::load()?;
    let ack = Spec::tcp(CLIENT, FLOW_SPORT, NODE, WEB_TCP, TCP_ACK).build();
    let mut floor_rounds = Vec::new();
    let time = |w: Option<&World>| -> Result<f64> {
        let mut total = 0u64;
        for _ in 0..a.calls {
            let r = match w {
                Some(w) => {
                    let r = w.run_xdp(PROG_XDP, &ack)?;
                    Expect::Local.check(&r)?;
                    r
                }
                None => floors.run_xdp(PROG_FLOOR_PASS, &ack)?,
            };
            total += r.ns;
        }
        Ok(total as f64 / a.calls as f64)
    };
    // Warm-up.
    for w in sw
        .iter()
        .map(|w| &w.world)
        .chain(fw.iter().map(|w| &w.world))
    {
        for _ in 0..1000 {
            w.run_xdp(PROG_XDP, &ack)?;
        }
    }
    let n = 1 + sw.len() + fw.len();
    for round in 0..a.rounds {
        for k in 0..n {
            let i = (round + k) % n;
            if i == 0 {
                floor_rounds.push(time(None)?);
            } else if i <= sw.len() {
                let ns = time(Some(&sw[i - 1].world))?;
                sw[i - 1].rounds.push(ns);
            } else {
                let j = i - 1 - sw.len();
                let ns = time(Some(&fw[j].world))?;
                fw[j].rounds.push(ns);
            }
        }
        eprintln!("round {}/{} done", round + 1, a.rounds);
    }
    let floor = median(&floor_rounds);
    let over = |r: &[f64]| median(r) - floor;

    // meshd's conntrack sweep (dataplane::sweep) over each full table:
    // a scan with nothing ended, then one that removes every entry (the
    // worlds are timed no more after it).
    for w in fw.iter_mut().skip(1) {
        use mesh_userspace::dataplane::sweep::{MARGIN_UNITS, Sweeper};
        let ct = aya::maps::MapData::from_fd(w.world.map_fd(MAP_CT4)?)?;
        let mut s = Sweeper::new(vec![("tcp", ct)], w.world.limits.ct_lifetimes)?;
        let n = w.flows as u64;
        let t = Instant::now();
        // "Now" at the margin: nothing has ended.
        let scan = s.sweep(MARGIN_UNITS)?;
        let scan_ms = t.elapsed().as_secs_f64() * 1e3;
        ensure!(
            scan[0].scanned == n && scan[0].removed == 0,
            "sweep scan of {n} flows: {:?}",
            scan[0]
        );
        let t = Instant::now();
        // Half the clock's range on: everything has.
        let all = s.sweep(u32::MAX / 2)?;
        let all_ms = t.elapsed().as_secs_f64() * 1e3;
        ensure!(
            all[0].removed == n,
            "sweep removing {n} flows: {:?}",
            all[0]
        );
        eprintln!(
            "conntrack sweep of {n} flows: scan {scan_ms:.1} ms, removing all {all_ms:.1} ms"
        );
        w.sweep_ms = Some((scan_ms, all_ms));
    }

    // Report.
    println!();
    println!(
        "mesh scale: programming fresh maps, map memory (kernel accounting), per-packet cost of an established flow's ACK over floor_pass ({} rounds x {} calls)",
        a.rounds, a.calls
    );
    println!(
        "{:>8} {:>6} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>10}",
        "services",
        "tasks",
        "backends",
        "plan ms",
        "apply ms",
        "maglev MiB",
        "was MiB",
        "all MiB",
        "pkt +ns"
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut services_json = Vec::new();
    for w in &sw {
        // Before per-service table sizes: 8 x max-services x maglev-size.
        let was = 8 * w.world.limits.max_services as u64 * w.world.limits.maglev_size as u64;
        let maglev = w.memory.get(MAP_MAGLEV).copied().unwrap_or(0);
        let total: u64 = w.memory.values().sum();
        println!(
            "{:>8} {:>6} {:>9} {:>9.1} {:>9.1} {:>11.1} {:>11.1} {:>11.1} {:>10.1}",
            w.services,
            w.tasks,
            w.services * w.tasks,
            w.plan_ms,
            w.apply_ms,
            mib(maglev),
            mib(was),
            mib(total),
            over(&w.rounds)
        );
        services_json.push(json!({
            "services": w.services,
            "tasks_per_service": w.tasks,
            "backends": w.services * w.tasks,
            "table_size": table_size(w.tasks, w.world.limits.maglev_size),
            "plan_ms": r1(w.plan_ms),
            "apply_ms": r1(w.apply_ms),
            "maglev_map_bytes": maglev,
            "maglev_entries_in_use": w.maglev_in_use,
            "maglev_map_bytes_before_per_service_sizes": was,
            "ports_tables_bytes": maglev + w.memory.get(MAP_SERVICES).copied().unwrap_or(0) + w.memory.get(MAP_PORTS).copied().unwrap_or(0),
            "all_maps_bytes": total,
            "maps_bytes": w.memory,
            "limits": {"max_services": w.world.limits.max_services, "max_backends": w.world.limits.max_backends, "maglev_size": w.world.limits.maglev_size, "maglev_entries": w.world.limits.maglev_entries(), "ct_entries": w.world.limits.ct_entries, "ct_new_entries": w.world.limits.ct_new_entries},
            "packet_ns": r1(median(&w.rounds)),
            "packet_overhead_ns": r1(over(&w.rounds)),
            "rounds": w.rounds.iter().map(|&x| r1(x)).collect::<Vec<_>>(),
        }));
    }
    println!();
    println!(
        "{:>10} {:>12} {:>14} {:>10} {:>14} {:>16}",
        "flows", "CT4 MiB", "bytes/flow", "pkt +ns", "sweep scan ms", "sweep all ms"
    );
    let mut flows_json = Vec::new();
    for w in &fw {
        let per = w.ct_bytes as f64 / w.world.limits.ct_entries as f64;
        let (scan, all) = match w.sweep_ms {
            Some((s, a)) => (format!("{s:.1}"), format!("{a:.1}")),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:>10} {:>12.1} {:>14.1} {:>10.1} {:>14} {:>16}",
            w.flows,
            mib(w.ct_bytes),
            per,
            over(&w.rounds),
            scan,
            all
        );
        flows_json.push(json!({
            "tracked_flows": w.flows,
            "ct_entries": w.world.limits.ct_entries,
            "ct4_map_bytes": w.ct_bytes,
            "bytes_per_entry": r1(per),
            "packet_ns": r1(median(&w.rounds)),
            "packet_overhead_ns": r1(over(&w.rounds)),
            "rounds": w.rounds.iter().map(|&x| r1(x)).collect::<Vec<_>>(),
            "sweep_scan_ms": w.sweep_ms.map(|s| r1(s.0)),
            "sweep_remove_all_ms": w.sweep_ms.map(|s| r1(s.1)),
        }));
    }
    // Marginal conntrack memory per flow: between the two largest tables.
    let marginal = if fw.len() >= 2 {
        let (x, y) = (&fw[fw.len() - 2], &fw[fw.len() - 1]);
        Some(
            (y.ct_bytes as f64 - x.ct_bytes as f64)
                / (y.world.limits.ct_entries as f64 - x.world.limits.ct_entries as f64),
        )
    } else {
        None
    };
    if let Some(m) = marginal {
        println!(
            "conntrack: {m:.1} bytes per tracked flow (the map's growth between its two largest sizes; preallocated, so paid whether used or not)"
        );
    }

    // Goals.
    let mut goals = Vec::new();
    let base = over(&sw[0].rounds);
    let within = |x: f64| ((x - base) / base).abs() <= 0.10;
    if let Some(w) = sw.iter().find(|w| w.services == 10_000) {
        let x = over(&w.rounds);
        goals.push(Goal::new(
            "scale",
            "per-packet cost at 10,000 services vs 1 service (established, over floor_pass)",
            "within 10%",
            format!(
                "{x:+.1} vs {base:+.1} ns ({:+.1}%)",
                (x - base) / base * 100.0
            ),
            Some(within(x)),
        ));
    }
    {
        let fbase = over(&fw[0].rounds);
        let big = fw.iter().rfind(|w| w.flows >= 1_000_000);
        goals.push(Goal::new(
            "scale",
            "per-packet cost at 1 million tracked flows vs 1 (established, over floor_pass)",
            "within 10%",
            big.map(|w| {
                let x = over(&w.rounds);
                format!(
                    "{x:+.1} vs {fbase:+.1} ns ({:+.1}%)",
                    (x - fbase) / fbase * 100.0
                )
            })
            .unwrap_or_else(|| "not measured (--max-flows below 1,000,000)".into()),
            big.map(|w| ((over(&w.rounds) - fbase) / fbase).abs() <= 0.10),
        ));
    }
    if let Some(w) = sw.iter().find(|w| (w.services, w.tasks) == BACKENDS_100K) {
        goals.push(Goal::new(
            "scale",
            "100,000 backends (10,000 services x 10) programmed into fresh maps",
            "< 2 s",
            format!("{:.2} s", w.apply_ms / 1e3),
            Some(w.apply_ms < 2000.0),
        ));
    }
    if let Some(w) = sw.iter().find(|w| (w.services, w.tasks) == PORTS_2768) {
        let b = w.memory.get(MAP_MAGLEV).copied().unwrap_or(0)
            + w.memory.get(MAP_SERVICES).copied().unwrap_or(0)
            + w.memory.get(MAP_PORTS).copied().unwrap_or(0);
        goals.push(Goal::new(
            "scale",
            "map memory for 2,768 published ports x 3 tasks (Maglev, service and port maps)",
            "< 64 MiB",
            format!("{:.1} MiB", mib(b)),
            Some(b < 64 << 20),
        ));
    }
    util::print_goals(&goals);
    eprintln!("total {:.0} s", started.elapsed().as_secs_f64());

    Ok(json!({
        "bench": "scale",
        "maglev_build": maglev_json,
        "services": services_json,
        "flows": flows_json,
        "ct_bytes_per_flow_marginal": marginal.map(r1),
        "floor_pass_ns": r1(floor),
        "floor_rounds": floor_rounds.iter().map(|&x| r1(x)).collect::<Vec<_>>(),
        "goals": goals.iter().map(|g| g.json()).collect::<Vec<_>>(),
        "config": {"rounds": a.rounds, "calls": a.calls, "pinned_cpu": cpu, "machine": machine},
        "notes": [
            "plan_ms: the planner alone on a fresh planner; apply_ms: planner and every map write into freshly loaded maps (what meshd does at start). Loading the object is not counted.",
            "Memory: fdinfo memlock of every map the programs use (the kernel's own accounting; MESH_NODES_V1, read by no program yet, is left out: 32 KiB). ports_tables_bytes: the Maglev map, the service map and the port array, what published ports cost; all_maps_bytes adds conntrack (sized by ct_entries, preallocated), backends, replies, counters.",
            "maglev_map_bytes_before_per_service_sizes: 8 x max_services x maglev_size, what the Maglev map took when every table had --maglev-size entries.",
            "Per-packet: the ACK of a confirmed flow through mesh_xdp (BPF_PROG_TEST_RUN, repeat=1, kernel-reported ns), over floor_pass; every world once per round, round-robin; medians.",
            "Flows: the confirmed TCP table sized and filled with that many flows (batch updates, untimed), the measured flow among them.",
            "Maglev build: one service's table (100 entries per backend, a prime, up to 65521) built in user space, ms.",
        ],
    }))
}
