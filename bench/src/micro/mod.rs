//! `mesh-bench micro`: per-packet cost of the real BPF object, path by
//! path, against floors measured in the same run. See bench/README.md for
//! the method and why it is so.
//!
//! - `worlds`: the loaded object with the table contents a case needs;
//! - `cases`: cases run with BPF_PROG_TEST_RUN (XDP, one call per frame);
//! - `live`: the whole path on live frames (XDP, TC, the task's answer);
//! - `report`: the tables, the goals, the JSON.
//!
//! Adding a case is one entry in [`xdp_cases`] or [`live_cases`], and, for
//! a path the goals judge, one line in `report::PATHS`.

pub mod cases;
pub mod live;
pub mod report;
pub mod worlds;

use std::net::SocketAddrV4;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use mesh_common::abi::{
    PROG_FLOOR_DECAP, PROG_FLOOR_LOOKUP, PROG_FLOOR_PASS, PROG_FLOOR_REPLY, PROG_FLOOR_TC_NAT,
    PROG_FLOOR_TRACK, PROG_TC_HOST, PROG_TC_INGRESS, PROG_XDP,
};
use mesh_tests::fixtures::{Floors, Flow};
use mesh_tests::packet::{Spec, TCP_ACK};
use mesh_userspace::model::Proto;
use mesh_userspace::plan::Limits;
use serde_json::Value;

use crate::util;
use cases::{AfterBatch, Case, Frames};
use live::{Attach, Dev, LiveCase, LiveWorld, Prog, XdpProg};
use worlds::{
    CLIENT, Expect, FLOOR_TC, FLOW_SPORT, MAGLEV_SIZE, NODE, PORTS_PER_ADDR, SERVICES_10K,
    UNPUBLISHED, WEB_TCP, World,
};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Write the results as JSON: a file (micro.json), or a directory
    /// (micro.json in it). Atomically: temp file + rename.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Rounds; each runs every case once, round-robin. The median over rounds is reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Calls (frames) per case per round; their kernel-reported durations are averaged.
    #[arg(long, default_value_t = 20_000)]
    pub calls: usize,
    /// Untimed calls per case before the first round (new_flow: at least --calls).
    #[arg(long, default_value_t = 2_000)]
    pub warmup: usize,
    /// Entries of the unconfirmed conntrack table of `new_flow_full`, filled
    /// to capacity before timing and never emptied.
    #[arg(long, default_value_t = 4 << 20)]
    pub ct_full: u32,
    /// Leave out the whole-path cases (live frames, TC, a lab in network namespaces).
    #[arg(long)]
    pub no_live: bool,
    /// Pin to this CPU (default: the CPU the benchmark starts on).
    #[arg(long, conflicts_with = "no_pin")]
    pub cpu: Option<usize>,
    /// Do not pin to a CPU.
    #[arg(long)]
    pub no_pin: bool,
    /// Run only these cases (comma-separated names, as the tables print
    /// them), with the floors they are measured from; the live lab is
    /// built only when a live case (`*_live*`) is named. For profiling one
    /// path (e.g. under `perf record`).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Runs the suite on a thread of its own (the live cases move it into a
/// lab namespace for good); returns the JSON document.
pub fn run(a: &Args) -> Result<Value> {
    ensure!(
        a.rounds >= 1 && a.calls >= 1,
        "--rounds and --calls must be at least 1"
    );
    let mut a = a.clone();
    if !a.only.is_empty() && !a.only.iter().any(|n| is_live_name(n)) {
        a.no_live = true;
    }
    std::thread::spawn(move || run_here(&a))
        .join()
        .map_err(|_| anyhow::anyhow!("the micro-benchmark thread panicked"))?
}

/// The worlds, by index.
pub const W_BASE: usize = 0;
pub const W_NEW: usize = 1;
pub const W_10K: usize = 2;
pub const W_FULL: usize = 3;
pub const W_FWD: usize = 4;
pub const W_HOST: usize = 5;

fn run_here(a: &Args) -> Result<Value> {
    let started = Instant::now();
    let cpu = if a.no_pin {
        None
    } else {
        let c = a.cpu.unwrap_or_else(util::current_cpu);
        util::pin(c)?;
        Some(c)
    };
    let machine = util::machine();
    if machine["bpf_jit_enable"].as_str() != Some("1") {
        eprintln!(
            "warning: net.core.bpf_jit_enable is {}, not 1: these are not the numbers of a JIT-compiled program",
            machine["bpf_jit_enable"]
        );
    }
    if machine["bpf_stats_enabled"].as_str() == Some("1") {
        eprintln!(
            "warning: kernel.bpf_stats_enabled is 1: every program run pays for run-time accounting"
        );
    }

    // new_flow replays the same flows in every batch, the unconfirmed
    // table emptied in between: LRU inserts without eviction.
    let new_flows_needed = a.calls.max(a.warmup).max(1);
    let ct_new = (new_flows_needed + new_flows_needed / 4)
        .next_power_of_two()
        .max(65_536) as u32;
    let mut worlds = load_worlds(a, ct_new)?;
    let mut live = if a.no_live {
        None
    } else {
        let addrs = 1 + new_flows_needed.div_ceil(PORTS_PER_ADDR);
        ensure!(
            addrs <= 95,
            "--calls {} needs {addrs} client addresses for the live new flows; the lab has 95",
            a.calls
        );
        Some(LiveWorld::new(addrs, ct_new).context("the live lab")?)
    };

    // The forwarding world's link, in whatever namespace this thread is
    // in now (the live lab's node, or a namespace of its own): never the
    // host's.
    if live.is_none() {
        // SAFETY: plain syscall; this thread is the benchmark's own.
        ensure!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
    }
    worlds[W_FWD].ifindex = worlds::fwd_link().context("the forwarding and host worlds' links")?;
    // The intercept at TC: its test runs' floor, the empty TC program, in
    // every world it runs in.
    for w in [W_BASE, W_NEW, W_10K, W_FULL, W_FWD] {
        worlds[w].floor_tc = Some(crate::sys::load_empty_tc("floor_tc_run")?);
    }

    let mut xdp = xdp_cases();
    let mut lc = live.as_ref().map(live_cases).unwrap_or_default();
    if !a.only.is_empty() {
        let mut known: Vec<&str> = xdp.iter().map(|c| c.name).collect();
        known.extend(lc.iter().map(|c| c.name));
        if let Some(bad) = a.only.iter().find(|n| !known.contains(&n.as_str())) {
            bail!(
                "--only: no case {bad:?}; the cases are {}",
                known.join(", ")
            );
        }
        // The floors every case is measured from come along; a design
        // floor (what a path's kernel work costs alone) only when named.
        let design = |name: &str| report::DESIGN_FLOORS.iter().any(|d| d.1 == name);
        let wanted = |name: &str| {
            (name.starts_with("floor_") && !design(name)) || a.only.iter().any(|n| n == name)
        };
        xdp.retain(|c| wanted(c.name));
        lc.retain(|c| wanted(c.name));
    }

    // First call of each case, untimed, checked down to the output bytes.
    for c in &mut xdp {
        c.first_call(&mut worlds[c.world])?;
    }
    // Warm-up. new_flow gets a whole batch: a fresh map hands out its
    // preallocated elements in address order, one that has been filled and
    // emptied in the order of its free list, as after any real use; the
    // first timed round would otherwise run faster than the rest.
    for c in &mut xdp {
        let n = if c.after.clears() {
            a.warmup.max(a.calls)
        } else {
            a.warmup
        };
        if n > 0 {
            c.batch(&mut worlds[c.world], n)?;
        }
    }
    if let Some(lw) = &mut live {
        for c in &mut lc {
            let n = if c.after.clears() {
                a.warmup.max(a.calls)
            } else {
                a.warmup.clamp(1, a.calls)
            };
            c.batch(lw, n, false)
                .with_context(|| format!("{}: warm-up", c.name))?;
        }
    }

    // Rounds: every case once, round-robin, starting one case later each
    // round, so neither drift nor position in the round favours a case.
    let t = Instant::now();
    let n = xdp.len() + lc.len();
    for round in 0..a.rounds {
        for k in 0..n {
            let i = (round + k) % n;
            if i < xdp.len() {
                let c = &mut xdp[i];
                let total = c.batch(&mut worlds[c.world], a.calls)?;
                c.rounds.push(total as f64 / a.calls as f64);
            } else {
                let lw = live.as_mut().expect("live cases need the live world");
                lc[i - xdp.len()].batch(lw, a.calls, true)?;
            }
        }
        eprintln!(
            "round {}/{} done ({:.1} s)",
            round + 1,
            a.rounds,
            t.elapsed().as_secs_f64()
        );
    }
    if xdp.iter().any(|c| c.rounds.len() != a.rounds) || lc.iter().any(|c| c.wall.len() != a.rounds)
    {
        bail!("internal: a case missed a round");
    }

    let doc = report::report(&report::Input {
        args: a,
        cpu,
        machine,
        xdp: &xdp,
        live: &lc,
        worlds: &worlds,
        live_world: live.as_ref().map(|l| &l.world),
        live_skipped: a.no_live,
    });
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(doc)
}

fn load_worlds(a: &Args, ct_new: u32) -> Result<Vec<World>> {
    let tasks = worlds::tasks();
    let base = worlds::desired(NODE, &tasks)?;
    let big = worlds::with_fillers(&base, SERVICES_10K);
    ensure!(big.services.len() == SERVICES_10K);
    let lim = |max_services, max_backends, ct_new_entries| Limits {
        maglev_size: MAGLEV_SIZE,
        max_services,
        max_backends,
        ct_entries: 65_536,
        ct_new_entries,
        ..Limits::default()
    };
    let mut w = vec![
        worlds::load("base", lim(64, 1024, 65_536), &base, &tasks)?,
        worlds::load("new_flow", lim(64, 1024, ct_new), &base, &tasks)?,
        worlds::load(
            "10k",
            lim(
                10_240,
                (worlds::backend_count(&big) as u32).next_power_of_two(),
                65_536,
            ),
            &big,
            &tasks,
        )?,
        worlds::load("new_flow_full", lim(64, 1024, a.ct_full), &base, &tasks)?,
        worlds::load(
            "forward",
            lim(64, 1024, 65_536),
            &worlds::desired_fwd(&tasks)?,
            &tasks,
        )?,
        worlds::load(
            "host",
            lim(64, 1024, 65_536),
            &worlds::desired(worlds::HOST_NODE, &worlds::host_tasks())?,
            &worlds::host_tasks(),
        )?,
    ];
    {
        let mut floors = Floors::load()?;
        let key = WEB_TCP.to_be() as u32;
        floors
            .map()?
            .insert(key, 1, 0)
            .context("filling MESH_FLOOR")?;
        // floor_tc_nat's flow: the established flow, to the first task,
        // with the MACs of its recorded link.
        let flow = Flow::new(Proto::Tcp, (CLIENT, FLOW_SPORT), (NODE, WEB_TCP));
        floors
            .nat(
                &flow.key(),
                SocketAddrV4::new(tasks[0], worlds::TARGET_PORT),
                w[W_BASE].ifindex,
                worlds::link_task_mac(tasks[0]),
                worlds::LINK_GATEWAY_MAC,
            )
            .context("filling MESH_FLOOR_NAT")?;
        // floor_decap's: decap_local's packet (the other node, the task,
        // the flow).
        floors
            .decap(
                worlds::FWD_OTHER,
                SocketAddrV4::new(tasks[0], worlds::TARGET_PORT),
                SocketAddrV4::new(CLIENT, FLOW_SPORT + 1),
            )
            .context("filling floor_decap's maps")?;
        // floor_reply's: reply_via_ingress's packet (the other node, the
        // route to its client, as its test run arrives: on the loopback).
        floors
            .reply_route(
                worlds::FWD_OTHER,
                (
                    worlds::FWD_NODE,
                    worlds::FWD_CLIENT,
                    mesh_common::abi::LOOPBACK_IFINDEX,
                ),
                [0x02, 0, 0, 0, 0x40, 0x01],
                [0x02, 0, 0, 0, 0x40, 0x02],
            )
            .context("filling floor_reply's maps")?;
        w[W_BASE].floors = Some(floors);
    }
    // The established flow: confirmed, pinned to the first task.
    for i in [W_BASE, W_10K] {
        w[i].track((CLIENT, FLOW_SPORT), NODE, tasks[0])?;
    }
    // The spread of established flows, likewise.
    for i in 0..worlds::SPREAD_FLOWS {
        w[W_BASE].track(worlds::spread_client(i), NODE, tasks[0])?;
    }
    w[W_FULL].prefill_ct_new()?;
    // The node's own flow to its published port: confirmed, pinned to
    // the first task.
    w[W_HOST].track_on(
        (worlds::HOST_NODE, worlds::HOST_SPORT),
        (worlds::HOST_NODE, WEB_TCP),
        worlds::host_tasks()[0],
    )?;
    // The forwarded flow: confirmed, pinned to the far service's first
    // task (on the other node).
    w[W_FWD].track_on(
        (worlds::FWD_CLIENT, FLOW_SPORT),
        (worlds::FWD_NODE, worlds::FAR_TCP),
        worlds::far_tasks()[0],
    )?;
    Ok(w)
}

/// The cases run with BPF_PROG_TEST_RUN. The first is the floor every
/// overhead is measured from.
fn xdp_cases() -> Vec<Case> {
    let ack = Spec::tcp(CLIENT, FLOW_SPORT, NODE, WEB_TCP, TCP_ACK).build();
    let other = Spec::tcp(CLIENT, FLOW_SPORT, NODE, UNPUBLISHED, TCP_ACK).build();
    vec![
        Case::new(
            "floor_pass",
            PROG_FLOOR_PASS,
            W_BASE,
            "XDP program that only returns XDP_PASS (TCP ACK frame)",
            Frames::One(ack.clone()),
            Expect::Pass,
        ),
        Case::new(
            "floor_lookup",
            PROG_FLOOR_LOOKUP,
            W_BASE,
            "parse Eth/IPv4/L4 ports + one hash lookup (hit), XDP_TX",
            Frames::One(ack.clone()),
            Expect::Tx,
        ),
        Case::new(
            "established",
            PROG_XDP,
            W_BASE,
            "mesh_xdp, TCP ACK of a confirmed flow, 1 service / 16 backends: conntrack hit + DNAT",
            Frames::One(ack.clone()),
            Expect::Local,
        )
        .counted(false),
        Case::new(
            "new_flow",
            PROG_XDP,
            W_NEW,
            "mesh_xdp, TCP SYN of an unseen flow: Maglev pick + one insert into the unconfirmed table (emptied after every batch) + DNAT",
            Frames::each(worlds::new_flow_frame, true),
            Expect::Local,
        )
        .counted(true)
        .after(AfterBatch::ClearNewFlows),
        Case::new(
            "floor_track",
            PROG_FLOOR_TRACK,
            W_BASE,
            "the floor of a tracked new flow: parse + the conntrack work of new_flow alone (a lookup in each table, both miss, one insert into the unconfirmed one, emptied after every batch), XDP_TX",
            Frames::each(worlds::new_flow_frame, true),
            Expect::Tx,
        )
        .after(AfterBatch::ClearFloorFlows),
        Case::new(
            "non_service",
            PROG_XDP,
            W_BASE,
            "mesh_xdp, TCP to a port no service publishes: parse + one service lookup (miss)",
            Frames::One(other),
            Expect::Pass,
        ),
        Case::new(
            "established_10k",
            PROG_XDP,
            W_10K,
            "as established, with 10,000 services loaded",
            Frames::One(ack),
            Expect::Local,
        )
        .counted(false),
        Case::new(
            "established_spread",
            PROG_XDP,
            W_BASE,
            "as established, each call the next of 8,192 confirmed flows: the conntrack entries and their buckets no longer all stay in the CPU's caches, as on a node with many flows",
            Frames::each(worlds::spread_frame, false),
            Expect::Local,
        )
        .counted(false),
        Case::new(
            "forward_remote",
            PROG_XDP,
            W_FWD,
            "mesh_xdp, TCP ACK of a confirmed flow whose task runs on another node: conntrack hit + DNAT + 40 bytes of encapsulation + FIB lookup, XDP_TX",
            Frames::One(
                Spec::tcp(worlds::FWD_CLIENT, FLOW_SPORT, worlds::FWD_NODE, worlds::FAR_TCP, TCP_ACK)
                    .build(),
            ),
            Expect::Encap,
        )
        .counted_on(worlds::FAR_TCP, false),
        Case::new(
            "decap_local",
            PROG_XDP,
            W_FWD,
            "mesh_xdp, another node's encapsulated TCP ACK for a local task: node check, strip, identity lookup, flow record",
            Frames::One(worlds::decap_frame()),
            Expect::Local,
        ),
        Case::new(
            "floor_decap",
            PROG_FLOOR_DECAP,
            W_BASE,
            "the floor of decap_local: parse, the node lookup, strip (bpf_xdp_adjust_head), parse, the task's identity lookup, the flow record's lookup, metadata (bpf_xdp_adjust_meta), nothing else",
            Frames::One(worlds::decap_frame()),
            Expect::Local,
        ),
        Case::new(
            "reply_via_ingress",
            PROG_XDP,
            W_FWD,
            "mesh_xdp, a task's reply another node carried back: node check, strip, FIB lookup to the client, XDP_TX",
            Frames::One(worlds::reply_frame()),
            Expect::Out,
        ),
        Case::new(
            "floor_reply",
            PROG_FLOOR_REPLY,
            W_BASE,
            "the floor of reply_via_ingress: parse, the node lookup, strip, parse, the unconfirmed table's lookup (miss), the route cache's (hit), MACs, XDP_TX, nothing else",
            Frames::One(worlds::reply_frame()),
            Expect::Out,
        ),
        Case::new(
            "host_non_service",
            PROG_TC_HOST,
            W_HOST,
            "mesh_tc_host (TC on lo), the node's own TCP to a port no service publishes: what all of its loopback traffic pays (TC_ACT_UNSPEC over floor_pass: an XDP floor, for scale)",
            Frames::One(worlds::host_frame(UNPUBLISHED, TCP_ACK)),
            Expect::Unspec,
        ),
        Case::new(
            "host_established",
            PROG_TC_HOST,
            W_HOST,
            "mesh_tc_host, a packet of the node's own confirmed flow to its published port: conntrack hit + DNAT with the skb helpers + FIB lookup + redirect",
            Frames::One(worlds::host_frame(WEB_TCP, TCP_ACK)),
            Expect::Redirect,
        )
        .counted(false),
        Case::new(
            "new_flow_full",
            PROG_XDP,
            W_FULL,
            "as new_flow, into an unconfirmed table filled to capacity and never emptied: every insert evicts",
            Frames::each(worlds::new_flow_frame, false),
            Expect::Local,
        )
        .counted(true),
    ]
    .into_iter()
    .chain(tc_cases())
    .collect()
}

/// The same paths with the intercept at TC ingress (`--intercept tc`):
/// `mesh_tc_ingress` under BPF_PROG_TEST_RUN on a socket buffer, over the
/// empty TC program run the same way (`floor_tc_run`). Delivery to a
/// local task is part of it (the task's recorded link, redirect_peer).
fn tc_cases() -> Vec<Case> {
    let ack = Spec::tcp(CLIENT, FLOW_SPORT, NODE, WEB_TCP, TCP_ACK).build();
    let other = Spec::tcp(CLIENT, FLOW_SPORT, NODE, UNPUBLISHED, TCP_ACK).build();
    vec![
        Case::new(
            FLOOR_TC,
            FLOOR_TC,
            W_BASE,
            "TC program that only returns TC_ACT_UNSPEC, under the same test run as mesh_tc_ingress (TCP ACK frame): the floor of the tc_* cases",
            Frames::One(ack.clone()),
            Expect::Unspec,
        ),
        Case::new(
            "floor_tc_nat",
            PROG_FLOOR_TC_NAT,
            W_BASE,
            "the floor of tc_established: parse + one lookup of the flow (hit) + the destination rewritten with the skb checksum helpers (pseudo-header and port) + the link's MACs + bpf_redirect_peer, nothing else",
            Frames::One(ack.clone()),
            Expect::TcLocal,
        ),
        Case::new(
            "tc_established",
            PROG_TC_INGRESS,
            W_BASE,
            "mesh_tc_ingress, TCP ACK of a confirmed flow: conntrack hit + DNAT (skb checksum helpers) + the task's link MACs + bpf_redirect_peer",
            Frames::One(ack.clone()),
            Expect::TcLocal,
        )
        .counted(false),
        Case::new(
            "tc_new_flow",
            PROG_TC_INGRESS,
            W_NEW,
            "mesh_tc_ingress, TCP SYN of an unseen flow: Maglev pick + one insert into the unconfirmed table (emptied after every batch) + DNAT + delivery",
            Frames::each(worlds::new_flow_frame, true),
            Expect::TcLocal,
        )
        .counted(true)
        .after(AfterBatch::ClearNewFlows),
        Case::new(
            "tc_non_service",
            PROG_TC_INGRESS,
            W_BASE,
            "mesh_tc_ingress, TCP to a port no service publishes: parse + one service lookup (miss), TC_ACT_UNSPEC",
            Frames::One(other),
            Expect::Unspec,
        ),
        Case::new(
            "tc_established_10k",
            PROG_TC_INGRESS,
            W_10K,
            "as tc_established, with 10,000 services loaded",
            Frames::One(ack),
            Expect::TcLocal,
        )
        .counted(false),
        Case::new(
            "tc_established_spread",
            PROG_TC_INGRESS,
            W_BASE,
            "as established_spread, through mesh_tc_ingress",
            Frames::each(worlds::spread_frame, false),
            Expect::TcLocal,
        )
        .counted(false),
        Case::new(
            "tc_forward_remote",
            PROG_TC_INGRESS,
            W_FWD,
            "mesh_tc_ingress, TCP ACK of a confirmed flow whose task runs on another node: DNAT + bpf_skb_adjust_room + encapsulation + FIB lookup + redirect",
            Frames::One(
                Spec::tcp(worlds::FWD_CLIENT, FLOW_SPORT, worlds::FWD_NODE, worlds::FAR_TCP, TCP_ACK)
                    .build(),
            ),
            Expect::TcEncap,
        )
        .counted_on(worlds::FAR_TCP, false),
        Case::new(
            "tc_decap_local",
            PROG_TC_INGRESS,
            W_FWD,
            "mesh_tc_ingress, another node's encapsulated TCP ACK for a local task: node check, strip (bpf_skb_adjust_room), identity lookup, flow record, delivery",
            Frames::One(worlds::decap_frame()),
            Expect::TcLocal,
        ),
        Case::new(
            "tc_reply_via_ingress",
            PROG_TC_INGRESS,
            W_FWD,
            "mesh_tc_ingress, a task's reply another node carried back: node check, strip, FIB lookup to the client, redirect",
            Frames::One(worlds::reply_frame()),
            Expect::TcOut,
        ),
        Case::new(
            "tc_new_flow_full",
            PROG_TC_INGRESS,
            W_FULL,
            "as tc_new_flow, into the full unconfirmed table of new_flow_full, never emptied (flows of its own): every insert evicts",
            Frames::each(worlds::new_flow_frame_b, false),
            Expect::TcLocal,
        )
        .counted(true),
    ]
}

/// Whether `name` is one of the live cases' (`live_cases`).
fn is_live_name(name: &str) -> bool {
    name.contains("_live")
}

/// The whole-path cases on live frames, floors first.
fn live_cases(lw: &LiveWorld) -> Vec<LiveCase> {
    use Prog::*;
    vec![
        LiveCase::new(
            "floor_live",
            "floor_pass + empty TC on the uplink, the established flow's ACK: the node's own stack answers (reset)",
            XdpProg::Pass,
            Dev::Uplink,
            Attach::Floor,
            Frames::One(lw.established()),
            &[(FloorPass, 1), (FloorTc, 1)],
        ),
        LiveCase::new(
            "floor_live_direct",
            "floor_pass + empty TC, the ACK addressed to the task itself: the node's kernel routes it to the task and its reset back (no NAT)",
            XdpProg::Pass,
            Dev::Uplink,
            Attach::Floor,
            Frames::One(lw.direct()),
            &[(FloorPass, 1), (FloorTc, 2)],
        ),
        LiveCase::new(
            "floor_live_reply",
            "floor_pass + empty TC on the task port, the task's reset: the node's kernel routes it to the client",
            XdpProg::Pass,
            Dev::TaskPort,
            Attach::Floor,
            Frames::One(lw.reply()),
            &[(FloorPass, 1), (FloorTc, 1)],
        ),
        LiveCase::new(
            "established_live",
            "mesh_xdp + mesh_tc_uplink into the task, its reset back through mesh_tc_task: the established flow's ACK",
            XdpProg::Mesh,
            Dev::Uplink,
            Attach::Mesh,
            Frames::One(lw.established()),
            &[(MeshXdp, 1), (MeshTcUplink, 1), (MeshTcTask, 1)],
        )
        .counted(false),
        LiveCase::new(
            "new_flow_live",
            "as established_live, a SYN of an unseen flow (unconfirmed table emptied after every batch)",
            XdpProg::Mesh,
            Dev::Uplink,
            Attach::Mesh,
            Frames::each(lw.new_flows(), true),
            &[(MeshXdp, 1), (MeshTcUplink, 1), (MeshTcTask, 1)],
        )
        .counted(true)
        .after(AfterBatch::ClearNewFlows),
        LiveCase::new(
            "non_service_live",
            "mesh_xdp + mesh_tc_uplink, an ACK to a port no service publishes: passed, the node answers",
            XdpProg::Mesh,
            Dev::Uplink,
            Attach::Mesh,
            Frames::One(lw.non_service()),
            &[(MeshXdp, 1), (MeshTcUplink, 1), (MeshTcTask, 0)],
        ),
        LiveCase::new(
            "established_live_tc",
            "--intercept tc: floor_pass, then mesh_tc_ingress on the uplink into the task (its link, redirect_peer), its reset back through mesh_tc_task: the established flow's ACK",
            XdpProg::Pass,
            Dev::Uplink,
            Attach::MeshTc,
            Frames::One(lw.established()),
            &[(FloorPass, 1), (MeshTcIngress, 1), (MeshTcTask, 1)],
        )
        .counted(false),
        LiveCase::new(
            "new_flow_live_tc",
            "as established_live_tc, a SYN of an unseen flow (unconfirmed table emptied after every batch)",
            XdpProg::Pass,
            Dev::Uplink,
            Attach::MeshTc,
            Frames::each(lw.new_flows(), true),
            &[(FloorPass, 1), (MeshTcIngress, 1), (MeshTcTask, 1)],
        )
        .counted(true)
        .after(AfterBatch::ClearNewFlows),
        LiveCase::new(
            "non_service_live_tc",
            "floor_pass + mesh_tc_ingress, an ACK to a port no service publishes: passed, the node answers",
            XdpProg::Pass,
            Dev::Uplink,
            Attach::MeshTc,
            Frames::One(lw.non_service()),
            &[(FloorPass, 1), (MeshTcIngress, 1), (MeshTcTask, 0)],
        ),
        LiveCase::new(
            "reply_live",
            "floor_pass + mesh_tc_task on the task port, the task's reset of the established flow: translated and redirected to the uplink",
            XdpProg::Pass,
            Dev::TaskPort,
            Attach::Mesh,
            Frames::One(lw.reply()),
            &[(FloorPass, 1), (MeshTcTask, 1), (MeshTcUplink, 0)],
        ),
    ]
}
