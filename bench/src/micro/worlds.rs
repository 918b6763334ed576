//! The micro-benchmark's worlds: the real object, loaded and filled
//! through the planner exactly as meshd fills it, with the table contents
//! a case needs. Nothing is attached here (see `live` for the world whose
//! programs are).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap as BpfHashMap, MapData};
use mesh_common::abi::{CT_SYN, CtValue, FlowKey4, IPPROTO_TCP, MAP_CT4_NEW, XDP_META_MAGIC};
use mesh_tests::fixtures::{BpfWorld, Floors, Flow, Run, World as _, XDP_PASS};
use mesh_tests::packet::{Spec, TCP_ACK, TCP_SYN, View, checksums_ok};
use mesh_userspace::desired::{BackendKey, Desired, DesiredService, TaskLink};
use mesh_userspace::model::{Proto, StateBuilder};
use mesh_userspace::plan::Limits;
use serde_json::{Value, json};

use crate::sys;

/// The same Maglev table size everywhere, so `established` and
/// `established_10k` differ only in how many services are loaded.
pub const MAGLEV_SIZE: u32 = 1021;
/// The measured service: tcp `WEB_TCP` -> `TARGET_PORT`.
pub const WEB_TCP: u16 = 30080;
pub const TARGET_PORT: u16 = 8080;
/// Tasks of the measured service in the worlds that are not attached.
pub const BACKENDS: u8 = 16;
/// A port no service publishes.
pub const UNPUBLISHED: u16 = 30081;
/// Services loaded in the `established_10k` world (the measured one included).
pub const SERVICES_10K: usize = 10_000;
/// The other services publish tcp ports from here up.
pub const FILLER_PORT0: u16 = 20_000;
/// The client port of the one tracked flow.
pub const FLOW_SPORT: u16 = 40001;
/// Client ports per address for new flows.
pub const PORTS_PER_ADDR: usize = 50_000;
pub const FIRST_PORT: u16 = 10_000;

/// The node and the client of the worlds that are not attached (their
/// addresses only ever appear in frames handed to BPF_PROG_TEST_RUN).
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 122, 7);

/// The forwarding world: this node and another, on the link of a veth
/// (`FWD_DEV`, its peer beside it) the benchmark's thread adds to its own network
/// namespace, so that XDP's FIB lookups route to the other node and to the
/// client (static neighbours), as on a node's uplink.
/// In 198.18.0.0/17, which no namespace lab uses (the Docker labs do, in
/// namespaces of their own): the live lab's node namespace, where this
/// link may be added, routes only its own slot's /23 of 198.18.128.0/17.
pub const FWD_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 121, 1);
pub const FWD_OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 121, 2);
const FWD_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 121, 254);
/// The forwarding world's client, behind the gateway.
pub const FWD_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 122, 7);
pub const FWD_DEV: &str = "mbfwd0";
/// The service whose tasks all run on the other node.
pub const FAR_TCP: u16 = 30070;

/// What every timed call must return; checked on every call, so that a
/// case never silently times the wrong path.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// XDP_PASS, no metadata (not service traffic).
    Pass,
    /// XDP_TX of the packet encapsulated to the other node (forwarding).
    Encap,
    /// XDP_TX of a reply another node carried back, stripped and routed
    /// to its client.
    Out,
    /// TC_ACT_UNSPEC, untouched (a TC program: not service traffic).
    Unspec,
    /// TC_ACT_REDIRECT, rewritten for a local task and routed to it.
    Redirect,
    /// XDP_TX (floor_lookup's hit).
    Tx,
    /// XDP_PASS with 8 bytes of metadata: rewritten for a local task.
    Local,
    /// TC_ACT_REDIRECT (`mesh_tc_ingress`): rewritten for a local task,
    /// with its recorded link's MACs, into the task.
    TcLocal,
    /// TC_ACT_REDIRECT (`mesh_tc_ingress`): encapsulated to the other node.
    TcEncap,
    /// TC_ACT_REDIRECT (`mesh_tc_ingress`): a reply another node carried
    /// back, stripped and routed to its client.
    TcOut,
}

pub const XDP_TX: u32 = 3;
/// TC return codes (linux/pkt_cls.h).
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_REDIRECT: i32 = 7;

impl Expect {
    pub fn check(self, r: &Run) -> Result<()> {
        let ok = match self {
            Expect::Pass => r.ret == XDP_PASS && r.meta.is_empty(),
            Expect::Tx | Expect::Encap | Expect::Out => r.ret == XDP_TX && r.meta.is_empty(),
            Expect::Unspec => r.ret as i32 == TC_ACT_UNSPEC,
            Expect::Redirect | Expect::TcLocal | Expect::TcEncap | Expect::TcOut => {
                r.ret as i32 == TC_ACT_REDIRECT
            }
            Expect::Local => r.ret == XDP_PASS && r.meta.len() == 8,
        };
        ensure!(
            ok,
            "returned {} with {} bytes of metadata, expected {}",
            r.ret,
            r.meta.len(),
            self.describe()
        );
        Ok(())
    }

    /// The per-call check plus the output, for the untimed first call.
    pub fn check_full(self, input: &[u8], r: &Run, tasks: &[Ipv4Addr]) -> Result<()> {
        self.check(r)?;
        match self {
            Expect::Pass | Expect::Tx | Expect::Unspec => {
                ensure!(r.output == input, "the packet was rewritten")
            }
            Expect::Redirect => {
                let o = &r.output;
                ensure!(
                    host_tasks().contains(&View(o).daddr()) && View(o).dport() == TARGET_PORT,
                    "not rewritten for a task of the service: {o:02x?}"
                );
                ensure!(checksums_ok(o), "bad checksum");
            }
            Expect::TcLocal => {
                let o = &r.output;
                let to = View(o).daddr();
                ensure!(
                    tasks.contains(&to) && View(o).dport() == TARGET_PORT,
                    "not rewritten for a task of the service: {o:02x?}"
                );
                ensure!(
                    o[0..6] == link_task_mac(to) && o[6..12] == LINK_GATEWAY_MAC,
                    "not the MACs of the task's recorded link: {o:02x?}"
                );
                ensure!(checksums_ok(o), "bad checksum");
            }
            Expect::Encap | Expect::TcEncap => {
                let o = &r.output;
                ensure!(
                    View(o).daddr() == FWD_OTHER
                        && View(o).dport() == mesh_common::abi::DEFAULT_ENCAP_PORT,
                    "not encapsulated to the other node: {o:02x?}"
                );
                let inner = &o[mesh_common::abi::ENCAP_LEN..];
                ensure!(
                    tasks.contains(&View(inner).daddr()) && View(inner).dport() == TARGET_PORT,
                    "the inner packet is not for a task of the service"
                );
                ensure!(checksums_ok(o) && checksums_ok(inner), "bad checksum");
            }
            Expect::Out | Expect::TcOut => {
                let o = &r.output;
                ensure!(
                    (View(o).saddr(), View(o).daddr()) == (FWD_NODE, FWD_CLIENT)
                        && o.len() + mesh_common::abi::ENCAP_LEN == input.len(),
                    "not the stripped reply to the client: {o:02x?}"
                );
                ensure!(checksums_ok(o), "bad checksum");
            }
            Expect::Local => {
                let magic = u32::from_ne_bytes(r.meta[0..4].try_into().unwrap());
                ensure!(
                    magic == XDP_META_MAGIC,
                    "metadata without the mesh magic: {:02x?}",
                    r.meta
                );
                let o = &r.output;
                let (daddr, dport) = (View(o).daddr(), View(o).dport());
                ensure!(
                    tasks.contains(&daddr),
                    "delivered to {daddr}, not a task of the service"
                );
                ensure!(
                    dport == TARGET_PORT,
                    "delivered to port {dport}, expected {TARGET_PORT}"
                );
                ensure!(checksums_ok(o), "bad checksum in the rewritten packet");
            }
        }
        Ok(())
    }

    pub fn describe(self) -> &'static str {
        match self {
            Expect::Pass => "XDP_PASS without metadata",
            Expect::Tx => "XDP_TX",
            Expect::Encap => "XDP_TX, encapsulated to the other node",
            Expect::Out => "XDP_TX, stripped and routed to the client",
            Expect::Unspec => "TC_ACT_UNSPEC",
            Expect::Redirect => "TC_ACT_REDIRECT, rewritten for a local task and routed to it",
            Expect::Local => "XDP_PASS with 8 bytes of metadata (rewritten for a local task)",
            Expect::TcLocal => {
                "TC_ACT_REDIRECT, rewritten for a local task, its link's MACs (bpf_redirect_peer)"
            }
            Expect::TcEncap => "TC_ACT_REDIRECT, encapsulated to the other node",
            Expect::TcOut => "TC_ACT_REDIRECT, stripped and routed to the client",
        }
    }
}

/// A loaded world.
pub struct World {
    pub name: &'static str,
    pub bpf: BpfWorld,
    /// The floor programs, run in this world's cases (they have their own
    /// object and map; the world's maps do not matter to them).
    pub floors: Option<Floors>,
    pub limits: Limits,
    pub services: usize,
    pub backends: usize,
    /// The measured service's tasks.
    pub tasks: Vec<Ipv4Addr>,
    /// Entries written into the unconfirmed conntrack table before timing.
    pub prefilled: u64,
    /// The device XDP runs arrive on (its FIB lookups route from there);
    /// 0: none.
    pub ifindex: u32,
    /// The empty TC program (`FLOOR_TC`), the floor of `mesh_tc_ingress`'s
    /// test runs, where this world runs it.
    pub floor_tc: Option<std::os::fd::OwnedFd>,
}

/// The empty TC program's name, as a case names it.
pub const FLOOR_TC: &str = "floor_tc_run";

impl World {
    /// One test run of `prog`: a floor program or one of the dataplane's.
    pub fn run_xdp(&self, prog: &str, frame: &[u8]) -> Result<Run> {
        match &self.floors {
            // The TC floor: arriving on the uplink, as mesh_tc_ingress.
            Some(f) if prog == mesh_common::abi::PROG_FLOOR_TC_NAT => {
                f.run_tc(prog, frame, self.ifindex)
            }
            Some(f) if mesh_common::abi::FLOOR_PROG_NAMES.contains(&prog) => f.run_xdp(prog, frame),
            // The node's own packets, arriving on its loopback.
            _ if prog == mesh_common::abi::PROG_TC_HOST => {
                self.bpf
                    .run_tc(prog, frame, mesh_common::abi::LOOPBACK_IFINDEX)
            }
            // The intercept at TC: arriving on the uplink, as mesh_xdp.
            _ if prog == mesh_common::abi::PROG_TC_INGRESS => {
                self.bpf.run_tc(prog, frame, self.ifindex)
            }
            _ if prog == FLOOR_TC => {
                let fd = self
                    .floor_tc
                    .as_ref()
                    .context("this world has no empty TC program")?;
                let (ret, ns) = sys::test_run_fd(
                    fd.as_fd(),
                    frame,
                    &mesh_tests::fixtures::skb_ctx(self.ifindex),
                )?;
                Ok(Run {
                    ret,
                    output: frame.to_vec(),
                    meta: Vec::new(),
                    ns,
                })
            }
            _ => self.bpf.run_xdp_on(prog, frame, self.ifindex),
        }
    }

    /// (packets, new_flows) of the service on tcp `port`.
    pub fn svc_counters(&self, port: u16) -> Result<(u64, u64)> {
        let stats = self.bpf.dp.service_stats()?;
        let (_, _, _, s) = stats
            .into_iter()
            .find(|(_, p, q, _)| *p == Proto::Tcp && *q == port)
            .context("the measured service has no counters")?;
        Ok((s.packets, s.new_flows))
    }

    /// Every drop the dataplane counted, over all reasons.
    pub fn drops_total(&self) -> Result<u64> {
        Ok(self.bpf.dp.drops()?.iter().map(|(_, n)| n).sum())
    }

    fn ct_new(&mut self) -> Result<BpfHashMap<&mut MapData, FlowKey4, CtValue>> {
        let m = self
            .bpf
            .dp
            .ebpf_mut()
            .map_mut(MAP_CT4_NEW)
            .context("no unconfirmed conntrack map")?;
        Ok(BpfHashMap::try_from(m)?)
    }

    /// Deletes every unconfirmed conntrack entry (where new flows go);
    /// returns how many there were.
    pub fn clear_ct_new(&mut self) -> Result<usize> {
        let mut ct = self.ct_new()?;
        let keys = ct.keys().collect::<Result<Vec<_>, _>>()?;
        for k in &keys {
            ct.remove(k)?;
        }
        Ok(keys.len())
    }

    /// Pins the flow from `client` to the measured service at `node` to
    /// task `to`, as a confirmed (established) flow: the entry the forward
    /// path leaves once the client acknowledged the task's SYN-ACK.
    pub fn track(&mut self, client: (Ipv4Addr, u16), node: Ipv4Addr, to: Ipv4Addr) -> Result<()> {
        self.track_on(client, (node, WEB_TCP), to)
    }

    /// As `track`, for the service published at `service`.
    pub fn track_on(
        &mut self,
        client: (Ipv4Addr, u16),
        service: (Ipv4Addr, u16),
        to: Ipv4Addr,
    ) -> Result<()> {
        let flow = Flow::new(Proto::Tcp, client, service);
        self.bpf
            .track(&flow, SocketAddrV4::new(to, TARGET_PORT))
            .with_context(|| format!("{} world: tracking the established flow", self.name))
    }

    /// Fills the unconfirmed conntrack table to capacity with flows no
    /// timed frame uses (clients in 198.18.0.0/16), with batch updates.
    pub fn prefill_ct_new(&mut self) -> Result<()> {
        let n = self.limits.ct_new_entries as usize;
        let v = CtValue {
            state: CT_SYN,
            ..CtValue::default()
        };
        self.prefill(MAP_CT4_NEW, n, v)?;
        self.prefilled = n as u64;
        Ok(())
    }

    /// Writes `n` flows no timed frame uses (clients in 198.18.0.0/16) with
    /// value `v` into conntrack table `map`, with batch updates.
    pub fn prefill(&mut self, map: &str, n: usize, v: CtValue) -> Result<()> {
        let t = Instant::now();
        let fd = self.map_fd(map)?;
        const CHUNK: usize = 65_536;
        let mut done = 0usize;
        while done < n {
            let m = CHUNK.min(n - done);
            let keys: Vec<FlowKey4> = (done..done + m).map(|i| prefill_key(i, NODE)).collect();
            let vals = vec![v; m];
            let w = sys::update_batch(fd.as_fd(), &keys, &vals)?;
            ensure!(w as usize == m, "batch update wrote {w} of {m}");
            done += m;
        }
        eprintln!(
            "filled {map} of the {} world with {n} flows ({:.1} s, not timed)",
            self.name,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// A descriptor of map `name` (one the object still holds).
    pub fn map_fd(&self, name: &str) -> Result<std::os::fd::OwnedFd> {
        let m = self
            .bpf
            .dp
            .ebpf()
            .map(name)
            .with_context(|| format!("no map {name} in the object"))?;
        let data: &MapData = match m {
            aya::maps::Map::LruHashMap(d)
            | aya::maps::Map::HashMap(d)
            | aya::maps::Map::Array(d)
            | aya::maps::Map::PerCpuArray(d) => d,
            _ => anyhow::bail!("{name}: a map of an unexpected kind"),
        };
        Ok(data.fd().as_fd().try_clone_to_owned()?)
    }

    pub fn json(&self) -> Value {
        json!({
            "name": self.name,
            "services": self.services,
            "backends": self.backends,
            "maglev_size": self.limits.maglev_size,
            "max_services": self.limits.max_services,
            "max_backends": self.limits.max_backends,
            "ct_entries": self.limits.ct_entries,
            "ct_new_entries": self.limits.ct_new_entries,
            "ct_new_prefilled": self.prefilled,
        })
    }
}

/// Conntrack key `i` of the prefill: clients 198.18.0.0/16, a port each.
fn prefill_key(i: usize, node: Ipv4Addr) -> FlowKey4 {
    let saddr =
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + (i / PORTS_PER_ADDR) as u32);
    let sport = FIRST_PORT + (i % PORTS_PER_ADDR) as u16;
    FlowKey4 {
        saddr: u32::from_ne_bytes(saddr.octets()),
        daddr: u32::from_ne_bytes(node.octets()),
        sport_be: sport.to_be(),
        dport_be: WEB_TCP.to_be(),
        proto: IPPROTO_TCP,
        _pad0: 0,
        _pad1: 0,
    }
}

/// The measured service's tasks in the worlds that are not attached.
pub fn tasks() -> Vec<Ipv4Addr> {
    (0..BACKENDS)
        .map(|i| Ipv4Addr::new(198, 18, 129, 2 + i))
        .collect()
}

/// One node (n1 at `node`), one tcp service (`WEB_TCP` -> `TARGET_PORT`)
/// with `tasks` on n1.
pub fn desired(node: Ipv4Addr, tasks: &[Ipv4Addr]) -> Result<Desired> {
    let state = StateBuilder::new()
        .node("n1", node)
        .service("web", &[(Proto::Tcp, WEB_TCP, TARGET_PORT)])
        .tasks("web", "n1", tasks.iter().copied())
        .build()?;
    let mut d = Desired::compute(&state, "n1", &[])?;
    ensure!(d.services.len() == 1 && d.services.values().all(|s| s.backends.len() == tasks.len()));
    with_links(&mut d, tasks);
    Ok(d)
}

/// Records a link for each of `tasks`, as meshd records the links it
/// finds (a veth into the task's namespace, its MACs), so that delivery
/// takes the path it takes on a node: no FIB lookup, `bpf_redirect_peer`.
/// The ifindexes name no device: under BPF_PROG_TEST_RUN a redirect is a
/// return code. (The live world records its task's real link.)
pub fn with_links(d: &mut Desired, tasks: &[Ipv4Addr]) {
    for (i, t) in tasks.iter().enumerate() {
        d.task_links.insert(
            *t,
            TaskLink {
                ifindex: LINK_IFINDEX0 + i as u32,
                peer: true,
                task_mac: link_task_mac(*t),
                gateway_mac: LINK_GATEWAY_MAC,
            },
        );
    }
}

/// The recorded links of the worlds that are not attached.
pub const LINK_IFINDEX0: u32 = 10_000;
pub const LINK_GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x02];

/// The MAC recorded for task `t`'s link.
pub fn link_task_mac(t: Ipv4Addr) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x30, t.octets()[3]]
}

/// `base` plus `total - 1` more tcp services on ports 20000.., with 2 to 16
/// tasks each (all on n1, each task its own address in 198.18.0.0/15).
/// Built as a `Desired` directly, so that loading it costs only the planner.
pub fn with_fillers(base: &Desired, total: usize) -> Desired {
    let mut d = base.clone();
    let mut next = u32::from(Ipv4Addr::new(198, 18, 0, 1));
    for i in 0..total.saturating_sub(base.services.len()) {
        let port = FILLER_PORT0 + i as u16;
        let n = 2 + i % 15;
        let backends = (0..n)
            .map(|_| {
                let addr = Ipv4Addr::from(next);
                next += 1;
                BackendKey {
                    addr,
                    port: 80,
                    node: "n1".into(),
                    local: true,
                    deliver: addr,
                }
            })
            .collect();
        d.services.insert(
            (Proto::Tcp, port),
            DesiredService {
                name: format!("svc{i}"),
                target: 80,
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

pub fn backend_count(d: &Desired) -> usize {
    d.services.values().map(|s| s.backends.len()).sum()
}

/// Loads the object with `limits` and fills it with `d` (not timed).
pub fn load(name: &'static str, limits: Limits, d: &Desired, tasks: &[Ipv4Addr]) -> Result<World> {
    let t = Instant::now();
    let bpf =
        BpfWorld::with(limits.clone(), d).with_context(|| format!("loading the {name} world"))?;
    eprintln!(
        "loaded the {name} world: {} services, {} backends, conntrack {} + {} unconfirmed ({:.1} s, not timed)",
        d.services.len(),
        backend_count(d),
        limits.ct_entries,
        limits.ct_new_entries,
        t.elapsed().as_secs_f64()
    );
    Ok(World {
        name,
        bpf,
        floors: None,
        ifindex: 0,
        services: d.services.len(),
        backends: backend_count(d),
        limits,
        tasks: tasks.to_vec(),
        prefilled: 0,
        floor_tc: None,
    })
}

/// The client address and port of new flow `i` (50,000 ports per
/// address, from `first` up).
pub fn new_flow_client(first: Ipv4Addr, i: usize) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from(first) + (i / PORTS_PER_ADDR) as u32),
        FIRST_PORT + (i % PORTS_PER_ADDR) as u16,
    )
}

/// The SYN of new flow `i` from clients in 198.19.0.0/17 to `NODE`.
pub fn new_flow_frame(i: usize) -> Vec<u8> {
    let (saddr, sport) = new_flow_client(Ipv4Addr::new(198, 19, 0, 1), i);
    Spec::tcp(saddr, sport, NODE, WEB_TCP, TCP_SYN).build()
}

/// Confirmed flows the `*_established_spread` cases take in turn: enough
/// that their entries and buckets (about a megabyte of the table) do not
/// all stay in the CPU's caches between two packets of one flow, as one
/// flow's do.
pub const SPREAD_FLOWS: usize = 8192;

/// Established flow `i` of the spread (`i` modulo `SPREAD_FLOWS`): its
/// client, from 198.19.64.0/18.
pub fn spread_client(i: usize) -> (Ipv4Addr, u16) {
    new_flow_client(Ipv4Addr::new(198, 19, 64, 1), i % SPREAD_FLOWS)
}

/// The ACK of established flow `i` of the spread.
pub fn spread_frame(i: usize) -> Vec<u8> {
    let (saddr, sport) = spread_client(i);
    Spec::tcp(saddr, sport, NODE, WEB_TCP, TCP_ACK).build()
}

/// As [`new_flow_frame`], from clients in 198.19.128.0/17: flows of
/// their own (a table that is never emptied has seen the others).
pub fn new_flow_frame_b(i: usize) -> Vec<u8> {
    let (saddr, sport) = new_flow_client(Ipv4Addr::new(198, 19, 128, 1), i);
    Spec::tcp(saddr, sport, NODE, WEB_TCP, TCP_SYN).build()
}

/// The host world: a node whose own processes call its published port
/// (`mesh_tc_host` on the loopback), its tasks behind a veth the
/// benchmark's thread adds (`HOST_DEV`, static neighbours).
pub const HOST_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 124, 1);
pub const HOST_DEV: &str = "mbhost0";
/// The client port of the node's own tracked flow.
pub const HOST_SPORT: u16 = 50001;

/// The host world's tasks.
pub fn host_tasks() -> Vec<Ipv4Addr> {
    (0..BACKENDS)
        .map(|i| Ipv4Addr::new(198, 18, 125, 2 + i))
        .collect()
}

/// A frame of the node's own flow on the loopback (its Ethernet
/// addresses are zero): from its address to its address, port `dport`.
pub fn host_frame(dport: u16, flags: u8) -> Vec<u8> {
    Spec {
        dst_mac: [0; 6],
        src_mac: [0; 6],
        ..Spec::tcp(HOST_NODE, HOST_SPORT, HOST_NODE, dport, flags)
    }
    .build()
}

/// The far service's tasks, on the other node.
pub fn far_tasks() -> Vec<Ipv4Addr> {
    (0..BACKENDS)
        .map(|i| Ipv4Addr::new(198, 18, 123, 2 + i))
        .collect()
}

/// Two nodes: n1 at `FWD_NODE` runs the web service's `tasks`; n2 at
/// `FWD_OTHER` runs every task of the far service (`FAR_TCP`).
pub fn desired_fwd(tasks: &[Ipv4Addr]) -> Result<Desired> {
    let state = StateBuilder::new()
        .node("n1", FWD_NODE)
        .node("n2", FWD_OTHER)
        .service("web", &[(Proto::Tcp, WEB_TCP, TARGET_PORT)])
        .service("far", &[(Proto::Tcp, FAR_TCP, TARGET_PORT)])
        .tasks("web", "n1", tasks.iter().copied())
        .tasks("far", "n2", far_tasks())
        .build()?;
    let mut d = Desired::compute(&state, "n1", &[])?;
    with_links(&mut d, tasks);
    Ok(d)
}

/// Adds, to the calling thread's network namespace, the forwarding
/// world's link: a veth (both ends here) holding `FWD_NODE`, a static neighbour for
/// the other node, the clients' subnet through a gateway with a static
/// neighbour, forwarding on. Returns the device's index. (Commands run
/// from this thread start in its namespace.)
pub fn fwd_link() -> Result<u32> {
    let client_net = Ipv4Addr::from(u32::from(FWD_CLIENT) & !0xff);
    for cmd in [
        format!("ip link add {FWD_DEV} type veth peer name {FWD_DEV}p"),
        format!("ip addr add {FWD_NODE}/24 dev {FWD_DEV}"),
        format!("ip link set {FWD_DEV}p up"),
        format!("ip link set {FWD_DEV} up"),
        format!(
            "ip neigh replace {FWD_OTHER} lladdr 02:00:00:00:fa:02 dev {FWD_DEV} nud permanent"
        ),
        format!(
            "ip neigh replace {FWD_GATEWAY} lladdr 02:00:00:00:fa:fe dev {FWD_DEV} nud permanent"
        ),
        format!("ip route replace {client_net}/24 via {FWD_GATEWAY} dev {FWD_DEV}"),
        format!("sysctl -qw net.ipv4.conf.{FWD_DEV}.forwarding=1"),
        // The host world's tasks.
        format!("ip link add {HOST_DEV} type veth peer name {HOST_DEV}p"),
        format!("ip addr add 198.18.125.1/24 dev {HOST_DEV}"),
        format!("ip link set {HOST_DEV}p up"),
        format!("ip link set {HOST_DEV} up"),
        format!("ip addr add {HOST_NODE}/32 dev lo"),
        "sysctl -qw net.ipv4.conf.lo.forwarding=1".to_string(),
    ]
    .into_iter()
    .chain(host_tasks().into_iter().enumerate().map(|(i, t)| {
        format!(
            "ip neigh replace {t} lladdr 02:00:00:00:fb:{:02x} dev {HOST_DEV} nud permanent",
            i + 2
        )
    })) {
        let args: Vec<&str> = cmd.split_whitespace().collect();
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .with_context(|| format!("running {cmd}"))?;
        ensure!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let name = std::ffi::CString::new(FWD_DEV)?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(i != 0, "{FWD_DEV} is not in this thread's namespace");
    Ok(i)
}

/// What the other node sends this one for a local task: a client's TCP
/// ACK, DNAT'd there to the task.
pub fn decap_frame() -> Vec<u8> {
    use mesh_common::abi::{DEFAULT_ENCAP_PORT, ENCAP_K_REQUEST, ENCAP_VERSION};
    let inner = Spec::tcp(
        CLIENT,
        FLOW_SPORT + 1,
        tasks()[0],
        TARGET_PORT,
        mesh_tests::packet::TCP_ACK,
    );
    mesh_tests::packet::EncapSpec {
        from: FWD_OTHER,
        to: FWD_NODE,
        sport: 0xc123,
        dport: DEFAULT_ENCAP_PORT,
        version: ENCAP_VERSION,
        kind: ENCAP_K_REQUEST,
        flags: 0,
        orig: (FWD_OTHER, WEB_TCP),
    }
    .build(&inner)
}

/// What the other node sends back: its task's reply to a flow that came
/// in through this node, already from this node's address and port.
pub fn reply_frame() -> Vec<u8> {
    use mesh_common::abi::{DEFAULT_ENCAP_PORT, ENCAP_K_REPLY, ENCAP_VERSION};
    let inner = Spec::tcp(
        FWD_NODE,
        FAR_TCP,
        CLIENT,
        FLOW_SPORT,
        mesh_tests::packet::TCP_ACK,
    );
    mesh_tests::packet::EncapSpec {
        from: FWD_OTHER,
        to: FWD_NODE,
        sport: 0xc123,
        dport: DEFAULT_ENCAP_PORT,
        version: ENCAP_VERSION,
        kind: ENCAP_K_REPLY,
        flags: 0,
        orig: (FWD_NODE, FAR_TCP),
    }
    .build(&inner)
}
