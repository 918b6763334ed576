//! The whole path a packet takes, not XDP alone: live frames.
//!
//! BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (kernel 5.18+) runs
//! an XDP program on a frame as if it had arrived on a real device, and
//! then does what the verdict says: an XDP_PASS frame becomes an skb (with
//! the program's metadata) and goes up the stack of that device, TC
//! ingress included. So `mesh_xdp` runs on a frame "received" on a lab
//! node's uplink, `mesh_tc_uplink` (attached there with TCX) delivers it
//! into a task behind the node's bridge, the task's kernel answers, and
//! `mesh_tc_task` (attached to the task's bridge port) turns the answer
//! around to the client: the path a real packet takes, all of it inside
//! the one system call.
//!
//! Two clocks:
//! - the kernel's BPF run-time statistics (BPF_ENABLE_STATS; per program
//!   `run_time_ns` and `run_cnt`, read from fdinfo before and after each
//!   batch): each program's own ns per run, against an empty TC program
//!   and `floor_pass` measured the same way;
//! - the test run's own duration (kernel-reported, repeat = 1): in live
//!   mode the kernel times the program, the skb, TC, the redirect and the
//!   softirq work it triggers (the task's stack and its answer), all of
//!   which runs before the timer stops. Against `floor_pass` fed the same
//!   frames (the kernel's own handling of them: the node answers), and
//!   against a frame addressed to the task itself, routed by the node's
//!   kernel (no NAT, the "direct" floor).
//!
//! The task listens on nothing: every frame that reaches it is answered
//! with a reset, as is every frame the node itself gets, so each path ends
//! the same way (one reset to the client, which drops it). Neighbours and
//! bridge ports are static and IPv6 is off in the lab, so hardly any other
//! packet crosses the programs: each batch checks that every program ran as
//! often as its frames require (a stray packet or two of the lab's own, an
//! IGMP report, is tolerated and counted).
//!
//! One frame per call (repeat = 1): with repeat > 1 the kernel recycles
//! pages without restoring their contents, so a program that rewrites the
//! packet (DNAT) would see its own output on later iterations.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp};
use mesh_common::abi::{PROG_FLOOR_PASS, PROG_TC_INGRESS, PROG_TC_TASK, PROG_TC_UPLINK, PROG_XDP};
use mesh_tests::fixtures::Floors;
use mesh_tests::lab::{Topology, exec, ip};
use mesh_tests::packet::{Spec, TCP_ACK, TCP_RST, TCP_SYN};
use mesh_userspace::plan::Limits;
use serde_json::{Value, json};

use super::cases::{AfterBatch, Frames, StatsCheck};
use super::worlds::{self, FLOW_SPORT, MAGLEV_SIZE, TARGET_PORT, UNPUBLISHED, WEB_TCP, World};
use crate::sys::{self, RunStats, StatsOn, TcxLink};
use crate::util::{median, r1};

/// The programs whose statistics the live cases read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Prog {
    MeshXdp,
    MeshTcUplink,
    MeshTcTask,
    /// The intercept at TC (`--intercept tc`).
    MeshTcIngress,
    FloorPass,
    /// The empty TC program (attached to the uplink and the task port).
    FloorTc,
}

impl Prog {
    pub fn name(self) -> &'static str {
        match self {
            Prog::MeshXdp => PROG_XDP,
            Prog::MeshTcUplink => PROG_TC_UPLINK,
            Prog::MeshTcTask => PROG_TC_TASK,
            Prog::MeshTcIngress => PROG_TC_INGRESS,
            Prog::FloorPass => PROG_FLOOR_PASS,
            Prog::FloorTc => "floor_tc",
        }
    }
}

/// Which XDP program a live case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpProg {
    Mesh,
    Pass,
}

/// The device a live frame arrives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dev {
    /// The node's uplink (`up0`): clients' packets.
    Uplink,
    /// The task's port on the node's bridge (`vt1`): the task's packets.
    TaskPort,
}

/// What is attached at TC ingress while a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// `mesh_tc_uplink` on the uplink, `mesh_tc_task` on the task port
    /// (`--intercept xdp`, with `mesh_xdp` as the XDP program).
    Mesh,
    /// `mesh_tc_ingress` on the uplink, `mesh_tc_task` on the task port
    /// (`--intercept tc`; the XDP program is `floor_pass`, which live
    /// frames need and the floors run too).
    MeshTc,
    /// The empty TC program on both.
    Floor,
}

/// The lab node the live cases run on, its dataplane and its floors.
pub struct LiveWorld {
    pub world: World,
    floors: Floors,
    floor_tc: OwnedFd,
    uplink: u32,
    task_port: u32,
    links: Vec<TcxLink>,
    mode: Option<Attach>,
    pub node: Ipv4Addr,
    pub task: Ipv4Addr,
    /// The client's addresses: the first holds the established flow, the
    /// others send new flows.
    pub clients: Vec<Ipv4Addr>,
    macs: Macs,
    /// Last: the lab goes when everything attached to it has.
    _topo: Topology,
}

#[derive(Clone, Copy)]
struct Macs {
    uplink: [u8; 6],
    client: [u8; 6],
    bridge: [u8; 6],
    task: [u8; 6],
}

fn mac_of(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = ip(ns, &format!("-o link show dev {dev}"))?;
    let m = out
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .with_context(|| format!("no MAC address for {dev} in {ns}: {out}"))?;
    let mut mac = [0u8; 6];
    for (d, h) in mac.iter_mut().zip(m.split(':')) {
        *d = u8::from_str_radix(h, 16)?;
    }
    Ok(mac)
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl LiveWorld {
    /// Builds the lab (one node, one task, one client with `client_addrs`
    /// addresses), loads and fills the dataplane for it, and moves the
    /// calling thread into the node's namespace for good (BPF_PROG_TEST_RUN
    /// finds the device, and TCX attaches, in the caller's namespace): call
    /// it on a thread of its own.
    pub fn new(client_addrs: usize, ct_new_entries: u32) -> Result<LiveWorld> {
        let t = Instant::now();
        let topo = Topology::builder().node(1).client(client_addrs).build()?;
        let node = topo.node(1).clone();
        let task = node.task(1).clone();
        let client = topo.clients[0].clone();
        let seg = topo.segment_ns.clone();
        let macs = Macs {
            uplink: mac_of(&node.ns, &node.uplink)?,
            client: mac_of(&client.ns, &client.iface)?,
            bridge: mac_of(&node.ns, &node.bridge)?,
            task: mac_of(&task.ns, "eth0")?,
        };
        // No packet but the benchmark's: no IPv6 (router solicitations,
        // neighbour discovery), static neighbours and bridge ports (no ARP,
        // no flooding). The node forwards what is not the mesh's (the
        // direct floor, the floor's replies) instead of dropping it.
        for ns in topo.namespaces() {
            exec(&ns, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1")?;
            exec(&ns, "sysctl -qw net.ipv6.conf.default.disable_ipv6=1")?;
        }
        ip(
            &node.ns,
            &format!(
                "neigh replace {} lladdr {} dev {} nud permanent",
                task.addr,
                mac_str(macs.task),
                node.bridge
            ),
        )?;
        for a in &client.addrs {
            ip(
                &node.ns,
                &format!(
                    "neigh replace {a} lladdr {} dev {} nud permanent",
                    mac_str(macs.client),
                    node.uplink
                ),
            )?;
        }
        ip(
            &task.ns,
            &format!(
                "neigh replace {} lladdr {} dev eth0 nud permanent",
                node.gateway,
                mac_str(macs.bridge)
            ),
        )?;
        exec(
            &node.ns,
            &format!(
                "bridge fdb replace {} dev {} master static",
                mac_str(macs.task),
                task.port
            ),
        )?;
        exec(
            &seg,
            &format!(
                "bridge fdb replace {} dev c{} master static",
                mac_str(macs.client),
                client.index
            ),
        )?;
        exec(
            &seg,
            &format!(
                "bridge fdb replace {} dev {} master static",
                mac_str(macs.uplink),
                node.segment_port
            ),
        )?;
        exec(&node.ns, "iptables -P FORWARD ACCEPT")?;

        sys::enter_netns(&node.ns)?;
        let uplink = sys::ifindex(&node.uplink)?;
        let task_port = sys::ifindex(&task.port)?;
        let mut d = worlds::desired(node.addr, &[task.addr])?;
        d.task_ports.insert(task.addr, task_port);
        // The task's link, as meshd finds it (net::find_tasks): its port
        // on the bridge is a veth whose other end is the task's eth0.
        d.task_links.insert(
            task.addr,
            mesh_userspace::desired::TaskLink {
                ifindex: task_port,
                peer: true,
                task_mac: macs.task,
                gateway_mac: macs.bridge,
            },
        );
        let limits = Limits {
            maglev_size: MAGLEV_SIZE,
            max_services: 64,
            max_backends: 1024,
            ct_entries: 65_536,
            ct_new_entries,
            ..Limits::default()
        };
        let mut world = worlds::load("live", limits, &d, &[task.addr])?;
        world.track((client.addrs[0], FLOW_SPORT), node.addr, task.addr)?;
        let floors = Floors::load()?;
        let floor_tc = sys::load_empty_tc("floor_tc")?;
        // What fresh interfaces send on their own (IGMP reports) is over
        // within a second or two.
        std::thread::sleep(std::time::Duration::from_secs(2));
        eprintln!(
            "built the live lab (node {}, task {}, {} client addresses) ({:.1} s, not timed)",
            node.addr,
            task.addr,
            client.addrs.len(),
            t.elapsed().as_secs_f64()
        );
        Ok(LiveWorld {
            world,
            floors,
            floor_tc,
            uplink,
            task_port,
            links: Vec::new(),
            mode: None,
            node: node.addr,
            task: task.addr,
            clients: client.addrs.clone(),
            macs,
            _topo: topo,
        })
    }

    fn tc_fd(&self, name: &str) -> Result<BorrowedFd<'_>> {
        let p: &SchedClassifier = self
            .world
            .bpf
            .dp
            .ebpf()
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        Ok(p.fd()?.as_fd())
    }

    fn xdp(&self, which: XdpProg) -> Result<&Xdp> {
        let p = match which {
            XdpProg::Mesh => self.world.bpf.dp.ebpf().program(PROG_XDP),
            XdpProg::Pass => self.floors.ebpf().program(PROG_FLOOR_PASS),
        }
        .context("no XDP program")?;
        Ok(p.try_into()?)
    }

    fn prog_fd(&self, p: Prog) -> Result<BorrowedFd<'_>> {
        match p {
            Prog::MeshXdp => Ok(self.xdp(XdpProg::Mesh)?.fd()?.as_fd()),
            Prog::FloorPass => Ok(self.xdp(XdpProg::Pass)?.fd()?.as_fd()),
            Prog::MeshTcUplink => self.tc_fd(PROG_TC_UPLINK),
            Prog::MeshTcTask => self.tc_fd(PROG_TC_TASK),
            Prog::MeshTcIngress => self.tc_fd(PROG_TC_INGRESS),
            Prog::FloorTc => Ok(self.floor_tc.as_fd()),
        }
    }

    pub fn stats(&self, p: Prog) -> Result<RunStats> {
        RunStats::of(self.prog_fd(p)?)
    }

    /// Attaches what `mode` needs at TC ingress (detaching the rest).
    pub fn set_mode(&mut self, mode: Attach) -> Result<()> {
        if self.mode == Some(mode) {
            return Ok(());
        }
        self.links.clear();
        self.mode = None;
        let (up, task) = match mode {
            Attach::Mesh => (self.tc_fd(PROG_TC_UPLINK)?, self.tc_fd(PROG_TC_TASK)?),
            Attach::MeshTc => (self.tc_fd(PROG_TC_INGRESS)?, self.tc_fd(PROG_TC_TASK)?),
            Attach::Floor => (self.floor_tc.as_fd(), self.floor_tc.as_fd()),
        };
        let links = vec![
            sys::tcx_ingress(up, self.uplink)?,
            sys::tcx_ingress(task, self.task_port)?,
        ];
        self.links = links;
        self.mode = Some(mode);
        Ok(())
    }

    /// One live run of `which` on `frame`, arriving on `dev`; returns the
    /// kernel-reported duration (ns).
    pub fn run(&self, which: XdpProg, dev: Dev, frame: &[u8]) -> Result<u64> {
        let ifindex = match dev {
            Dev::Uplink => self.uplink,
            Dev::TaskPort => self.task_port,
        };
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex (u32 each).
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let r = self
            .xdp(which)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: 1,
                attrs: TestRunAttrs::new().xdp_live_frames(0),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN with live frames (kernel 5.18 or later)")?;
        Ok(r.duration.as_nanos() as u64)
    }

    fn spec(&self, s: Spec, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        Spec {
            dst_mac: dst,
            src_mac: src,
            ..s
        }
        .build()
    }

    /// The established flow's ACK, client to node.
    pub fn established(&self) -> Vec<u8> {
        let s = Spec::tcp(self.clients[0], FLOW_SPORT, self.node, WEB_TCP, TCP_ACK);
        self.spec(s, self.macs.uplink, self.macs.client)
    }

    /// An ACK to a port no service publishes.
    pub fn non_service(&self) -> Vec<u8> {
        let s = Spec::tcp(self.clients[0], FLOW_SPORT, self.node, UNPUBLISHED, TCP_ACK);
        self.spec(s, self.macs.uplink, self.macs.client)
    }

    /// The established flow's ACK addressed to the task itself (no NAT):
    /// the node's kernel routes it.
    pub fn direct(&self) -> Vec<u8> {
        let s = Spec::tcp(self.clients[0], FLOW_SPORT, self.task, TARGET_PORT, TCP_ACK);
        self.spec(s, self.macs.uplink, self.macs.client)
    }

    /// The task's reset answering the established flow, as it leaves the
    /// task (to its gateway's MAC).
    pub fn reply(&self) -> Vec<u8> {
        let s = Spec::tcp(
            self.task,
            TARGET_PORT,
            self.clients[0],
            FLOW_SPORT,
            TCP_RST | TCP_ACK,
        );
        self.spec(s, self.macs.bridge, self.macs.task)
    }

    /// A maker of new-flow SYNs from the client's other addresses.
    pub fn new_flows(&self) -> impl Fn(usize) -> Vec<u8> + 'static {
        let (first, node, macs) = (self.clients[1], self.node, self.macs);
        move |i| {
            let (saddr, sport) = worlds::new_flow_client(first, i);
            Spec {
                dst_mac: macs.uplink,
                src_mac: macs.client,
                ..Spec::tcp(saddr, sport, node, WEB_TCP, TCP_SYN)
            }
            .build()
        }
    }
}

/// A case run on live frames.
pub struct LiveCase {
    pub name: &'static str,
    pub what: &'static str,
    pub xdp: XdpProg,
    pub dev: Dev,
    pub attach: Attach,
    pub frames: Frames,
    pub stats: Option<StatsCheck>,
    pub after: AfterBatch,
    /// How many times each program runs per frame: checked after every batch.
    pub runs: Vec<(Prog, u64)>,
    /// Mean kernel-reported ns per frame, one per round (the whole path).
    pub wall: Vec<f64>,
    /// Per program, ns per run by the run-time statistics, one per round.
    pub progs: BTreeMap<Prog, Vec<f64>>,
    /// Program runs beyond what the frames require, over all batches.
    pub stray: u64,
}

/// Stray program runs tolerated per batch (besides one per thousand frames).
const STRAY_MAX: u64 = 2;

impl LiveCase {
    pub fn new(
        name: &'static str,
        what: &'static str,
        xdp: XdpProg,
        dev: Dev,
        attach: Attach,
        frames: Frames,
        runs: &[(Prog, u64)],
    ) -> LiveCase {
        LiveCase {
            name,
            what,
            xdp,
            dev,
            attach,
            frames,
            stats: None,
            after: AfterBatch::Nothing,
            runs: runs.to_vec(),
            wall: Vec::new(),
            progs: BTreeMap::new(),
            stray: 0,
        }
    }

    pub fn counted(mut self, new_flows: bool) -> LiveCase {
        self.stats = Some(StatsCheck {
            new_flows,
            port: WEB_TCP,
        });
        self
    }

    pub fn after(mut self, after: AfterBatch) -> LiveCase {
        self.after = after;
        self
    }

    /// `n` live frames; `record`: keep the figures (not for the warm-up).
    pub fn batch(&mut self, lw: &mut LiveWorld, n: usize, record: bool) -> Result<()> {
        lw.set_mode(self.attach)?;
        self.frames.start_batch();
        let svc0 = self
            .stats
            .map(|_| lw.world.svc_counters(WEB_TCP))
            .transpose()?;
        let drops0 = lw.world.drops_total()?;
        let frames: Vec<Vec<u8>> = (0..n).map(|_| self.frames.next()).collect();
        let on = StatsOn::new()?;
        let before: Vec<RunStats> = self
            .runs
            .iter()
            .map(|(p, _)| lw.stats(*p))
            .collect::<Result<_>>()?;
        let mut total = 0u64;
        for f in &frames {
            total += lw.run(self.xdp, self.dev, f)?;
        }
        let after: Vec<RunStats> = self
            .runs
            .iter()
            .map(|(p, _)| lw.stats(*p))
            .collect::<Result<_>>()?;
        drop(on);
        let drops = lw.world.drops_total()? - drops0;
        ensure!(
            drops == 0,
            "{}: the dataplane dropped {drops} packets: not the path meant",
            self.name
        );
        for (((p, per), b), a) in self.runs.iter().zip(&before).zip(&after) {
            let d = a.since(*b);
            let want = per * n as u64;
            // A packet the lab itself sends now and then (an IGMP report of
            // a fresh interface) crosses TC too: a few are tolerated, and
            // counted; more means the frames took another path.
            ensure!(
                d.runs >= want && d.runs <= want + STRAY_MAX + n as u64 / 1000,
                "{}: {} ran {} times for {n} frames, expected {want}: not the path meant",
                self.name,
                p.name(),
                d.runs,
            );
            self.stray += d.runs - want;
            if record && d.runs > 0 {
                self.progs
                    .entry(*p)
                    .or_default()
                    .push(d.ns as f64 / d.runs as f64);
            }
        }
        if let (Some(chk), Some((p0, f0))) = (self.stats, svc0) {
            let (p1, f1) = lw.world.svc_counters(WEB_TCP)?;
            let want = if chk.new_flows { n as u64 } else { 0 };
            ensure!(
                p1 - p0 == n as u64 && f1 - f0 == want,
                "{}: {n} frames counted {} packets and {} new flows, expected {n} and {want}",
                self.name,
                p1 - p0,
                f1 - f0
            );
        }
        if self.after == AfterBatch::ClearNewFlows {
            let cleared = lw.world.clear_ct_new()?;
            ensure!(
                cleared == n,
                "{}: {n} new flows left {cleared} unconfirmed conntrack entries",
                self.name
            );
        }
        if record {
            self.wall.push(total as f64 / n as f64);
        }
        Ok(())
    }

    pub fn wall_ns(&self) -> f64 {
        median(&self.wall)
    }

    /// Median ns per run of `p` in this case.
    pub fn prog_ns(&self, p: Prog) -> Option<f64> {
        self.progs.get(&p).map(|v| median(v))
    }

    pub fn json(&self) -> Value {
        let progs: serde_json::Map<String, Value> = self
            .progs
            .iter()
            .map(|(p, v)| {
                (
                    p.name().to_string(),
                    json!({
                        "ns_per_run": r1(median(v)),
                        "rounds": v.iter().map(|&x| r1(x)).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        json!({
            "name": self.name,
            "measures": self.what,
            "xdp_program": match self.xdp { XdpProg::Mesh => PROG_XDP, XdpProg::Pass => PROG_FLOOR_PASS },
            "device": match self.dev { Dev::Uplink => "uplink", Dev::TaskPort => "task port" },
            "tc_attached": match self.attach { Attach::Mesh => "mesh_tc_uplink on the uplink, mesh_tc_task on the task port", Attach::MeshTc => "mesh_tc_ingress on the uplink, mesh_tc_task on the task port", Attach::Floor => "floor_tc (empty) on both" },
            "wall_ns": r1(self.wall_ns()),
            "wall_rounds": self.wall.iter().map(|&x| r1(x)).collect::<Vec<_>>(),
            "programs": progs,
            "runs_per_frame": self.runs.iter().map(|(p, n)| json!({"program": p.name(), "runs": n})).collect::<Vec<_>>(),
            "frame_bytes": self.frames.frame_bytes(),
            "stray_program_runs": self.stray,
        })
    }
}
