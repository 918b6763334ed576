//! Where the dataplane lives between meshd processes: pinned under a BPF
//! filesystem, so that it keeps forwarding while no meshd runs (a crash,
//! `kill -9`, a restart, an upgrade), and a new meshd adopts it instead of
//! starting over.
//!
//! ```text
//! <bpffs>/mesh/            (--bpffs, default /sys/fs/bpf; flock'ed by the meshd that owns it)
//!   maps/MESH_*_Vn         every map of the object, by its versioned name
//!   links/<prog>@<iface>   XDP and TCX links (netlink TC filters need no pin)
//!   clsact/<iface>/        clsact qdiscs meshd added (removed by cleanup when unused)
//! ```
//!
//! A new meshd checks every pinned map against what its own object declares
//! (type, key and value sizes, entries, flags) before it adopts anything,
//! so a layout it does not know is never misread as its own:
//! - a map of another layout (the `_Vn` suffix changed, or the sizes the
//!   flags set did) is replaced, with the reason logged;
//! - the state maps (services, tables, backends, nodes, reply entries) are
//!   adopted all together or not at all: the planner is rebuilt from them;
//! - connection tracking is adopted only with them (its entries name their
//!   slots and generations): otherwise it starts empty, and flows are
//!   matched again by Maglev (the same task while the service is
//!   unchanged);
//! - counters are adopted on their own;
//! - maps no longer in the object (an older layout) are removed once the
//!   new programs are attached.
//!
//! Programs are always loaded anew (the verifier runs) and swapped into the
//! pinned links atomically (`bpf_link_update`): a restart of the same
//! binary and an upgrade take the same path, and packets never meet a
//! moment without a program.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use mesh_common::abi::{MAP_NAMES, MapRole, map_role};
use tracing::{info, warn};

use super::load::{BPF_OBJECT, max_entries};
use crate::plan::Limits;

/// Where bpffs is mounted by default (meshd mounts it there if it is not).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// meshd's directory on the bpffs.
pub const PIN_DIR: &str = "mesh";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `p` is on a BPF filesystem.
pub fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct it is given.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct to fill.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Mounts a BPF filesystem at `at` (as Cilium does when none is mounted).
fn mount_bpffs(at: &Path) -> Result<()> {
    std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    let target = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: valid C strings for mount(2).
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if r != 0 {
        bail!(
            "no BPF filesystem at {} and mounting one failed: {} (mount -t bpf bpf {})",
            at.display(),
            std::io::Error::last_os_error(),
            at.display()
        );
    }
    Ok(())
}

/// Whether this process's mount namespace is another than PID 1's: then a
/// bpffs it mounts goes away when the last process in it exits.
fn own_mount_namespace() -> bool {
    let ns = |p: &str| std::fs::read_link(p).ok();
    ns("/proc/self/ns/mnt") != ns("/proc/1/ns/mnt")
}

/// meshd's pin directory, locked by the meshd that owns it (or by
/// `cleanup`): two processes never write the same maps.
#[derive(Debug)]
pub struct PinDir {
    pub root: PathBuf,
    _lock: File,
}

/// Why a pin directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "another meshd (or meshd cleanup) holds {0}: one meshd per node and pin directory; stop it first"
    )]
    Busy(PathBuf),
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl PinDir {
    /// Opens `<bpffs>/mesh` for a meshd that runs: mounts a BPF filesystem
    /// at `bpffs` if there is none, creates the directory, takes the lock.
    pub fn open(bpffs: &Path) -> Result<PinDir, OpenError> {
        if !is_bpffs(bpffs) {
            mount_bpffs(bpffs).map_err(OpenError::Other)?;
            info!(path = %bpffs.display(), "mounted a BPF filesystem");
            if own_mount_namespace() {
                warn!(
                    "the BPF filesystem meshd mounted at {} is in meshd's own mount namespace: \
                     the pinned dataplane goes away with it when meshd exits (mount it on the \
                     host, or bind-mount the host's into the container, to keep the dataplane \
                     across restarts)",
                    bpffs.display()
                );
            }
        }
        let root = bpffs.join(PIN_DIR);
        for d in [
            &root,
            &root.join("maps"),
            &root.join("links"),
            &root.join("clsact"),
        ] {
            std::fs::create_dir_all(d)
                .with_context(|| format!("creating {}", d.display()))
                .map_err(OpenError::Other)?;
        }
        Self::lock(root)
    }

    /// Opens `<bpffs>/mesh` if it exists (for `cleanup` and `status`),
    /// never mounting or creating anything.
    pub fn existing(bpffs: &Path) -> Result<Option<PinDir>, OpenError> {
        let root = bpffs.join(PIN_DIR);
        if !is_bpffs(bpffs) || !root.is_dir() {
            return Ok(None);
        }
        Self::lock(root).map(Some)
    }

    fn lock(root: PathBuf) -> Result<PinDir, OpenError> {
        let f = File::open(&root)
            .with_context(|| format!("opening {}", root.display()))
            .map_err(OpenError::Other)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(OpenError::Busy(root));
            }
            return Err(OpenError::Other(
                anyhow::Error::from(e).context(format!("locking {}", root.display())),
            ));
        }
        Ok(PinDir { root, _lock: f })
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn link(&self, prog: &str, iface: &str) -> PathBuf {
        self.root.join("links").join(format!("{prog}@{iface}"))
    }

    /// The marker of a clsact qdisc meshd added to `iface`.
    pub fn clsact(&self, iface: &str) -> PathBuf {
        self.root.join("clsact").join(iface)
    }

    /// Names in a subdirectory.
    fn list(&self, sub: &str) -> Vec<String> {
        crate::net::dir_names(&self.root.join(sub))
    }

    /// Pinned maps, by name.
    pub fn maps(&self) -> Vec<String> {
        self.list("maps")
    }

    /// Pinned links, as (program, interface).
    pub fn links(&self) -> Vec<(String, String)> {
        self.list("links")
            .into_iter()
            .filter_map(|n| {
                n.split_once('@')
                    .map(|(p, i)| (p.to_string(), i.to_string()))
            })
            .collect()
    }

    /// Interfaces whose clsact qdisc meshd added.
    pub fn clsacts(&self) -> Vec<String> {
        self.list("clsact")
    }

    /// Marks (or unmarks) `iface`'s clsact qdisc as added by meshd.
    pub fn mark_clsact(&self, iface: &str, added: bool) {
        let p = self.clsact(iface);
        let r = if added {
            std::fs::create_dir(&p).or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        } else {
            std::fs::remove_dir(&p)
        };
        if let Err(e) = r {
            warn!("{}: {e}", p.display());
        }
    }
}

/// What a map is, as the kernel and the object describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The shape of every map of the object, sized for `limits` as the
/// loader sizes them.
pub fn expected_shapes(limits: &Limits) -> Result<BTreeMap<&'static str, Shape>> {
    let obj = aya_obj::Object::parse(BPF_OBJECT).context("parsing the BPF object")?;
    let sizes: BTreeMap<&str, u32> = max_entries(limits).into_iter().collect();
    let mut out = BTreeMap::new();
    for name in MAP_NAMES {
        let m = obj
            .maps
            .get(*name)
            .with_context(|| format!("map {name} missing from the object"))?;
        out.insert(
            *name,
            Shape {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: sizes.get(name).copied().unwrap_or(m.max_entries()),
                flags: m.map_flags(),
            },
        );
    }
    Ok(out)
}

/// The shape of the map pinned at `path`.
pub fn pinned_shape(path: &Path) -> Result<Shape> {
    let m = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let i = m.info()?;
    Ok(Shape {
        map_type: i.map_type()? as u32,
        key_size: i.key_size(),
        value_size: i.value_size(),
        max_entries: i.max_entries(),
        flags: i.map_flags(),
    })
}

/// What a starting meshd does with what is pinned.
#[derive(Debug, Default)]
pub struct Adoption {
    /// Maps adopted as they are.
    pub adopt: BTreeSet<&'static str>,
    /// Maps made anew, and why (none for a first start).
    pub fresh: Vec<(&'static str, String)>,
    /// Whether the state maps are adopted (the planner is rebuilt from
    /// them, and connection tracking kept).
    pub state: bool,
    /// Pinned maps that are no map of this object (older layouts): removed
    /// once the new programs are attached.
    pub foreign: Vec<String>,
}

/// A map name's base and layout version: `MESH_SVC_V2` is (`MESH_SVC`, 2).
pub fn versioned(name: &str) -> Option<(&str, u32)> {
    let (base, v) = name.rsplit_once("_V")?;
    Some((base, v.parse().ok()?))
}

/// Pinned maps of another layout of `name` (same base, another version).
fn older_layouts<'a>(name: &str, pinned: &'a BTreeSet<String>) -> Vec<&'a str> {
    let Some((base, v)) = versioned(name) else {
        return Vec::new();
    };
    pinned
        .iter()
        .filter(|p| versioned(p).is_some_and(|(b, pv)| b == base && pv != v))
        .map(String::as_str)
        .collect()
}

/// Decides what to adopt, and removes the pins of pinned maps that will
/// be made anew (their programs keep them while they run: only the names
/// go). Logs every reason.
///
/// A map this meshd's object has that is not pinned is new: made empty.
/// When another layout of it is pinned (same base name, another `_Vn`),
/// its layout changed: no entry of the old one is read as the new one's.
/// With no migration from one to the other (there is none so far: add one
/// here when a layout change can carry entries over), it is made anew,
/// and if it is a state map, so are all of them (a planner cannot be
/// rebuilt from maps of which one lost its entries), and connection
/// tracking with them.
pub fn decide(dir: &PinDir, expected: &BTreeMap<&'static str, Shape>) -> Result<Adoption> {
    let pinned: BTreeMap<String, Result<Shape, String>> = dir
        .maps()
        .into_iter()
        .map(|n| {
            let shape = pinned_shape(&dir.map(&n)).map_err(|e| format!("{e:#}"));
            (n, shape)
        })
        .collect();
    let a = judge(&pinned, expected);
    let first_start = pinned.is_empty();
    for (name, why) in &a.fresh {
        if pinned.contains_key(*name) {
            warn!("pinned map {name} is not adopted: {why}; it is made anew");
            let p = dir.map(name);
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        } else if why == NEW {
            if !first_start {
                info!("map {name} is new in this layout: made empty");
            }
        } else {
            warn!("map {name} is made anew: {why}");
        }
    }
    Ok(a)
}

const NEW: &str = "new in this layout";

/// [`decide`]'s judgement, on what is pinned (each map's shape, or why it
/// could not be read) and what the object declares.
pub fn judge(
    pinned: &BTreeMap<String, Result<Shape, String>>,
    expected: &BTreeMap<&'static str, Shape>,
) -> Adoption {
    let names: BTreeSet<String> = pinned.keys().cloned().collect();
    let mut fits: BTreeMap<&'static str, Result<(), String>> = BTreeMap::new();
    // Maps new in this layout: empty is what they should hold.
    let mut new: BTreeSet<&'static str> = BTreeSet::new();
    for (name, want) in expected {
        let r = match pinned.get(*name) {
            None => {
                let older = older_layouts(name, &names);
                if older.is_empty() {
                    new.insert(name);
                    Err(NEW.to_string())
                } else {
                    Err(format!(
                        "its layout changed ({} pinned, this meshd has {name}), and there is no \
                         migration from one to the other",
                        older.join(", ")
                    ))
                }
            }
            Some(Ok(have)) if have == want => Ok(()),
            Some(Ok(have)) => Err(format!(
                "another layout or size: pinned {have}; this meshd's is {want}"
            )),
            Some(Err(e)) => Err(format!("unreadable: {e}")),
        };
        fits.insert(name, r);
    }
    let role = |n: &str| map_role(n).unwrap_or(MapRole::State);
    let state = fits
        .iter()
        .filter(|(n, _)| role(n) == MapRole::State && !new.contains(*n))
        .all(|(_, r)| r.is_ok())
        // Nothing at all pinned of the state: a first start.
        && fits
            .iter()
            .any(|(n, r)| role(n) == MapRole::State && r.is_ok());
    let mut a = Adoption {
        state,
        ..Adoption::default()
    };
    for (name, r) in &fits {
        let reason = match (r, role(name)) {
            (Ok(()), MapRole::State) if state => None,
            (Ok(()), MapRole::Flows) if state => None,
            (Ok(()), MapRole::Counters) => None,
            (Ok(()), _) => Some(
                "it depends on the state maps, which are made anew (its entries name their slots)"
                    .to_string(),
            ),
            (Err(why), _) => Some(why.clone()),
        };
        match reason {
            None => {
                a.adopt.insert(name);
            }
            Some(why) => a.fresh.push((name, why)),
        }
    }
    a.foreign = names
        .iter()
        .filter(|p| !expected.contains_key(p.as_str()))
        .cloned()
        .collect();
    a
}

/// Removes the pins of maps no longer in the object, saying why.
pub fn remove_foreign(dir: &PinDir, foreign: &[String]) {
    for name in foreign {
        let p = dir.map(name);
        match std::fs::remove_file(&p) {
            Ok(()) => info!(
                "removed pinned map {name}: no map of this meshd has that name (an older layout, \
                 replaced by this one's)"
            ),
            Err(e) => warn!("removing {}: {e}", p.display()),
        }
    }
}

/// The interface index a pinned XDP or TCX link is attached to (0 when it
/// is defunct: its device went away).
pub fn link_ifindex(fd: BorrowedFd<'_>) -> Result<u32> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) a union
    // whose XDP and TCX members both start with the ifindex.
    let mut info = [0u64; 32];
    crate::bpfsys::obj_info(fd, &mut info).context("the link's info")?;
    Ok((info[2] & 0xffff_ffff) as u32)
}

/// Whether the link pinned at `path` is attached to interface `ifindex`.
pub fn pinned_link_on(path: &Path, ifindex: u32) -> bool {
    aya::programs::links::PinnedLink::from_pin(path)
        .ok()
        .map(aya::programs::links::FdLink::from)
        .and_then(|l| link_fd_ifindex(&l).ok())
        == Some(ifindex)
}

fn link_fd_ifindex(l: &aya::programs::links::FdLink) -> Result<u32> {
    // FdLink does not lend its descriptor; its info carries the link id,
    // which opens another one.
    let id = l.info()?.id();
    let fd = crate::bpfsys::link_fd_by_id(id)?;
    link_ifindex(fd.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::abi::{MAP_BACKENDS, MAP_CT4, MAP_DROPS, MAP_SERVICES};

    fn shape(n: u32) -> Shape {
        Shape {
            map_type: 2,
            key_size: 4,
            value_size: 8,
            max_entries: n,
            flags: 0,
        }
    }

    /// Every map of the object, shaped alike (their shapes do not matter
    /// here, only whether pinned ones match).
    fn expected() -> BTreeMap<&'static str, Shape> {
        MAP_NAMES.iter().map(|n| (*n, shape(16))).collect()
    }

    fn pinned_as(exp: &BTreeMap<&'static str, Shape>) -> BTreeMap<String, Result<Shape, String>> {
        exp.iter().map(|(n, s)| (n.to_string(), Ok(*s))).collect()
    }

    #[test]
    fn nothing_pinned_is_a_first_start() {
        let a = judge(&BTreeMap::new(), &expected());
        assert!(!a.state && a.adopt.is_empty() && a.foreign.is_empty());
        assert_eq!(a.fresh.len(), MAP_NAMES.len());
        assert!(a.fresh.iter().all(|(_, why)| why == NEW));
    }

    #[test]
    fn the_same_layout_is_adopted_whole() {
        let exp = expected();
        let a = judge(&pinned_as(&exp), &exp);
        assert!(a.state);
        assert_eq!(a.adopt.len(), MAP_NAMES.len());
    }

    /// A map added by a newer layout is made empty; the rest is adopted,
    /// connection tracking included.
    #[test]
    fn a_new_map_is_made_empty_and_the_rest_adopted() {
        let exp = expected();
        let mut pinned = pinned_as(&exp);
        pinned.remove(MAP_SERVICES);
        let a = judge(&pinned, &exp);
        assert!(a.state);
        assert!(a.adopt.contains(MAP_CT4));
        assert_eq!(a.fresh, vec![(MAP_SERVICES, NEW.to_string())]);
    }

    /// A state map whose size or layout differs is never read as this
    /// one's: all state maps are made anew, and connection tracking with
    /// them; counters are kept.
    #[test]
    fn a_state_map_of_another_shape_takes_the_state_and_conntrack_along() {
        let exp = expected();
        let mut pinned = pinned_as(&exp);
        pinned.insert(MAP_BACKENDS.into(), Ok(shape(8)));
        let a = judge(&pinned, &exp);
        assert!(!a.state);
        assert!(a.adopt.contains(MAP_DROPS));
        assert!(!a.adopt.contains(MAP_CT4) && !a.adopt.contains(MAP_SERVICES));
        let why = &a.fresh.iter().find(|(n, _)| *n == MAP_BACKENDS).unwrap().1;
        assert!(
            why.contains("16 entries") && why.contains("8 entries"),
            "{why}"
        );
    }

    /// A conntrack table of another size alone is made anew; the state is
    /// adopted.
    #[test]
    fn a_conntrack_table_of_another_size_is_made_anew_alone() {
        let exp = expected();
        let mut pinned = pinned_as(&exp);
        pinned.insert(MAP_CT4.into(), Ok(shape(8)));
        let a = judge(&pinned, &exp);
        assert!(a.state);
        assert_eq!(a.fresh.len(), 1);
        assert_eq!(a.fresh[0].0, MAP_CT4);
    }

    /// An older version of a map pinned, this one's not: its layout
    /// changed; without a migration it is made anew, and being a state
    /// map, the state with it. The old one is foreign (removed later).
    #[test]
    fn a_map_of_an_older_layout_is_detected_and_never_misread() {
        let exp = expected();
        let mut pinned = pinned_as(&exp);
        let (base, v) = versioned(MAP_SERVICES).unwrap();
        let old = format!("{base}_V{}", v - 1);
        pinned.remove(MAP_SERVICES);
        pinned.insert(old.clone(), Ok(shape(16)));
        let a = judge(&pinned, &exp);
        assert!(!a.state);
        let why = &a.fresh.iter().find(|(n, _)| *n == MAP_SERVICES).unwrap().1;
        assert!(
            why.contains("layout changed") && why.contains(&old),
            "{why}"
        );
        assert_eq!(a.foreign, vec![old]);
    }

    #[test]
    fn versions_parse() {
        assert_eq!(versioned("MESH_CT4_V2"), Some(("MESH_CT4", 2)));
        assert_eq!(versioned("MESH_CT4"), None);
        assert_eq!(versioned("FOO_Vx"), None);
        for n in MAP_NAMES {
            assert!(versioned(n).is_some(), "{n} has no _Vn suffix");
            assert!(map_role(n).is_some(), "{n} has no role");
        }
    }
}
