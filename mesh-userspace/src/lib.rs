//! mesh user space: the daemon `meshd` and what it is made of, in the
//! order state flows through it:
//!
//! - [`cli`] and [`config`]: the command line, turned into a validated
//!   configuration (config errors exit 64);
//! - [`commands`]: one module per subcommand (`run`, `check`);
//! - [`source`]: where state comes from (the state file; a new source is a
//!   module there), yielding whole, validated [`model::State`] snapshots;
//! - [`model`]: the state itself (nodes, services, ports, tasks) and its
//!   validation, whatever the source;
//! - [`desired`]: what one node's maps should hold for a state;
//! - [`plan`]: the ordered map writes from what was applied to that;
//! - [`dataplane`]: the BPF object (load, attach, write, read counters);
//! - [`daemon`]: the reconcile loop that owns source -> desired -> plan ->
//!   writer; [`admin`]: `/metrics`, `/ready`, `/live`, and the HTTP
//!   serving the health port shares; [`health`]: the node's and services'
//!   health answers for load balancers, and the drain switch; [`net`]: what
//!   the host's network configuration says;
//! - [`sim`]: the same plan applied to host tables, for tests and tools.

pub mod admin;
pub mod bpfsys;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod desired;
pub mod explain;
pub mod health;
pub mod model;
pub mod neigh;
pub mod net;
pub mod plan;
pub mod sim;
pub mod source;
pub mod status;
#[cfg(test)]
mod test_rng;
