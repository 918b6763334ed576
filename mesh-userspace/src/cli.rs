//! meshd's command line (clap), turned into a validated [`crate::config`].

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{
    CheckConfig, CleanupConfig, ConfigError, DrainConfig, OrConfig, RunConfig, SourceConfig,
    host_name,
};
use crate::dataplane::{Intercept, OnExit, TcAttach, XdpAttach};
use crate::desired::Forwarding;
use crate::model::ReplyMode;
use crate::plan::Limits;
use crate::source::{docker, ports};

const EXIT_STATUS: &str = "Exit status: 0 done; 1 the node failed (loading, attaching, the kernel); \
2 the command line does not parse; 64 (EX_USAGE) the configuration was refused (flags, state, \
host prerequisites) before anything touched the kernel.";

/// The mesh node daemon: makes this node answer every published port of a
/// Docker Swarm (or of a state file) and carries each connection to a task.
#[derive(Parser)]
#[command(name = "meshd", version, about, long_about = None, after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
    /// How log lines are written (to stderr): text for people, json (one
    /// object per line, fields as keys) for log pipelines. RUST_LOG sets
    /// the level (default info).
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Load and attach the dataplane, fill it from the swarm (--docker) or
    /// a state file (--state), and keep it in sync as they change (read
    /// again every --watch-interval-ms, on events and on SIGHUP). SIGTERM
    /// or SIGINT detaches everything and exits.
    #[command(
        args_override_self = true,
        after_long_help = "Examples:\n  meshd run --docker                  # on every node of a swarm, managers and workers\n  \
        meshd run --state /etc/mesh/state.toml --iface eth0 --node node1\n\n\
        Needs root (BPF), IPv4 forwarding on the uplink and the tasks' interfaces, and iproute2.\n\
        Readiness: GET /ready on --admin-addr answers 200 once programs are attached and maps filled.\n\
        Load balancers: GET /healthz on --health-addr (503 when drained: meshd drain).\n\
        Restarts: the dataplane is pinned under --bpffs and keeps serving while meshd is down; the next \
        meshd adopts it (connection tracking included). meshd cleanup removes it.\n\n\
        Exit status: 0 after SIGTERM/SIGINT; 1 the node failed; 64 the configuration was refused."
    )]
    Run(RunArgs),
    /// Validate a state file and print what this node would serve; touches
    /// nothing.
    #[command(
        after_long_help = "Example:\n  meshd check --state /etc/mesh/state.toml --node node1\n\n\
        Exit status: 0 valid; 64 refused (the reason names the file, the field and the value)."
    )]
    Check(CheckArgs),
    /// Take this node out of load balancers before maintenance: its health
    /// answer (--health-addr) turns 503, so they stop sending it new flows,
    /// while every flow, new ones included, is still served. Kept in the
    /// state directory: it outlives restarts and reboots until `undrain`.
    #[command(
        after_long_help = "Example:\n  meshd drain --reason \"kernel upgrade\"   # wait for the load balancer to move new flows away\n  \
        ...maintenance...\n  meshd undrain\n\n\
        Waits (--wait) until the running meshd answers 503; with no meshd running, the node starts drained.\n\
        Exit status: 0 done; 1 the drain could not be written, or a running meshd did not take it."
    )]
    Drain(DrainArgs),
    /// End a drain: the health answer turns 200 again (when nothing else
    /// is wrong).
    Undrain(UndrainArgs),
    /// Remove everything the mesh installed on this node: programs (their
    /// pinned links, netlink TC filters, XDP), the clsact qdiscs meshd
    /// added, pinned maps, the reserved published ports. Says what it
    /// removed. Refuses while a meshd runs with the same pins.
    #[command(
        after_long_help = "Example:\n  systemctl stop meshd && meshd cleanup\n\n\
        Without it, a stopped meshd leaves the dataplane serving its last state (so a restart loses \
        nothing).\nExit status: 0 done (or nothing to do); 1 something could not be removed, or a \
        meshd is running."
    )]
    Cleanup(CleanupArgs),
    /// Show what this node serves: services and their ports, tasks,
    /// traffic mode and allow lists, counters, nodes, connection tracking,
    /// the health answer and sync. Asks the running meshd (--admin-addr);
    /// without one, reads the pinned maps (which keep serving).
    #[command(
        after_long_help = "Examples:\n  meshd status\n  meshd status --json | jq '.services[] | select(.tasks == 0)'\n\n\
        Exit status: 0 shown; 1 no meshd answers and nothing is pinned."
    )]
    Status(StatusArgs),
    /// Explain what the dataplane does with one packet: which service,
    /// which task on which node, which rewrite or encapsulation, or why it
    /// passes or is dropped. The XDP program itself runs on the packet
    /// (BPF_PROG_TEST_RUN) against a copy of the live maps: nothing
    /// changes. Run it on the node (in its network namespace).
    #[command(
        after_long_help = "Examples:\n  meshd explain tcp 203.0.113.7:40000 198.18.128.1:30080\n  \
        meshd explain udp 203.0.113.7:5000 198.18.128.1:30053 --json\n  \
        meshd explain tcp 203.0.113.7:40000 198.18.128.1:30080 --flags ack   # a segment mid-flow\n\n\
        Exit status: 0 explained; 1 nothing is pinned here, or the program could not run."
    )]
    Explain(ExplainArgs),
    /// Print a shell completion script for meshd.
    #[command(
        after_long_help = "Examples:\n  meshd completions bash > /etc/bash_completion.d/meshd\n  \
        meshd completions zsh > \"${fpath[1]}/_meshd\"\n  meshd completions fish > ~/.config/fish/completions/meshd.fish"
    )]
    Completions(CompletionsArgs),
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The running meshd's admin endpoint (as its --admin-addr).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9469")]
    pub admin_addr: SocketAddr,
    /// The BPF filesystem the dataplane is pinned on (as meshd run's),
    /// read when no meshd answers.
    #[arg(long, value_name = "DIR", default_value = crate::dataplane::pin::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// One JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExplainProto {
    Tcp,
    Udp,
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The protocol.
    #[arg(value_enum)]
    pub proto: ExplainProto,
    /// The client's address and port.
    #[arg(value_name = "SRC:PORT")]
    pub src: std::net::SocketAddrV4,
    /// Where the client sends it: a node address and published port.
    #[arg(value_name = "DST:PORT")]
    pub dst: std::net::SocketAddrV4,
    /// TCP flags of the segment, comma separated (syn, ack, fin, rst,
    /// psh): a SYN opens a flow, an ACK goes by conntrack.
    #[arg(long, value_name = "FLAGS", default_value = "syn")]
    pub flags: String,
    /// The interface the packet arrives on [default: the one holding DST].
    #[arg(long, value_name = "IF")]
    pub iface: Option<String>,
    /// The BPF filesystem the dataplane is pinned on (as meshd run's).
    #[arg(long, value_name = "DIR", default_value = crate::dataplane::pin::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// One JSON document instead of sentences.
    #[arg(long)]
    pub json: bool,
}

impl ExplainArgs {
    /// The TCP flags asked for.
    pub fn tcp_flags(&self) -> Result<u8, ConfigError> {
        use mesh_common::parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
        const TCP_PSH: u8 = 0x08;
        let mut f = 0;
        for w in self
            .flags
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            f |= match w {
                "syn" => TCP_SYN,
                "ack" => TCP_ACK,
                "fin" => TCP_FIN,
                "rst" => TCP_RST,
                "psh" => TCP_PSH,
                other => {
                    return Err(ConfigError(anyhow::anyhow!(
                        "--flags: {other:?} is not one of syn, ack, fin, rst, psh"
                    )));
                }
            };
        }
        Ok(f)
    }
}

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct CleanupArgs {
    /// The BPF filesystem the dataplane is pinned on (as meshd run's).
    #[arg(long, value_name = "DIR", default_value = crate::dataplane::pin::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// meshd's state directory (as meshd run's): where the settings of
    /// net.ipv4.ip_local_reserved_ports and net.ipv4.conf.lo.accept_local
    /// it found are kept.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/mesh")]
    pub state_dir: PathBuf,
    /// Say what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl CleanupArgs {
    pub fn config(&self) -> Result<CleanupConfig, ConfigError> {
        Ok(CleanupConfig {
            bpffs: self.bpffs.clone(),
            state_dir: self.state_dir.clone(),
            dry_run: self.dry_run,
        })
    }
}

#[derive(clap::Args)]
pub struct StateArgs {
    /// The state file (TOML: nodes, services with their ports, tasks; see
    /// the README). A file that fails validation is refused whole.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// This node's name in the state file [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Range that published ports left out of the state file are assigned
    /// from (in file order, lowest free first). Ports given explicitly may
    /// lie outside it, as in Docker.
    #[arg(long, value_name = "LOW-HIGH", default_value = "30000-32767", value_parser = ports::parse_range)]
    pub port_range: RangeInclusive<u16>,
    /// Where meshd keeps what must outlive it: the published ports it
    /// assigned (a port stays with its service until the service is
    /// removed, across restarts). `check` reads it, never writes it.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/mesh")]
    pub state_dir: PathBuf,
}

/// What decides whether a state fits this node's maps: shared by `run` and
/// `check`, so that `check` refuses exactly what `run` would.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// Another address this node answers published ports on, besides its
    /// address in the state file (repeatable; 16 addresses in all).
    #[arg(long = "node-addr", value_name = "ADDR")]
    pub node_addrs: Vec<Ipv4Addr>,
    /// Entries of the largest Maglev table (a prime). Each service's table
    /// has 100 entries per task (the smallest prime above), for at most 1%
    /// imbalance, up to this.
    #[arg(long, value_name = "PRIME", default_value_t = mesh_common::abi::DEFAULT_MAGLEV_SIZE)]
    pub maglev_size: u32,
    /// Entries of the Maglev map (4 bytes each), shared by every published
    /// port's two tables (two for hitless updates). Default: two tables of
    /// 1021 entries (10 tasks) per --max-services; larger services take
    /// more of it, smaller ones less.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub maglev_entries: u32,
    /// Published ports (service, protocol, port) the maps can hold.
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_MAX_SERVICES)]
    pub max_services: u32,
    /// Backends (task address and target port) the maps can hold.
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_MAX_BACKENDS)]
    pub max_backends: u32,
    /// Source ranges (CIDRs) all services' allow lists can hold together
    /// (a service's old and new lists both, while it changes).
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_MAX_SRC_RANGES)]
    pub max_source_ranges: u32,
    /// Clients the affinity map remembers, all services with client
    /// affinity together (per node). When full, the least recently used
    /// client is forgotten (its next new flow goes to Maglev's pick, the
    /// same task while the service's tasks are unchanged).
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_AFF_ENTRIES)]
    pub affinity_entries: u32,
    /// Confirmed flows connection tracking holds (flows whose task has
    /// answered), one entry per flow. When full, the least recently used
    /// is forgotten (its next packet is picked again by Maglev: the same
    /// task while the service is unchanged).
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_CT_ENTRIES)]
    pub ct_entries: u32,
    /// Unconfirmed flows connection tracking holds: SYNs and UDP datagrams
    /// not answered yet. A flood of spoofed packets churns only this
    /// table, never the confirmed one.
    #[arg(long, value_name = "N", default_value_t = mesh_common::abi::DEFAULT_CT_NEW_ENTRIES)]
    pub ct_new_entries: u32,
    /// Seconds a half-open TCP flow (a SYN not answered) is remembered.
    #[arg(long, value_name = "S", default_value_t = mesh_common::abi::DEFAULT_CT_LIFETIME_SECS[0])]
    pub ct_tcp_syn_timeout: u32,
    /// Seconds an open TCP flow is remembered past its last packet from
    /// the client (6 hours, as Cilium; Linux keeps 5 days).
    #[arg(long, value_name = "S", default_value_t = mesh_common::abi::DEFAULT_CT_LIFETIME_SECS[1])]
    pub ct_tcp_timeout: u32,
    /// Seconds a TCP flow is remembered past its last packet once the
    /// client sent a FIN or a RST.
    #[arg(long, value_name = "S", default_value_t = mesh_common::abi::DEFAULT_CT_LIFETIME_SECS[2])]
    pub ct_tcp_closing_timeout: u32,
    /// Seconds a UDP flow is remembered past the client's last datagram.
    #[arg(long, value_name = "S", default_value_t = mesh_common::abi::DEFAULT_CT_LIFETIME_SECS[3])]
    pub ct_udp_timeout: u32,
    /// UDP port nodes carry flows to each other on (encapsulated, node
    /// address to node address). The same on every node; no service may
    /// publish it for UDP. Not Docker's own: 2377, 4789, 7946.
    #[arg(long, value_name = "PORT", default_value_t = mesh_common::abi::DEFAULT_ENCAP_PORT)]
    pub encap_port: u16,
    /// How replies of flows forwarded to another node's task reach the
    /// client, for services that do not say (state file: `reply`).
    /// via-ingress: back through the node the client sent to (works on
    /// every network); direct: straight from the task's node with the
    /// address the client used as source (one hop less; the network must
    /// let a node send from another node's address).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = ReplyMode::ViaIngress)]
    pub reply_mode: ReplyMode,
}

/// Ports Docker's swarm uses on every node: cluster management (raft),
/// VXLAN overlay data, gossip.
const DOCKER_PORTS: [u16; 3] = [2377, 4789, 7946];

impl PlanArgs {
    /// How this node forwards (the MTU: `mtu`, or 0 for the uplink's).
    fn forwarding(
        &self,
        mtu: u32,
        port_range: Option<&RangeInclusive<u16>>,
    ) -> Result<Forwarding, ConfigError> {
        let port = self.encap_port;
        if port == 0 || DOCKER_PORTS.contains(&port) {
            return Err(ConfigError(anyhow::anyhow!(
                "--encap-port {port}: Docker's swarm uses 2377, 4789 and 7946, and 0 is no port; \
                 pick another (default {})",
                mesh_common::abi::DEFAULT_ENCAP_PORT
            )));
        }
        if let Some(r) = port_range
            && r.contains(&port)
        {
            return Err(ConfigError(anyhow::anyhow!(
                "--encap-port {port} is inside --port-range {}-{}: a published UDP port could be \
                 assigned it",
                r.start(),
                r.end()
            )));
        }
        Ok(Forwarding {
            port,
            mtu,
            reply: self.reply_mode,
        })
    }

    fn limits(&self) -> Result<Limits, ConfigError> {
        let limits = Limits {
            maglev_size: self.maglev_size,
            maglev_pool: self.maglev_entries,
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_src_ranges: self.max_source_ranges,
            aff_entries: self.affinity_entries,
            ct_entries: self.ct_entries,
            ct_new_entries: self.ct_new_entries,
            ct_lifetimes: mesh_common::abi::CtLifetimes::from_secs([
                self.ct_tcp_syn_timeout,
                self.ct_tcp_timeout,
                self.ct_tcp_closing_timeout,
                self.ct_udp_timeout,
            ]),
            ..Limits::default()
        };
        limits.validate().or_config()?;
        Ok(limits)
    }
}

#[derive(clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Follow a Docker swarm through the Engine API at URL (unix:///path,
    /// tcp://host:port) instead of a state file: nodes, services, tasks,
    /// this node's name and address all come from Docker. Run it on every
    /// node; workers follow managers' meshd (mutual TLS with the swarm's
    /// own certificates) for what only managers know.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = docker::DEFAULT_URL, conflicts_with_all = ["state", "node", "port_range"])]
    pub docker: Option<String>,
    /// With --docker: the port meshd on managers serves the swarm view on
    /// (on the node's swarm address), and meshd on workers follows it on.
    #[arg(long, value_name = "PORT", default_value_t = docker::DEFAULT_PEER_PORT)]
    pub peer_port: u16,
    /// The uplink: the interface clients' packets arrive on. XDP and TC
    /// programs are attached to it [default: the interface that holds this
    /// node's address].
    #[arg(long, value_name = "IF")]
    pub iface: Option<String>,
    /// Interfaces leading to local tasks, where the reply program is
    /// attached (a bridge: each of its ports, as ports come and go). By
    /// default: the interface the route to each local task uses.
    #[arg(long = "task-iface", value_name = "IF")]
    pub task_ifaces: Vec<String>,
    /// Where clients' packets are taken on the uplink. tc: at TC ingress
    /// alone, so the uplink keeps its offloads (TSO, GRO) for all of its
    /// traffic; xdp: at XDP, before the kernel builds a socket buffer, at
    /// the cost of those offloads on some devices (a veth's peer loses
    /// TSO; virtio-net its receive offloads). See the README's
    /// Performance section. Default: the intercept a pinned dataplane on
    /// the uplink already has (a restart or an upgrade keeps it: changing
    /// it drops packets in flight), else tc.
    #[arg(long, value_enum)]
    pub intercept: Option<Intercept>,
    /// XDP attach mode (with --intercept xdp).
    #[arg(long, value_enum, default_value_t = XdpAttach::Auto)]
    pub xdp_mode: XdpAttach,
    /// How TC programs are attached: TCX links (kernel 6.6+) or netlink
    /// filters on a clsact qdisc, which meshd adds where missing and
    /// removes at exit if it added it and nothing else uses it.
    #[arg(long, value_enum, default_value_t = TcAttach::Auto)]
    pub tc_attach: TcAttach,
    /// Where /metrics, /ready, /live, /state and the health answers are
    /// served (keep it private: /state lists the swarm).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9469")]
    pub admin_addr: SocketAddr,
    /// Where load balancers probe this node: GET /healthz answers 200 only
    /// when the programs are attached, the maps filled, the last sync
    /// recent and the node not drained (503 with the reasons otherwise);
    /// GET /service/NAME answers for one service (200 only with a task
    /// that gets new flows: on this node, for a service in local traffic
    /// mode). `off`: no health port.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "0.0.0.0:9471", value_parser = parse_health_addr)]
    pub health_addr: HealthAddr,
    /// Seconds after the last sync (the state source read and found valid,
    /// and the dataplane holding what it says) that the health answer
    /// turns 503: a node that stopped following the swarm leaves the load
    /// balancer, while it keeps serving its last state.
    #[arg(long, value_name = "S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub health_max_sync_age: u64,
    /// Seconds between sweeps of the conntrack tables: entries whose
    /// lifetime ended (the --ct-*-timeout options) are removed, so the
    /// tables hold the live flows and a new flow's entry is written into
    /// room instead of evicting another (which costs about twice as much).
    /// Counted in mesh_conntrack_swept_total. 0: never (the tables then
    /// fill with ended flows, and every new flow evicts the least recently
    /// used).
    #[arg(long, value_name = "S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub ct_sweep_interval: u64,
    /// How often the state file is checked for changes; with --docker, how
    /// often the swarm is read again in full (events trigger reads too).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub watch_interval_ms: u64,
    /// The MTU packets to other nodes must fit, encapsulation included
    /// (40 bytes): TCP handshakes forwarded get their MSS lowered to fit,
    /// and a packet that still does not is answered with ICMP
    /// fragmentation-needed [default: the uplink's MTU].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(576..=65535))]
    pub mtu: Option<u32>,
    /// Where the BPF filesystem is: meshd mounts one there if there is
    /// none, and pins the dataplane (maps, links) in its `mesh` directory,
    /// so that it keeps serving while no meshd runs and a new meshd adopts
    /// it, connection tracking included. Inside a container, bind-mount
    /// the host's (a bpffs mounted in the container goes with it).
    #[arg(long, value_name = "DIR", default_value = crate::dataplane::pin::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// What becomes of the dataplane when meshd exits (SIGTERM, SIGINT):
    /// keep (it serves the last state until a new meshd adopts it, or
    /// `meshd cleanup`), or detach (everything is removed, as cleanup
    /// does). A crash always keeps it.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = OnExit::Keep)]
    pub on_exit: OnExit,
    /// Most verbose level of the BPF programs' own log lines (bridged into
    /// this daemon's log). Anything above info may log per packet.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Info)]
    pub bpf_log_level: BpfLogLevel,
}

/// Where the running meshd keeps and reads the drain.
#[derive(clap::Args)]
pub struct DrainTarget {
    /// The state directory of the meshd to drain (as its --state-dir).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/mesh")]
    pub state_dir: PathBuf,
    /// Its admin endpoint (as its --admin-addr), asked whether it took it.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9469")]
    pub admin_addr: SocketAddr,
    /// Seconds to wait for the running meshd to answer as asked.
    #[arg(long, value_name = "S", default_value_t = 5)]
    pub wait: u64,
}

#[derive(clap::Args)]
pub struct DrainArgs {
    /// Why (shown in the health answer and the log).
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub target: DrainTarget,
}

#[derive(clap::Args)]
pub struct UndrainArgs {
    #[command(flatten)]
    pub target: DrainTarget,
}

impl DrainTarget {
    fn config(&self, drain: Option<String>) -> DrainConfig {
        DrainConfig {
            drain,
            state_dir: self.state_dir.clone(),
            admin_addr: self.admin_addr,
            wait: Duration::from_secs(self.wait),
        }
    }
}

impl DrainArgs {
    pub fn config(&self) -> Result<DrainConfig, ConfigError> {
        if self.reason.len() > 200 || self.reason.contains(['\n', '\r']) {
            return Err(ConfigError(anyhow::anyhow!(
                "--reason: one line of at most 200 bytes"
            )));
        }
        Ok(self.target.config(Some(self.reason.clone())))
    }
}

impl UndrainArgs {
    pub fn config(&self) -> Result<DrainConfig, ConfigError> {
        Ok(self.target.config(None))
    }
}

/// `--health-addr`: an address and port, or `off` (`None`).
#[derive(Clone, Copy, Debug)]
pub struct HealthAddr(pub Option<SocketAddr>);

fn parse_health_addr(s: &str) -> Result<HealthAddr, String> {
    if s == "off" {
        return Ok(HealthAddr(None));
    }
    s.parse()
        .map(|a| HealthAddr(Some(a)))
        .map_err(|_| format!("{s:?} is not ADDR:PORT (e.g. 0.0.0.0:9471) or off"))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl StateArgs {
    fn node(&self) -> Result<String, ConfigError> {
        match &self.node {
            Some(n) => Ok(n.clone()),
            None => host_name(),
        }
    }

    fn source(&self, interval: Duration) -> Result<SourceConfig, ConfigError> {
        let Some(path) = &self.state else {
            return Err(ConfigError(anyhow::anyhow!(
                "say where state comes from: --docker [URL] or --state FILE"
            )));
        };
        Ok(SourceConfig::File {
            path: path.clone(),
            port_range: self.port_range.clone(),
            interval,
            state_dir: self.state_dir.clone(),
        })
    }
}

impl RunArgs {
    /// The validated configuration of `meshd run`.
    pub fn config(&self) -> Result<RunConfig, ConfigError> {
        let interval = Duration::from_millis(self.watch_interval_ms.max(50));
        let source = match &self.docker {
            Some(url) => SourceConfig::Docker {
                url: {
                    docker::check_url(url).or_config()?;
                    url.clone()
                },
                interval,
                peer_port: self.peer_port,
            },
            None => self.state.source(interval)?,
        };
        Ok(RunConfig {
            node: self.state.node()?,
            source,
            iface: self.iface.clone(),
            node_addrs: self.plan.node_addrs.clone(),
            task_ifaces: self.task_ifaces.clone(),
            intercept: self.intercept,
            xdp_mode: self.xdp_mode,
            tc_attach: self.tc_attach,
            limits: self.plan.limits()?,
            forwarding: self.plan.forwarding(
                self.mtu.unwrap_or(0),
                self.docker.is_none().then_some(&self.state.port_range),
            )?,
            admin_addr: self.admin_addr,
            health_addr: self.health_addr.0,
            health_max_sync_age: Duration::from_secs(self.health_max_sync_age),
            ct_sweep_interval: (self.ct_sweep_interval > 0)
                .then(|| Duration::from_secs(self.ct_sweep_interval)),
            state_dir: self.state.state_dir.clone(),
            bpffs: self.bpffs.clone(),
            on_exit: self.on_exit,
            bpf_log_level: self.bpf_log_level as u8,
        })
    }
}

impl CheckArgs {
    pub fn config(&self) -> Result<CheckConfig, ConfigError> {
        Ok(CheckConfig {
            node: self.state.node()?,
            source: self.state.source(Duration::ZERO)?,
            node_addrs: self.plan.node_addrs.clone(),
            limits: self.plan.limits()?,
            forwarding: self.plan.forwarding(1500, Some(&self.state.port_range))?,
        })
    }
}
