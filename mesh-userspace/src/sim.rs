//! The dataplane's state on the host: the same plan the kernel maps get,
//! written the way [`crate::dataplane`] writes it, to
//! [`mesh_common::testing::HostMaps`] (the maps in the kernel's shapes,
//! implementing the shared logic's table traits). Unit tests, fixtures and
//! tools run the real forward and reply logic on `sim.maps` without a
//! kernel: `fwd::process(&pkt, &sim.maps)`.

use anyhow::Result;
use mesh_common::testing::{HostMaps, Sizes};

use crate::desired::Desired;
use crate::plan::{Limits, Op, Planner, Report};

pub struct Sim {
    pub planner: Planner,
    pub maps: HostMaps,
}

impl Sim {
    pub fn new(limits: Limits) -> Self {
        let maps = HostMaps::new(Sizes {
            max_services: limits.max_services,
            max_backends: limits.max_backends,
            reply_entries: limits.reply_entries(),
            maglev_entries: limits.maglev_entries(),
            max_nodes: limits.max_nodes,
        });
        Self {
            planner: Planner::new(limits),
            maps,
        }
    }

    /// Plans `d` and carries the plan out, as `Dataplane::apply` does.
    pub fn apply(&mut self, d: &Desired) -> Result<Report> {
        let (ops, report) = self.planner.plan(d)?;
        for op in ops {
            self.exec(op)?;
        }
        Ok(report)
    }

    /// One write, as `Dataplane::exec` makes it to the kernel maps.
    pub fn exec(&mut self, op: Op) -> Result<()> {
        let m = &mut self.maps;
        match op {
            Op::PutBackend(id, b) => m.put_backend(id, b)?,
            Op::DelBackend(id) => m.del_backend(id)?,
            Op::WriteTable { offset, table } => m.write_table(offset, &table)?,
            Op::ResetStats(id) => m.reset_stats(id)?,
            Op::PutService { key, slot, value } => {
                m.put_service(slot, value)?;
                m.switch_port(&key, slot)?;
            }
            Op::DelService(k) => m.del_port(&k)?,
            Op::PutNodeAddr(a) => m.put_node_addr(a)?,
            Op::DelNodeAddr(a) => m.del_node_addr(a),
            Op::PutReply(k, v) => m.put_reply(k, v)?,
            Op::DelReply(k) => m.del_reply(&k),
            Op::PutNode(slot, n) => m.put_node(slot, n)?,
            Op::PutConfig(c) => m.put_config(c),
            Op::PutNodeIndex(a, slot) => m.put_node_index(a, slot),
            Op::DelNodeIndex(a) => m.del_node_index(a),
            Op::PutLocal(k, slot) => m.put_local(k, slot),
            Op::DelLocal(k) => m.del_local(&k),
            Op::DelNode(slot) => m.del_node(slot)?,
            Op::PutLocalDev(id, d) => m.put_local_dev(id, d)?,
            Op::DelLocalDev(id) => m.del_local_dev(id)?,
            // What only a restarted meshd reads: the host maps have none.
            Op::PutGens(..) | Op::PutName(..) | Op::DelName(_) => {}
            Op::PutSrc(id, c) => m.put_src(id, crate::plan::raw4(c.addr), c.len),
            Op::DelSrc(id, c) => m.del_src(id, crate::plan::raw4(c.addr), c.len),
            Op::PutAffTimeout(id, units) => m.put_aff_timeout(id, units)?,
        }
        Ok(())
    }
}
