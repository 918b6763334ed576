//! The load: wrk for short HTTP requests (one wrk per client namespace,
//! all at once, so the load comes from as many source addresses), iperf3
//! for one long TCP stream and for UDP packets per second.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::lab::E2eLab;
use crate::proc::{self, machine_jiffies};

/// keep-alive, or a new connection per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    Close,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keepalive",
            Mode::Close => "close",
        }
    }
}

/// wrk's Lua hooks: "Connection: close" when asked, and at the end the
/// request count, errors and 1,000 latency quantiles (µs), so that the
/// runs of several wrk processes can be pooled.
const WRK_SCRIPT: &str = r#"-- written by mesh-bench
if os.getenv("MESH_BENCH_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("MESHBENCH %d %d %d %d %d %d %d\n", summary.requests,
    summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  local q = {}
  for i = 0, 999 do
    q[#q + 1] = string.format("%d", latency:percentile((i + 0.5) / 10))
  end
  io.write("MESHQ " .. table.concat(q, " ") .. "\n")
end
"#;

pub fn write_script(dir: &Path) -> Result<std::path::PathBuf> {
    let p = dir.join("mesh-bench.lua");
    std::fs::write(&p, WRK_SCRIPT)?;
    Ok(p)
}

/// One HTTP measurement over every client.
#[derive(Clone, Debug, Default)]
pub struct Http {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// CPU time of the lab's processes (cgroup) per request, µs.
    pub cpu_us_per_req: Option<f64>,
    /// The whole machine's busy time per request, µs (shared machine:
    /// includes whatever else ran).
    pub machine_cpu_us_per_req: f64,
    pub per_client_rps: Vec<f64>,
}

struct WrkOut {
    requests: u64,
    secs: f64,
    errors: u64,
    quantiles_us: Vec<f64>,
}

fn parse_wrk(out: &str) -> Result<WrkOut> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("MESHBENCH "))
        .with_context(|| format!("wrk printed no summary: {out}"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    let q = out
        .lines()
        .find_map(|l| l.strip_prefix("MESHQ "))
        .context("wrk printed no latency quantiles")?
        .split_whitespace()
        .map(|x| x.parse::<f64>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WrkOut {
        requests: v[0],
        secs: v[1] as f64 / 1e6,
        errors: v[2..7].iter().sum(),
        quantiles_us: q,
    })
}

/// The `q` quantile of several runs' latency, each run's quantiles
/// weighted by its request count.
fn pooled_quantile(runs: &[WrkOut], q: f64) -> f64 {
    let mut pts: Vec<(f64, f64)> = Vec::new();
    for r in runs {
        let w = r.requests as f64 / r.quantiles_us.len().max(1) as f64;
        pts.extend(r.quantiles_us.iter().map(|&x| (x, w)));
    }
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = pts.iter().map(|p| p.1).sum();
    let mut acc = 0.0;
    for (x, w) in &pts {
        acc += w;
        if acc >= q * total {
            return *x;
        }
    }
    pts.last().map(|p| p.0).unwrap_or(f64::NAN)
}

/// wrk from every client at once for `secs` against `addr:port`,
/// `conns` connections per client.
pub fn http(
    lab: &E2eLab,
    script: &Path,
    addr: Ipv4Addr,
    port: u16,
    mode: Mode,
    secs: u32,
    conns: usize,
) -> Result<Http> {
    let url = format!("http://{addr}:{port}/");
    let script = script.display().to_string();
    let dur = format!("{secs}s");
    let c = conns.to_string();
    let close = if mode == Mode::Close { "1" } else { "0" };
    let cpu0 = lab.group.as_ref().map(|g| g.usage_ns()).transpose()?;
    let m0 = machine_jiffies();
    let mut procs = Vec::new();
    for cl in &lab.clients {
        procs.push(proc::spawn(
            &cl.ns,
            &[
                "wrk",
                "-t1",
                "-c",
                &c,
                "-d",
                &dur,
                "--timeout",
                "2s",
                "-s",
                &script,
                &url,
            ],
            &[("MESH_BENCH_CLOSE", close)],
            lab.group.as_ref(),
            None,
            true,
        )?);
    }
    let mut runs = Vec::new();
    for p in procs {
        let (st, out) = p.wait_output(Duration::from_secs(secs as u64 + 30))?;
        if !st.success() {
            bail!("wrk failed ({st}): {}", out.trim());
        }
        runs.push(parse_wrk(&out)?);
    }
    let cpu1 = lab.group.as_ref().map(|g| g.usage_ns()).transpose()?;
    let m1 = machine_jiffies();
    let requests: u64 = runs.iter().map(|r| r.requests).sum();
    let per_client: Vec<f64> = runs
        .iter()
        .map(|r| r.requests as f64 / r.secs.max(1e-9))
        .collect();
    let rps = per_client.iter().sum();
    let req = requests.max(1) as f64;
    Ok(Http {
        requests,
        rps,
        p50_ms: pooled_quantile(&runs, 0.50) / 1000.0,
        p99_ms: pooled_quantile(&runs, 0.99) / 1000.0,
        errors: runs.iter().map(|r| r.errors).sum(),
        cpu_us_per_req: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) as f64 / 1000.0 / req),
            _ => None,
        },
        machine_cpu_us_per_req: (m1.0 - m0.0) as f64 / proc::hz() * 1e6 / req,
        per_client_rps: per_client,
    })
}

/// iperf3 from the first client: one TCP stream for `secs`; Gbit/s
/// received.
pub fn stream(lab: &E2eLab, addr: Ipv4Addr, port: u16, secs: u32) -> Result<f64> {
    let v = iperf3(lab, addr, port, &["-t", &secs.to_string()], secs)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3: no received rate")
}

/// iperf3 from the first client: UDP, 64-byte datagrams, as fast as it
/// can send, for `secs`; datagrams per second that arrived.
pub fn udp(lab: &E2eLab, addr: Ipv4Addr, port: u16, secs: u32) -> Result<(f64, f64)> {
    let v = iperf3(
        lab,
        addr,
        port,
        &["-u", "-b", "0", "-l", "64", "-t", &secs.to_string()],
        secs,
    )?;
    let s = &v["end"]["sum"];
    let sent = s["packets"].as_f64().context("iperf3: no packet count")?;
    let lost = s["lost_packets"].as_f64().unwrap_or(0.0);
    let t = s["seconds"].as_f64().unwrap_or(secs as f64).max(1e-9);
    Ok(((sent - lost) / t, sent / t))
}

fn iperf3(lab: &E2eLab, addr: Ipv4Addr, port: u16, extra: &[&str], secs: u32) -> Result<Value> {
    let a = addr.to_string();
    let p = port.to_string();
    let mut args = vec!["iperf3", "-c", &a, "-p", &p, "-J"];
    args.extend_from_slice(extra);
    let out = proc::run(
        &lab.clients[0].ns,
        &args,
        &[],
        lab.group.as_ref(),
        Duration::from_secs(secs as u64 + 30),
    )?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("iperf3 output: {out}"))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pool_by_requests() {
        let run = |requests, lat: f64| WrkOut {
            requests,
            secs: 1.0,
            errors: 0,
            quantiles_us: vec![lat; 1000],
        };
        // 900 requests at 1 ms, 100 at 10 ms: p50 is 1 ms, p99 10 ms.
        let runs = [run(900, 1000.0), run(100, 10_000.0)];
        assert_eq!(pooled_quantile(&runs, 0.5), 1000.0);
        assert_eq!(pooled_quantile(&runs, 0.99), 10_000.0);
    }

    #[test]
    fn wrk_summary_is_parsed() {
        let out = "Running 1s test\nMESHBENCH 1000 2000000 0 1 0 2 0\nMESHQ 5 6 7\n";
        let w = parse_wrk(out).unwrap();
        assert_eq!((w.requests, w.errors), (1000, 3));
        assert_eq!(w.secs, 2.0);
        assert_eq!(w.quantiles_us, vec![5.0, 6.0, 7.0]);
    }
}
