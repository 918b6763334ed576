//! What the daemon asks the host's network configuration.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The interface the kernel routes `addr` out of (`ip route get`).
pub fn route_dev(addr: Ipv4Addr) -> Result<String> {
    let out = Command::new("ip")
        .args(["-j", "route", "get", &addr.to_string()])
        .output()
        .context("running `ip route get` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "no route to task {addr}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j route get`")?;
    let dev = v.get(0).and_then(|r| r.get("dev")).and_then(|d| d.as_str());
    match dev {
        Some("lo") => bail!("task {addr} is an address of this host, not behind an interface"),
        Some(d) => Ok(d.to_string()),
        None => bail!("route to task {addr} names no device"),
    }
}

/// The interface that holds `addr` (`ip addr`).
pub fn iface_with_addr(addr: Ipv4Addr) -> Result<String> {
    let out = Command::new("ip")
        .args(["-j", "-4", "addr", "show"])
        .output()
        .context("running `ip addr` (iproute2)")?;
    if !out.status.success() {
        bail!("ip addr: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j addr`")?;
    let want = addr.to_string();
    for link in v.as_array().into_iter().flatten() {
        let holds = link
            .get("addr_info")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
            .any(|i| i.get("local").and_then(|l| l.as_str()) == Some(want.as_str()));
        if holds && let Some(name) = link.get("ifname").and_then(|n| n.as_str()) {
            return Ok(name.to_string());
        }
    }
    bail!("no interface holds {addr}")
}

/// The oldest kernel meshd runs on: `bpf_ktime_get_coarse_ns` (5.11) is
/// the newest helper the programs call (conntrack's clock where the tick
/// rate is unknown, see `clock`), then `bpf_redirect_neigh` (5.10);
/// memory-mapped arrays and `bpf_jiffies64` need 5.5.
pub const MIN_KERNEL: (u8, u8) = (5, 11);

/// Fails on a kernel older than [`MIN_KERNEL`], or one without TCX when
/// TCX is asked for.
pub fn check_kernel(tc: crate::dataplane::TcAttach) -> Result<()> {
    use aya::util::KernelVersion;
    let v = KernelVersion::current().context("reading the kernel version")?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("{v:?}"));
    let (major, minor) = MIN_KERNEL;
    if v < KernelVersion::new(major, minor, 0) {
        bail!(
            "kernel {release} is older than {major}.{minor}, the oldest mesh runs on \
             (its programs call bpf_ktime_get_coarse_ns, new in 5.11)"
        );
    }
    if tc == crate::dataplane::TcAttach::Tcx && v < KernelVersion::new(6, 6, 0) {
        bail!(
            "--tc-attach tcx needs kernel 6.6 or later (this is {release}); use --tc-attach netlink or auto"
        );
    }
    Ok(())
}

/// The names in directory `dir`, sorted; none if it cannot be read.
pub fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Fails unless `iface` exists.
pub fn check_iface(iface: &str) -> Result<()> {
    if !std::path::Path::new("/sys/class/net").join(iface).exists() {
        bail!("interface {iface:?} does not exist (see `ip link`)");
    }
    Ok(())
}

/// The MTU of `iface`: what packets to other nodes must fit, once
/// encapsulated.
pub fn mtu(iface: &str) -> Result<u32> {
    let p = format!("/sys/class/net/{iface}/mtu");
    let v = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    let mtu: u32 = v.trim().parse().with_context(|| format!("{p}: {v:?}"))?;
    if mtu < 576 {
        bail!("{iface} has MTU {mtu}: too small to carry flows to other nodes (pass --mtu)");
    }
    Ok(mtu)
}

/// The FIB lookups the programs make refuse to route for an interface
/// with IPv4 forwarding off; say so before attaching.
pub fn check_forwarding(iface: &str) -> Result<()> {
    let p = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
    let v = std::fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    if v.trim() != "1" {
        bail!(
            "IPv4 forwarding is off on {iface}; mesh forwards between the uplink and the tasks' \
             interfaces (Docker hosts have it on). Enable it with: sysctl -w net.ipv4.conf.{iface}.forwarding=1"
        );
    }
    Ok(())
}

/// The interfaces to attach the reply program to for the links that lead
/// to tasks: a bridge's ports (a task's replies are caught where they
/// enter the bridge, before the bridge and its netfilter hooks see them),
/// any other link itself. With each, its current ifindex (a port that was
/// replaced under the same name needs attaching again).
pub fn reply_ifaces(
    links: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeMap<String, u32> {
    let mut out = std::collections::BTreeMap::new();
    for link in links {
        let brif = std::path::Path::new("/sys/class/net")
            .join(link)
            .join("brif");
        let names: Vec<String> = match std::fs::read_dir(&brif) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => vec![link.clone()],
        };
        for n in names {
            if let Some(i) = ifindex(&n) {
                out.insert(n, i);
            }
        }
    }
    out
}

/// The name of the interface with index `i`, if it exists.
pub fn ifname(i: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call needs.
    let p = unsafe { libc::if_indextoname(i, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// An interface's index, if it exists.
pub fn ifindex(iface: &str) -> Option<u32> {
    let p = std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("ifindex");
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Where network namespaces of tasks can be found by handle: iproute2's
/// named namespaces, Docker's sandboxes.
pub const NETNS_DIRS: &[&str] = &["/run/netns", "/run/docker/netns"];

/// The interface each of `tasks` sits behind on this node, where it can
/// be found: for a task reached through a bridge, the bridge port whose
/// veth peer (in the task's network namespace) holds the task's address;
/// for a task reached through another link, that link. Tasks not found
/// (a namespace meshd cannot see, a task not started yet) are left out.
pub fn task_ports(tasks: &[Ipv4Addr]) -> std::collections::BTreeMap<Ipv4Addr, u32> {
    find_tasks(tasks)
        .into_iter()
        .map(|(t, f)| (t, f.port))
        .collect()
}

/// Where a local task was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskFound {
    /// The interface it sits behind (see [`task_ports`]).
    pub port: u32,
    /// Its link, when its end was found in a namespace of its own.
    pub link: Option<crate::desired::TaskLink>,
}

/// As [`task_ports`], with each task's link where its end (a veth whose
/// other end is the port, holding the task's address) was found in a
/// network namespace other than this one: the Ethernet addresses its
/// packets carry (the task's, and the bridge's or the port's), so they
/// can be delivered straight into that namespace.
pub fn find_tasks(tasks: &[Ipv4Addr]) -> std::collections::BTreeMap<Ipv4Addr, TaskFound> {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    // Host ends of veths that may lead to tasks, by ifindex: their peer's
    // ifindex in its own namespace, and the MAC the task's packets come
    // from on this side.
    let mut ends: BTreeMap<u32, (u32, [u8; 6])> = BTreeMap::new();
    let mut wanted: Vec<Ipv4Addr> = Vec::new();
    for &t in tasks {
        let Ok(dev) = route_dev(t) else { continue };
        let brif = std::path::Path::new("/sys/class/net")
            .join(&dev)
            .join("brif");
        let Some(gw) = mac(&dev) else { continue };
        if brif.exists() {
            for p in std::fs::read_dir(&brif).into_iter().flatten().flatten() {
                let name = p.file_name().to_string_lossy().into_owned();
                if let (Some(i), Some(peer)) = (ifindex(&name), link_index(&name)) {
                    ends.insert(i, (peer, gw));
                }
            }
            wanted.push(t);
            continue;
        }
        let Some(i) = ifindex(&dev) else { continue };
        out.insert(
            t,
            TaskFound {
                port: i,
                link: None,
            },
        );
        if let Some(peer) = link_index(&dev) {
            ends.insert(i, (peer, gw));
            wanted.push(t);
        }
    }
    if wanted.is_empty() {
        return out;
    }
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    // Each namespace meshd can see (not its own): its interfaces whose
    // peer is one of those ends (and whose ifindex that end names), with
    // their addresses and MAC.
    {
        for ns in namespaces(own) {
            if wanted
                .iter()
                .all(|t| out.get(t).is_some_and(|f: &TaskFound| f.link.is_some()))
            {
                return out;
            }
            // Every family: with -4, ip leaves out the links' MACs.
            let Ok(o) = Command::new("nsenter")
                .arg(format!("--net={}", ns.display()))
                .args(["ip", "-j", "addr", "show"])
                .output()
            else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
                continue;
            };
            for link in v.as_array().into_iter().flatten() {
                let (Some(idx), Some(end)) = (
                    link.get("ifindex").and_then(|x| x.as_u64()),
                    link.get("link_index").and_then(|x| x.as_u64()),
                ) else {
                    continue;
                };
                let Some(&(peer, gateway_mac)) = ends.get(&(end as u32)) else {
                    continue;
                };
                if peer != idx as u32 {
                    continue;
                }
                let task_mac = link
                    .get("address")
                    .and_then(|x| x.as_str())
                    .and_then(parse_mac);
                for a in link
                    .get("addr_info")
                    .and_then(|x| x.as_array())
                    .into_iter()
                    .flatten()
                {
                    if let Some(addr) = a
                        .get("local")
                        .and_then(|x| x.as_str())
                        .and_then(|s| s.parse::<Ipv4Addr>().ok())
                        && wanted.contains(&addr)
                    {
                        out.insert(
                            addr,
                            TaskFound {
                                port: end as u32,
                                link: task_mac.map(|task_mac| crate::desired::TaskLink {
                                    ifindex: end as u32,
                                    peer: true,
                                    task_mac,
                                    gateway_mac,
                                }),
                            },
                        );
                    }
                }
            }
        }
    }
    out
}

/// The network namespaces a task may sit in, each once and without
/// `own` (this process's, by inode): those bound under [`NETNS_DIRS`]
/// (`ip netns`, dockerd's default exec root), then those of every
/// process. A dockerd with another `--exec-root` binds its containers'
/// namespaces elsewhere, but a container never runs without a process.
pub fn namespaces(own: Option<u64>) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::BTreeSet::new();
    if let Some(o) = own {
        seen.insert(o);
    }
    let bound = NETNS_DIRS
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()));
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flat_map(|rd| rd.flatten())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    bound
        .chain(procs)
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| seen.insert(m.ino()))
                .unwrap_or(false)
        })
        .collect()
}

/// An interface's Ethernet address, if it has one.
pub fn mac(iface: &str) -> Option<[u8; 6]> {
    let p = std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("address");
    parse_mac(std::fs::read_to_string(p).ok()?.trim())
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// The ifindex of a veth's peer (in the peer's namespace), if `iface` is
/// one.
fn link_index(iface: &str) -> Option<u32> {
    let p = std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("iflink");
    let v: u32 = std::fs::read_to_string(p).ok()?.trim().parse().ok()?;
    (Some(v) != ifindex(iface)).then_some(v)
}

/// `net.ipv4.ip_local_reserved_ports` of this namespace: ports the kernel
/// never picks as a local port for an outgoing connection. meshd adds the
/// published ports (and the range they are assigned from), so that none of
/// the node's own connections takes a published port as its local one,
/// and puts the setting back as it found it when it exits (unless the
/// dataplane stays: then the ports stay reserved, and `meshd cleanup`
/// puts it back). The setting as found is kept in the state directory
/// before anything is written, so a meshd that was killed is not taken
/// for the host's own settings by the next one.
pub struct ReservedPorts {
    held: Held,
    /// What meshd wrote last.
    written: Option<String>,
}

/// The file in the state directory that holds the setting as meshd found
/// it, while meshd's is in force.
pub const RESERVED_PORTS_FILE: &str = "ip_local_reserved_ports.orig";

/// Puts back the setting a meshd kept in `state_dir` (after one that left
/// its own in force); says whether there was one.
pub fn restore_reserved_ports(state_dir: &std::path::Path, dry_run: bool) -> Result<bool> {
    restore_kept(state_dir, RESERVED_PORTS_FILE, RESERVED_PORTS, dry_run)
}

/// Writes the setting kept in `state_dir`'s `file` back to `sysctl` and
/// removes the file; says whether there was one.
fn restore_kept(
    state_dir: &std::path::Path,
    file: &str,
    sysctl: &str,
    dry_run: bool,
) -> Result<bool> {
    let p = state_dir.join(file);
    let original = match std::fs::read_to_string(&p) {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    if !dry_run {
        std::fs::write(sysctl, format!("{}\n", original.trim()))
            .with_context(|| format!("writing {sysctl}"))?;
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(true)
}

/// A sysctl meshd holds while its dataplane runs (`ReservedPorts`,
/// `AcceptLocal`): the setting as found (taken from the state directory
/// when a previous meshd left its own in force), kept there before meshd
/// first writes its own, put back when meshd exits unless the dataplane
/// stays (`keep`), else by `meshd cleanup` (`restore_kept`).
struct Held {
    sysctl: &'static str,
    /// The setting as found (`None`: unreadable).
    original: Option<String>,
    /// `original` came from the state directory: a previous meshd's
    /// setting is in force.
    inherited: bool,
    /// Where the original is kept while meshd's setting is in force.
    saved: std::path::PathBuf,
    /// Leave the setting in force at exit.
    keep: bool,
}

impl Held {
    fn find(sysctl: &'static str, state_dir: &std::path::Path, file: &str) -> Self {
        let saved = state_dir.join(file);
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
        };
        let kept = read(&saved);
        Self {
            sysctl,
            inherited: kept.is_some(),
            original: kept.or_else(|| read(std::path::Path::new(sysctl))),
            saved,
            keep: false,
        }
    }

    /// Keeps the original in the state directory, unless it is there.
    fn save(&self) -> Result<()> {
        let Some(original) = &self.original else {
            return Ok(());
        };
        if self.saved.exists() {
            return Ok(());
        }
        self.saved
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&self.saved, format!("{original}\n")))
            .with_context(|| {
                format!(
                    "keeping the original {} in {}",
                    self.sysctl,
                    self.saved.display()
                )
            })
    }

    /// Puts the original back and drops the kept copy, unless the
    /// dataplane stays.
    fn put_back(&self) {
        if self.keep {
            return;
        }
        // With its newline: writing nothing at all changes nothing.
        if let Some(original) = &self.original
            && std::fs::write(self.sysctl, format!("{original}\n")).is_ok()
        {
            let _ = std::fs::remove_file(&self.saved);
        }
    }
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

impl ReservedPorts {
    /// The setting as found, to be kept in `state_dir` (or taken from
    /// there when a previous meshd left its own setting in force).
    pub fn kept_in(state_dir: &std::path::Path) -> Self {
        Self {
            held: Held::find(RESERVED_PORTS, state_dir, RESERVED_PORTS_FILE),
            written: None,
        }
    }

    /// Leaves the setting in force when dropped (the dataplane stays).
    pub fn keep(&mut self) {
        self.held.keep = true;
    }

    /// Reserves `range` and `ports` (besides what was reserved before
    /// meshd). Warns, once per set, about published ports inside the
    /// ephemeral range (`ip_local_port_range`), which they are now taken
    /// out of.
    pub fn reserve(&mut self, range: Option<&std::ops::RangeInclusive<u16>>, ports: &[u16]) {
        let Some(original) = &self.held.original else {
            return;
        };
        let mut parts: Vec<String> = original
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(r) = range {
            parts.push(format!("{}-{}", r.start(), r.end()));
        }
        let mut ephemeral_hits = Vec::new();
        let eph = std::fs::read_to_string(LOCAL_PORT_RANGE)
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
                Some((it.next()??, it.next()??))
            });
        let mut ports: Vec<u16> = ports.to_vec();
        ports.sort();
        ports.dedup();
        for p in ports {
            if range.is_some_and(|r| r.contains(&p)) {
                continue;
            }
            if eph.is_some_and(|(lo, hi)| (lo..=hi).contains(&p)) {
                ephemeral_hits.push(p);
            }
            parts.push(p.to_string());
        }
        let want = parts.join(",");
        if self.written.as_deref() == Some(want.as_str()) {
            return;
        }
        if let Err(e) = self.held.save() {
            tracing::warn!("{e:#}; not reserving published ports");
            return;
        }
        if !ephemeral_hits.is_empty() {
            let (lo, hi) = eph.unwrap_or_default();
            tracing::warn!(
                "published ports {} lie in ip_local_port_range ({lo}-{hi}): \
                 reserved, the node's own connections no longer use them as local ports",
                ephemeral_hits
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        match std::fs::write(RESERVED_PORTS, format!("{want}\n")) {
            Ok(()) => self.written = Some(want),
            Err(e) => tracing::warn!(
                "reserving published ports in {RESERVED_PORTS}: {e}; the node's own connections \
                 may take one as their local port (mesh then leaves their packets to them)"
            ),
        }
    }
}

impl Drop for ReservedPorts {
    fn drop(&mut self) {
        if self.written.is_some() {
            self.held.put_back();
        }
    }
}

/// `accept_local` on the loopback device, on while the programs run.
/// Replies to flows the node's own processes start (to a published port
/// on one of its addresses) come from an address of the node; the
/// programs hand them to the node's stack through the loopback device,
/// and the stack drops a packet with a local source that arrives on a
/// device unless that device accepts local sources. The loopback carries
/// nothing but what the node sends itself (and what the programs hand
/// it), so this lets nothing in from outside. As `ReservedPorts`: the
/// setting as found is kept in the state directory before anything is
/// written, put back when meshd exits, unless the dataplane stays
/// (`keep`: the programs still hand replies in), then by `meshd cleanup`.
pub struct AcceptLocal {
    held: Held,
    /// meshd's setting is in force (written now, or by a previous meshd).
    changed: bool,
}

const LOOPBACK_ACCEPT_LOCAL: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";

/// The file in the state directory that holds the loopback's
/// `accept_local` as meshd found it, while meshd's is in force.
pub const ACCEPT_LOCAL_FILE: &str = "lo_accept_local.orig";

impl AcceptLocal {
    /// Turns it on, keeping the setting as found in `state_dir` (or taking
    /// it from there when a previous meshd left its own in force).
    pub fn enable(state_dir: &std::path::Path) -> Result<Self> {
        let held = Held::find(LOOPBACK_ACCEPT_LOCAL, state_dir, ACCEPT_LOCAL_FILE);
        let now = std::fs::read_to_string(LOOPBACK_ACCEPT_LOCAL)
            .with_context(|| format!("reading {LOOPBACK_ACCEPT_LOCAL}"))?;
        let on = now.trim() == "1";
        if !on {
            if !held.inherited {
                held.save()?;
            }
            std::fs::write(LOOPBACK_ACCEPT_LOCAL, "1\n")
                .with_context(|| format!("writing 1 to {LOOPBACK_ACCEPT_LOCAL}"))?;
        }
        Ok(Self {
            changed: held.inherited || !on,
            held,
        })
    }

    /// Leaves the setting in force when dropped (the dataplane stays).
    pub fn keep(&mut self) {
        self.held.keep = true;
    }
}

impl Drop for AcceptLocal {
    fn drop(&mut self) {
        if self.changed {
            self.held.put_back();
        }
    }
}

/// Puts back the loopback's `accept_local` a meshd kept in `state_dir`
/// (after one that left its own in force); says whether there was one.
pub fn restore_accept_local(state_dir: &std::path::Path, dry_run: bool) -> Result<bool> {
    restore_kept(state_dir, ACCEPT_LOCAL_FILE, LOOPBACK_ACCEPT_LOCAL, dry_run)
}
