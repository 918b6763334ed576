//! The micro-benchmark's tables, goals and JSON.

use serde_json::{Value, json};

use super::cases::Case;
use super::live::{LiveCase, Prog};
use super::worlds::{FILLER_PORT0, FLOOR_TC, MAGLEV_SIZE, World};
use super::{Args, W_10K, W_FULL, W_NEW};
use crate::util::{Goal, median, r1, r3};

pub struct Input<'a> {
    pub args: &'a Args,
    pub cpu: Option<usize>,
    pub machine: Value,
    pub xdp: &'a [Case],
    pub live: &'a [LiveCase],
    pub worlds: &'a [World],
    pub live_world: Option<&'a World>,
    pub live_skipped: bool,
}

/// A path a packet takes, as the goals judge it, with one intercept: the
/// intercept's test-run case over its floor (XDP: `floor_pass`; TC:
/// `floor_tc_run`), plus the TC program that runs after it for the same
/// packet (`--intercept xdp`: `mesh_tc_uplink`'s delivery), timed by the
/// run-time statistics of a live case over the empty TC program; and the
/// whole path's wall-clock from a live case. Each over its floor from the
/// same run.
pub struct PathDef {
    pub name: &'static str,
    /// `xdp` or `tc` (meshd's `--intercept`); `any`: the same either way.
    pub mode: &'static str,
    /// The intercept's test-run case; none where the intercept does not
    /// run (a task's reply).
    pub run: Option<&'static str>,
    /// That case's floor.
    pub run_floor: &'static str,
    /// The live case the TC figure (and the wall-clock) comes from; empty:
    /// none.
    pub live: &'static str,
    /// The TC program timed in `live` that runs after the intercept for
    /// the same packet, if one does (`--intercept tc` delivers in the
    /// intercept itself).
    pub tc: Option<Prog>,
    /// The live floor case of that TC program (its empty TC program).
    pub tc_floor: &'static str,
    /// Whether `live` is this path's own (wall-clock and the intercept's
    /// run-time statistics are reported) or only lends its TC figure.
    pub own_live: bool,
    /// The intercept program and its floor under the run-time statistics
    /// of `live` and `tc_floor` (a cross-check of the test run).
    pub stats: Option<(Prog, Prog)>,
    /// Whether the wall-clock is also compared with the kernel routing
    /// the same frame to the task (`floor_live_direct`).
    pub vs_direct: bool,
    /// The goal on intercept + TC over the floors, and where it comes from.
    pub goal: Option<(f64, &'static str)>,
}

const XDP_STATS: Option<(Prog, Prog)> = Some((Prog::MeshXdp, Prog::FloorPass));
const TC_STATS: Option<(Prog, Prog)> = Some((Prog::MeshTcIngress, Prog::FloorTc));

const fn xdp_path(
    name: &'static str,
    run: &'static str,
    live: &'static str,
    tc: Option<Prog>,
    own_live: bool,
    vs_direct: bool,
    goal: Option<(f64, &'static str)>,
) -> PathDef {
    PathDef {
        name,
        mode: "xdp",
        run: Some(run),
        run_floor: "floor_pass",
        live,
        tc,
        tc_floor: "floor_live",
        own_live,
        stats: if own_live { XDP_STATS } else { None },
        vs_direct,
        goal,
    }
}

const fn tc_path(
    name: &'static str,
    run: &'static str,
    live: &'static str,
    vs_direct: bool,
    goal: Option<(f64, &'static str)>,
) -> PathDef {
    PathDef {
        name,
        mode: "tc",
        run: Some(run),
        run_floor: "floor_tc_run",
        live,
        tc: None,
        tc_floor: "floor_live",
        own_live: !live.is_empty(),
        stats: if live.is_empty() { None } else { TC_STATS },
        vs_direct,
        goal,
    }
}

const UPLINK: Option<Prog> = Some(Prog::MeshTcUplink);

/// Every path the report shows, with each intercept; adding a path is one
/// entry here plus its cases.
pub const PATHS: &[PathDef] = &[
    xdp_path(
        "established",
        "established",
        "established_live",
        UPLINK,
        true,
        true,
        Some((150.0, "issue 10")),
    ),
    xdp_path(
        "new_flow",
        "new_flow",
        "new_flow_live",
        UPLINK,
        true,
        true,
        Some((500.0, "issue 10")),
    ),
    // Borrows new_flow_live's TC figure: delivery does not look at
    // conntrack.
    xdp_path(
        "new_flow_full",
        "new_flow_full",
        "new_flow_live",
        UPLINK,
        false,
        false,
        Some((500.0, "issue 10")),
    ),
    xdp_path(
        "non_service",
        "non_service",
        "non_service_live",
        UPLINK,
        true,
        false,
        Some((15.0, "issue 10")),
    ),
    xdp_path(
        "established_10k",
        "established_10k",
        "established_live",
        UPLINK,
        false,
        false,
        None,
    ),
    // Established flows taken in turn, their conntrack entries no longer
    // all in the CPU's caches: what many flows cost.
    xdp_path(
        "established_spread",
        "established_spread",
        "established_live",
        UPLINK,
        false,
        false,
        None,
    ),
    // Forwarding: the ingress node's XDP sends the packet to the other
    // node itself (XDP_TX): no TC program runs after it.
    xdp_path(
        "forward_remote",
        "forward_remote",
        "",
        None,
        false,
        false,
        Some((150.0, "issue 11")),
    ),
    // Decapsulated for a local task: then delivered by mesh_tc_uplink
    // exactly as a local flow's packet (same metadata, same program).
    xdp_path(
        "decap_local",
        "decap_local",
        "established_live",
        UPLINK,
        false,
        false,
        Some((150.0, "issue 11")),
    ),
    // A reply carried back: stripped and sent to the client by XDP_TX.
    xdp_path(
        "reply_via_ingress",
        "reply_via_ingress",
        "",
        None,
        false,
        false,
        Some((150.0, "issue 11")),
    ),
    tc_path(
        "established",
        "tc_established",
        "established_live_tc",
        true,
        Some((150.0, "issue 10")),
    ),
    tc_path(
        "new_flow",
        "tc_new_flow",
        "new_flow_live_tc",
        true,
        Some((500.0, "issue 10")),
    ),
    tc_path(
        "new_flow_full",
        "tc_new_flow_full",
        "",
        false,
        Some((500.0, "issue 10")),
    ),
    tc_path(
        "non_service",
        "tc_non_service",
        "non_service_live_tc",
        false,
        Some((15.0, "issue 10")),
    ),
    tc_path("established_10k", "tc_established_10k", "", false, None),
    tc_path(
        "established_spread",
        "tc_established_spread",
        "",
        false,
        None,
    ),
    tc_path(
        "forward_remote",
        "tc_forward_remote",
        "",
        false,
        Some((150.0, "issue 11")),
    ),
    tc_path(
        "decap_local",
        "tc_decap_local",
        "",
        false,
        Some((150.0, "issue 11")),
    ),
    tc_path(
        "reply_via_ingress",
        "tc_reply_via_ingress",
        "",
        false,
        Some((150.0, "issue 11")),
    ),
    // A task's reply: mesh_tc_task on its port, whichever the intercept.
    PathDef {
        name: "reply",
        mode: "any",
        run: None,
        run_floor: "floor_pass",
        live: "reply_live",
        tc: Some(Prog::MeshTcTask),
        tc_floor: "floor_live_reply",
        own_live: true,
        stats: None,
        vs_direct: false,
        goal: Some((150.0, "issue 11")),
    },
];

/// The XDP-only targets of the first benchmark issue, kept as they were.
const XDP_TARGETS: &[(&str, f64)] = &[
    ("established", 150.0),
    ("new_flow", 450.0),
    ("non_service", 40.0),
];

/// Paths beside the floor of the kernel's work they need: (case, floor
/// case, what the floor does). The goal is the path's (`PATHS`).
pub const DESIGN_FLOORS: &[(&str, &str, &str)] = &[
    (
        "new_flow",
        "floor_track",
        "parse, a lookup in each conntrack table (both miss) and one LRU insert, nothing else",
    ),
    (
        "tc_established",
        "floor_tc_nat",
        "parse, one lookup of the flow, the destination rewritten with the skb checksum helpers, the link's MACs and bpf_redirect_peer, nothing else",
    ),
    (
        "decap_local",
        "floor_decap",
        "parse, the node lookup, the strip, the task's identity and the flow record's lookups, the metadata, nothing else; without the TC program after it",
    ),
    (
        "reply_via_ingress",
        "floor_reply",
        "parse, the node lookup, the strip, the unconfirmed table's and the route cache's lookups, the MACs, XDP_TX, nothing else",
    ),
];

/// Forwarding's targets: (case, reference case, most ns above it).
const REL_TARGETS: &[(&str, &str, f64)] = &[
    ("forward_remote", "established", 60.0),
    ("decap_local", "floor_lookup", 40.0),
];

struct Target {
    case: &'static str,
    text: String,
    met: bool,
    json: Value,
}

pub fn report(i: &Input) -> Value {
    let a = i.args;
    let floor_case = &i.xdp[0];
    let floor = floor_case.ns();
    let xdp_ns = |name: &str| i.xdp.iter().find(|c| c.name == name).map(|c| c.ns());
    let over = |name: &str| xdp_ns(name).map(|n| n - floor);
    // A case's floor: floor_pass, or for the intercept at TC the empty TC
    // program under the same test run.
    let tc_floor = i.xdp.iter().find(|c| c.name == FLOOR_TC);
    let floor_of = |c: &Case| match tc_floor {
        Some(t)
            if c.prog == mesh_common::abi::PROG_TC_INGRESS
                || c.prog == mesh_common::abi::PROG_FLOOR_TC_NAT =>
        {
            (t.ns(), t.rounds.clone())
        }
        _ => (floor, floor_case.rounds.clone()),
    };

    // The XDP-only targets.
    let mut targets = Vec::new();
    for &(case, limit) in XDP_TARGETS {
        let Some(m) = over(case) else { continue };
        targets.push(Target {
            case,
            text: format!("<= {limit:.0} ns"),
            met: m <= limit,
            json: json!({"case": case, "metric": "overhead_ns", "max": limit, "measured": r1(m), "met": m <= limit}),
        });
    }
    // Forwarding's targets (issue 7), relative to their reference case
    // in the same run.
    for &(case, reference, limit) in REL_TARGETS {
        let (Some(m), Some(r)) = (xdp_ns(case), xdp_ns(reference)) else {
            continue;
        };
        let d = m - r;
        targets.push(Target {
            case,
            text: format!("<= {reference} + {limit:.0} ns"),
            met: d <= limit,
            json: json!({"case": case, "metric": "ns minus the reference case's ns", "reference": reference, "max": limit, "measured": r1(d), "met": d <= limit}),
        });
    }
    if let (Some(e), Some(b)) = (over("established"), over("established_10k")) {
        let ratio = b / e;
        let met = (ratio - 1.0).abs() <= 0.10;
        targets.push(Target {
            case: "established_10k",
            text: format!("established +-10% ({:.1}..{:.1})", e * 0.9, e * 1.1),
            met,
            json: json!({
                "case": "established_10k",
                "metric": "overhead_ns relative to established's overhead_ns",
                "max_relative_difference": 0.10,
                "measured": r1(b),
                "reference": r1(e),
                "ratio": r3(ratio),
                "met": met,
            }),
        });
    }

    // The test-run table.
    println!();
    println!(
        "mesh micro-benchmark: {} rounds x {} calls (repeat=1) per case, median of per-round means, kernel-reported ns",
        a.rounds, a.calls
    );
    println!();
    println!(
        "the intercept alone (BPF_PROG_TEST_RUN), overhead over floor_pass (tc_*: over floor_tc_run, the empty TC program):"
    );
    let row = |c: [&str; 6]| {
        let line = format!(
            "{:<16} {:>8} {:>9} {:>17}   {:<34} {}",
            c[0], c[1], c[2], c[3], c[4], c[5]
        );
        println!("{}", line.trim_end());
    };
    row([
        "case",
        "ns",
        "overhead",
        "rounds min..max",
        "target (overhead)",
        "status",
    ]);
    for c in i.xdp {
        let m = c.ns();
        let (lo, hi) = c
            .rounds
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        let t = targets.iter().find(|t| t.case == c.name);
        let overhead = if c.name == floor_case.name || c.name == FLOOR_TC {
            "-".to_string()
        } else {
            format!("{:.1}", m - floor_of(c).0)
        };
        row([
            c.name,
            &format!("{m:.1}"),
            &overhead,
            &format!("{lo:.1}..{hi:.1}"),
            t.map(|t| t.text.as_str()).unwrap_or(""),
            t.map(|t| if t.met { "met" } else { "MISSED" })
                .unwrap_or(""),
        ]);
    }

    // The live table.
    let live = |name: &str| i.live.iter().find(|c| c.name == name);
    if !i.live.is_empty() {
        println!();
        println!(
            "live frames (BPF_F_TEST_XDP_LIVE_FRAMES): whole path per frame (kernel-reported), and each program's ns per run (BPF run-time statistics):"
        );
        println!("{:<18} {:>9}   programs (ns per run)", "case", "wall ns");
        for c in i.live {
            let progs: Vec<String> = c
                .progs
                .iter()
                .map(|(p, v)| format!("{} {:.1}", p.name(), median(v)))
                .collect();
            println!("{:<18} {:>9.1}   {}", c.name, c.wall_ns(), progs.join(", "));
        }
    }

    // The paths.
    let mut goals = Vec::new();
    let mut paths_json = Vec::new();
    println!();
    println!(
        "whole path, ns over the floors (intercept: test run over its floor, floor_pass or floor_tc_run; TC after it: run-time statistics over an empty TC program; wall: live frame over the same frame through the floors):"
    );
    println!(
        "{:<18} {:<4} {:>9} {:>8} {:>8}   {:<14} {:<8} {:>10} {:>8} {:>9}",
        "path",
        "mode",
        "intercept",
        "TC",
        "sum",
        "goal (sum)",
        "status",
        "int. stats",
        "wall",
        "vs direct"
    );
    for p in PATHS {
        let run = match p.run {
            Some(c) => match (xdp_ns(c), xdp_ns(p.run_floor)) {
                (Some(m), Some(f)) => Some(m - f),
                _ => None,
            },
            None => Some(0.0),
        };
        let (lc, tf) = (live(p.live), live(p.tc_floor));
        let tc = match p.tc {
            None => Some(0.0),
            Some(prog) => match (
                lc.and_then(|c| c.prog_ns(prog)),
                tf.and_then(|c| c.prog_ns(Prog::FloorTc)),
            ) {
                (Some(m), Some(f)) => Some(m - f),
                _ => None,
            },
        };
        let sum = match (run, tc) {
            (Some(x), Some(t)) => Some(x + t),
            _ => None,
        };
        let (stats, wall, wall_direct) = if p.own_live {
            let xs = match p.stats {
                Some((prog, floor)) => match (
                    lc.and_then(|c| c.prog_ns(prog)),
                    tf.and_then(|c| c.prog_ns(floor)),
                ) {
                    (Some(m), Some(f)) => Some(m - f),
                    _ => None,
                },
                None => None,
            };
            let w = match (lc, tf) {
                (Some(c), Some(f)) => Some(c.wall_ns() - f.wall_ns()),
                _ => None,
            };
            let wd = match (lc, live("floor_live_direct")) {
                (Some(c), Some(d)) if p.vs_direct => Some(c.wall_ns() - d.wall_ns()),
                _ => None,
            };
            (xs, w, wd)
        } else {
            (None, None, None)
        };
        let (goal_text, status) = match (p.goal, sum) {
            (Some((max, _)), Some(s)) => (
                format!("<= +{max:.0} ns"),
                if s <= max { "MET" } else { "NOT MET" },
            ),
            (Some((max, _)), None) => (format!("<= +{max:.0} ns"), "not measured"),
            (None, _) => (String::new(), ""),
        };
        let f = |x: Option<f64>| x.map(|v| format!("{v:+.1}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<18} {:<4} {:>9} {:>8} {:>8}   {:<14} {:<8} {:>10} {:>8} {:>9}",
            p.name,
            p.mode,
            f(run),
            f(tc),
            f(sum),
            goal_text,
            status,
            f(stats),
            f(wall),
            f(wall_direct)
        );
        if let Some((max, source)) = p.goal {
            let why_not = if i.live_skipped {
                " (live cases skipped: --no-live)"
            } else {
                ""
            };
            goals.push(Goal::new(
                "micro",
                format!(
                    "{} (--intercept {}): whole path (intercept + TC after it) over the floors ({source})",
                    p.name, p.mode
                ),
                format!("<= +{max:.0} ns"),
                sum.map(|s| format!("{s:+.1} ns"))
                    .unwrap_or_else(|| format!("not measured{why_not}")),
                sum.map(|s| s <= max),
            ));
        }
        paths_json.push(json!({
            "path": p.name,
            "intercept": p.mode,
            "intercept_case": p.run,
            "intercept_floor_case": p.run.map(|_| p.run_floor),
            "intercept_overhead_ns": run.map(r1),
            "tc_program": p.tc.map(|t| t.name()),
            "tc_case": (!p.live.is_empty()).then_some(p.live),
            "tc_overhead_ns": tc.map(r1),
            "sum_overhead_ns": sum.map(r1),
            "intercept_stats_overhead_ns": stats.map(r1),
            "wall_overhead_ns": wall.map(r1),
            "wall_over_direct_ns": wall_direct.map(r1),
            "goal_max_ns": p.goal.map(|g| g.0),
            "goal_source": p.goal.map(|g| g.1),
            "met": match (p.goal, sum) { (Some((max, _)), Some(s)) => Some(s <= max), _ => None },
        }));
    }
    crate::util::print_goals(&goals);

    // What the kernel's own work on a path costs, beside the path: each
    // over its own floor (floor_pass, or for TC programs the empty one).
    let own = |name: &str| {
        i.xdp
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.ns() - floor_of(c).0)
    };
    let mut floors_json = Vec::new();
    let design: Vec<_> = DESIGN_FLOORS
        .iter()
        .filter_map(|&(case, floor, does)| {
            let goal = PATHS.iter().find(|p| p.run == Some(case))?.goal?.0;
            Some((case, floor, goal, does, own(case)?, own(floor)?))
        })
        .collect();
    if !design.is_empty() {
        println!();
        println!(
            "design floors (test run, over floor_pass; tc_*: over floor_tc_run): what the kernel's work a path needs costs alone, beside the path:"
        );
        for &(case, floor, goal, does, m, f) in &design {
            println!(
                "  {case} {m:+.1} ns: {floor} {f:+.1} ns, the path {:+.1} ns above it; its goal (<= +{goal:.0} ns) {} that floor",
                m - f,
                if f > goal { "lies below" } else { "is above" }
            );
            floors_json.push(json!({
                "case": case,
                "floor_case": floor,
                "floor_does": does,
                "case_overhead_ns": r1(m),
                "floor_overhead_ns": r1(f),
                "above_floor_ns": r1(m - f),
                "goal_max_ns": goal,
                "goal_below_floor": f > goal,
            }));
        }
    }

    // The JSON.
    let cases_json: Vec<Value> = i
        .xdp
        .iter()
        .map(|c| {
            let (f, rounds) = floor_of(c);
            c.json(
                &i.worlds[c.world],
                f,
                &rounds,
                c.name == floor_case.name || c.name == FLOOR_TC,
            )
        })
        .collect();
    let mut targets_json: Vec<Value> = targets.iter().map(|t| t.json.clone()).collect();
    for (p, g) in PATHS.iter().filter(|p| p.goal.is_some()).zip(&goals) {
        targets_json.push(json!({
            "case": p.name,
            "intercept": p.mode,
            "metric": "path_overhead_ns (XDP + TC over their floors)",
            "max": p.goal.map(|g| g.0),
            "measured": g.measured,
            "met": g.met,
        }));
    }
    json!({
        "bench": "micro",
        "cases": cases_json,
        "live_cases": i.live.iter().map(|c| c.json()).collect::<Vec<_>>(),
        "live_world": i.live_world.map(|w| w.json()),
        "paths": paths_json,
        "design_floors": floors_json,
        "targets": targets_json,
        "goals": goals.iter().map(|g| g.json()).collect::<Vec<_>>(),
        "config": {
            "rounds": a.rounds,
            "calls_per_case_per_round": a.calls,
            "warmup_calls_per_case": a.warmup,
            "maglev_size": MAGLEV_SIZE,
            "pinned_cpu": i.cpu,
            "cpus_online": i.machine["cpus_online"],
            "kernel": i.machine["kernel"],
            "cpu_model": i.machine["cpu_model"],
            "bpf_jit_enable": i.machine["bpf_jit_enable"],
            "bpf_jit_harden": i.machine["bpf_jit_harden"],
            "bpf_stats_enabled": i.machine["bpf_stats_enabled"],
            "loadavg_at_start": i.machine["loadavg"],
            "busiest_other_processes_at_start": i.machine["busiest_other_processes"],
            "live": !i.live_skipped,
        },
        "notes": [
            "ns: kernel-reported duration of BPF_PROG_TEST_RUN with repeat=1, averaged over calls_per_case_per_round calls; the median over rounds is reported.",
            "repeat=1 because BPF_PROG_TEST_RUN does not restore the packet between repeat iterations and mesh_xdp rewrites it (DNAT): with repeat=N every iteration after the first would time a different packet. With repeat=1 the kernel copies the original frame in on every call.",
            "Rounds run every case once, round-robin, starting one case later each round, so noise and drift hit all cases alike.",
            "overhead_ns = ns - floor_pass ns from the same run (medians); floor_pass's ns is the test-run harness itself (timer reads, program dispatch). overhead_rounds pairs each round with floor_pass's same round.",
            "Every call's verdict is checked (XDP_PASS with 8 bytes of metadata for established/new_flow/established_10k/new_flow_full, XDP_PASS without for non_service, XDP_TX for floor_lookup), and after every batch the service's packet and new-flow counters must have grown by exactly what the case claims.",
            "established and established_10k: the ACK of a confirmed flow (its entry in the confirmed TCP table, as the forward path leaves it once the client acknowledged the task's SYN-ACK); same 16-backend service and maglev_size 1021.",
            format!("new_flow: every call is a flow conntrack has not seen (clients in 198.19.0.0/16, 50,000 source ports per address): conntrack misses in both tables, Maglev selection and one LRU insert into the unconfirmed table ({} entries, never full: no eviction). That table is emptied after every batch (untimed) and the same flows replayed, so every batch inserts into a table holding 0..calls_per_case_per_round flows, whatever the number of rounds.", i.worlds[W_NEW].limits.ct_new_entries),
            format!("new_flow_full: the same, into an unconfirmed table of {} entries filled to capacity before timing and never emptied: every insert evicts the least recently used entry (one LRU list for all CPUs).", i.worlds[W_FULL].limits.ct_new_entries),
            format!("established_10k: 9,999 more tcp services loaded (ports {FILLER_PORT0}.., 2-16 backends each, {} backends in all). Load time is not counted.", i.worlds[W_10K].backends),
            "live_cases: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, repeat=1, on a lab node in a network namespace (one task behind the node's bridge, one client). An XDP_PASS frame becomes an skb on the node's uplink and crosses TC ingress (mesh_tc_uplink attached with TCX); the task's kernel answers (nothing listens: a reset), and the answer crosses mesh_tc_task on the task's bridge port. wall_ns is the kernel-reported duration of one such call: everything up to the end of the softirq work it triggers. Per-program ns come from the kernel's BPF run-time statistics (BPF_ENABLE_STATS, run_time_ns / run_cnt from fdinfo), enabled only during live batches.",
            "Live floors: floor_pass and an empty TC program (two instructions) attached the same way, fed the same frames: the node's own stack answers them (reset). floor_live_direct: the flow's ACK addressed to the task itself, routed by the node's kernel (FORWARD accepted in this lab), the floor of a path without NAT. Every batch checks that each program ran exactly as often as its frames require, and that the dataplane dropped nothing.",
            "paths: XDP = the test-run case over floor_pass; TC = the live case's TC program over the empty TC program (statistics); XDP + TC is what the goals judge (the programs' own cost, as issue 11 measured TC). wall = the live case over floor_live (same frames, through floor_pass): the whole path including the extra hops into the task's namespace; vs direct = over floor_live_direct. new_flow_full and established_10k borrow the TC figure of new_flow_live and established_live.",
            "design_floors: a path beside a floor program that does only the kernel's work the path needs, run the same way in the same rounds, each over its own floor. floor_track (new_flow's): parse, the flow's key, a lookup in a confirmed and an unconfirmed LRU table of new_flow's sizes (both miss), one insert into the unconfirmed one (emptied after every batch, as new_flow's); fed new_flow's frames. floor_decap (decap_local's XDP part): parse, the sender's lookup among the nodes, bpf_xdp_adjust_head with the MACs kept, parse, the task's identity lookup, the flow record's lookup, bpf_xdp_adjust_meta; fed decap_local's frame. floor_reply (reply_via_ingress's): parse, the node lookup, the strip, the flow's lookup in the unconfirmed table (a reply may confirm it; a miss), the route cache's lookup (a hit), the MACs, XDP_TX; fed reply_via_ingress's frame. floor_tc_nat (tc_established's, over floor_tc_run): parse, one LRU lookup of the flow (a hit), the destination address and port written with the IPv4 checksum updated in the program and the TCP checksum through bpf_l4_csum_replace twice (the pseudo-header's part and the port's: a partial checksum takes only the first, and the program cannot tell which kind the buffer carries), the link's MACs, bpf_redirect_peer. A goal below its floor cannot be met by the path's own code.",
            "Targets are overheads over the floors in the same run; a missed target is reported, not enforced.",
        ],
    })
}
