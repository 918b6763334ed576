//! Turns a [`Desired`] state into the ordered map writes that reach it from
//! what was applied before. Pure: the same plan fills the kernel's maps
//! ([`crate::dataplane`]) and the host simulation ([`crate::sim`]), and its
//! ordering is unit-tested here.
//!
//! Order (make-before-break; a packet never sees a half-written table):
//! 1. new backends, in free slots with a new generation (nothing refers to
//!    them yet);
//! 2. per changed service: its entry and Maglev table into the one of its
//!    two slots no packet reads, then the port switched to that slot;
//! 3. removed services; 4. backends nothing refers to (their slots are
//!    reused by a later plan, never this one); 5. node addresses (added
//!    before removed).
//!
//! Reply entries (how a local task's replies find their flow) are written
//! with their backend, before any table can send a flow there, and outlive
//! a removed backend by [`REPLY_GRACE`], so replies already on their way
//! (or a removed task still answering an open flow) are still translated.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mesh_common::abi::*;
use mesh_common::maglev;

use crate::desired::{BackendKey, Desired};
use crate::state::Proto;

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Fill backend slot `.0`.
    PutBackend(u32, Backend),
    /// Write `table` into the Maglev map at `offset`.
    WriteTable {
        offset: u32,
        table: Vec<u32>,
    },
    /// Zero a (new or reused) service's counters.
    ResetStats(u32),
    /// Write a service into its slot (`svc_id * 2 + half`, one no packet
    /// reads), then switch the port to that slot.
    PutService {
        key: SvcKey,
        slot: u32,
        value: SvcValue,
    },
    DelService(SvcKey),
    /// Free backend slot `.0` (all zero).
    DelBackend(u32),
    PutNodeAddr(u32),
    DelNodeAddr(u32),
    PutReply(ReplyKey4, ReplyValue4),
    DelReply(ReplyKey4),
    /// Fill node slot `.0` (`Backend::node_id` names it).
    PutNode(u32, NodeValue),
    /// Free node slot `.0` (all zero).
    DelNode(u32),
}

/// How long the reply entry of a removed backend stays.
pub const REPLY_GRACE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
struct ReplyState {
    value: ReplyValue4,
    retired_at: Option<Instant>,
}

/// Sizes fixed at load time.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Entries in each service's Maglev table (prime).
    pub maglev_size: u32,
    pub max_services: u32,
    pub max_backends: u32,
    /// Entries in each of the two conntrack maps.
    pub ct_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            maglev_size: DEFAULT_MAGLEV_SIZE,
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            ct_entries: DEFAULT_CT_ENTRIES,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<()> {
        if !maglev::is_prime(self.maglev_size) || self.maglev_size < 7 {
            bail!(
                "--maglev-size {}: must be a prime of at least 7 (for example 251, 1021, 4093, 16381, 65521)",
                self.maglev_size
            );
        }
        if self.max_services == 0 || self.max_backends == 0 || self.ct_entries == 0 {
            bail!("map sizes must be positive");
        }
        let entries = 2u64 * self.max_services as u64 * self.maglev_size as u64;
        if entries > (1 << 30) {
            bail!(
                "--max-services {} x --maglev-size {} needs {} table entries (two per service for hitless updates); keep it under 2^30",
                self.max_services,
                self.maglev_size,
                entries
            );
        }
        Ok(())
    }

    pub fn maglev_entries(&self) -> u32 {
        2 * self.max_services * self.maglev_size
    }
}

#[derive(Clone, Debug)]
pub struct SvcSlot {
    pub svc_id: u32,
    pub half: u32,
    pub name: String,
    pub target: u16,
    pub backends: Vec<BackendKey>,
}

/// What one plan changes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub services_added: usize,
    pub services_changed: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

/// What has been applied: ids and table halves. Clone it, plan on the
/// clone, and keep the clone only once every op has been written.
#[derive(Clone, Debug)]
pub struct Planner {
    limits: Limits,
    pub services: BTreeMap<(Proto, u16), SvcSlot>,
    pub backends: HashMap<BackendKey, u32>,
    /// Backend slots: the last generation each was given, the free ones.
    gens: HashMap<u32, u32>,
    free_slots: BTreeSet<u32>,
    next_slot: u32,
    free_svc_ids: Vec<u32>,
    next_svc_id: u32,
    node_addrs: BTreeSet<Ipv4Addr>,
    replies: BTreeMap<ReplyKey4, ReplyState>,
}

pub fn raw4(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl Planner {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            services: BTreeMap::new(),
            backends: HashMap::new(),
            gens: HashMap::new(),
            free_slots: BTreeSet::new(),
            next_slot: 0,
            free_svc_ids: Vec::new(),
            next_svc_id: 0,
            node_addrs: BTreeSet::new(),
            replies: BTreeMap::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The ops that take the maps from the applied state to `d`. Refuses a
    /// state that does not fit the maps before producing any op.
    pub fn plan(&mut self, d: &Desired) -> Result<(Vec<Op>, Report)> {
        self.plan_at(d, Instant::now())
    }

    /// `plan` at a given time (reply entries of removed backends expire).
    pub fn plan_at(&mut self, d: &Desired, now: Instant) -> Result<(Vec<Op>, Report)> {
        let lim = &self.limits;
        if d.services.len() > lim.max_services as usize {
            bail!(
                "{} published ports exceed --max-services {}; nothing applied",
                d.services.len(),
                lim.max_services
            );
        }
        let wanted: BTreeSet<&BackendKey> = d
            .services
            .values()
            .flat_map(|s| s.backends.iter())
            .collect();
        // Old and new backends coexist between steps 1 and 4.
        let peak = wanted.len() + self.backends.keys().filter(|k| !wanted.contains(k)).count();
        if peak > lim.max_backends as usize {
            bail!(
                "{peak} backends (old and new during the update) exceed --max-backends {}; nothing applied",
                lim.max_backends
            );
        }
        if d.node_addrs.len() > MAX_NODE_ADDRS as usize {
            bail!("more than {MAX_NODE_ADDRS} node addresses; nothing applied");
        }
        let replies = reply_candidates(d)?;
        let m = lim.maglev_size;
        let mut ops = Vec::new();
        let mut report = Report::default();

        for k in &wanted {
            if self.backends.contains_key(*k) {
                continue;
            }
            // A slot freed by an earlier plan (never by this one: frees come
            // after every allocation), with its next generation.
            let id = self.free_slots.pop_first().unwrap_or_else(|| {
                self.next_slot += 1;
                self.next_slot - 1
            });
            let gen_ = self.gens.entry(id).or_insert(0);
            *gen_ += 1;
            let gen_ = *gen_;
            ops.push(Op::PutBackend(
                id,
                Backend {
                    addr: [raw4(k.addr), 0, 0, 0],
                    port_be: k.port.to_be(),
                    family: FAMILY_V4,
                    _pad0: 0,
                    flags: if k.local { BE_F_LOCAL } else { BE_F_REMOTE },
                    node_id: k.node_id,
                    gen_,
                },
            ));
            self.backends.insert((*k).clone(), id);
            report.backends_added += 1;
        }

        // Replies of local tasks: in place before any table sends a flow.
        for (key, (backend, cands)) in &replies {
            let slot = self.backends[backend];
            let mut value = ReplyValue4 {
                backend_id: slot,
                backend_gen: self.gens[&slot],
                count: cands.len() as u32,
                _pad: 0,
                cands: [ReplyCand::default(); MAX_REPLY_CANDS],
            };
            value.cands[..cands.len()].copy_from_slice(cands);
            match self.replies.get(key) {
                Some(r) if r.value == value && r.retired_at.is_none() => {}
                _ => {
                    ops.push(Op::PutReply(*key, value));
                    self.replies.insert(
                        *key,
                        ReplyState {
                            value,
                            retired_at: None,
                        },
                    );
                }
            }
        }

        for (key, ds) in &d.services {
            let (svc_id, half, is_new) = match self.services.get_mut(key) {
                Some(s) if s.backends == ds.backends && s.target == ds.target => {
                    s.name = ds.name.clone();
                    continue;
                }
                Some(s) => (s.svc_id, 1 - s.half, false),
                None => {
                    let id = self.free_svc_ids.pop().unwrap_or_else(|| {
                        self.next_svc_id += 1;
                        self.next_svc_id - 1
                    });
                    (id, 0, true)
                }
            };
            let ids: Vec<u32> = ds.backends.iter().map(|b| self.backends[b]).collect();
            let keys: Vec<String> = ds.backends.iter().map(|b| b.maglev_key()).collect();
            let table: Vec<u32> = maglev::table(&keys, m)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect();
            let slot = svc_id * 2 + half;
            let offset = slot * m;
            let table_size = if table.is_empty() { 0 } else { m };
            if !table.is_empty() {
                ops.push(Op::WriteTable { offset, table });
            }
            if is_new {
                ops.push(Op::ResetStats(svc_id));
            }
            ops.push(Op::PutService {
                key: SvcKey::new(key.1, key.0.number()),
                slot,
                value: SvcValue {
                    svc_id,
                    flags: 0,
                    table_off: offset,
                    table_size,
                    backend_count: ids.len() as u32,
                    _pad: 0,
                },
            });
            self.services.insert(
                *key,
                SvcSlot {
                    svc_id,
                    half,
                    name: ds.name.clone(),
                    target: ds.target,
                    backends: ds.backends.clone(),
                },
            );
            if is_new {
                report.services_added += 1;
            } else {
                report.services_changed += 1;
            }
        }

        let gone: Vec<(Proto, u16)> = self
            .services
            .keys()
            .filter(|k| !d.services.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            ops.push(Op::DelService(SvcKey::new(key.1, key.0.number())));
            let slot = self.services.remove(&key).expect("listed above");
            self.free_svc_ids.push(slot.svc_id);
            report.services_removed += 1;
        }

        let mut stale: Vec<(BackendKey, u32)> = self
            .backends
            .iter()
            .filter(|(k, _)| !wanted.contains(k))
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        stale.sort_by_key(|(_, id)| *id);
        for (k, id) in stale {
            ops.push(Op::DelBackend(id));
            self.backends.remove(&k);
            self.free_slots.insert(id);
            report.backends_removed += 1;
        }

        let want: BTreeSet<Ipv4Addr> = d.node_addrs.iter().copied().collect();
        for a in want.difference(&self.node_addrs) {
            ops.push(Op::PutNodeAddr(raw4(*a)));
        }
        for a in self.node_addrs.difference(&want) {
            ops.push(Op::DelNodeAddr(raw4(*a)));
        }
        self.node_addrs = want;

        for (key, r) in self.replies.iter_mut() {
            if !replies.contains_key(key) && r.retired_at.is_none() {
                r.retired_at = Some(now);
            }
        }
        ops.extend(self.expire(now));
        Ok((ops, report))
    }

    /// Deletes the reply entries of backends removed more than
    /// [`REPLY_GRACE`] before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Op> {
        let old: Vec<ReplyKey4> = self
            .replies
            .iter()
            .filter(|(_, r)| {
                r.retired_at
                    .is_some_and(|t| now.duration_since(t) >= REPLY_GRACE)
            })
            .map(|(k, _)| *k)
            .collect();
        old.into_iter()
            .map(|k| {
                self.replies.remove(&k);
                Op::DelReply(k)
            })
            .collect()
    }

    /// Reply entries applied (retired ones included).
    pub fn reply_count(&self) -> usize {
        self.replies.len()
    }

    /// The backend id of a task address and target port, if applied.
    pub fn backend_id(&self, addr: Ipv4Addr, port: u16) -> Option<u32> {
        self.backends
            .iter()
            .find(|(k, _)| k.addr == addr && k.port == port)
            .map(|(_, id)| *id)
    }
}

/// For each local backend, the (node address, published port) pairs its
/// flows can come through. Refuses more than `MAX_REPLY_CANDS`.
fn reply_candidates(d: &Desired) -> Result<BTreeMap<ReplyKey4, (&BackendKey, Vec<ReplyCand>)>> {
    let mut out: BTreeMap<ReplyKey4, (&BackendKey, Vec<ReplyCand>)> = BTreeMap::new();
    for ((proto, port), s) in &d.services {
        for b in s.backends.iter().filter(|b| b.local) {
            let key = ReplyKey4 {
                addr: raw4(b.addr),
                port_be: b.port.to_be(),
                proto: proto.number(),
                _pad: 0,
            };
            let e = out.entry(key).or_insert_with(|| (b, Vec::new()));
            for a in &d.node_addrs {
                e.1.push(ReplyCand {
                    addr: raw4(*a),
                    port_be: port.to_be(),
                    _pad: 0,
                });
            }
        }
    }
    for (k, (b, cands)) in out.iter_mut() {
        cands.sort();
        cands.dedup();
        if cands.len() > MAX_REPLY_CANDS {
            bail!(
                "task {} port {}/{}: its replies could belong to {} (node address, published port) pairs; \
                 at most {MAX_REPLY_CANDS} are supported; nothing applied",
                b.addr,
                if k.proto == IPPROTO_TCP { "tcp" } else { "udp" },
                b.port,
                cands.len()
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DEFAULT_PORT_RANGE, State};

    fn desired(tasks: &[&str]) -> Desired {
        let mut text = String::from(
            "[[nodes]]\nname='n1'\naddr='198.18.128.1'\n[[nodes]]\nname='n2'\naddr='198.18.128.2'\n\
             [[services]]\nname='web'\nports=[{protocol='tcp',published=30080,target=8080}]\n",
        );
        for t in tasks {
            text += &format!("[[tasks]]\nservice='web'\nnode='n1'\naddr='{t}'\n");
        }
        Desired::compute(
            &State::parse(&text, "t", &DEFAULT_PORT_RANGE).unwrap(),
            "n1",
            &[],
        )
    }

    fn limits() -> Limits {
        Limits {
            maglev_size: 251,
            ..Limits::default()
        }
    }

    #[test]
    fn first_plan_adds_backends_before_the_service_that_uses_them() {
        let mut p = Planner::new(limits());
        let (ops, r) = p.plan(&desired(&["198.18.129.2", "198.18.129.3"])).unwrap();
        assert_eq!(r.services_added, 1);
        assert_eq!(r.backends_added, 2);
        let pos = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).unwrap();
        let svc = pos(&|o| matches!(o, Op::PutService { .. }));
        let table = pos(&|o| matches!(o, Op::WriteTable { .. }));
        assert!(
            ops[..table]
                .iter()
                .filter(|o| matches!(o, Op::PutBackend(..)))
                .count()
                == 2
        );
        assert!(
            ops[..table]
                .iter()
                .filter(|o| matches!(o, Op::PutReply(..)))
                .count()
                == 2
        );
        assert!(table < svc);
        assert!(matches!(ops.last(), Some(Op::PutNodeAddr(_))));
    }

    #[test]
    fn a_change_writes_the_other_half_then_switches_then_deletes() {
        let mut p = Planner::new(limits());
        p.plan(&desired(&["198.18.129.2", "198.18.129.3"])).unwrap();
        let (ops, r) = p.plan(&desired(&["198.18.129.2", "198.18.129.4"])).unwrap();
        assert_eq!(
            (r.services_changed, r.backends_added, r.backends_removed),
            (1, 1, 1)
        );
        match &ops[..] {
            [
                Op::PutBackend(new, _),
                Op::PutReply(_, r),
                Op::WriteTable { offset, table },
                Op::PutService { value: v, .. },
                Op::DelBackend(old),
            ] => {
                assert_eq!(r.backend_id, *new);
                assert_eq!(*offset, 251, "second half of service 0's region");
                assert_eq!(v.table_off, 251);
                assert!(table.contains(new) && !table.contains(old));
            }
            other => panic!("unexpected plan {other:#?}"),
        }
        // And back: the first half again.
        let (ops, _) = p.plan(&desired(&["198.18.129.2"])).unwrap();
        assert!(
            ops.iter()
                .any(|o| matches!(o, Op::WriteTable { offset: 0, .. }))
        );
    }

    #[test]
    fn every_node_builds_the_same_table_from_the_same_state() {
        let text = "[[nodes]]\nname='n1'\naddr='198.18.128.1'\n[[nodes]]\nname='n2'\naddr='198.18.128.2'\n\
             [[services]]\nname='web'\nports=[{protocol='tcp',published=30080,target=8080}]\n\
             [[tasks]]\nservice='web'\nnode='n2'\naddr='198.18.129.9'\n\
             [[tasks]]\nservice='web'\nnode='n1'\naddr='198.18.129.2'\n\
             [[tasks]]\nservice='web'\nnode='n2'\naddr='198.18.129.5'\n";
        let state = State::parse(text, "t", &DEFAULT_PORT_RANGE).unwrap();
        // Node n2 has applied another state before, so its backend ids
        // differ from n1's.
        let mut p2 = Planner::new(limits());
        p2.plan(&desired(&["198.18.129.7", "198.18.129.8"]))
            .unwrap();
        let tables = |node: &str, p: &mut Planner| -> Vec<std::net::Ipv4Addr> {
            // The table as written to the kernel, ids turned back into tasks.
            let mut fresh = Planner::new(limits());
            if node == "n2" {
                fresh = p.clone();
                fresh.services.clear();
            }
            let (ops, _) = fresh.plan(&Desired::compute(&state, node, &[])).unwrap();
            let ids: HashMap<u32, std::net::Ipv4Addr> =
                fresh.backends.iter().map(|(k, id)| (*id, k.addr)).collect();
            let table = ops
                .iter()
                .find_map(|o| match o {
                    Op::WriteTable { table, .. } => Some(table.clone()),
                    _ => None,
                })
                .unwrap();
            table.into_iter().map(|id| ids[&id]).collect()
        };
        let mut p1 = Planner::new(limits());
        assert_eq!(tables("n1", &mut p1), tables("n2", &mut p2));
    }

    #[test]
    fn an_unchanged_state_plans_nothing() {
        let mut p = Planner::new(limits());
        let d = desired(&["198.18.129.2"]);
        p.plan(&d).unwrap();
        assert_eq!(p.plan(&d).unwrap().0, vec![]);
    }

    #[test]
    fn too_many_backends_is_refused_before_any_op() {
        let mut p = Planner::new(Limits {
            max_backends: 2,
            ..limits()
        });
        p.plan(&desired(&["198.18.129.2", "198.18.129.3"])).unwrap();
        let before = p.clone();
        // Replacing both needs 4 live backends for a moment.
        let e = p
            .plan(&desired(&["198.18.129.4", "198.18.129.5"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceed --max-backends 2"), "{e}");
        assert_eq!(p.backends, before.backends);
    }

    #[test]
    fn removed_service_frees_its_id_for_reuse_with_reset_counters() {
        let mut p = Planner::new(limits());
        p.plan(&desired(&["198.18.129.2"])).unwrap();
        let (ops, r) = p
            .plan(&Desired {
                node_addrs: vec![],
                services: BTreeMap::new(),
            })
            .unwrap();
        assert_eq!(r.services_removed, 1);
        assert!(ops.iter().any(|o| matches!(o, Op::DelService(_))));
        let (ops, _) = p.plan(&desired(&["198.18.129.2"])).unwrap();
        assert!(ops.contains(&Op::ResetStats(0)));
    }
}

#[cfg(test)]
mod reply_tests {
    use super::*;
    use crate::state::{DEFAULT_PORT_RANGE, State};

    fn desired(text_tasks: &[&str], extra: &[Ipv4Addr]) -> Desired {
        let mut text = String::from(
            "[[nodes]]\nname='n1'\naddr='198.18.128.1'\n\
             [[services]]\nname='web'\nports=[{protocol='tcp',published=30080,target=8080},{protocol='tcp',published=30081,target=8080}]\n",
        );
        for t in text_tasks {
            text += &format!("[[tasks]]\nservice='web'\nnode='n1'\naddr='{t}'\n");
        }
        Desired::compute(
            &State::parse(&text, "t", &DEFAULT_PORT_RANGE).unwrap(),
            "n1",
            extra,
        )
    }

    #[test]
    fn a_task_behind_two_published_ports_gets_both_candidates() {
        let mut p = Planner::new(Limits {
            maglev_size: 251,
            ..Limits::default()
        });
        let (ops, _) = p.plan(&desired(&["198.18.129.2"], &[])).unwrap();
        let r = ops
            .iter()
            .find_map(|o| match o {
                Op::PutReply(_, v) => Some(*v),
                _ => None,
            })
            .unwrap();
        assert_eq!(r.count, 2);
        let ports: Vec<u16> = r.cands[..2]
            .iter()
            .map(|c| u16::from_be(c.port_be))
            .collect();
        assert_eq!(ports, [30080, 30081]);
    }

    #[test]
    fn too_many_candidates_are_refused_before_any_op() {
        let mut p = Planner::new(Limits {
            maglev_size: 251,
            ..Limits::default()
        });
        let extra = [
            Ipv4Addr::new(198, 18, 128, 5),
            Ipv4Addr::new(198, 18, 128, 6),
        ];
        let e = p
            .plan(&desired(&["198.18.129.2"], &extra))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("198.18.129.2") && e.contains("6 (node address, published port) pairs"),
            "{e}"
        );
        assert_eq!(p.reply_count(), 0);
    }

    #[test]
    fn a_removed_backends_reply_entry_outlives_it_by_the_grace_period() {
        let mut p = Planner::new(Limits {
            maglev_size: 251,
            ..Limits::default()
        });
        let t0 = Instant::now();
        p.plan_at(&desired(&["198.18.129.2", "198.18.129.3"], &[]), t0)
            .unwrap();
        let (ops, _) = p.plan_at(&desired(&["198.18.129.2"], &[]), t0).unwrap();
        assert!(ops.iter().any(|o| matches!(o, Op::DelBackend(_))));
        assert!(
            !ops.iter().any(|o| matches!(o, Op::DelReply(_))),
            "kept during the grace period"
        );
        assert!(p.expire(t0 + REPLY_GRACE / 2).is_empty());
        assert!(
            matches!(p.expire(t0 + REPLY_GRACE)[..], [Op::DelReply(k)] if k.addr == raw4(Ipv4Addr::new(198, 18, 129, 3)))
        );
        assert_eq!(p.reply_count(), 1);
    }
}
