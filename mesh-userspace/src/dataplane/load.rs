//! Loading the BPF object: map sizes from the daemon's limits, every
//! program through the verifier, the aya-log buffer opened. Nothing is
//! attached here.

use anyhow::{Context, Result, bail};
use aya::programs::{SchedClassifier, Xdp};
use aya::{Ebpf, EbpfLoader};
use mesh_common::abi::*;
use tracing::debug;

use crate::plan::Limits;

/// The compiled BPF object.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_BPF_OBJ"));
/// The benchmark's floor programs (their own object; meshd never loads it).
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_FLOOR_OBJ"));

/// The programs' log buffer, bridged into this process's log.
pub type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

pub struct Loaded {
    pub ebpf: Ebpf,
    pub logger: Option<Logger>,
}

/// The sizes the loader sets, by map: everything `limits` decides.
pub fn max_entries(limits: &Limits) -> Vec<(&'static str, u32)> {
    vec![
        (MAP_SERVICES, 2 * limits.max_services),
        (MAP_SVC_STATS, limits.max_services),
        (MAP_SVC_NAMES, limits.max_services),
        (MAP_BACKENDS, limits.max_backends),
        (MAP_LOCAL_DEV, limits.max_backends),
        (MAP_NODES, limits.max_nodes),
        (MAP_NODE_HOP, limits.max_nodes),
        (MAP_NODE_BY_ADDR4, limits.max_nodes),
        (MAP_LOCAL4, limits.reply_entries()),
        (MAP_FWD4, limits.ct_entries),
        (MAP_MAGLEV, limits.maglev_entries().div_ceil(2)),
        (MAP_CT4, limits.ct_entries),
        (MAP_CT4_UDP, limits.ct_entries),
        (MAP_CT4_NEW, limits.ct_new_entries),
        (MAP_REPLY4, limits.reply_entries()),
        (MAP_SRC4, limits.max_src_ranges),
        (MAP_AFF4, limits.aff_entries),
        (MAP_AFF_TIMEOUT, limits.max_services),
    ]
}

/// Loads the object with `limits`' map sizes; `bpf_log_level` is the most
/// verbose aya-log level the programs emit (0 = off, 3 = info, 4 = debug).
/// Every map is made anew, and nothing is pinned.
pub fn load(limits: &Limits, bpf_log_level: u8) -> Result<Loaded> {
    load_with_pins(limits, bpf_log_level, None)
}

/// As [`load`], with every map pinned under `pins`: the pinned maps there
/// are used as they are (see [`super::pin::decide`], which removes the
/// pins of those that must not be), the others made and pinned.
pub fn load_with_pins(
    limits: &Limits,
    bpf_log_level: u8,
    pins: Option<&super::pin::PinDir>,
) -> Result<Loaded> {
    if BPF_OBJECT.is_empty() {
        bail!(
            "this meshd has no BPF programs: it was built with MESH_BPF_SKIP=1 (for editors \
             and linters only); rebuild without MESH_BPF_SKIP"
        );
    }
    limits.validate()?;
    raise_memlock();
    let mut loader = EbpfLoader::new();
    for (name, n) in max_entries(limits) {
        loader.map_max_entries(name, n);
    }
    if let Some(pins) = pins {
        for name in MAP_NAMES {
            loader.map_pin_path(name, pins.map(name));
        }
    }
    let clock = crate::clock::jiffy_clock();
    loader
        .override_global("CT_LIFETIMES", &limits.ct_lifetimes, true)
        .override_global("CT_CLOCK", &clock, true)
        .override_global("AYA_LOG_LEVEL", &bpf_log_level, false);
    let mut ebpf = loader.load(BPF_OBJECT).context("loading the BPF object")?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            debug!("no aya-log map in the object: {e}");
            None
        }
    };
    let xdp: &mut Xdp = ebpf
        .program_mut(PROG_XDP)
        .with_context(|| format!("program {PROG_XDP} missing"))?
        .try_into()?;
    xdp.load()
        .with_context(|| format!("the verifier refused {PROG_XDP}"))?;
    verified(xdp.info(), PROG_XDP);
    for name in [PROG_TC_UPLINK, PROG_TC_TASK, PROG_TC_INGRESS, PROG_TC_HOST] {
        let p: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("the verifier refused {name}"))?;
        verified(p.info(), name);
    }
    Ok(Loaded { ebpf, logger })
}

/// Logs how many instructions the verifier went through for a program:
/// its budget is a million, and the forward path's branches multiply.
fn verified(info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>, name: &str) {
    if let Some(n) = info.ok().and_then(|i| i.verified_instruction_count()) {
        debug!("{name}: the verifier processed {n} instructions (of 1,000,000 at most)");
    }
}

/// FNV-1a (64 bits) of the dataplane's object: the same bytes, the same
/// programs (stable across builds and compilers, unlike std's hasher).
pub fn object_hash() -> u64 {
    BPF_OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
