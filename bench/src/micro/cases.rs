//! The micro-benchmark's cases that run a program with BPF_PROG_TEST_RUN
//! (repeat = 1), and the frames they feed it. Adding a case is one entry
//! in `micro::cases` (mod.rs): a name, a program, a world, frames and
//! what every call must return.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use super::worlds::{Expect, WEB_TCP, World};
use crate::util::{median, r1};

/// What a case feeds its program.
pub enum Frames {
    /// The same frame every call (the kernel copies data_in afresh each call).
    One(Vec<u8>),
    /// A different frame every call (new flows), frame `i` made by `make`.
    /// `replay`: every batch starts from the first again (its flows are
    /// forgotten in between); otherwise they never repeat.
    Each {
        make: Box<dyn Fn(usize) -> Vec<u8>>,
        next: usize,
        replay: bool,
    },
}

impl Frames {
    pub fn each(make: impl Fn(usize) -> Vec<u8> + 'static, replay: bool) -> Frames {
        Frames::Each {
            make: Box::new(make),
            next: 0,
            replay,
        }
    }

    /// Called before each batch.
    pub fn start_batch(&mut self) {
        if let Frames::Each {
            next, replay: true, ..
        } = self
        {
            *next = 0;
        }
    }

    pub fn next(&mut self) -> Vec<u8> {
        match self {
            Frames::One(f) => f.clone(),
            Frames::Each { make, next, .. } => {
                *next += 1;
                make(*next - 1)
            }
        }
    }

    /// The frame the next call gets, without using it up.
    pub fn peek(&self) -> Vec<u8> {
        match self {
            Frames::One(f) => f.clone(),
            Frames::Each { make, next, .. } => make(*next),
        }
    }

    pub fn frame_bytes(&self) -> usize {
        self.peek().len()
    }
}

/// Counter check after each batch: the measured service's packet counter
/// must grow by one per call, its new-flow counter by one per call for
/// new flows and not at all otherwise.
#[derive(Clone, Copy)]
pub struct StatsCheck {
    pub new_flows: bool,
    /// The service's published TCP port.
    pub port: u16,
}

/// What happens to conntrack after each batch (untimed).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum AfterBatch {
    Nothing,
    /// Empty the unconfirmed table, where new flows go, so that every
    /// batch starts from the same table and its flows are unseen again;
    /// every call must have left exactly one entry.
    ClearNewFlows,
    /// The same for `floor_track`'s unconfirmed table.
    ClearFloorFlows,
}

impl AfterBatch {
    /// Whether every batch starts from an emptied table (the warm-up
    /// then runs a whole batch: see `micro::run`).
    pub fn clears(self) -> bool {
        self != AfterBatch::Nothing
    }
}

impl World {
    /// Empties the table `after` names; how many entries it held (`None`:
    /// nothing to empty).
    fn clear(&mut self, after: AfterBatch) -> Result<Option<usize>> {
        match after {
            AfterBatch::Nothing => Ok(None),
            AfterBatch::ClearNewFlows => self.clear_ct_new().map(Some),
            AfterBatch::ClearFloorFlows => self
                .floors
                .as_mut()
                .context("this world has no floor programs")?
                .clear_track()
                .map(Some),
        }
    }
}

/// A case run with BPF_PROG_TEST_RUN.
pub struct Case {
    pub name: &'static str,
    pub prog: &'static str,
    pub world: usize,
    pub what: &'static str,
    pub frames: Frames,
    pub expect: Expect,
    pub stats: Option<StatsCheck>,
    pub after: AfterBatch,
    /// Mean kernel-reported ns per call, one per round.
    pub rounds: Vec<f64>,
}

impl Case {
    pub fn new(
        name: &'static str,
        prog: &'static str,
        world: usize,
        what: &'static str,
        frames: Frames,
        expect: Expect,
    ) -> Case {
        Case {
            name,
            prog,
            world,
            what,
            frames,
            expect,
            stats: None,
            after: AfterBatch::Nothing,
            rounds: Vec::new(),
        }
    }

    /// The service's counters must move as this case claims.
    pub fn counted(mut self, new_flows: bool) -> Case {
        self.stats = Some(StatsCheck {
            new_flows,
            port: WEB_TCP,
        });
        self
    }

    /// As `counted`, for the service published at TCP `port`.
    pub fn counted_on(mut self, port: u16, new_flows: bool) -> Case {
        self.stats = Some(StatsCheck { new_flows, port });
        self
    }

    pub fn after(mut self, after: AfterBatch) -> Case {
        self.after = after;
        self
    }

    /// The untimed first call, checked down to the output bytes.
    pub fn first_call(&mut self, w: &mut World) -> Result<()> {
        self.frames.start_batch();
        let input = self.frames.next();
        let r = w.run_xdp(self.prog, &input)?;
        let tasks = if matches!(
            self.expect,
            super::worlds::Expect::Encap | super::worlds::Expect::TcEncap
        ) {
            super::worlds::far_tasks()
        } else {
            w.tasks.clone()
        };
        if let Err(e) = self.expect.check_full(&input, &r, &tasks) {
            let drops: Vec<String> = w
                .bpf
                .dp
                .drops()?
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{} {n}", r.name()))
                .collect();
            return Err(e.context(format!(
                "{}: first call (drops counted in this world: {drops:?})",
                self.name
            )));
        }
        w.clear(self.after)?;
        Ok(())
    }

    /// `n` timed calls; returns the sum of the kernel-reported durations.
    pub fn batch(&mut self, w: &mut World, n: usize) -> Result<u64> {
        self.frames.start_batch();
        let before = self.stats.map(|c| w.svc_counters(c.port)).transpose()?;
        let mut total = 0u64;
        for i in 0..n {
            let frame = self.frames.next();
            let r = w.run_xdp(self.prog, &frame)?;
            self.expect
                .check(&r)
                .with_context(|| format!("{}: call {i}", self.name))?;
            total += r.ns;
        }
        if let (Some(chk), Some((p0, f0))) = (self.stats, before) {
            let (p1, f1) = w.svc_counters(chk.port)?;
            let want_flows = if chk.new_flows { n as u64 } else { 0 };
            ensure!(
                p1 - p0 == n as u64 && f1 - f0 == want_flows,
                "{}: {n} calls counted {} packets and {} new flows, expected {n} and {want_flows}: not the path meant",
                self.name,
                p1 - p0,
                f1 - f0
            );
        }
        if let Some(cleared) = w.clear(self.after)? {
            ensure!(
                cleared == n,
                "{}: {n} new flows left {cleared} unconfirmed conntrack entries, expected {n}",
                self.name
            );
        }
        Ok(total)
    }

    pub fn ns(&self) -> f64 {
        median(&self.rounds)
    }

    pub fn json(&self, w: &World, floor: f64, floor_rounds: &[f64], is_floor: bool) -> Value {
        let m = self.ns();
        json!({
            "name": self.name,
            "ns": r1(m),
            "overhead_ns": if is_floor { 0.0 } else { r1(m - floor) },
            "rounds": self.rounds.iter().map(|&x| r1(x)).collect::<Vec<_>>(),
            "overhead_rounds": self.rounds.iter().zip(floor_rounds).map(|(x, f)| if is_floor { 0.0 } else { r1(x - f) }).collect::<Vec<_>>(),
            "program": self.prog,
            "measures": self.what,
            "expect": self.expect.describe(),
            "frame_bytes": self.frames.frame_bytes(),
            "world": w.json(),
        })
    }
}
