//! What every suite shares: statistics, pinning, atomic output files, the
//! machine's description (with how loaded it was), and goals printed as
//! met or not met.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// One decimal.
pub fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Three decimals.
pub fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) -> Result<()> {
    // SAFETY: plain syscalls on a zeroed cpu_set_t we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> usize {
    // SAFETY: no arguments.
    unsafe { libc::sched_getcpu() }.max(0) as usize
}

/// Writes `bytes` to `path` through a temporary file in the same
/// directory and a rename: a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Writes a JSON document (pretty, with a final newline) atomically.
pub fn write_json(path: &Path, doc: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(doc)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Where a suite writes its JSON: `--out` names a file (`micro.json`), or a
/// directory (an existing one, or a path without `.json`), which then gets
/// `<suite>.json`. Checked before anything runs, so a long run never ends
/// on a bad path.
pub fn out_file(out: &Path, suite: &str) -> Result<PathBuf> {
    let is_dir = out.is_dir() || out.extension().is_none_or(|e| e != "json");
    let file = if is_dir {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        out.join(format!("{suite}.json"))
    } else {
        out.to_path_buf()
    };
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    ensure!(
        dir.is_dir(),
        "--out {}: {} is not a directory",
        out.display(),
        dir.display()
    );
    Ok(file)
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The machine a run happened on, and how busy it was: kernel, CPU, JIT
/// settings, the load average, and the processes using the most CPU
/// besides this one (the machine is shared; a loaded run says so).
pub fn machine() -> Value {
    json!({
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "cpu_model": std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        }),
        // SAFETY: plain sysconf (available_parallelism would see only a pinned CPU).
        "cpus_online": unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) },
        "mem_total_kib": std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        }),
        "bpf_jit_enable": read_trim("/proc/sys/net/core/bpf_jit_enable"),
        "bpf_jit_harden": read_trim("/proc/sys/net/core/bpf_jit_harden"),
        "bpf_stats_enabled": read_trim("/proc/sys/kernel/bpf_stats_enabled"),
        "loadavg": read_trim("/proc/loadavg"),
        "busiest_other_processes": busiest(5),
    })
}

/// The `n` processes (not this one) with the most CPU time over the last
/// half second: "pid comm %cpu".
pub fn busiest(n: usize) -> Vec<String> {
    let sample = || -> Vec<(u32, String, u64)> {
        let mut v = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return v;
        };
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // comm is in parentheses and may hold spaces.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[open + 1..close].to_string();
            let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
            v.push((pid, comm, ticks));
        }
        v
    };
    let a = sample();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let b = sample();
    // SAFETY: plain sysconf.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut d: Vec<(f64, u32, String)> = b
        .into_iter()
        .filter_map(|(pid, comm, t1)| {
            let t0 = a.iter().find(|x| x.0 == pid)?.2;
            let pct = (t1.saturating_sub(t0)) as f64 / hz / 0.5 * 100.0;
            (pct >= 1.0).then_some((pct, pid, comm))
        })
        .collect();
    d.sort_by(|x, y| y.0.total_cmp(&x.0));
    d.into_iter()
        .take(n)
        .map(|(pct, pid, comm)| format!("{pid} {comm} {pct:.0}%"))
        .collect()
}

/// A goal of the harness issue, judged on one run's figures. `met` is
/// `None` when the figure could not be measured on this machine (then it
/// says why); a goal is never tuned to pass.
#[derive(Clone, Debug)]
pub struct Goal {
    pub suite: &'static str,
    pub name: String,
    /// What is asked, e.g. "<= +150 ns over the floor".
    pub target: String,
    /// The figure, with its unit, e.g. "+262.4 ns".
    pub measured: String,
    pub met: Option<bool>,
}

impl Goal {
    pub fn new(
        suite: &'static str,
        name: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        met: Option<bool>,
    ) -> Goal {
        Goal {
            suite,
            name: name.into(),
            target: target.into(),
            measured: measured.into(),
            met,
        }
    }

    pub fn status(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None if self.target == "reported" => "(reported)",
            None => "not measured",
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "suite": self.suite,
            "goal": self.name,
            "target": self.target,
            "measured": self.measured,
            "met": self.met,
        })
    }

    /// Goals back from a suite's JSON (`"goals": [...]`).
    pub fn from_json(suite: &'static str, doc: &Value) -> Vec<Goal> {
        doc["goals"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|g| Goal {
                        suite,
                        name: g["goal"].as_str().unwrap_or("?").to_string(),
                        target: g["target"].as_str().unwrap_or("").to_string(),
                        measured: g["measured"].as_str().unwrap_or("").to_string(),
                        met: g["met"].as_bool(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Prints goals as a table to stdout.
pub fn print_goals(goals: &[Goal]) {
    if goals.is_empty() {
        return;
    }
    println!();
    println!("goals (ratios and overheads from this run; reported, never enforced):");
    for g in goals {
        println!(
            "  {:<8} {:<58} {:<26} {:<22} {}",
            g.suite,
            g.name,
            g.target,
            g.measured,
            g.status()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn out_names_a_file_or_a_directory() {
        let d = std::env::temp_dir().join(format!("mesh-bench-out-{}", std::process::id()));
        let f = out_file(&d, "micro").unwrap();
        assert_eq!(f, d.join("micro.json"));
        assert_eq!(
            out_file(&d.join("x.json"), "micro").unwrap(),
            d.join("x.json")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
