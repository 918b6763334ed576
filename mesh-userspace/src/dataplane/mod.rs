//! The BPF dataplane, in the pieces the daemon owns separately:
//!
//! - [`load`]: the object, loaded (the verifier runs) with the daemon's
//!   map sizes, and its aya-log buffer;
//! - [`attach`]: [`Programs`], which attaches XDP and TC to the uplink and
//!   the reply program to the ports that lead to local tasks;
//! - [`writer`]: [`MapWriter`], which carries out the planner's [`Op`]s,
//!   and [`Applier`], the planner and the writer together;
//! - [`stats`]: [`StatsReader`], which reads the counter maps through its
//!   own file descriptors, so metrics never wait for a writer (and a
//!   `status` command can read pinned maps from another process);
//! - [`pin`]: where the dataplane lives between meshd processes, and what
//!   a starting meshd adopts of it; [`cleanup`]: removing all of it.
//!
//! [`Dataplane`] bundles them for callers that want all of them in one
//! place (tests, fixtures, the benchmark: [`Dataplane::load`], nothing
//! pinned); the daemon loads it pinned ([`Dataplane::load_pinned`]) and
//! splits it up with [`Dataplane::into_parts`].
//!
//! ## Recovering the planner after a restart
//! Everything the [`Planner`](crate::plan::Planner) knows is in the maps:
//! the port array gives each published port's service slot (`svc_id * 2 +
//! half`), `MESH_SVC_V2` its generation and flags, `MESH_NAMES_V1` the
//! name of the service that owns it, `MESH_BE_V1` every backend's address,
//! port, node slot and generation, `MESH_LOCAL4_V1` the identity of local
//! ones, `MESH_NODES_V1` every node's address and generation,
//! `MESH_REPLY4_V2` the reply entries, `MESH_ADDR4_V1` this node's
//! addresses, `MESH_META_V1` the generations reserved so far (free slots
//! are taken above them, so no (slot, generation) pair a conntrack entry
//! may hold is handed out twice). A restarted daemon rebuilds its planner
//! from them ([`Planner::adopt`](crate::plan::Planner::adopt), matching
//! them to the first state its source gives), then plans against that
//! state, which writes only the difference. Retired reply entries whose
//! backend is gone restart their grace period.

use anyhow::Result;
use mesh_common::abi::{DropReason, SvcStats};

use crate::desired::Desired;
use crate::model::Proto;
use crate::plan::{Limits, Report};

pub mod attach;
pub mod cleanup;
pub mod load;
pub mod pin;
pub mod stats;
pub mod sweep;
pub mod writer;

pub use attach::{DEFAULT_INTERCEPT, Intercept, OnExit, Programs, TcAttach, XdpAttach};
pub use load::{BPF_OBJECT, FLOOR_OBJECT};
pub use stats::StatsReader;
pub use writer::{Applier, ApplyError, MapWriter, Writer};

/// The loaded object, its map writer and planner, its stats reader and its
/// log buffer.
pub struct Dataplane {
    pub programs: Programs,
    pub applier: Applier,
    pub stats: StatsReader,
    pub logger: Option<load::Logger>,
}

impl Dataplane {
    /// Loads the object and its programs (the verifier runs here) with the
    /// given map sizes. Nothing is attached yet. `bpf_log_level` is the
    /// most verbose aya-log level the programs emit (0 = off, 3 = info,
    /// 4 = debug).
    pub fn load(limits: Limits, bpf_log_level: u8) -> Result<Self> {
        Self::load_with(limits, bpf_log_level, TcAttach::Auto)
    }

    /// As [`Dataplane::load`], attaching TC programs as `tc` says.
    pub fn load_with(limits: Limits, bpf_log_level: u8, tc: TcAttach) -> Result<Self> {
        let mut loaded = load::load(&limits, bpf_log_level)?;
        // The reader first: the writer takes maps out of the object.
        let stats = StatsReader::new(&loaded.ebpf)?;
        let writer = MapWriter::new(&mut loaded.ebpf, &limits)?;
        Ok(Self {
            programs: Programs::new(loaded.ebpf, tc),
            applier: Applier::new(limits, writer),
            stats,
            logger: loaded.logger,
        })
    }

    /// Loads the object against the maps pinned under `pins` (see
    /// [`pin`]: what fits is adopted, the rest made anew and pinned), the
    /// programs to be attached through pinned links, kept or detached at
    /// exit as `on_exit` says. Nothing is attached yet. Says what was
    /// adopted; when the state maps were, [`Dataplane::adopt`] rebuilds the
    /// planner from them.
    pub fn load_pinned(
        limits: Limits,
        bpf_log_level: u8,
        tc: TcAttach,
        pins: pin::PinDir,
        on_exit: OnExit,
    ) -> Result<(Self, pin::Adoption)> {
        let expected = pin::expected_shapes(&limits)?;
        let adoption = pin::decide(&pins, &expected)?;
        let mut loaded = load::load_with_pins(&limits, bpf_log_level, Some(&pins))?;
        let stats = StatsReader::new(&loaded.ebpf)?;
        let writer = MapWriter::new(&mut loaded.ebpf, &limits)?;
        Ok((
            Self {
                programs: Programs::new(loaded.ebpf, tc).pinned(pins, on_exit),
                applier: Applier::new(limits, writer),
                stats,
                logger: loaded.logger,
            },
            adoption,
        ))
    }

    pub fn into_parts(self) -> (Programs, Applier, StatsReader, Option<load::Logger>) {
        (self.programs, self.applier, self.stats, self.logger)
    }

    pub fn ebpf(&self) -> &aya::Ebpf {
        self.programs.ebpf()
    }

    pub fn ebpf_mut(&mut self) -> &mut aya::Ebpf {
        self.programs.ebpf_mut()
    }

    pub fn limits(&self) -> &Limits {
        self.applier.planner().limits()
    }

    /// Makes the maps hold `d` (see [`Applier::apply`]).
    pub fn apply(&mut self, d: &Desired) -> Result<Report> {
        Ok(self.applier.apply(d)?)
    }

    /// Per service (name, protocol, published port) counters, summed over CPUs.
    pub fn service_stats(&self) -> Result<Vec<(String, Proto, u16, SvcStats)>> {
        self.stats.services(&self.applier.service_index())
    }

    /// Drop counters by reason, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>> {
        self.stats.drops()
    }
}
