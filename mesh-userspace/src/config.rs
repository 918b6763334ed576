//! The daemon's validated configuration. Everything here is checked before
//! anything touches the kernel; a [`ConfigError`] makes meshd exit with
//! EX_USAGE (64), as linkerd2-proxy does, so that a supervisor can tell
//! "fix the configuration" from "the node failed".

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use crate::dataplane::{Intercept, OnExit, TcAttach, XdpAttach};
use crate::desired::Forwarding;
use crate::plan::Limits;

/// sysexits.h: the command was used incorrectly (bad flags, a state that
/// does not validate, a host that lacks what the flags name).
pub const EX_USAGE: i32 = 64;

/// A configuration refused before the kernel was touched.
#[derive(Debug)]
pub struct ConfigError(pub anyhow::Error);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Wraps any error as a configuration error.
pub trait OrConfig<T> {
    fn or_config(self) -> Result<T, ConfigError>;
}

impl<T, E: Into<anyhow::Error>> OrConfig<T> for Result<T, E> {
    fn or_config(self) -> Result<T, ConfigError> {
        self.map_err(|e| ConfigError(e.into()))
    }
}

/// Where state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A state file, checked every `interval` and on SIGHUP; the ports it
    /// assigns are kept in `state_dir`.
    File {
        path: PathBuf,
        port_range: RangeInclusive<u16>,
        interval: Duration,
        state_dir: PathBuf,
    },
    /// A Docker swarm, through the Engine API at `url`, read again in full
    /// every `interval`; managers serve the view workers need on
    /// `peer_port` (see [`crate::source::docker`]).
    Docker {
        url: String,
        interval: Duration,
        peer_port: u16,
    },
}

/// `meshd run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// This node's name in the state (a state that names the node it was
    /// read on, as Docker's do, wins).
    pub node: String,
    pub source: SourceConfig,
    /// The uplink: where clients' packets arrive. `None`: the interface
    /// that holds this node's address in the first state.
    pub iface: Option<String>,
    /// More addresses to answer published ports on.
    pub node_addrs: Vec<Ipv4Addr>,
    /// Interfaces leading to local tasks; empty: found from routes.
    pub task_ifaces: Vec<String>,
    /// Where clients' packets are taken on the uplink.
    /// None: the pinned dataplane's, else the default.
    pub intercept: Option<Intercept>,
    pub xdp_mode: XdpAttach,
    pub tc_attach: TcAttach,
    pub limits: Limits,
    /// Forwarding to other nodes (`mtu` 0: the uplink's, found at start).
    pub forwarding: Forwarding,
    pub admin_addr: SocketAddr,
    /// Where load balancers ask for the node's health (`None`: nowhere).
    pub health_addr: Option<SocketAddr>,
    /// The health answer turns 503 this long after the last sync.
    pub health_max_sync_age: Duration,
    /// How often ended flows are swept from conntrack (`None`: never).
    pub ct_sweep_interval: Option<Duration>,
    /// What must outlive meshd: assigned ports, the drain.
    pub state_dir: PathBuf,
    /// Where the BPF filesystem is (mounted there if it is not); the
    /// dataplane is pinned in its `mesh` directory.
    pub bpffs: PathBuf,
    /// What becomes of the pinned dataplane when meshd exits.
    pub on_exit: OnExit,
    /// Most verbose aya-log level the programs emit (0 = off .. 5 = trace).
    pub bpf_log_level: u8,
}

/// `meshd check`: what decides whether `run` would take a state.
#[derive(Clone, Debug)]
pub struct CheckConfig {
    pub node: String,
    pub source: SourceConfig,
    pub node_addrs: Vec<Ipv4Addr>,
    pub limits: Limits,
    pub forwarding: Forwarding,
}

/// The host name, the default node name.
pub fn host_name() -> Result<String, ConfigError> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| ConfigError(anyhow::anyhow!("reading the host name (pass --node): {e}")))?;
    Ok(h.trim().to_string())
}

/// `meshd drain` and `meshd undrain`.
#[derive(Clone, Debug)]
pub struct DrainConfig {
    /// Drain (`Some(reason)`) or end the drain (`None`).
    pub drain: Option<String>,
    pub state_dir: PathBuf,
    /// Where the running meshd is asked whether it has seen it.
    pub admin_addr: SocketAddr,
    /// How long to wait for it to.
    pub wait: Duration,
}

/// `meshd cleanup`.
#[derive(Clone, Debug)]
pub struct CleanupConfig {
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub dry_run: bool,
}
