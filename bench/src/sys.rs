//! The few kernel interfaces the benchmark needs that aya 0.14 does not
//! wrap: an empty TC program (the floor the TC programs are measured
//! against, two instructions, so it needs no compiler), TCX links by
//! ifindex, the kernel's own per-program run-time statistics and per-map
//! memory accounting (both from fdinfo), batch map updates and lookups,
//! read-only mappings of memory-mappable arrays, and entering a network
//! namespace.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};
use aya_obj::generated::bpf_attach_type;
use mesh_userspace::bpfsys::{
    EXIT, MOV64_IMM, bpf_cmd, bpf_prog_type, insn, load_prog, sys_bpf, zeroed_attr,
};

/// TC_ACT_UNSPEC (TCX_NEXT under TCX): go on as if there were no program.
const TC_ACT_UNSPEC: i32 = -1;

/// Loads a TC program that does nothing (`r0 = TC_ACT_UNSPEC; exit`):
/// what any TC program pays before its first instruction, under the same
/// run-time statistics as the programs measured against it.
pub fn load_empty_tc(name: &str) -> Result<OwnedFd> {
    load_prog(
        bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS,
        &[
            insn(MOV64_IMM, 0, 0, 0, TC_ACT_UNSPEC),
            insn(EXIT, 0, 0, 0, 0),
        ],
        name,
    )
    .context("loading an empty TC program")
}

/// One BPF_PROG_TEST_RUN of a program aya does not hold (the empty TC
/// program): see `bpfsys::test_run_fd`.
pub use mesh_userspace::bpfsys::test_run_fd;

/// A TCX link: the program stays attached as long as this lives.
#[derive(Debug)]
pub struct TcxLink(#[allow(dead_code)] OwnedFd);

/// Attaches program `prog` to the TCX ingress of device `ifindex` in the
/// calling thread's network namespace.
pub fn tcx_ingress(prog: BorrowedFd<'_>, ifindex: u32) -> Result<TcxLink> {
    let mut attr = zeroed_attr();
    // SAFETY: writing the BPF_LINK_CREATE member of a zeroed union.
    unsafe {
        let l = &mut attr.link_create;
        l.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
        l.__bindgen_anon_2.target_ifindex = ifindex;
        l.attach_type = bpf_attach_type::BPF_TCX_INGRESS as u32;
    }
    let fd = sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
        .with_context(|| format!("attaching a TC program to ifindex {ifindex} (TCX ingress)"))?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor we now own.
    Ok(TcxLink(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// The key/value lines of /proc/self/fdinfo/<fd>.
pub fn fdinfo(fd: BorrowedFd<'_>) -> Result<HashMap<String, String>> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect())
}

fn field(info: &HashMap<String, String>, key: &str) -> Result<u64> {
    info.get(key)
        .with_context(|| format!("fdinfo has no {key}"))?
        .parse()
        .with_context(|| format!("fdinfo {key}"))
}

/// A program's run-time statistics: total ns in the program and runs,
/// counted by the kernel while statistics are enabled ([`StatsOn`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub ns: u64,
    pub runs: u64,
}

impl RunStats {
    pub fn of(prog: BorrowedFd<'_>) -> Result<RunStats> {
        let i = fdinfo(prog)?;
        Ok(RunStats {
            ns: field(&i, "run_time_ns")?,
            runs: field(&i, "run_cnt")?,
        })
    }

    pub fn since(self, before: RunStats) -> RunStats {
        RunStats {
            ns: self.ns - before.ns,
            runs: self.runs - before.runs,
        }
    }
}

/// The kernel's accounting of a map's memory (fdinfo `memlock`, bytes).
pub fn map_memlock(map: BorrowedFd<'_>) -> Result<u64> {
    field(&fdinfo(map)?, "memlock")
}

/// Keeps the kernel's BPF run-time statistics on (BPF_ENABLE_STATS) for as
/// long as it lives; they are off again when it drops (unless someone else
/// holds them on).
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

impl StatsOn {
    pub fn new() -> Result<StatsOn> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run-time statistics")?;
        Ok(StatsOn(fd))
    }
}

/// Writes `keys[i] -> values[i]` into `map` with BPF_MAP_UPDATE_BATCH;
/// returns how many were written.
pub fn update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<u32> {
    if keys.len() != values.len() {
        bail!("{} keys and {} values", keys.len(), values.len());
    }
    let mut attr = zeroed_attr();
    // SAFETY: writing the batch member of a zeroed union; the arrays live
    // through the call.
    unsafe {
        let b = &mut attr.batch;
        b.keys = keys.as_ptr() as u64;
        b.values = values.as_ptr() as u64;
        b.count = keys.len() as u32;
        b.map_fd = map.as_raw_fd() as u32;
    }
    sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr).context("BPF_MAP_UPDATE_BATCH")?;
    // SAFETY: the kernel wrote back how many it processed.
    Ok(unsafe { attr.batch.count })
}

/// Reads the first `keys.len()` entries of array `map` with
/// BPF_MAP_LOOKUP_BATCH (one syscall): their keys and values; returns how
/// many were read.
pub fn lookup_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &mut [K],
    values: &mut [V],
) -> Result<u32> {
    if keys.len() != values.len() {
        bail!("{} keys and {} values", keys.len(), values.len());
    }
    let mut token = 0u32;
    let mut attr = zeroed_attr();
    // SAFETY: writing the batch member of a zeroed union; the buffers live
    // through the call. No in_batch: from the first entry.
    unsafe {
        let b = &mut attr.batch;
        b.out_batch = &mut token as *mut u32 as u64;
        b.keys = keys.as_mut_ptr() as u64;
        b.values = values.as_mut_ptr() as u64;
        b.count = keys.len() as u32;
        b.map_fd = map.as_raw_fd() as u32;
    }
    match sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(_) => {}
        // The end of the map: `count` says how many came.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
    }
    // SAFETY: the kernel wrote back how many it read.
    Ok(unsafe { attr.batch.count })
}

/// A read-only shared mapping of a BPF_F_MMAPABLE array of `u32` (pairs
/// count as two): what the map holds now, without a syscall per read.
pub struct MmapU32 {
    ptr: *const u32,
    len: usize,
    bytes: usize,
}

// SAFETY: read-only, and every read is an atomic load.
unsafe impl Send for MmapU32 {}

impl MmapU32 {
    /// Maps `len` u32 of the array behind `map` (the mapping holds its own
    /// reference to the map).
    pub fn new(map: BorrowedFd<'_>, len: usize) -> Result<MmapU32> {
        let bytes = (len * 4).next_multiple_of(4096);
        // SAFETY: a shared read-only mapping of a BPF_F_MMAPABLE array of
        // at least `len` u32.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mmap of a BPF array");
        }
        Ok(MmapU32 {
            ptr: p as *const u32,
            len,
            bytes,
        })
    }

    /// Entry `i`, as it is now (None: beyond the map).
    pub fn get(&self, i: usize) -> Option<u32> {
        if i >= self.len {
            return None;
        }
        // SAFETY: in bounds; the base is page-aligned, so every entry is
        // 4-byte aligned. Another process stores to it: load atomically.
        let cell = unsafe { &*(self.ptr.add(i) as *const std::sync::atomic::AtomicU32) };
        Some(cell.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl Drop for MmapU32 {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.bytes) };
    }
}

/// The index of device `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: plain libc call on a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no device {name} in this thread's network namespace");
    }
    Ok(i)
}

/// Moves the calling thread into network namespace `ns` (/run/netns/NS)
/// for good: callers run such work on a thread of its own.
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: plain syscall on a valid descriptor.
    if unsafe { libc::setns(f.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("entering {ns}"));
    }
    Ok(())
}
