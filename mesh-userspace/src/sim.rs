//! The dataplane's state on the host: the same plan the kernel maps get,
//! applied to hash maps that implement the shared packet logic's table
//! traits. Unit tests, fixtures and tools run the real forward and reply
//! logic on it without a kernel.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use anyhow::Result;
use mesh_common::abi::*;
use mesh_common::fwd::Tables;
use mesh_common::rev::RevTables;

use crate::desired::Desired;
use crate::plan::{Limits, Op, Planner, Report};

pub struct Sim {
    pub planner: Planner,
    pub services: HashMap<SvcKey, SvcValue>,
    pub node_addrs: HashSet<u32>,
    pub backends: HashMap<u32, Backend>,
    pub maglev: Vec<u32>,
    pub ct: RefCell<HashMap<FlowKey4, CtValue>>,
    pub replies: HashMap<ReplyKey4, ReplyValue4>,
    pub stats: RefCell<HashMap<u32, SvcStats>>,
}

impl Sim {
    pub fn new(limits: Limits) -> Self {
        let n = limits.maglev_entries() as usize;
        Self {
            planner: Planner::new(limits),
            services: HashMap::new(),
            node_addrs: HashSet::new(),
            backends: HashMap::new(),
            maglev: vec![0; n],
            ct: RefCell::default(),
            replies: HashMap::new(),
            stats: RefCell::default(),
        }
    }

    pub fn apply(&mut self, d: &Desired) -> Result<Report> {
        let (ops, report) = self.planner.plan(d)?;
        for op in ops {
            self.exec(op);
        }
        Ok(report)
    }

    pub fn exec(&mut self, op: Op) {
        match op {
            Op::PutBackend(id, b) => {
                self.backends.insert(id, b);
            }
            Op::DelBackend(id) => {
                self.backends.remove(&id);
            }
            Op::WriteTable { offset, table } => {
                let o = offset as usize;
                self.maglev[o..o + table.len()].copy_from_slice(&table);
            }
            Op::ResetStats(id) => {
                self.stats.borrow_mut().remove(&id);
            }
            Op::PutService { key, value, .. } => {
                self.services.insert(key, value);
            }
            Op::DelService(k) => {
                self.services.remove(&k);
            }
            Op::PutNodeAddr(a) => {
                self.node_addrs.insert(a);
            }
            Op::DelNodeAddr(a) => {
                self.node_addrs.remove(&a);
            }
            Op::PutReply(k, v) => {
                self.replies.insert(k, v);
            }
            Op::DelReply(k) => {
                self.replies.remove(&k);
            }
        }
    }
}

impl Tables for Sim {
    fn service(&self, key: &SvcKey) -> Option<SvcValue> {
        self.services.get(key).copied()
    }
    fn is_node_addr4(&self, addr: u32) -> bool {
        self.node_addrs.contains(&addr)
    }
    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue> {
        self.ct.borrow().get(key).copied()
    }
    fn ct_put(&self, key: &FlowKey4, ct: &CtValue) {
        self.ct.borrow_mut().insert(*key, *ct);
    }
    fn maglev(&self, index: u32) -> Option<u32> {
        self.maglev.get(index as usize).copied()
    }
    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id).copied()
    }
    fn account(&self, svc_id: u32, bytes: u64, new_flow: bool) {
        let mut s = self.stats.borrow_mut();
        let e = s.entry(svc_id).or_default();
        e.packets += 1;
        e.bytes += bytes;
        e.new_flows += new_flow as u64;
    }
}

impl RevTables for Sim {
    fn reply(&self, key: &ReplyKey4) -> Option<ReplyValue4> {
        self.replies.get(key).copied()
    }
    fn ct_get(&self, key: &FlowKey4) -> Option<CtValue> {
        Tables::ct_get(self, key)
    }
}
