//! `mesh-bench all --out DIR`: every suite this machine allows, one after
//! the other, each suite's JSON in DIR, then DIR/summary.md (the machine,
//! how loaded it was, every suite's main figures and every goal as met or
//! not met) and the plots (SVG). A suite that fails is reported as such
//! and the others still run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::util::{self, Goal};
use crate::{churn, converge, e2e, micro, scale, svg};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The directory for every suite's JSON, summary.md and the plots.
    #[arg(long)]
    pub out: PathBuf,
    /// Shorter runs (one round each, fewer calls): to try the harness,
    /// not to quote.
    #[arg(long)]
    pub quick: bool,
    /// Suites to leave out (micro, e2e, scale, churn, converge).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Run nothing: write summary.md and the plots again from the JSON a
    /// run left in --out (after a change to how they are drawn).
    #[arg(long)]
    pub render_only: bool,
}

const SUITES: [&str; 5] = ["micro", "scale", "churn", "e2e", "converge"];

pub fn run(a: &Args) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    if a.render_only {
        return render_only(&a.out);
    }
    let started = Instant::now();
    let machine_start = util::machine();
    let mut docs: Vec<(&'static str, Result<Value, String>)> = Vec::new();
    let q = a.quick;
    let skip = |s: &str| a.skip.iter().any(|x| x == s);
    if !skip("micro") {
        let m = micro::Args {
            out: None,
            rounds: if q { 1 } else { 5 },
            calls: if q { 2_000 } else { 20_000 },
            warmup: if q { 500 } else { 2_000 },
            ct_full: if q { 1 << 20 } else { 4 << 20 },
            no_live: false,
            cpu: None,
            no_pin: false,
            only: Vec::new(),
        };
        docs.push(("micro", timed("micro", || micro::run(&m))));
    }
    if !skip("scale") {
        let s = scale::Args {
            out: None,
            rounds: if q { 1 } else { 3 },
            calls: if q { 2_000 } else { 20_000 },
            max_flows: 1 << 20,
            cpu: None,
        };
        docs.push(("scale", timed("scale", || scale::run(&s))));
    }
    if !skip("churn") {
        let c = churn::Args {
            out: None,
            rounds: if q { 1 } else { 2 },
            secs: if q { 3 } else { 5 },
            stable: 3,
            churning: 3,
            every_ms: 100,
            keepalive: 4,
            fresh: 2,
        };
        docs.push(("churn", timed("churn", || churn::run(&c))));
    }
    if !skip("e2e") {
        let e = e2e::Args {
            out: None,
            rounds: if q { 1 } else { 3 },
            secs: if q { 2 } else { 5 },
            clients: 4,
            conns: 16,
            backends: 1,
            stream_secs: if q { 2 } else { 4 },
            paths: Vec::new(),
        };
        docs.push(("e2e", timed("e2e", || e2e::run(&e))));
    }
    if !skip("converge") {
        let c = converge::Args {
            out: None,
            rounds: if q { 2 } else { 20 },
            nodes: 3,
            low: 2,
            high: 6,
            poll_ms: 20,
            watch_interval_ms: converge::MESHD_DEFAULT_WATCH_MS,
            pause_ms: 1000,
            timeout_secs: 60,
            logs: None,
            meshd_log: "info".into(),
        };
        docs.push(("converge", timed("converge", || converge::run(&c))));
    }

    for (name, d) in &docs {
        let path = a.out.join(format!("{name}.json"));
        let v = match d {
            Ok(v) => v.clone(),
            Err(e) => json!({"bench": name, "error": e}),
        };
        util::write_json(&path, &v)?;
    }
    let machine_end = util::machine();
    util::write_json(
        &a.out.join("run.json"),
        &json!({
            "machine_at_start": machine_start,
            "machine_at_end": machine_end,
            "seconds": started.elapsed().as_secs_f64().round(),
            "quick": q,
        }),
    )?;
    let plots = plots(&a.out, &docs)?;
    let summary = summary(
        &docs,
        &machine_start,
        &machine_end,
        &plots,
        started.elapsed().as_secs_f64(),
        q,
    );
    util::write_atomic(&a.out.join("summary.md"), summary.as_bytes())?;
    let goals: Vec<Goal> = docs
        .iter()
        .filter_map(|(n, d)| Some((*n, d.as_ref().ok()?)))
        .flat_map(|(n, d)| Goal::from_json(n, d))
        .collect();
    util::print_goals(&goals);
    eprintln!(
        "wrote {} (every suite's JSON, summary.md, {} plots) in {:.0} s",
        a.out.display(),
        plots.len(),
        started.elapsed().as_secs_f64()
    );
    if docs.iter().any(|(_, d)| d.is_err()) {
        anyhow::bail!("a suite failed: see summary.md");
    }
    Ok(())
}

fn render_only(dir: &Path) -> Result<()> {
    let read = |name: &str| -> Result<Value> {
        let p = dir.join(name);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let run = read("run.json")?;
    let docs: Vec<(&'static str, Result<Value, String>)> = SUITES
        .iter()
        .filter(|s| dir.join(format!("{s}.json")).exists())
        .map(|s| {
            let v = read(&format!("{s}.json")).map_err(|e| format!("{e:#}"));
            let v = match v {
                Ok(v) if v.get("error").is_some() => {
                    Err(v["error"].as_str().unwrap_or("failed").to_string())
                }
                other => other,
            };
            (*s, v)
        })
        .collect();
    let plots = plots(dir, &docs)?;
    let text = summary(
        &docs,
        &run["machine_at_start"],
        &run["machine_at_end"],
        &plots,
        run["seconds"].as_f64().unwrap_or(0.0),
        run["quick"].as_bool().unwrap_or(false),
    );
    util::write_atomic(&dir.join("summary.md"), text.as_bytes())?;
    eprintln!(
        "wrote {}/summary.md and {} plots",
        dir.display(),
        plots.len()
    );
    Ok(())
}

fn timed(name: &str, f: impl FnOnce() -> Result<Value>) -> Result<Value, String> {
    eprintln!("== {name}");
    let t = Instant::now();
    let r = f().map_err(|e| format!("{e:#}"));
    if let Err(e) = &r {
        eprintln!("{name} failed: {e}");
    }
    eprintln!("== {name}: {:.0} s", t.elapsed().as_secs_f64());
    r.map(|mut v| {
        v["seconds"] = json!(t.elapsed().as_secs_f64().round());
        v
    })
}

fn doc<'a>(docs: &'a [(&'static str, Result<Value, String>)], name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d.0 == name)
        .and_then(|d| d.1.as_ref().ok())
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Writes the plots; returns (file, what it shows).
fn plots(
    dir: &Path,
    docs: &[(&'static str, Result<Value, String>)],
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut put = |name: &str, what: &str, text: String| -> Result<()> {
        util::write_atomic(&dir.join(name), text.as_bytes())?;
        out.push((name.to_string(), what.to_string()));
        Ok(())
    };
    if let Some(m) = doc(docs, "micro") {
        let rows: Vec<(String, Vec<f64>, Option<f64>)> = m["paths"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    format!("{} ({})", p["path"].as_str()?, p["intercept"].as_str()?),
                    vec![f(&p["intercept_overhead_ns"])?, f(&p["tc_overhead_ns"])?],
                    f(&p["goal_max_ns"]),
                ))
            })
            .collect();
        if !rows.is_empty() {
            put(
                "micro_paths.svg",
                "per-packet cost of each path over its floors, with each intercept: the intercept and the TC program after it, with the goal",
                svg::stacked(
                    "Whole path per packet: ns over the floors (intercept + TC after it)",
                    "ns over the intercept's floor (floor_pass, floor_tc_run) and an empty TC program (TC)",
                    &["intercept".into(), "TC after it".into()],
                    &rows,
                ),
            )?;
        }
    }
    if let Some(e) = doc(docs, "e2e") {
        let paths: Vec<&Value> = e["paths"].as_array().into_iter().flatten().collect();
        let names: Vec<String> = {
            let mut v: Vec<String> = paths
                .iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect();
            v.dedup();
            v
        };
        let series = |mode: &str, key: &str| -> Vec<Option<f64>> {
            names
                .iter()
                .map(|n| {
                    paths
                        .iter()
                        .find(|p| p["name"] == n.as_str() && p["mode"] == mode)
                        .and_then(|p| f(&p[key]))
                })
                .collect()
        };
        put(
            "e2e_rps.svg",
            "HTTP requests per second relative to direct, keep-alive and a new connection per request",
            svg::bars(
                "HTTP requests per second, relative to direct (same run)",
                "x direct",
                &names,
                &[
                    ("keep-alive".into(), series("keepalive", "rps_vs_direct")),
                    (
                        "new connection per request".into(),
                        series("close", "rps_vs_direct"),
                    ),
                ],
                Some((1.0, "direct")),
            ),
        )?;
        put(
            "e2e_p99.svg",
            "p99 latency per path",
            svg::bars(
                "p99 latency (ms)",
                "ms",
                &names,
                &[
                    ("keep-alive".into(), series("keepalive", "p99_ms")),
                    (
                        "new connection per request".into(),
                        series("close", "p99_ms"),
                    ),
                ],
                None,
            ),
        )?;
        put(
            "e2e_cpu.svg",
            "CPU time per request per path",
            svg::bars(
                "CPU time per request (us, the lab's processes)",
                "us per request",
                &names,
                &[
                    ("keep-alive".into(), series("keepalive", "cpu_us_per_req")),
                    (
                        "new connection per request".into(),
                        series("close", "cpu_us_per_req"),
                    ),
                ],
                None,
            ),
        )?;
        let streams: Vec<&Value> = e["streams"].as_array().into_iter().flatten().collect();
        let sn: Vec<String> = streams
            .iter()
            .filter_map(|s| s["name"].as_str().map(String::from))
            .collect();
        put(
            "e2e_stream.svg",
            "one TCP stream's throughput per path",
            svg::bars(
                "One TCP stream (Gbit/s)",
                "Gbit/s",
                &sn,
                &[(
                    "iperf3, one stream".into(),
                    streams.iter().map(|s| f(&s["tcp_stream_gbit_s"])).collect(),
                )],
                f(&e["direct_stream_with_meshd_gbit_s"])
                    .map(|x| (x, "direct while meshd (--intercept tc) is attached")),
            ),
        )?;
    }
    if let Some(s) = doc(docs, "scale") {
        let sv: Vec<&Value> = s["services"].as_array().into_iter().flatten().collect();
        let pts = |x: &str, y: &str, div: f64| -> Vec<(f64, f64)> {
            sv.iter()
                .filter_map(|w| Some((f(&w[x])?, f(&w[y])? / div)))
                .collect()
        };
        put(
            "scale_program.svg",
            "time to program fresh maps against backends",
            svg::lines(
                "Programming fresh maps (ms) against backends",
                "backends",
                "ms",
                &[
                    (
                        "planner and map writes".into(),
                        pts("backends", "apply_ms", 1.0),
                    ),
                    ("planner alone".into(), pts("backends", "plan_ms", 1.0)),
                ],
            ),
        )?;
        put(
            "scale_memory.svg",
            "Maglev map memory against services, per-service sizes and before",
            svg::lines(
                "Maglev map (MiB) against services",
                "services",
                "MiB",
                &[
                    (
                        "now: tables sized per service (kernel accounting)".into(),
                        pts("services", "maglev_map_bytes", 1048576.0),
                    ),
                    (
                        "before: every table --maglev-size (computed)".into(),
                        pts(
                            "services",
                            "maglev_map_bytes_before_per_service_sizes",
                            1048576.0,
                        ),
                    ),
                ],
            ),
        )?;
        let fl: Vec<(f64, f64)> = s["flows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| Some((f(&w["tracked_flows"])?, f(&w["packet_overhead_ns"])?)))
            .collect();
        put(
            "scale_packet.svg",
            "per-packet cost against services and tracked flows",
            svg::lines(
                "Established flow, ns over floor_pass",
                "services, or tracked flows",
                "ns",
                &[
                    (
                        "against services".into(),
                        pts("services", "packet_overhead_ns", 1.0),
                    ),
                    ("against tracked flows".into(), fl),
                ],
            ),
        )?;
    }
    if let Some(c) = doc(docs, "churn") {
        let modes: Vec<&Value> = c["modes"].as_array().into_iter().flatten().collect();
        let names: Vec<String> = modes
            .iter()
            .filter_map(|m| m["mode"].as_str().map(String::from))
            .collect();
        let ser = |k: &str| modes.iter().map(|m| f(&m[k]["p99_ms"])).collect::<Vec<_>>();
        put(
            "churn_p99.svg",
            "p99 latency with and without churn",
            svg::bars(
                "p99 latency (ms) while backends change every 100 ms",
                "ms",
                &names,
                &[
                    ("no churn".into(), ser("no_churn")),
                    ("churn".into(), ser("churn")),
                ],
                None,
            ),
        )?;
    }
    Ok(out)
}

fn summary(
    docs: &[(&'static str, Result<Value, String>)],
    m0: &Value,
    m1: &Value,
    plots: &[(String, String)],
    secs: f64,
    quick: bool,
) -> String {
    let mut s = String::new();
    let txt = |v: &Value| {
        v.as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string())
    };
    let _ = writeln!(s, "# mesh benchmark summary\n");
    let _ = writeln!(
        s,
        "Machine: {} CPU(s) ({}), {:.1} GiB, kernel {}, BPF JIT {}. All suites in {:.0} s{}.",
        m0["cpus_online"],
        txt(&m0["cpu_model"]),
        m0["mem_total_kib"].as_f64().unwrap_or(0.0) / 1048576.0,
        txt(&m0["kernel"]),
        if m0["bpf_jit_enable"] == "1" {
            "on"
        } else {
            "off"
        },
        secs,
        if quick {
            " (--quick: one round each, not for quoting)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Load average at start {}, at end {}; busiest other processes at start: {}.\n",
        txt(&m0["loadavg"]),
        txt(&m1["loadavg"]),
        m0["busiest_other_processes"]
            .as_array()
            .map(|a| if a.is_empty() {
                "none above 1%".to_string()
            } else {
                a.iter().map(txt).collect::<Vec<_>>().join(", ")
            })
            .unwrap_or_default()
    );
    let load1 = |m: &Value| {
        m["loadavg"]
            .as_str()
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpus = m0["cpus_online"].as_f64().unwrap_or(1.0);
    if load1(m0).max(load1(m1)) >= cpus {
        let _ = writeln!(
            s,
            "**The machine was loaded** during this run (a load average at or above its {cpus} CPUs, from other work besides the benchmark): absolute figures are noisier and lower than on an idle machine; ratios and overheads compare cases measured under the same load.\n"
        );
    }
    let _ = writeln!(
        s,
        "Ratios and overheads are between cases measured side by side in the same run.\n"
    );

    if let Some(m) = doc(docs, "micro") {
        let _ = writeln!(s, "## micro: per packet, ns over the floors\n");
        let _ = writeln!(
            s,
            "| path | intercept | intercept's cost | TC after it | sum | goal | wall (live) | wall vs direct |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        let n = |v: &Value| {
            v.as_f64()
                .map(|x| format!("{x:+.1}"))
                .unwrap_or_else(|| "–".into())
        };
        for p in m["paths"].as_array().into_iter().flatten() {
            let goal = match (p["goal_max_ns"].as_f64(), p["met"].as_bool()) {
                (Some(g), Some(true)) => format!("≤ +{g:.0}: met"),
                (Some(g), Some(false)) => format!("≤ +{g:.0}: **not met**"),
                (Some(g), None) => format!("≤ +{g:.0}: not measured"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                txt(&p["path"]),
                txt(&p["intercept"]),
                n(&p["intercept_overhead_ns"]),
                n(&p["tc_overhead_ns"]),
                n(&p["sum_overhead_ns"]),
                goal,
                n(&p["wall_overhead_ns"]),
                n(&p["wall_over_direct_ns"])
            );
        }
        let _ = writeln!(
            s,
            "\nintercept xdp: mesh_xdp under BPF_PROG_TEST_RUN over floor_pass, then mesh_tc_uplink (TC after it: the kernel's run-time statistics over an empty TC program, on live frames); intercept tc: mesh_tc_ingress under BPF_PROG_TEST_RUN over the empty TC program run the same way (it delivers itself); any: mesh_tc_task, whichever the intercept. wall: a live frame's whole path (intercept, skb, TC, the task's answer) over the same frame through the floors, and over the frame routed to the task without NAT.\n"
        );
        for f in m["design_floors"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "Design floor: {} costs {} ns over its floor (floor_pass; at TC the empty TC program), {} ({}) {} ns: the path is {} ns above the kernel's work it needs, and its goal (≤ +{} ns) {} that floor.\n",
                txt(&f["case"]),
                n(&f["case_overhead_ns"]),
                txt(&f["floor_case"]),
                txt(&f["floor_does"]),
                n(&f["floor_overhead_ns"]),
                n(&f["above_floor_ns"]),
                f["goal_max_ns"].as_f64().unwrap_or(0.0),
                if f["goal_below_floor"].as_bool() == Some(true) {
                    "lies below"
                } else {
                    "is above"
                }
            );
        }
    }
    if let Some(e) = doc(docs, "e2e") {
        let _ = writeln!(
            s,
            "## e2e: HTTP through each path ({} clients, {} connections each)\n",
            e["config"]["clients"], e["config"]["connections_per_client"]
        );
        let _ = writeln!(
            s,
            "| path | mode | req/s | vs direct | p50 ms | p99 ms | CPU µs/req |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for p in e["paths"].as_array().into_iter().flatten() {
            let o = |v: &Value, d: usize| {
                v.as_f64()
                    .map(|x| format!("{x:.d$}"))
                    .unwrap_or_else(|| "–".into())
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                txt(&p["name"]),
                txt(&p["mode"]),
                o(&p["rps"], 0),
                o(&p["rps_vs_direct"], 3),
                o(&p["p50_ms"], 3),
                o(&p["p99_ms"], 3),
                o(&p["cpu_us_per_req"], 1)
            );
        }
        let _ = writeln!(
            s,
            "\n| path | one TCP stream Gbit/s | UDP datagrams/s received |"
        );
        let _ = writeln!(s, "|---|---|---|");
        for p in e["streams"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                txt(&p["name"]),
                p["tcp_stream_gbit_s"]
                    .as_f64()
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or("–".into()),
                p["udp_pps_received"]
                    .as_f64()
                    .map(|x| format!("{x:.0}"))
                    .unwrap_or("n/a".into())
            );
        }
        for (m, x) in e["direct_stream_with_meshd_by_path"]
            .as_object()
            .into_iter()
            .flatten()
        {
            if let Some(x) = x.as_f64() {
                let _ = writeln!(s, "| direct, meshd attached ({m}) | {x:.2} | |");
            }
        }
        let _ = writeln!(s, "\n{}\n", txt(&e["ipvs"]));
    }
    if let Some(sc) = doc(docs, "scale") {
        let _ = writeln!(s, "## scale\n");
        let _ = writeln!(
            s,
            "| services | tasks each | backends | program (ms) | Maglev map MiB (before) | all maps MiB | packet ns over floor |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for w in sc["services"].as_array().into_iter().flatten() {
            let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / 1048576.0;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} ({:.1}) | {:.1} | {:+.1} |",
                w["services"],
                w["tasks_per_service"],
                w["backends"],
                w["apply_ms"].as_f64().unwrap_or(0.0),
                mib(&w["maglev_map_bytes"]),
                mib(&w["maglev_map_bytes_before_per_service_sizes"]),
                mib(&w["all_maps_bytes"]),
                w["packet_overhead_ns"].as_f64().unwrap_or(0.0)
            );
        }
        let _ = writeln!(
            s,
            "\n| tracked flows | packet ns over floor | sweep: scan ms | sweep: removing all ms |\n|---|---|---|---|"
        );
        let ms = |v: &Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.1}"));
        for w in sc["flows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {:+.1} | {} | {} |",
                w["tracked_flows"],
                w["packet_overhead_ns"].as_f64().unwrap_or(0.0),
                ms(&w["sweep_scan_ms"]),
                ms(&w["sweep_remove_all_ms"])
            );
        }
        let _ = writeln!(
            s,
            "\nConntrack: {} bytes per tracked flow (preallocated). Maglev build: {}.\n",
            sc["ct_bytes_per_flow_marginal"],
            sc["maglev_build"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| format!("{} backends {} ms", b["backends"], b["build_ms"]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(c) = doc(docs, "churn") {
        let _ = writeln!(s, "## churn: a backend added or removed every 100 ms\n");
        let _ = writeln!(
            s,
            "| mode | period | answered | failed | of which backend stayed | p99 ms |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for m in c["modes"].as_array().into_iter().flatten() {
            for p in ["no_churn", "churn"] {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {:.3} |",
                    txt(&m["mode"]),
                    p.replace('_', " "),
                    m[p]["answered"],
                    m[p]["failed"],
                    m[p]["failed_backend_stayed"],
                    m[p]["p99_ms"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
        let _ = writeln!(s);
    }
    if let Some(c) = doc(docs, "converge") {
        converge_summary(&mut s, c);
    }
    let _ = writeln!(s, "## goals\n");
    let _ = writeln!(s, "| suite | goal | target | measured | status |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for (n, d) in docs {
        match d {
            Ok(v) => {
                for g in Goal::from_json(n, v) {
                    let st = match g.met {
                        Some(true) => "met".to_string(),
                        Some(false) => "**not met**".to_string(),
                        None => g.status().to_string(),
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {} | {} |",
                        g.suite, g.name, g.target, g.measured, st
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(
                    s,
                    "| {n} | the suite failed | | {} | **failed** |",
                    e.lines().next().unwrap_or("")
                );
            }
        }
    }
    let _ = writeln!(s, "\nIPVS is missing from this kernel: not measured.\n");
    let _ = writeln!(s, "## plots\n");
    for (file, what) in plots {
        let _ = writeln!(s, "- [{file}]({file}): {what}");
    }
    s
}

/// The converge suite's table: Docker's part, ours per role, the total.
fn converge_summary(s: &mut String, c: &Value) {
    let cfg = &c["config"];
    let _ = writeln!(
        s,
        "## converge: a Docker change to every node's maps\n\n{} nodes (1 manager), a service scaled {} ↔ {} replicas, {} rounds; meshd `--watch-interval-ms {}`; the manager's tasks API and every node's maps polled every {} ms. ms, p50 / p99 / max; ours: from Docker's report (tasks running, or stopped) to the node's BPF maps (read from outside meshd) holding exactly Docker's running set (negative: before the manager's API said so).\n",
        cfg["nodes"],
        cfg["low"],
        cfg["high"],
        cfg["rounds"],
        cfg["meshd_watch_interval_ms"],
        cfg["poll_ms"]
    );
    let _ = writeln!(
        s,
        "| changes | n | Docker's part | ours, manager | ours, workers | ours, every node | total, every node |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let cell = |v: &Value| match (v["p50"].as_f64(), v["p99"].as_f64(), v["max"].as_f64()) {
        (Some(a), Some(b), Some(m)) => format!("{a:.0} / {b:.0} / {m:.0}"),
        _ => "–".into(),
    };
    for dir in ["up", "down", "all"] {
        let x = &c["summary"][dir];
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            match dir {
                "up" => "scale up",
                "down" => "scale down",
                _ => "all",
            },
            x["changes"],
            cell(&x["docker_ms"]),
            cell(&x["ours_ms"]["manager"]),
            cell(&x["ours_ms"]["worker"]),
            cell(&x["ours_ms"]["every_node"]),
            cell(&x["total_ms"]["every_node"]),
        );
    }
    let nc = c["summary"]["all"]["not_converged"].as_u64().unwrap_or(0);
    let cpu = |key: &str| -> String {
        c[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| format!("{}%", n["percent"]))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let _ = writeln!(
        s,
        "\n{}CPU of one core while changes ran, node 1 (manager) / 2 / 3: meshd {}, dockerd {} (it answers the benchmark's polls too). Load average at start {}, at end {}.\n",
        if nc > 0 {
            format!("**{nc} changes did not converge** within the time-out. ")
        } else {
            String::new()
        },
        cpu("meshd_cpu_percent_of_one_cpu"),
        cpu("dockerd_cpu_percent_of_one_cpu"),
        cfg["machine"]["loadavg"].as_str().unwrap_or("?"),
        cfg["machine_at_end"]["loadavg"].as_str().unwrap_or("?"),
    );
}
