//! Neighbour entries for the next hops to other nodes, kept resolved by
//! the kernel ("managed", kernel 5.16+), as Cilium keeps them for its XDP
//! path.
//!
//! XDP sends a packet to another node only if the FIB lookup finds the
//! next hop's MAC address; otherwise the packet takes a detour through TC
//! (`bpf_redirect_neigh`), where the first packet towards a next hop not
//! resolved yet was seen lost, and a UDP client's request with it. With a
//! managed entry per next hop, the kernel resolves it before the first
//! packet and refreshes it for as long as it exists, so forwarding stays
//! on the XDP path. On kernels without managed entries, resolution is
//! only started (`NTF_USE`), once per next hop.
//!
//! Only entries meshd created are removed: when their node leaves, and at
//! exit.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};
use tracing::{debug, warn};

const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NDA_DST: u16 = 1;
const NDA_FLAGS_EXT: u16 = 15;
/// `ndm_flags`: resolve now (any kernel).
const NTF_USE: u8 = 0x01;
/// `NDA_FLAGS_EXT`: keep it resolved (5.16+).
const NTF_EXT_MANAGED: u32 = 0x1;

/// The next hop towards `addr` and the device it is on (`ip route get`):
/// `addr` itself on a link of this node, or the gateway.
pub fn next_hop(addr: Ipv4Addr) -> Result<(Ipv4Addr, String)> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &addr.to_string()])
        .output()
        .context("running `ip route get` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "no route to node {addr}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j route get`")?;
    let r = v.get(0).context("`ip route get` said nothing")?;
    let dev = r
        .get("dev")
        .and_then(|d| d.as_str())
        .context("the route names no device")?;
    if dev == "lo" {
        bail!("node {addr} is an address of this host");
    }
    let via = match r.get("gateway").and_then(|g| g.as_str()) {
        Some(g) => g.parse().with_context(|| format!("gateway {g:?}"))?,
        None => addr,
    };
    Ok((via, dev.to_string()))
}

/// The managed entries meshd made, by (device, next hop).
#[derive(Default)]
pub struct Neighbours {
    made: BTreeMap<(String, Ipv4Addr), ()>,
    /// Next hops per node address, as found.
    hops: BTreeMap<Ipv4Addr, (Ipv4Addr, String)>,
    /// The kernel has no managed entries: resolution is only started.
    unmanaged: bool,
}

impl Neighbours {
    /// Keeps an entry for the next hop of each of `nodes` (other nodes'
    /// addresses) and removes those of nodes that left. Failures are
    /// logged: forwarding still works through TC without them.
    pub fn follow(&mut self, nodes: &[Ipv4Addr]) {
        self.hops.retain(|a, _| nodes.contains(a));
        for &a in nodes {
            if self.hops.contains_key(&a) {
                continue;
            }
            match next_hop(a) {
                Ok(h) => {
                    self.hops.insert(a, h);
                }
                Err(e) => warn!("node {a}: {e:#}; its packets resolve the next hop as they go"),
            }
        }
        let want: BTreeMap<(String, Ipv4Addr), ()> = self
            .hops
            .values()
            .map(|(via, dev)| ((dev.clone(), *via), ()))
            .collect();
        let gone: Vec<(String, Ipv4Addr)> = self
            .made
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for (dev, via) in gone {
            if let Err(e) = request(RTM_DELNEIGH, &dev, via, 0, None, 0) {
                debug!("removing neighbour {via} on {dev}: {e:#}");
            }
            self.made.remove(&(dev, via));
        }
        for (dev, via) in want.into_keys() {
            if self.made.contains_key(&(dev.clone(), via)) {
                continue;
            }
            match self.add(&dev, via) {
                Ok(()) => {
                    debug!(%via, %dev, managed = !self.unmanaged, "neighbour entry for a node's next hop");
                    if !self.unmanaged {
                        self.made.insert((dev, via), ());
                    }
                }
                Err(e) => warn!("neighbour {via} on {dev}: {e:#}"),
            }
        }
    }

    fn add(&mut self, dev: &str, via: Ipv4Addr) -> Result<()> {
        let flags = NLM_F_CREATE | NLM_F_REPLACE;
        if !self.unmanaged {
            // Never over an entry someone configured (permanent, static).
            let first = request(
                RTM_NEWNEIGH,
                dev,
                via,
                0,
                Some(NTF_EXT_MANAGED),
                NLM_F_CREATE,
            );
            let r = match first {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    if configured(dev, via) {
                        bail!("left as configured (permanent)");
                    }
                    request(RTM_NEWNEIGH, dev, via, 0, Some(NTF_EXT_MANAGED), flags)
                }
                r => r,
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    warn!(
                        "this kernel keeps no managed neighbour entries (5.16+): next hops to \
                         other nodes are resolved once, then as packets need them"
                    );
                    self.unmanaged = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Starts resolution of an entry the kernel owns: nothing to remove.
        request(RTM_NEWNEIGH, dev, via, NTF_USE, None, flags)?;
        Ok(())
    }

    /// Forgets the entries meshd made without removing them: a pinned
    /// dataplane goes on forwarding through them after meshd exits, and
    /// the next meshd takes them over.
    pub fn keep(&mut self) {
        self.made.clear();
        self.hops.clear();
    }

    /// Removes every entry meshd made.
    pub fn clear(&mut self) {
        self.hops.clear();
        self.follow(&[]);
    }
}

impl Drop for Neighbours {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Whether the entry for `addr` on `dev` was configured (permanent or
/// without ARP), not learned.
fn configured(dev: &str, addr: Ipv4Addr) -> bool {
    let out = Command::new("ip")
        .args(["-j", "neigh", "show", &addr.to_string(), "dev", dev])
        .output();
    let Ok(out) = out else { return true };
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("PERMANENT") || text.contains("NOARP")
}

/// One neighbour request on `dev` for `addr`, acknowledged.
fn request(
    kind: u16,
    dev: &str,
    addr: Ipv4Addr,
    ndm_flags: u8,
    ext: Option<u32>,
    flags: u16,
) -> std::io::Result<()> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut body = Vec::with_capacity(32);
    // struct ndmsg: family, pad, pad, ifindex, state (NUD_NONE), flags, type.
    body.push(libc::AF_INET as u8);
    body.extend_from_slice(&[0; 3]);
    body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    body.extend_from_slice(&0u16.to_ne_bytes());
    body.push(ndm_flags);
    body.push(0);
    attr(&mut body, NDA_DST, &addr.octets());
    if let Some(e) = ext {
        attr(&mut body, NDA_FLAGS_EXT, &e.to_ne_bytes());
    }
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    netlink(&msg)
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

/// Sends one request on a NETLINK_ROUTE socket and reads its
/// acknowledgment.
fn netlink(msg: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return Err(std::io::Error::other("unexpected netlink answer"));
    }
    match i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]) {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(-e)),
    }
}
