//! Where state comes from. A source yields whole, validated [`State`]
//! snapshots, or says why the latest one was refused, through a `watch`
//! channel: the daemon always sees the newest word and never a partial one.
//! Sources know their own format (the state file: TOML; Docker: the Engine
//! API); the daemon, the planner and the dataplane know only [`State`].
//!
//! - [`file`]: a state file, polled and reloaded on demand (SIGHUP);
//! - [`docker`]: a Docker swarm, through the Engine API, on managers and
//!   workers.
//!
//! A new source is a module here with a `spawn` that returns a
//! [`Updates`] receiver, and a variant of [`crate::config::SourceConfig`].

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::model::State;

pub mod docker;
pub mod file;
pub mod ports;

/// The latest word from a source.
#[derive(Clone, Debug)]
pub enum Update {
    /// A whole, validated state. Sent again (the same or an equal one)
    /// when a reload is forced.
    State(Arc<State>),
    /// The source's latest state was refused; the daemon keeps the last
    /// good one. The text names what is wrong (file, field, value).
    Refused(Arc<str>),
    /// The source cannot be read just now (the state file is missing or
    /// unreadable, descriptors ran out, Docker is unreachable); the daemon
    /// keeps the last good state and the source keeps trying. Said once
    /// per distinct reason.
    Unavailable(Arc<str>),
}

/// What the daemon follows.
pub type Updates = watch::Receiver<Update>;

/// When a source last read its input and found a valid state in it,
/// changed or not. Sources send a state only when it changes; this is how
/// the daemon (and the node's health answer) tells a source that keeps up
/// from one that has stalled.
#[derive(Clone, Debug, Default)]
pub struct Beat(Arc<Mutex<Option<Instant>>>);

impl Beat {
    /// The source has just read a valid state.
    pub fn beat(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// When it last did.
    pub fn last(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
