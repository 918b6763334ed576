//! `meshd drain` and `meshd undrain`: write (or remove) the drain file in
//! the state directory, then wait until the running meshd's health answer
//! says so. The file is the switch, so a drain holds across restarts and
//! reboots, and a node can be drained before its meshd starts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use crate::config::DrainConfig;
use crate::daemon::Failed;
use crate::health::{self, Drain};

pub fn run(cfg: DrainConfig) -> Result<(), Failed> {
    let dir = &cfg.state_dir;
    match &cfg.drain {
        Some(reason) => {
            health::write_drain(dir, &Drain::now(reason))?;
            println!(
                "drained: {} written; the health answer is 503 until `meshd undrain`",
                health::drain_path(dir).display()
            );
        }
        None => {
            if health::remove_drain(dir)? {
                println!("undrained: {} removed", health::drain_path(dir).display());
            } else {
                println!(
                    "not drained: there is no {}",
                    health::drain_path(dir).display()
                );
            }
        }
    }
    let want_drained = cfg.drain.is_some();
    let deadline = Instant::now() + cfg.wait;
    loop {
        match get(cfg.admin_addr, "/healthz") {
            Err(e) => {
                println!(
                    "no meshd answers on {} ({e:#}): a meshd started with --state-dir {} takes it at start",
                    cfg.admin_addr,
                    dir.display()
                );
                return Ok(());
            }
            Ok((status, body)) => {
                let drained = body.contains("drained by meshd drain");
                if drained == want_drained {
                    println!(
                        "meshd on {} answers {status}: {}",
                        cfg.admin_addr,
                        body.trim()
                    );
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(Failed::Node(anyhow!(
                        "meshd on {} still answers {status} ({}) after {:?}: is it running with \
                         --state-dir {}?",
                        cfg.admin_addr,
                        body.trim(),
                        cfg.wait,
                        dir.display()
                    )));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal HTTP GET: the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path}: not an HTTP answer"))?;
    Ok((status, body.to_string()))
}
