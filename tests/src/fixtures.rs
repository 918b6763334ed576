//! The behaviour of the forward path as data, in the manner of Katran's
//! testing fixtures: a name, an input frame, the verdict and the output
//! bytes expected, over one fixed table content (the "world"). The same
//! fixtures run against the host logic (`run_host`) and through
//! BPF_PROG_TEST_RUN against the real object (`BpfWorld::run`).
//!
//! The micro-benchmark (bench/) builds its own worlds and frames; it
//! shares this module's loaders, `BpfWorld` and `Floors`.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use mesh_common::abi::{
    DropReason, FLOOR_PROG_NAMES, IPPROTO_ICMP, MAP_FLOOR, XDP_META_MAGIC, XdpMeta,
};
use mesh_common::fwd::{self, Tables, Verdict};
use mesh_common::parse::{
    ETH_HLEN, ETH_TYPE, IP_CSUM, IP_HLEN_MIN, IP_PROTO, IP_TOT_LEN, IP_VER_IHL, TCP_DOFF,
    TCP_HLEN_MIN, UDP_LEN,
};
use mesh_common::pkt::Pkt;
use mesh_userspace::dataplane::{Dataplane, FLOOR_OBJECT};
use mesh_userspace::desired::Desired;
use mesh_userspace::model::{Proto, State, StateBuilder};
use mesh_userspace::plan::Limits;
use mesh_userspace::sim::Sim;

use crate::packet::{
    IcmpErrSpec, SRC_MAC, Spec, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, UdpCsum, View,
    checksums_ok, ethernet,
};

pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 1);
pub const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 2);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 7);
pub const TASKS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 129, 2),
    Ipv4Addr::new(198, 18, 129, 3),
    Ipv4Addr::new(198, 18, 129, 4),
];
pub const FAR_TASK: Ipv4Addr = Ipv4Addr::new(198, 18, 130, 2);
pub const WEB_TCP: u16 = 30080;
pub const WEB_UDP: u16 = 30053;
pub const EMPTY_TCP: u16 = 30099;
pub const FAR_TCP: u16 = 30070;

/// XDP return codes.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The table contents every fixture runs against.
pub fn world_state() -> State {
    StateBuilder::new()
        .node("n1", NODE)
        .node("n2", OTHER_NODE)
        .service(
            "web",
            &[(Proto::Tcp, WEB_TCP, 8080), (Proto::Udp, WEB_UDP, 5353)],
        )
        .service("empty", &[(Proto::Tcp, EMPTY_TCP, 80)])
        .service("far", &[(Proto::Tcp, FAR_TCP, 80)])
        .task("far", "n2", FAR_TASK)
        .tasks("web", "n1", TASKS)
        .build()
        .expect("the fixture world is valid")
}

pub fn world() -> Desired {
    Desired::compute(&world_state(), "n1", &[]).expect("n1 is in the world")
}

pub fn limits() -> Limits {
    Limits {
        maglev_size: 1021,
        max_services: 64,
        max_backends: 1024,
        ct_entries: 65536,
        ..Limits::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Pass,
    Drop(DropReason),
    /// DNAT to one of the service's tasks: the output must equal `spec`
    /// rebuilt from scratch with the chosen task's address and target port.
    Local {
        target: u16,
    },
    /// An ICMP error about a tracked flow's reply, to the flow's task: the
    /// output must equal `icmp` rebuilt with the task in place of the node.
    LocalIcmp,
}

#[derive(Clone, Debug)]
pub struct Fixture {
    pub name: &'static str,
    pub input: Vec<u8>,
    /// For `Local`: the spec the input was built from; for `LocalIcmp`,
    /// the client flow the error is about.
    pub spec: Option<Spec>,
    /// For `LocalIcmp`: the error the input was built from.
    pub icmp: Option<IcmpErrSpec>,
    pub expect: Expect,
}

/// Frame offsets of the IPv4 header's fields (no Ethernet options).
const VER_IHL: usize = ETH_HLEN + IP_VER_IHL;
const TOT_LEN: usize = ETH_HLEN + IP_TOT_LEN;
const PROTO: usize = ETH_HLEN + IP_PROTO;
const IP_CHECK: usize = ETH_HLEN + IP_CSUM;
/// Frame offset of the TCP/UDP header behind an IPv4 header without
/// options.
const L4: usize = ETH_HLEN + IP_HLEN_MIN;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

fn fix_ip_csum(f: &mut [u8]) {
    let hlen = ((f[VER_IHL] & 0x0f) as usize * 4).max(IP_HLEN_MIN);
    f[IP_CHECK..IP_CHECK + 2].fill(0);
    let end = (ETH_HLEN + hlen).min(f.len());
    let c = mesh_common::csum::checksum(&f[ETH_HLEN..end], 0);
    f[IP_CHECK..IP_CHECK + 2].copy_from_slice(&c.to_be_bytes());
}

/// Sets the IPv4 total length (and the header checksum to match).
fn set_tot_len(f: &mut [u8], len: usize) {
    f[TOT_LEN..TOT_LEN + 2].copy_from_slice(&(len as u16).to_be_bytes());
    fix_ip_csum(f);
}

/// The fixtures, in order: the TCP ones share one flow (SYN first, so the
/// later ones exercise the established path).
pub fn all() -> Vec<Fixture> {
    let mut v = Vec::new();
    let tcp = |flags| Spec::tcp(CLIENT, 40001, NODE, WEB_TCP, flags);
    let local = |name, spec: Spec, target| Fixture {
        name,
        input: spec.build(),
        spec: Some(spec),
        icmp: None,
        expect: Expect::Local { target },
    };
    let raw = |name, input: Vec<u8>, expect| Fixture {
        name,
        input,
        spec: None,
        icmp: None,
        expect,
    };

    v.push(local("tcp_syn_new_flow", tcp(TCP_SYN), 8080));
    v.push(local("tcp_ack_established", tcp(TCP_ACK), 8080));
    v.push(local(
        "tcp_data_established",
        Spec {
            payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            ..tcp(TCP_ACK | TCP_PSH)
        },
        8080,
    ));
    {
        // A router between the node and the client cannot forward one of
        // the flow's replies: its "fragmentation needed" quotes the reply as
        // the client would have seen it, and must reach the task.
        let reply = Spec {
            payload: vec![0x5a; 64],
            ..Spec::tcp(NODE, WEB_TCP, CLIENT, 40001, TCP_ACK)
        };
        let router = Ipv4Addr::new(198, 18, 200, 1);
        for (name, quote_len) in [
            ("icmp_frag_needed_for_tracked_flow", None),
            ("icmp_frag_needed_quoting_8_l4_bytes", Some(28)),
        ] {
            let e = IcmpErrSpec {
                quote_len,
                ..IcmpErrSpec::frag_needed(router, NODE, 1280, reply.clone())
            };
            v.push(Fixture {
                name,
                input: e.build(),
                spec: Some(tcp(TCP_SYN)),
                icmp: Some(e),
                expect: Expect::LocalIcmp,
            });
        }
        let mut unknown = IcmpErrSpec::frag_needed(router, NODE, 1280, reply.clone());
        unknown.quoted.dport = 40999;
        v.push(raw(
            "icmp_about_an_unknown_flow",
            unknown.build(),
            Expect::Pass,
        ));
        let mut other = IcmpErrSpec::frag_needed(router, NODE, 1280, reply);
        other.quoted.saddr = Ipv4Addr::new(198, 18, 128, 77);
        v.push(raw(
            "icmp_quoting_another_source",
            other.build(),
            Expect::Pass,
        ));
    }
    v.push(local("tcp_fin", tcp(TCP_FIN | TCP_ACK), 8080));
    v.push(local("tcp_rst", tcp(TCP_RST), 8080));
    v.push(local(
        "tcp_ip_options",
        Spec {
            ip_opts: vec![0x94, 0x04, 0, 0, 1, 1, 1, 0],
            ..Spec::tcp(CLIENT, 40002, NODE, WEB_TCP, TCP_SYN)
        },
        8080,
    ));
    v.push(local(
        "udp_request",
        Spec::udp(CLIENT, 5000, NODE, WEB_UDP, b"ping"),
        5353,
    ));
    v.push(local(
        "udp_empty_payload",
        Spec::udp(CLIENT, 5001, NODE, WEB_UDP, b""),
        5353,
    ));
    v.push(local(
        "udp_no_checksum",
        Spec {
            udp_csum: UdpCsum::None,
            ..Spec::udp(CLIENT, 5002, NODE, WEB_UDP, b"x")
        },
        5353,
    ));
    {
        // Ethernet padding after a short datagram must survive untouched.
        let spec = Spec::udp(CLIENT, 5003, NODE, WEB_UDP, b"pad");
        let mut input = spec.build();
        input.resize(60, 0xee);
        v.push(Fixture {
            name: "udp_ethernet_padding",
            input,
            spec: Some(spec),
            icmp: None,
            expect: Expect::Local { target: 5353 },
        });
    }

    v.push(raw(
        "tcp_unpublished_port",
        Spec::tcp(CLIENT, 40001, NODE, 30081, TCP_SYN).build(),
        Expect::Pass,
    ));
    v.push(raw(
        "tcp_ssh_port",
        Spec::tcp(CLIENT, 40001, NODE, 22, TCP_SYN).build(),
        Expect::Pass,
    ));
    v.push(raw(
        "tcp_other_address",
        Spec::tcp(
            CLIENT,
            40001,
            Ipv4Addr::new(198, 18, 128, 9),
            WEB_TCP,
            TCP_SYN,
        )
        .build(),
        Expect::Pass,
    ));
    v.push(raw(
        "udp_unpublished_port",
        Spec::udp(CLIENT, 5000, NODE, 30054, b"x").build(),
        Expect::Pass,
    ));
    {
        // Who has NODE? Tell CLIENT (Ethernet, IPv4, request).
        let mut req = vec![0, 1, 8, 0, 6, 4, 0, 1];
        req.extend_from_slice(&SRC_MAC);
        req.extend_from_slice(&CLIENT.octets());
        req.extend_from_slice(&[0; 6]);
        req.extend_from_slice(&NODE.octets());
        let arp = ethernet([0xff; 6], SRC_MAC, ETH_P_ARP, &req);
        v.push(raw("arp_request", arp, Expect::Pass));
    }
    v.push(raw(
        "icmp_echo",
        // Echo request (type 8), identifier and sequence 0.
        Spec {
            payload: vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0],
            ..Spec::new(IPPROTO_ICMP, CLIENT, 0, NODE, 0)
        }
        .build(),
        Expect::Pass,
    ));
    {
        let mut v6 = Spec::tcp(CLIENT, 40001, NODE, WEB_TCP, TCP_SYN).build();
        v6[ETH_TYPE..ETH_TYPE + 2].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        v.push(raw("ipv6_ethertype", v6, Expect::Pass));
    }
    v.push(raw("truncated_ethernet", vec![0xff; 10], Expect::Pass));
    {
        let mut f = tcp(TCP_SYN).build();
        f.truncate(ETH_HLEN + 12);
        v.push(raw("truncated_ipv4_header", f, Expect::Pass));
    }
    {
        let mut f = tcp(TCP_SYN).build();
        f[VER_IHL] = 0x44;
        fix_ip_csum(&mut f);
        v.push(raw("ipv4_ihl_below_5", f, Expect::Pass));
    }
    {
        let mut f = tcp(TCP_SYN).build();
        f[VER_IHL] = 0x65;
        v.push(raw("ip_version_6_in_ipv4_frame", f, Expect::Pass));
    }
    {
        let mut f = tcp(TCP_SYN).build();
        set_tot_len(&mut f, IP_HLEN_MIN + TCP_HLEN_MIN + 100);
        v.push(raw("total_length_longer_than_frame", f, Expect::Pass));
    }
    {
        let mut f = tcp(TCP_SYN).build();
        set_tot_len(&mut f, 16);
        v.push(raw("total_length_shorter_than_header", f, Expect::Pass));
    }
    {
        let mut f = tcp(TCP_SYN).build();
        set_tot_len(&mut f, IP_HLEN_MIN + 10);
        f.truncate(L4 + 10);
        v.push(raw(
            "truncated_tcp_header",
            f,
            Expect::Drop(DropReason::L4Truncated),
        ));
    }
    {
        let mut f = tcp(TCP_SYN).build();
        set_tot_len(&mut f, IP_HLEN_MIN + 2);
        f.truncate(L4 + 2);
        v.push(raw("tcp_ports_cut", f, Expect::Pass));
    }
    {
        let mut f = tcp(TCP_SYN).build();
        f[L4 + TCP_DOFF] = 4 << 4;
        v.push(raw(
            "tcp_data_offset_below_5",
            f,
            Expect::Drop(DropReason::L4BadLength),
        ));
    }
    {
        let mut f = tcp(TCP_SYN).build();
        f[L4 + TCP_DOFF] = 15 << 4;
        v.push(raw(
            "tcp_data_offset_past_end",
            f,
            Expect::Drop(DropReason::L4Truncated),
        ));
    }
    {
        let mut f = Spec::udp(CLIENT, 5000, NODE, WEB_UDP, b"").build();
        set_tot_len(&mut f, IP_HLEN_MIN + 4);
        f.truncate(L4 + 4);
        v.push(raw(
            "truncated_udp_header",
            f,
            Expect::Drop(DropReason::L4Truncated),
        ));
    }
    {
        let mut f = Spec::udp(CLIENT, 5000, NODE, WEB_UDP, b"abcd").build();
        f[L4 + UDP_LEN..L4 + UDP_LEN + 2].fill(0);
        v.push(raw(
            "udp_length_zero",
            f,
            Expect::Drop(DropReason::L4BadLength),
        ));
    }
    {
        let mut f = Spec::udp(CLIENT, 5000, NODE, WEB_UDP, b"abcd").build();
        f[L4 + UDP_LEN + 1] = 200;
        v.push(raw(
            "udp_length_past_datagram",
            f,
            Expect::Drop(DropReason::L4BadLength),
        ));
    }
    v.push(raw(
        "first_fragment",
        Spec {
            frag: 0x2000,
            ..Spec::udp(CLIENT, 5000, NODE, WEB_UDP, b"frag")
        }
        .build(),
        Expect::Drop(DropReason::Fragment),
    ));
    v.push(raw(
        "later_fragment",
        Spec {
            frag: 0x0010,
            ..Spec::udp(CLIENT, 5000, NODE, WEB_UDP, b"frag")
        }
        .build(),
        Expect::Pass,
    ));
    v.push(raw(
        "service_without_tasks",
        Spec::tcp(CLIENT, 40001, NODE, EMPTY_TCP, TCP_SYN).build(),
        Expect::Drop(DropReason::NoBackend),
    ));
    v.push(raw(
        "task_on_other_node",
        Spec::tcp(CLIENT, 40001, NODE, FAR_TCP, TCP_SYN).build(),
        Expect::Drop(DropReason::RemoteBackend),
    ));
    v
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub expect: Expect,
    pub output: Vec<u8>,
}

/// The task the host logic picks for the client flow `spec` from a fresh
/// table (the fixtures never change the table, so that is the task any
/// tracked flow is pinned to).
fn maglev_pick(
    world: &Sim,
    fx: &Fixture,
    spec: &Spec,
) -> Result<mesh_common::abi::Backend, String> {
    let flow = mesh_common::abi::FlowKey4 {
        saddr: u32::from_ne_bytes(spec.saddr.octets()),
        daddr: u32::from_ne_bytes(spec.daddr.octets()),
        sport_be: spec.sport.to_be(),
        dport_be: spec.dport.to_be(),
        proto: spec.proto,
        _pad: [0; 3],
    };
    let svc = world
        .maps
        .service(&mesh_common::abi::SvcKey::new(spec.dport, spec.proto))
        .ok_or(format!("{}: no service", fx.name))?;
    fwd::select(&world.maps, &svc, &flow)
        .map(|(_, be)| be)
        .map_err(|r| format!("{}: select {r:?}", fx.name))
}

/// Checks an outcome against a fixture: the verdict; for a delivered
/// packet, that it went to the task the host logic picks (read from the
/// output's destination) and equals the input rebuilt for that task; for
/// any other verdict, that the packet is untouched.
pub fn judge(fx: &Fixture, got: &Outcome, world: &Sim) -> Result<(), String> {
    if got.expect != fx.expect {
        return Err(format!(
            "{}: verdict {:?}, expected {:?}",
            fx.name, got.expect, fx.expect
        ));
    }
    match &fx.expect {
        Expect::Local { target } => {
            let out = &got.output;
            let chosen = View(out).daddr();
            let spec = fx.spec.as_ref().expect("local fixtures carry their spec");
            let maglev_pick = Ipv4Addr::from(maglev_pick(world, fx, spec)?.addr[0].to_ne_bytes());
            if chosen != maglev_pick {
                return Err(format!(
                    "{}: delivered to {chosen}, Maglev picks {maglev_pick}",
                    fx.name
                ));
            }
            let mut expected = Spec {
                daddr: chosen,
                dport: *target,
                ..spec.clone()
            }
            .build();
            if fx.input.len() > expected.len() {
                expected.extend_from_slice(&fx.input[expected.len()..]);
            }
            if *out != expected {
                return Err(format!(
                    "{}: output differs\n got      {:02x?}\n expected {:02x?}",
                    fx.name, out, expected
                ));
            }
            if !checksums_ok(out) {
                return Err(format!("{}: bad checksum in output", fx.name));
            }
        }
        Expect::LocalIcmp => {
            let out = &got.output;
            let chosen = View(out).daddr();
            let be = maglev_pick(world, fx, fx.spec.as_ref().expect("the client flow"))?;
            let task = Ipv4Addr::from(be.addr[0].to_ne_bytes());
            if chosen != task {
                return Err(format!(
                    "{}: delivered to {chosen}, the flow's task is {task}",
                    fx.name
                ));
            }
            let e = fx.icmp.as_ref().expect("icmp fixtures carry their spec");
            let mut want = e.clone();
            want.to = task;
            want.quoted.saddr = task;
            want.quoted.sport = u16::from_be(be.port_be);
            let expected = want.build();
            if *out != expected {
                return Err(format!(
                    "{}: output differs\n got      {:02x?}\n expected {:02x?}",
                    fx.name, out, expected
                ));
            }
        }
        _ => {
            if got.output != fx.input {
                return Err(format!(
                    "{}: a {:?} verdict must not rewrite the packet",
                    fx.name, fx.expect
                ));
            }
        }
    }
    Ok(())
}

/// A host world: the planner's ops applied to hash maps.
pub fn host_world() -> Sim {
    let mut sim = Sim::new(limits());
    sim.apply(&world()).expect("world applies");
    sim
}

/// Runs a fixture through the shared logic on the host.
pub fn run_host(sim: &Sim, fx: &Fixture) -> Outcome {
    let mut buf = fx.input.clone();
    let v = fwd::process(&Pkt::from_slice(&mut buf), &sim.maps);
    let expect = match v {
        Verdict::Pass => Expect::Pass,
        Verdict::Drop(r) => Expect::Drop(r),
        Verdict::Local { .. } if buf.get(PROTO) == Some(&IPPROTO_ICMP) => Expect::LocalIcmp,
        Verdict::Local { backend_id } => Expect::Local {
            target: u16::from_be(
                sim.maps
                    .backend(backend_id)
                    .expect("a delivered packet's backend")
                    .port_be,
            ),
        },
    };
    Outcome {
        expect,
        output: buf,
    }
}

/// The real object, loaded (not attached) and filled with the world.
pub struct BpfWorld {
    pub dp: Dataplane,
    /// Drop counters after the previous run, to tell which one grew.
    last_drops: std::cell::RefCell<Vec<u64>>,
}

/// One BPF_PROG_TEST_RUN.
pub struct Run {
    pub ret: u32,
    /// The packet as the program left it (metadata excluded).
    pub output: Vec<u8>,
    /// XDP metadata the program left in front of the packet.
    pub meta: Vec<u8>,
    pub ns: u64,
}

impl BpfWorld {
    pub fn new() -> Result<Self> {
        Self::with(limits(), &world())
    }

    pub fn with(limits: Limits, d: &Desired) -> Result<Self> {
        let mut dp = Dataplane::load(limits, 0).context("loading the BPF object (needs root)")?;
        dp.apply(d)?;
        Ok(Self {
            dp,
            last_drops: Default::default(),
        })
    }

    /// Runs XDP program `prog` of the dataplane once on `input` (repeat = 1).
    pub fn run_xdp(&self, prog: &str, input: &[u8]) -> Result<Run> {
        test_run_xdp(self.dp.ebpf(), prog, input)
    }

    /// Runs a fixture through `mesh_xdp`.
    pub fn run(&self, fx: &Fixture) -> Result<Outcome> {
        let r = self.run_xdp(mesh_common::abi::PROG_XDP, &fx.input)?;
        let expect = match r.ret {
            XDP_PASS if r.meta.len() == size_of::<XdpMeta>() => {
                let magic = u32::from_ne_bytes(r.meta[0..4].try_into().unwrap());
                if magic != XDP_META_MAGIC {
                    anyhow::bail!(
                        "{}: metadata without the mesh magic: {:02x?}",
                        fx.name,
                        r.meta
                    );
                }
                if r.output[PROTO] == IPPROTO_ICMP {
                    Expect::LocalIcmp
                } else {
                    Expect::Local {
                        target: View(&r.output).dport(),
                    }
                }
            }
            XDP_PASS => Expect::Pass,
            XDP_DROP => Expect::Drop(
                self.last_drop_reason()?
                    .context("XDP_DROP without a counted reason")?,
            ),
            other => anyhow::bail!("{}: unexpected XDP action {other}", fx.name),
        };
        Ok(Outcome {
            expect,
            output: r.output,
        })
    }

    /// The reason whose counter grew since the previous call.
    fn last_drop_reason(&self) -> Result<Option<DropReason>> {
        let now = self.dp.drops()?;
        let prev = self
            .last_drops
            .replace(now.iter().map(|(_, n)| *n).collect());
        Ok(now
            .iter()
            .enumerate()
            .find(|(i, (_, n))| *n > prev.get(*i).copied().unwrap_or(0))
            .map(|(_, (r, _))| *r))
    }
}

/// Runs XDP program `prog` of `bpf` once on `input` (repeat = 1).
pub fn test_run_xdp(bpf: &Ebpf, prog: &str, input: &[u8]) -> Result<Run> {
    let p: &Xdp = bpf
        .program(prog)
        .with_context(|| format!("no program {prog}"))?
        .try_into()?;
    let mut out = vec![0u8; input.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex (u32 each).
    const XDP_MD_LEN: usize = 24;
    const DATA: usize = 0;
    const DATA_END: usize = 4;
    const DATA_META: usize = 8;
    let mut ctx_in = [0u8; XDP_MD_LEN];
    ctx_in[DATA_END..DATA_END + 4].copy_from_slice(&(input.len() as u32).to_ne_bytes());
    let mut ctx_out = [0u8; XDP_MD_LEN];
    let r = p.test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx_in),
        ctx_out: Some(&mut ctx_out),
        ..TestRunOptions::default()
    })?;
    out.truncate(r.data_size_out as usize);
    let word = |o: usize| u32::from_ne_bytes(ctx_out[o..o + 4].try_into().unwrap()) as usize;
    let (data, meta_off) = (word(DATA), word(DATA_META));
    let meta_len = data.saturating_sub(meta_off);
    let meta = out[..meta_len.min(out.len())].to_vec();
    let output = out[meta_len.min(out.len())..].to_vec();
    Ok(Run {
        ret: r.return_value,
        output,
        meta,
        ns: r.duration.as_nanos() as u64,
    })
}

/// The benchmark's floor programs (`floor_pass`, `floor_lookup` and their
/// map), loaded from their own object: the dataplane's object does not
/// carry them.
pub struct Floors {
    bpf: Ebpf,
}

impl Floors {
    /// Loads the floor object and its programs (needs root).
    pub fn load() -> Result<Self> {
        anyhow::ensure!(
            !FLOOR_OBJECT.is_empty(),
            "this build has no floor object: it was built with MESH_BPF_SKIP=1"
        );
        let mut bpf = EbpfLoader::new()
            .load(FLOOR_OBJECT)
            .context("loading the floor object (needs root)")?;
        for name in FLOOR_PROG_NAMES {
            let p: &mut Xdp = bpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            p.load()
                .with_context(|| format!("the verifier refused {name}"))?;
        }
        Ok(Self { bpf })
    }

    /// `floor_lookup`'s table: a frame whose destination port (raw,
    /// network order) is a key here is a hit (XDP_TX).
    pub fn map(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u32>> {
        Ok(BpfHashMap::try_from(
            self.bpf.map_mut(MAP_FLOOR).context("no floor map")?,
        )?)
    }

    /// Runs floor program `prog` once on `input` (repeat = 1).
    pub fn run_xdp(&self, prog: &str, input: &[u8]) -> Result<Run> {
        test_run_xdp(&self.bpf, prog, input)
    }
}
