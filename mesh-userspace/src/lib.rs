//! mesh user space: the state file, the desired map contents, and the
//! dataplane loader that keeps the BPF maps in sync. `meshd` (main.rs)
//! wires them to the command line, a file watcher and the admin endpoint.

pub mod admin;
pub mod dataplane;
pub mod desired;
pub mod net;
pub mod plan;
pub mod sim;
pub mod state;
