//! `meshd run`: the daemon.

use crate::config::RunConfig;
use crate::daemon::{self, Failed};

pub fn run(cfg: RunConfig) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::Node(anyhow::anyhow!("starting the runtime: {e}")))?;
    rt.block_on(daemon::run(cfg))
}
