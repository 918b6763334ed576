//! `mesh-bench`: what the mesh costs, against what users would pick
//! instead. One subcommand per suite; see README.md for the method of
//! each and why it is so.

mod all;
mod churn;
mod converge;
mod e2e;
mod micro;
mod proc;
mod scale;
mod svg;
mod sys;
mod util;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mesh-bench", about = "Benchmarks of the mesh dataplane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-packet cost of the real BPF object, path by path (XDP with
    /// BPF_PROG_TEST_RUN; XDP, TC and the whole path on live frames),
    /// against floors from the same run (needs root).
    Micro(micro::Args),
    /// The mesh against iptables DNAT, HAProxy and a direct route, in a lab
    /// of network namespaces: requests per second, latency, CPU per
    /// request, one TCP stream, UDP packets per second (needs root).
    E2e(e2e::Args),
    /// From 1 to 10,000 services and 10 to 100,000 backends: time to
    /// program, map memory, Maglev build time, per-packet cost against
    /// services and tracked flows (needs root).
    Scale(scale::Args),
    /// Continuous requests while backends are added and removed every
    /// 100 ms: failed requests, and p99 latency against no churn (needs root).
    Churn(churn::Args),
    /// A Docker change to every node's maps, in a real three-node swarm:
    /// p50/p99 of Docker's part and meshd's, on the manager and the
    /// workers, over repeated scale-ups and scale-downs (needs root and
    /// docker.io).
    Converge(converge::Args),
    /// Every suite this machine allows, then summary.md and the plots
    /// (SVG) in --out DIR (needs root).
    All(all::Args),
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Micro(a) => {
            let out = a
                .out
                .as_ref()
                .map(|o| util::out_file(o, "micro"))
                .transpose()?;
            let doc = micro::run(&a)?;
            write(out, &doc)
        }
        Cmd::E2e(a) => {
            let out = a
                .out
                .as_ref()
                .map(|o| util::out_file(o, "e2e"))
                .transpose()?;
            let doc = e2e::run(&a)?;
            write(out, &doc)
        }
        Cmd::Scale(a) => {
            let out = a
                .out
                .as_ref()
                .map(|o| util::out_file(o, "scale"))
                .transpose()?;
            let doc = scale::run(&a)?;
            write(out, &doc)
        }
        Cmd::Churn(a) => {
            let out = a
                .out
                .as_ref()
                .map(|o| util::out_file(o, "churn"))
                .transpose()?;
            let doc = churn::run(&a)?;
            write(out, &doc)
        }
        Cmd::Converge(a) => {
            let out = a
                .out
                .as_ref()
                .map(|o| util::out_file(o, "converge"))
                .transpose()?;
            let doc = converge::run(&a)?;
            write(out, &doc)
        }
        Cmd::All(a) => all::run(&a),
    }
}

fn write(out: Option<PathBuf>, doc: &serde_json::Value) -> Result<()> {
    if let Some(out) = out {
        util::write_json(&out, doc)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
