//! The lab's network: nodes on one shared L2 segment, clients on it (or
//! behind a router with a small-MTU link), and per node a task bridge (as
//! Docker's docker_gwbridge) with task hosts behind it. Only the network:
//! what runs in it is `Cluster`'s business.
//!
//! ```text
//!  client ml<k>c<m> eth0 ─┐                     ┌─ up0  node ml<k>n1 ─ br0 ─┬─ vt1 ─ eth0 task ml<k>n1t1
//!  client ml<k>c<m> eth0 ─┤ segment ml<k>s br0  ├─ up0  node ml<k>n2 ─ br0   └─ vt2 ─ eth0 task ml<k>n1t2
//!  router ml<k>r    rt0  ─┘  (ports c<m>, r0,   └─ up0  node ml<k>n3 ─ br0 ─── vt1 ─ eth0 task ml<k>n3t1
//!    rt1 (small MTU) ─ eth0 routed client ml<k>c<m>      n<j>)
//! ```
//!
//! The segment's bridge sits in a namespace of its own: frames bridged in
//! the root namespace would cross this host's FORWARD chain (policy DROP
//! where dockerd runs; see LAB.md). Nodes are set up as dockerd leaves a
//! host: ip_forward=1, bridged frames through iptables
//! (bridge-nf-call-iptables=1), FORWARD policy DROP. No namespace has a
//! default route; each knows only the lab's subnets.
//!
//! # Address plan
//!
//! Lab slot `k` (0..64) owns 198.18.`b`.0/23 with `b = 128 + 2k`, inside
//! 198.18.128.0/17 (198.18.0.0/17 is left to the Docker-based tests):
//! - 198.18.`b`.0/25, the segment: node `j` (1..=16) at .`j`, the router's
//!   segment side at .17, clients' addresses from .32 to .126 (in the order
//!   the builder lists them);
//! - 198.18.`b`.128/25, the router's link to the client behind it: router
//!   .129, that client's addresses from .130;
//! - 198.18.`b+1`.0/24, the tasks: split evenly into as many subnets as the
//!   next power of two at or above the number of nodes (one node: the whole
//!   /24; 2: /25s; 3 or 4: /26s; up to 16: /28s). In node `j`'s subnet the
//!   bridge is the first host, task `i` the (1+i)-th: with one node the
//!   bridge is .1 and task `i` is .(1+i), as the lab has always had it.
//!
//! Tasks route 198.18.`b`.0/23 (the segment and all task subnets) through
//! their bridge, as a container routes everything through
//! docker_gwbridge; nodes reach the router's client subnet through the
//! router; clients behind the router reach the segment through it.
//!
//! # Names
//!
//! Every namespace is `ml<k>` and a kind: `s` segment, `n<j>` node,
//! `n<j>t<i>` task `i` of node `j`, `c<m>` client, `r` router, so that
//! leftovers are attributable (`slot_namespaces`). The slot is claimed by
//! creating the segment namespace: creation fails if another lab holds
//! the slot, so labs run side by side; it is deleted last. Claims go round
//! the slots (from a place that depends on the process id), so a slot is
//! not reused the moment it is freed. Interface names
//! are short and the same in every lab (each namespace is its own): `up0`
//! the node's uplink, `br0` its task bridge, `vt<i>` task `i`'s port on it,
//! `eth0` in tasks and clients; in the segment `br0` with ports `n<j>`,
//! `c<m>`, `r0`; in the router `rt0` (segment) and `rt1` (client side).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail, ensure};

use super::shell::{
    NS_PREFIX, ensure_guard_routes, exec, ip, netns_add, netns_del, pass_xdp, slot_namespaces,
    wire_checksums,
};

/// Labs that can exist side by side.
pub const SLOTS: u32 = 64;
/// Nodes per lab (the segment has room for 16 node addresses, the task
/// /24 for 16 /28s).
pub const MAX_NODES: usize = 16;
/// The first address of the segment's client range, and the last.
const CLIENT_FIRST: u8 = 32;
const CLIENT_LAST: u8 = 126;
const ROUTER_SEGMENT: u8 = 17;

/// An IPv4 subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Subnet {
        Subnet { addr, prefix }
    }

    /// Addresses in it, network and broadcast included.
    pub fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    /// The `n`-th address (0 is the network address).
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        assert!(n < self.size(), "{self} has no address number {n}");
        Ipv4Addr::from(u32::from(self.addr) + n)
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(a) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A node: its own namespace with an uplink on the segment and a bridge
/// for its tasks.
#[derive(Clone, Debug)]
pub struct Node {
    /// 1-based.
    pub index: usize,
    /// Its name in state files and for `meshd --node`: "n<index>".
    pub name: String,
    pub ns: String,
    /// The uplink (in `ns`), on the segment.
    pub uplink: String,
    pub addr: Ipv4Addr,
    /// The uplink's peer, a port of the segment's bridge.
    pub segment_port: String,
    /// The task bridge (in `ns`).
    pub bridge: String,
    pub task_subnet: Subnet,
    /// The bridge's address: the tasks' gateway.
    pub gateway: Ipv4Addr,
    pub tasks: Vec<Task>,
}

impl Node {
    /// Task hosts that fit in the task subnet.
    pub fn max_tasks(&self) -> usize {
        self.task_subnet.size() as usize - 3
    }

    /// Address of task `i` (1-based), whether or not it exists yet.
    pub fn task_addr(&self, i: usize) -> Ipv4Addr {
        assert!(
            (1..=self.max_tasks()).contains(&i),
            "node {} has room for tasks 1..={} in {}, not task {i}",
            self.name,
            self.max_tasks(),
            self.task_subnet
        );
        self.task_subnet.nth(1 + i as u32)
    }

    /// Task `i` (1-based).
    pub fn task(&self, i: usize) -> &Task {
        i.checked_sub(1)
            .and_then(|k| self.tasks.get(k))
            .unwrap_or_else(|| panic!("node {} has no task {i}", self.name))
    }
}

/// A task host: its own namespace, `eth0` a port of its node's bridge.
#[derive(Clone, Debug)]
pub struct Task {
    /// Its node's index (1-based).
    pub node: usize,
    /// 1-based, per node.
    pub index: usize,
    pub ns: String,
    pub addr: Ipv4Addr,
    /// Its port on the node's bridge (in the node's namespace).
    pub port: String,
}

/// A client namespace: `eth0` on the segment, or behind the router.
#[derive(Clone, Debug)]
pub struct Client {
    /// 1-based.
    pub index: usize,
    pub ns: String,
    pub iface: String,
    pub addrs: Vec<Ipv4Addr>,
    pub routed: bool,
}

/// The router between the segment and one client.
#[derive(Clone, Debug)]
pub struct Router {
    pub ns: String,
    pub segment_addr: Ipv4Addr,
    /// Its address on the link to the client.
    pub client_side_addr: Ipv4Addr,
    /// That link's MTU (on the router's side; the client's stays 1500).
    pub mtu: u32,
}

#[derive(Clone, Copy, Debug)]
struct ClientSpec {
    addrs: usize,
    router_mtu: Option<u32>,
}

/// What to build; see `Topology::builder`.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct TopologyBuilder {
    nodes: Vec<usize>,
    clients: Vec<ClientSpec>,
    plain_segment: bool,
}

impl TopologyBuilder {
    /// One more node with `tasks` task hosts.
    pub fn node(mut self, tasks: usize) -> Self {
        self.nodes.push(tasks);
        self
    }

    /// One more node per entry, each with that many task hosts.
    pub fn nodes(mut self, tasks: &[usize]) -> Self {
        self.nodes.extend_from_slice(tasks);
        self
    }

    /// One more client namespace on the segment with `addrs` addresses.
    pub fn client(mut self, addrs: usize) -> Self {
        self.clients.push(ClientSpec {
            addrs,
            router_mtu: None,
        });
        self
    }

    /// One more client namespace with `addrs` addresses, behind a router
    /// whose link towards it has MTU `mtu` (the client's side stays at
    /// 1500, so it advertises a large MSS): replies larger than `mtu` make
    /// the router send "fragmentation needed" to the node. One per lab.
    pub fn routed_client(mut self, addrs: usize, mtu: u32) -> Self {
        self.clients.push(ClientSpec {
            addrs,
            router_mtu: Some(mtu),
        });
        self
    }

    /// Leaves the segment plain even with several nodes: no XDP_PASS
    /// program on its ports and the uplinks' checksum offload left on.
    /// For a lab that switches them on only while nodes forward (the
    /// benchmark: XDP on a veth turns TSO off on its peer, which would
    /// slow the paths that do not forward); see `shell::pass_xdp` and
    /// `shell::wire_checksums`.
    pub fn plain_segment(mut self) -> Self {
        self.plain_segment = true;
        self
    }

    /// Claims a slot and builds everything; on failure, whatever was made
    /// is removed again.
    pub fn build(self) -> Result<Topology> {
        let n = self.nodes.len();
        ensure!(
            (1..=MAX_NODES).contains(&n),
            "a lab has 1..={MAX_NODES} nodes, not {n}"
        );
        let routed = self
            .clients
            .iter()
            .filter(|c| c.router_mtu.is_some())
            .count();
        ensure!(routed <= 1, "one client behind the router, not {routed}");
        let direct: usize = self
            .clients
            .iter()
            .filter(|c| c.router_mtu.is_none())
            .map(|c| c.addrs)
            .sum();
        ensure!(
            direct <= usize::from(CLIENT_LAST - CLIENT_FIRST) + 1,
            "{direct} client addresses do not fit on the segment"
        );
        ensure!(
            self.clients.iter().all(|c| (1..=120).contains(&c.addrs)),
            "every client has 1..=120 addresses"
        );
        // LAB.md: the guard before anything.
        ensure_guard_routes()?;
        let slot = claim_slot()?;
        let dir = std::env::temp_dir().join(format!("mesh-lab-{slot}-{}", std::process::id()));
        let mut topo = Topology {
            slot,
            segment_ns: format!("{NS_PREFIX}{slot}s"),
            segment_bridge: "br0".into(),
            nodes: Vec::new(),
            clients: Vec::new(),
            router: None,
            dir,
            created: Vec::new(),
            segment_xdp: None,
        };
        // From here on, Drop removes whatever exists.
        topo.build(&self)
            .with_context(|| format!("building lab slot {slot}"))?;
        Ok(topo)
    }
}

/// Claims a free slot by creating its segment namespace, and clears what
/// a lab that died in that slot may have left.
///
/// The search starts after the slot this process claimed last (and, for
/// the first, at a place that depends on the process id): a slot just
/// freed is not taken again at once, so a test that checks that its lab
/// left nothing behind in its slot does not see the next lab's
/// namespaces there.
fn claim_slot() -> Result<u32> {
    const UNSET: u32 = u32::MAX;
    static NEXT: AtomicU32 = AtomicU32::new(UNSET);
    let start = match NEXT.load(Ordering::Relaxed) {
        UNSET => std::process::id().wrapping_mul(17) % SLOTS,
        next => next,
    };
    for k in (0..SLOTS).map(|n| (start + n) % SLOTS) {
        let seg = format!("{NS_PREFIX}{k}s");
        if netns_add(&seg)? {
            // A live lab deletes its segment namespace last, so what else
            // is left in this slot belongs to no live lab.
            for ns in slot_namespaces(k).into_iter().filter(|ns| *ns != seg) {
                netns_del(&ns);
            }
            NEXT.store((k + 1) % SLOTS, Ordering::Relaxed);
            return Ok(k);
        }
    }
    bail!("no free lab slot ({SLOTS} labs exist? see `ip netns`)")
}

/// A built lab network; see the module doc. Everything it made goes away
/// when it is dropped (also when a test panics).
pub struct Topology {
    pub slot: u32,
    pub segment_ns: String,
    pub segment_bridge: String,
    pub nodes: Vec<Node>,
    pub clients: Vec<Client>,
    pub router: Option<Router>,
    /// A directory for the lab's files (state files), removed with it.
    pub dir: PathBuf,
    /// Namespaces made, besides the segment's.
    created: Vec<String>,
    /// The XDP_PASS program on the segment's ports (`shell::pass_xdp`),
    /// detached with the namespaces.
    segment_xdp: Option<aya::Ebpf>,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// The third octet of the slot's segment /24.
    fn base(&self) -> u8 {
        (128 + 2 * self.slot) as u8
    }

    fn seg_addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.base(), host)
    }

    /// Node `j` (1-based).
    pub fn node(&self, j: usize) -> &Node {
        j.checked_sub(1)
            .and_then(|k| self.nodes.get(k))
            .unwrap_or_else(|| panic!("the lab has nodes 1..={}, not {j}", self.nodes.len()))
    }

    /// Task `i` of node `j` (both 1-based).
    pub fn task(&self, j: usize, i: usize) -> &Task {
        self.node(j).task(i)
    }

    /// Every client address, in the order the builder listed the clients.
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        self.clients
            .iter()
            .flat_map(|c| c.addrs.iter().copied())
            .collect()
    }

    /// The client namespace that holds `addr`.
    pub fn client_with(&self, addr: Ipv4Addr) -> Result<&Client> {
        self.clients
            .iter()
            .find(|c| c.addrs.contains(&addr))
            .with_context(|| format!("no client of lab slot {} has address {addr}", self.slot))
    }

    /// Every namespace of this lab, the segment's last.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = self.created.clone();
        v.push(self.segment_ns.clone());
        v
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        ensure!(netns_add(ns)?, "namespace {ns} exists already");
        self.created.push(ns.to_string());
        ip(ns, "link set lo up")?;
        Ok(())
    }

    fn build(&mut self, spec: &TopologyBuilder) -> Result<()> {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let seg = self.segment_ns.clone();
        ip(&seg, "link set lo up")?;
        ip(
            &seg,
            &format!("link add {} type bridge", self.segment_bridge),
        )?;
        ip(&seg, &format!("link set {} up", self.segment_bridge))?;

        let n = spec.nodes.len();
        let parts = n.next_power_of_two() as u32;
        let task_prefix = 24 + parts.trailing_zeros() as u8;
        for (k, &tasks) in spec.nodes.iter().enumerate() {
            let subnet = Subnet::new(
                Ipv4Addr::new(198, 18, self.base() + 1, (k as u32 * (256 / parts)) as u8),
                task_prefix,
            );
            self.add_node(subnet)?;
            for _ in 0..tasks {
                self.add_task(k + 1)?;
            }
        }

        let mut next_direct = CLIENT_FIRST;
        for (m, c) in spec.clients.iter().enumerate() {
            let (index, ns) = (m + 1, format!("{NS_PREFIX}{}c{}", self.slot, m + 1));
            self.add_ns(&ns)?;
            let addrs: Vec<Ipv4Addr> = match c.router_mtu {
                None => {
                    let first = next_direct;
                    next_direct += c.addrs as u8;
                    ip(
                        &ns,
                        &format!("link add eth0 type veth peer name c{index} netns {seg}"),
                    )?;
                    self.join_segment(&format!("c{index}"))?;
                    (first..next_direct).map(|h| self.seg_addr(h)).collect()
                }
                Some(mtu) => {
                    let r = self.add_router(mtu)?;
                    ip(
                        &r.ns,
                        &format!("link add rt1 type veth peer name eth0 netns {ns}"),
                    )?;
                    ip(
                        &r.ns,
                        &format!("addr add {}/25 dev rt1", r.client_side_addr),
                    )?;
                    ip(&r.ns, &format!("link set rt1 mtu {mtu}"))?;
                    ip(&r.ns, "link set rt1 up")?;
                    self.router = Some(r);
                    (0..c.addrs as u8).map(|h| self.seg_addr(130 + h)).collect()
                }
            };
            for a in &addrs {
                ip(&ns, &format!("addr add {a}/25 dev eth0"))?;
            }
            ip(&ns, "link set eth0 up")?;
            if c.router_mtu.is_some() {
                ip(
                    &ns,
                    &format!(
                        "route add {}/25 via {}",
                        self.seg_addr(0),
                        self.seg_addr(129)
                    ),
                )?;
            }
            // Packets from a wire carry complete checksums; make the
            // clients' do too, so the tasks' kernels judge the DNAT's
            // checksum updates.
            exec(&ns, "ethtool -K eth0 tx off")?;
            self.clients.push(Client {
                index,
                ns,
                iface: "eth0".into(),
                addrs,
                routed: c.router_mtu.is_some(),
            });
        }
        if self.nodes.len() > 1 && !spec.plain_segment {
            // Only labs of several nodes: on a veth, an XDP program turns
            // TSO off on its peer, the node's uplink.
            let ports = self.nodes.iter().map(|n| n.segment_port.clone()).collect();
            self.segment_xdp = Some(pass_xdp(&self.segment_ns, ports)?);
            for n in &self.nodes {
                wire_checksums(&n.ns, &n.uplink)?;
            }
        }
        Ok(())
    }

    /// Puts `port` (already in the segment's namespace) into its bridge.
    fn join_segment(&self, port: &str) -> Result<()> {
        ip(
            &self.segment_ns,
            &format!("link set {port} master {} up", self.segment_bridge),
        )?;
        Ok(())
    }

    /// The node on the segment with its task bridge, forwarding and
    /// firewall as dockerd leaves a host.
    fn add_node(&mut self, task_subnet: Subnet) -> Result<()> {
        let j = self.nodes.len() + 1;
        let ns = format!("{NS_PREFIX}{}n{j}", self.slot);
        self.add_ns(&ns)?;
        let addr = self.seg_addr(j as u8);
        let port = format!("n{j}");
        ip(
            &ns,
            &format!(
                "link add up0 type veth peer name {port} netns {}",
                self.segment_ns
            ),
        )?;
        self.join_segment(&port)?;
        ip(&ns, &format!("addr add {addr}/25 dev up0"))?;
        ip(&ns, "link set up0 up")?;
        let gateway = task_subnet.nth(1);
        ip(&ns, "link add br0 type bridge")?;
        ip(
            &ns,
            &format!("addr add {gateway}/{} dev br0", task_subnet.prefix),
        )?;
        ip(&ns, "link set br0 up")?;
        exec(&ns, "sysctl -qw net.ipv4.ip_forward=1")?;
        // As dockerd leaves a host: bridged frames through iptables, FORWARD DROP.
        let _ = exec(&ns, "sysctl -qw net.bridge.bridge-nf-call-iptables=1");
        exec(&ns, "iptables -P FORWARD DROP")?;
        self.nodes.push(Node {
            index: j,
            name: format!("n{j}"),
            ns,
            uplink: "up0".into(),
            addr,
            segment_port: port,
            bridge: "br0".into(),
            task_subnet,
            gateway,
            tasks: Vec::new(),
        });
        Ok(())
    }

    /// The router: its segment side, forwarding, and the nodes' route to
    /// the client behind it. The caller adds the link to that client.
    fn add_router(&mut self, mtu: u32) -> Result<Router> {
        let ns = format!("{NS_PREFIX}{}r", self.slot);
        self.add_ns(&ns)?;
        let r = Router {
            ns: ns.clone(),
            segment_addr: self.seg_addr(ROUTER_SEGMENT),
            client_side_addr: self.seg_addr(129),
            mtu,
        };
        ip(
            &ns,
            &format!(
                "link add rt0 type veth peer name r0 netns {}",
                self.segment_ns
            ),
        )?;
        self.join_segment("r0")?;
        ip(&ns, &format!("addr add {}/25 dev rt0", r.segment_addr))?;
        ip(&ns, "link set rt0 up")?;
        exec(&ns, "sysctl -qw net.ipv4.ip_forward=1")?;
        for node in &self.nodes {
            ip(
                &node.ns,
                &format!("route add {}/25 via {}", self.seg_addr(128), r.segment_addr),
            )?;
        }
        Ok(r)
    }

    /// Adds one more task host behind node `j`'s bridge; returns its index
    /// (1-based, per node).
    pub fn add_task(&mut self, j: usize) -> Result<usize> {
        let node = self.node(j).clone();
        let i = node.tasks.len() + 1;
        ensure!(
            i <= node.max_tasks(),
            "node {} has room for {} tasks in {}",
            node.name,
            node.max_tasks(),
            node.task_subnet
        );
        let addr = node.task_addr(i);
        let ns = format!("{}t{i}", node.ns);
        self.add_ns(&ns)?;
        let port = format!("vt{i}");
        ip(
            &node.ns,
            &format!("link add {port} type veth peer name eth0 netns {ns}"),
        )?;
        ip(
            &node.ns,
            &format!("link set {port} master {} up", node.bridge),
        )?;
        ip(
            &ns,
            &format!("addr add {addr}/{} dev eth0", node.task_subnet.prefix),
        )?;
        ip(&ns, "link set eth0 up")?;
        // The lab's whole /23 (the segment and every node's task subnet)
        // through the node, as a container's default route through
        // docker_gwbridge: a task answers a task of another node that
        // called it through a node address.
        ip(
            &ns,
            &format!("route add {}/23 via {}", self.seg_addr(0), node.gateway),
        )?;
        if i.is_multiple_of(2) {
            // Half the tasks send complete checksums, half leave them partial
            // (as containers do on veth): both reply rewrites are exercised.
            exec(&ns, "ethtool -K eth0 tx off")?;
        }
        self.nodes[j - 1].tasks.push(Task {
            node: j,
            index: i,
            ns,
            addr,
            port,
        });
        Ok(i)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The segment's namespace holds the slot: it goes last.
        for ns in self.created.iter().rev() {
            netns_del(ns);
        }
        netns_del(&self.segment_ns);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let s = Subnet::new(Ipv4Addr::new(198, 18, 129, 64), 26);
        assert_eq!(s.size(), 64);
        assert_eq!(s.nth(1), Ipv4Addr::new(198, 18, 129, 65));
        assert!(s.contains(Ipv4Addr::new(198, 18, 129, 127)));
        assert!(!s.contains(Ipv4Addr::new(198, 18, 129, 128)));
        assert_eq!(s.to_string(), "198.18.129.64/26");
    }
}
