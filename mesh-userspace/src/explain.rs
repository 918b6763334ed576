//! `meshd explain`: what the dataplane would do with one packet, told by
//! the dataplane itself. The XDP program runs (BPF_PROG_TEST_RUN) on a
//! packet built from the question, against a copy of the live maps: the
//! pinned maps are read, never written, so explaining changes nothing
//! (no conntrack entry, no counter, no Maglev pick remembered).
//!
//! Both intercepts (`--intercept tc|xdp`) decide with the same code
//! (`fwd::process`) on the same maps, so `mesh_xdp` explains a node whose
//! intercept is `mesh_tc_ingress` too; only how the decision is carried
//! out differs, and the explanation says it in the terms of the node's
//! intercept (found from the pinned links, or whether an XDP program is
//! on the interface).
//!
//! The copy holds everything a first packet reads (ports, services,
//! tables, backends, nodes, addresses, settings, allow lists) and, of
//! connection tracking, the asked flow's entry if there is one: a tracked
//! flow is explained as the entry takes it. Conntrack lifetimes are the
//! defaults (not the node's `--ct-*`): an entry older than the default
//! lifetime but younger than the node's would be explained as expired.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::EbpfLoader;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};
use mesh_common::abi::*;
use mesh_common::testing::frame::{Spec, View};
use serde_json::{Value, json};

use crate::dataplane::BPF_OBJECT;
use crate::model::Proto;

/// The packet to explain.
#[derive(Clone, Copy, Debug)]
pub struct Question {
    pub proto: Proto,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// TCP flags (`TCP_*` of mesh_common::parse); ignored for UDP.
    pub tcp_flags: u8,
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

fn pinned(root: &Path, name: &str) -> Result<MapData> {
    let p = root.join("maps").join(name);
    MapData::from_pin(&p).with_context(|| format!("opening {}", p.display()))
}

fn take(ebpf: &mut aya::Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the object"))
}

/// Copies the memory of a memory-mappable array.
fn copy_mmap(src: &MapData, dst: &MapData) -> Result<()> {
    let info = src.info()?;
    let bytes = (info.max_entries() as usize * info.value_size() as usize).next_multiple_of(4096);
    let map = |fd: i32, prot: i32| -> Result<*mut libc::c_void> {
        // SAFETY: mapping a BPF_F_MMAPABLE array of `bytes` bytes.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), bytes, prot, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        Ok(p)
    };
    let s = map(src.fd().as_fd().as_raw_fd(), libc::PROT_READ)?;
    let d = map(
        dst.fd().as_fd().as_raw_fd(),
        libc::PROT_READ | libc::PROT_WRITE,
    )?;
    // SAFETY: both mappings are `bytes` long, and distinct.
    unsafe {
        std::ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, bytes);
        libc::munmap(s, bytes);
        libc::munmap(d, bytes);
    }
    Ok(())
}

fn copy_array<T: aya::Pod>(src: MapData, dst: Map) -> Result<Array<MapData, T>> {
    let src: Array<MapData, T> = Array::try_from(Map::Array(src))?;
    let mut dst: Array<MapData, T> = Array::try_from(dst)?;
    for i in 0..src.len().min(dst.len()) {
        dst.set(i, src.get(&i, 0)?, 0)?;
    }
    Ok(dst)
}

fn copy_hash<K: aya::Pod, V: aya::Pod>(src: MapData, dst: Map) -> Result<()> {
    let src: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(Map::HashMap(src))?;
    let mut dst: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(dst)?;
    for e in src.iter() {
        let (k, v) = e?;
        dst.insert(k, v, 0)?;
    }
    Ok(())
}

/// The intercept on `iface` of the dataplane pinned under `root`: "tc" or
/// "xdp". Its pinned link says; without one (TC attached through netlink,
/// XDP on a kernel without XDP links), whether an XDP program is on the
/// interface.
pub fn intercept_of(root: &Path, iface: &str) -> &'static str {
    let links = root.join("links");
    if links.join(format!("{PROG_XDP}@{iface}")).exists() {
        return "xdp";
    }
    if links.join(format!("{PROG_TC_INGRESS}@{iface}")).exists() {
        return "tc";
    }
    let xdp_on = std::process::Command::new("ip")
        .args(["-details", "link", "show", "dev", iface])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("prog/xdp"))
        .unwrap_or(false);
    if xdp_on { "xdp" } else { "tc" }
}

/// Runs the question through the XDP program on a copy of the maps pinned
/// under `root`, arriving on interface `iface`; returns the explanation.
pub fn explain(root: &Path, iface: &str, q: &Question) -> Result<Value> {
    if BPF_OBJECT.is_empty() {
        bail!("this meshd has no BPF programs (built with MESH_BPF_SKIP=1)");
    }
    let ifindex = crate::net::ifindex(iface)
        .with_context(|| format!("interface {iface:?} does not exist here"))?;
    // The object, its maps sized as the pinned ones.
    let sizes: Vec<(&str, u32)> = MAP_NAMES
        .iter()
        .map(|n| Ok((*n, pinned(root, n)?.info()?.max_entries())))
        .collect::<Result<_>>()?;
    let mut loader = EbpfLoader::new();
    for (n, s) in &sizes {
        loader.map_max_entries(n, *s);
    }
    loader.override_global("AYA_LOG_LEVEL", &0u8, false);
    let mut ebpf = loader.load(BPF_OBJECT).context("loading the BPF object")?;
    // The program first: it holds its maps from then on, whatever this
    // process does with its own descriptors of them.
    {
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .context("no XDP program")?
            .try_into()?;
        prog.load()
            .context("the verifier refused the XDP program")?;
    }
    for name in [MAP_PORTS, MAP_NODE_ADDR4, MAP_MAGLEV] {
        let dst = ebpf.map(name).context("map missing")?;
        let Map::Array(dst) = dst else {
            bail!("{name} is not an array")
        };
        copy_mmap(&pinned(root, name)?, dst)?;
    }
    let backends =
        copy_array::<Backend>(pinned(root, MAP_BACKENDS)?, take(&mut ebpf, MAP_BACKENDS)?)?;
    copy_array::<SvcValue>(pinned(root, MAP_SERVICES)?, take(&mut ebpf, MAP_SERVICES)?)?;
    let nodes = copy_array::<NodeValue>(pinned(root, MAP_NODES)?, take(&mut ebpf, MAP_NODES)?)?;
    copy_array::<NodeConfig>(pinned(root, MAP_CONFIG)?, take(&mut ebpf, MAP_CONFIG)?)?;
    copy_hash::<ReplyKey4, ReplyValue4>(pinned(root, MAP_REPLY4)?, take(&mut ebpf, MAP_REPLY4)?)?;
    copy_hash::<u32, u32>(
        pinned(root, MAP_NODE_BY_ADDR4)?,
        take(&mut ebpf, MAP_NODE_BY_ADDR4)?,
    )?;
    copy_hash::<ReplyKey4, u32>(pinned(root, MAP_LOCAL4)?, take(&mut ebpf, MAP_LOCAL4)?)?;
    {
        let src: LpmTrie<MapData, [u32; 2], u32> =
            LpmTrie::try_from(Map::LpmTrie(pinned(root, MAP_SRC4)?))?;
        let mut dst: LpmTrie<MapData, [u32; 2], u32> = take(&mut ebpf, MAP_SRC4)?.try_into()?;
        for e in src.iter() {
            let (k, v) = e?;
            dst.insert(&Key::new(k.prefix_len(), k.data()), v, 0)?;
        }
    }
    let names: BpfHashMap<MapData, SvcKey, SvcName> =
        BpfHashMap::try_from(Map::HashMap(pinned(root, MAP_SVC_NAMES)?))?;
    // Client affinity: the timeouts, and what this node remembers of the
    // asked client for the port's service (if anything).
    copy_array::<u32>(
        pinned(root, MAP_AFF_TIMEOUT)?,
        take(&mut ebpf, MAP_AFF_TIMEOUT)?,
    )?;
    let aff_key = names
        .get(&SvcKey::new(q.dst.port(), q.proto.number()), 0)
        .ok()
        .map(|n| AffKey4 {
            svc_id: n.svc_id,
            addr: crate::plan::raw4(*q.src.ip()),
        });
    let mut remembered = None;
    if let Some(k) = aff_key {
        let live: BpfHashMap<MapData, AffKey4, AffValue4> =
            BpfHashMap::try_from(Map::LruHashMap(pinned(root, MAP_AFF4)?))?;
        if let Ok(v) = live.get(&k, 0) {
            let mut copy: BpfHashMap<MapData, AffKey4, AffValue4> =
                take(&mut ebpf, MAP_AFF4)?.try_into()?;
            copy.insert(k, v, 0)?;
            remembered = Some(v);
        }
    }
    // The asked flow's conntrack entry, where it is.
    let flow = FlowKey4 {
        saddr: crate::plan::raw4(*q.src.ip()),
        daddr: crate::plan::raw4(*q.dst.ip()),
        sport_be: q.src.port().to_be(),
        dport_be: q.dst.port().to_be(),
        proto: q.proto.number(),
        _pad0: 0,
        _pad1: 0,
    };
    let confirmed = if q.proto == Proto::Tcp {
        MAP_CT4
    } else {
        MAP_CT4_UDP
    };
    let mut ct_conf: BpfHashMap<MapData, FlowKey4, CtValue> =
        take(&mut ebpf, confirmed)?.try_into()?;
    let mut ct_new: BpfHashMap<MapData, FlowKey4, CtValue> =
        take(&mut ebpf, MAP_CT4_NEW)?.try_into()?;
    let mut tracked = None;
    for (name, label) in [(confirmed, "confirmed"), (MAP_CT4_NEW, "unconfirmed")] {
        let live: BpfHashMap<MapData, FlowKey4, CtValue> =
            BpfHashMap::try_from(Map::LruHashMap(pinned(root, name)?))?;
        if let Ok(v) = live.get(&flow, 0) {
            let copy = if name == MAP_CT4_NEW {
                &mut ct_new
            } else {
                &mut ct_conf
            };
            copy.insert(flow, v, 0)?;
            tracked = Some((label, v));
            break;
        }
    }
    let drops: PerCpuArray<MapData, u64> = take(&mut ebpf, MAP_DROPS)?.try_into()?;
    let counters: PerCpuArray<MapData, u64> = take(&mut ebpf, MAP_COUNTERS)?.try_into()?;
    let prog: &Xdp = ebpf
        .program(PROG_XDP)
        .context("no XDP program")?
        .try_into()?;

    let spec = match q.proto {
        Proto::Tcp => Spec::tcp(
            *q.src.ip(),
            q.src.port(),
            *q.dst.ip(),
            q.dst.port(),
            q.tcp_flags,
        ),
        Proto::Udp => Spec::udp(
            *q.src.ip(),
            q.src.port(),
            *q.dst.ip(),
            q.dst.port(),
            b"explain",
        ),
    };
    let input = spec.build();
    let (ret, meta, output) = test_run(prog, &input, ifindex)?;
    let intercept = intercept_of(root, iface);
    // Who carries out a delivery, or a send that needs the neighbour
    // resolved: with the intercept at XDP, mesh_tc_uplink after it; at
    // TC, the intercept itself.
    let deliverer = if intercept == "xdp" {
        "mesh_tc_uplink"
    } else {
        "mesh_tc_ingress"
    };

    // What the run did, in the copy.
    let sum = |m: &PerCpuArray<MapData, u64>, i: u32| -> u64 {
        m.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)
    };
    let dropped: Vec<&str> = DropReason::ALL
        .iter()
        .filter(|r| **r as u32 != 0 && sum(&drops, **r as u32) > 0)
        .map(|r| r.name())
        .collect();
    let counted: Vec<&str> = Counter::ALL
        .iter()
        .filter(|c| sum(&counters, **c as u32) > 0)
        .map(|c| c.metric())
        .collect();
    let new_entry = ct_new.get(&flow, 0).ok().filter(|_| tracked.is_none());

    // The service the port names, if one does.
    let key = SvcKey::new(q.dst.port(), q.proto.number());
    let service = names.get(&key, 0).ok().map(|n| n.name().to_string());
    let published = service.is_some();
    let backend_json = |id: u32| -> Value {
        match backends.get(&id, 0) {
            Ok(b) if b.flags != 0 => {
                let node = nodes
                    .get(&b.node_id, 0)
                    .ok()
                    .filter(|n| n.gen_ != 0)
                    .map(|n| Ipv4Addr::from(n.addr[0].to_ne_bytes()).to_string());
                json!({
                    "slot": id,
                    "addr": Ipv4Addr::from(b.addr[0].to_ne_bytes()).to_string(),
                    "port": u16::from_be(b.port_be),
                    "local": b.flags & BE_F_LOCAL != 0,
                    "node": node,
                })
            }
            _ => json!({ "slot": id }),
        }
    };
    let ct = match (&tracked, &new_entry) {
        (Some((table, v)), _) => json!({
            "tracked": true, "table": table, "backend": backend_json(v.backend_id),
        }),
        (None, Some(v)) => json!({
            "tracked": false, "new_entry": true, "backend": backend_json(v.backend_id),
        }),
        (None, None) => json!({ "tracked": false, "new_entry": false }),
    };
    let m = |o: usize| {
        meta.get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    let (verdict, says) = match ret {
        XDP_PASS if m(0) == Some(XDP_META_MAGIC) => {
            let id = m(4).unwrap_or(0);
            let be = backend_json(id);
            let out = View(&output);
            (
                "deliver",
                format!(
                    "delivered on this node: rewritten to {}:{} (the task's delivery address), \
                     redirected into it by {deliverer}",
                    out.daddr(),
                    out.dport()
                ) + &format!(" [backend slot {}]", be["slot"]),
            )
        }
        XDP_PASS if m(0) == Some(XDP_META_NEIGH) => (
            "forward",
            format!(
                "forwarded to another node (sent by {deliverer} once the next hop's neighbour \
                 entry is resolved)"
            ),
        ),
        XDP_PASS => {
            let why = if !published {
                format!("no service publishes {}/{}", q.proto, q.dst.port())
            } else {
                "not service traffic for this node (not one of its addresses, or a segment of \
                 the node's own connection)"
                    .to_string()
            };
            (
                "pass",
                format!("passed to the node's own stack, untouched: {why}"),
            )
        }
        XDP_DROP => (
            "drop",
            format!(
                "dropped: {}",
                if dropped.is_empty() {
                    "(no reason counted)".to_string()
                } else {
                    dropped.join(", ")
                }
            ),
        ),
        XDP_TX | XDP_REDIRECT => {
            if counted.contains(&Counter::TooBig.metric()) {
                (
                    "too_big",
                    "answered with ICMP fragmentation-needed (too big to encapsulate)".to_string(),
                )
            } else {
                let outer = View(&output[..]);
                let inner = output
                    .get(mesh_common::parse::ETH_HLEN + ENCAP_LEN..)
                    .map(|ip| {
                        let mut f = output[..mesh_common::parse::ETH_HLEN].to_vec();
                        f.extend_from_slice(ip);
                        f
                    })
                    .unwrap_or_default();
                let task = if inner.len() > 40 {
                    let v = View(&inner);
                    format!("{}:{}", v.daddr(), v.dport())
                } else {
                    "?".into()
                };
                (
                    "forward",
                    format!(
                        "forwarded: encapsulated (UDP {} -> {}:{}) to the node that runs task {task}",
                        outer.saddr(),
                        outer.daddr(),
                        outer.dport()
                    ),
                )
            }
        }
        r => ("other", format!("XDP verdict {r}")),
    };
    Ok(json!({
        "packet": {
            "protocol": q.proto.to_string(),
            "src": q.src.to_string(),
            "dst": q.dst.to_string(),
            "tcp_flags": if q.proto == Proto::Tcp { json!(q.tcp_flags) } else { Value::Null },
            "iface": iface,
        },
        "service": service,
        "intercept": intercept,
        "verdict": verdict,
        "explanation": says,
        "drops": dropped,
        "counters": counted,
        "conntrack": ct,
        "affinity": remembered.map(|v| json!({
            "remembered": backend_json(v.backend_id),
            "followed": counted.contains(&Counter::AffinityFollowed.metric()),
        })),
    }))
}

fn test_run(prog: &Xdp, input: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>, Vec<u8>)> {
    let mut out = vec![0u8; input.len() + 256];
    const XDP_MD_LEN: usize = 24;
    let mut ctx_in = [0u8; XDP_MD_LEN];
    ctx_in[4..8].copy_from_slice(&(input.len() as u32).to_ne_bytes());
    ctx_in[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut ctx_out = [0u8; XDP_MD_LEN];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .map_err(|e: ProgramError| anyhow::anyhow!("BPF_PROG_TEST_RUN: {e}"))?;
    out.truncate(r.data_size_out as usize);
    let word = |o: usize| u32::from_ne_bytes(ctx_out[o..o + 4].try_into().unwrap()) as usize;
    let meta_len = word(0).saturating_sub(word(8)).min(out.len());
    let meta = out[..meta_len].to_vec();
    Ok((r.return_value, meta, out[meta_len..].to_vec()))
}

/// The explanation, for people.
pub fn render(v: &Value) -> String {
    let p = &v["packet"];
    let mut s = format!(
        "{} {} -> {} on {}",
        p["protocol"].as_str().unwrap_or_default(),
        p["src"].as_str().unwrap_or_default(),
        p["dst"].as_str().unwrap_or_default(),
        p["iface"].as_str().unwrap_or_default()
    );
    if let Some(i) = v["intercept"].as_str() {
        s += &format!(" (intercept {i})");
    }
    if let Some(n) = v["service"].as_str() {
        s += &format!(" (service {n})");
    }
    s += &format!("\n  {}\n", v["explanation"].as_str().unwrap_or_default());
    let ct = &v["conntrack"];
    let be = |b: &Value| -> String {
        match (b["addr"].as_str(), b["port"].as_u64()) {
            (Some(a), Some(port)) => format!(
                "{a}:{port}{}",
                match (b["local"].as_bool(), b["node"].as_str()) {
                    (Some(true), _) => " on this node".to_string(),
                    (_, Some(n)) => format!(" on node {n}"),
                    _ => String::new(),
                }
            ),
            _ => format!("backend slot {}", b["slot"]),
        }
    };
    if ct["tracked"] == true {
        s += &format!(
            "  conntrack: a tracked flow ({} table), pinned to {}\n",
            ct["table"].as_str().unwrap_or_default(),
            be(&ct["backend"])
        );
    } else if ct["new_entry"] == true {
        s += &format!(
            "  conntrack: a new flow: Maglev picks {}; the real packet would be tracked\n",
            be(&ct["backend"])
        );
    } else {
        s += "  conntrack: not tracked, and this packet would not be\n";
    }
    let aff = &v["affinity"];
    if !aff.is_null() {
        s += &format!(
            "  affinity: this node remembers the client at {}{}\n",
            be(&aff["remembered"]),
            if aff["followed"] == true {
                ", and follows that"
            } else {
                ", but not for this packet (expired, draining, or not a new flow)"
            }
        );
    }
    if let Some(c) = v["counters"].as_array()
        && !c.is_empty()
    {
        s += &format!(
            "  counts: {}\n",
            c.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s += "  (run on a copy of the live maps: nothing was changed)\n";
    s
}
