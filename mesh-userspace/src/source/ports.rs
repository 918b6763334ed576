//! Published ports left out of a state file, assigned from a range as
//! Docker does for `--publish target` without a published port: the lowest
//! port of the range that no other entry holds. As in Docker, a port once
//! assigned stays with its service until the service goes ([`PortMemory`]),
//! whatever is added or removed around it. (Docker assigns its own ports;
//! only the state file needs this.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use crate::model::{Invalid, Proto};

/// The default range for published ports, as in Docker.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// One port of one service, as the file gives it.
#[derive(Clone, Debug)]
pub struct Wanted<'a> {
    pub service: &'a str,
    pub protocol: Proto,
    pub published: Option<u16>,
    pub target: u16,
    /// Where it sits in the file, for errors (`services[1].ports[0]`).
    pub field: String,
}

/// The ports assigned so far, by the entry they were assigned to: its
/// service, protocol, target port, and how many entries of the same
/// service, protocol and target come before it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortMemory {
    assigned: BTreeMap<String, u16>,
}

/// The file a state directory keeps the assignments in.
pub const MEMORY_FILE: &str = "assigned-ports.json";

impl PortMemory {
    /// The assignments kept in `dir` (none if there are none yet).
    pub fn load(dir: &Path) -> Result<PortMemory, String> {
        let p = dir.join(MEMORY_FILE);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(|assigned| PortMemory { assigned })
                .map_err(|e| format!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PortMemory::default()),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    /// Keeps the assignments in `dir`, atomically (a new file renamed over
    /// the old).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let p = dir.join(MEMORY_FILE);
        let tmp: PathBuf = dir.join(format!(".{MEMORY_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&self.assigned)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)
    }

    /// The assignments: `service/protocol/target/n` and the port.
    pub fn entries(&self) -> Vec<(String, u16)> {
        self.assigned.iter().map(|(k, p)| (k.clone(), *p)).collect()
    }

    pub fn len(&self) -> usize {
        self.assigned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.assigned.is_empty()
    }
}

/// The key of each entry of `wanted` in a [`PortMemory`].
fn keys(wanted: &[Wanted]) -> Vec<String> {
    let mut seen: BTreeMap<(&str, Proto, u16), usize> = BTreeMap::new();
    wanted
        .iter()
        .map(|w| {
            let n = seen.entry((w.service, w.protocol, w.target)).or_insert(0);
            *n += 1;
            format!("{}/{}/{}/{}", w.service, w.protocol, w.target, *n - 1)
        })
        .collect()
}

/// The published port of each entry of `wanted`, in order, and what to
/// remember of them. Explicit ports are taken first, so that an assignment
/// never takes one of them; an entry assigned a port before keeps it (if
/// it is still free and in the range); the others get the lowest free port
/// of `range`, in order. Explicit ports may lie outside the range; two
/// entries asking for the same port are left for
/// [`crate::model::State::validate`] to name.
pub fn assign(
    range: &RangeInclusive<u16>,
    wanted: &[Wanted],
    memory: &PortMemory,
) -> Result<(Vec<u16>, PortMemory), Invalid> {
    let mut taken: BTreeSet<(Proto, u16)> = BTreeSet::new();
    for w in wanted {
        if let Some(p) = w.published {
            taken.insert((w.protocol, p));
        }
    }
    let keys = keys(wanted);
    let mut out: Vec<Option<u16>> = wanted.iter().map(|w| w.published).collect();
    // Ports assigned before stay where they are.
    for (i, w) in wanted.iter().enumerate() {
        if w.published.is_some() {
            continue;
        }
        if let Some(&p) = memory.assigned.get(&keys[i])
            && range.contains(&p)
            && taken.insert((w.protocol, p))
        {
            out[i] = Some(p);
        }
    }
    let mut remembered = PortMemory::default();
    for (i, w) in wanted.iter().enumerate() {
        let port = match out[i] {
            Some(p) => p,
            None => {
                let free = range
                    .clone()
                    .find(|p| !taken.contains(&(w.protocol, *p)))
                    .ok_or_else(|| {
                        Invalid::new(
                            format!("{}.published", w.field),
                            format!(
                                "not given, and no {} port is free in the range {}-{}",
                                w.protocol,
                                range.start(),
                                range.end()
                            ),
                        )
                    })?;
                taken.insert((w.protocol, free));
                free
            }
        };
        if w.published.is_none() {
            remembered.assigned.insert(keys[i].clone(), port);
        }
        out[i] = Some(port);
    }
    Ok((
        out.into_iter().map(|p| p.expect("all assigned")).collect(),
        remembered,
    ))
}

/// Parses a port range such as `30000-32767`.
pub fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a range like 30000-32767"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?} is not a range of ports (1 <= low <= high)"));
    }
    Ok(a..=b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(service: &str, published: Option<u16>) -> Wanted<'_> {
        Wanted {
            service,
            protocol: Proto::Tcp,
            published,
            target: 80,
            field: format!("services[{service}].ports[0]"),
        }
    }

    #[test]
    fn explicit_ports_first_then_the_lowest_free() {
        let (got, mem) = assign(
            &DEFAULT_PORT_RANGE,
            &[w("a", None), w("b", Some(30000)), w("c", None)],
            &PortMemory::default(),
        )
        .unwrap();
        assert_eq!(got, [30001, 30000, 30002]);
        assert_eq!(mem.len(), 2, "only assigned ports are remembered");
    }

    #[test]
    fn an_explicit_port_wins_over_a_remembered_one() {
        let (_, mem) =
            assign(&DEFAULT_PORT_RANGE, &[w("a", None)], &PortMemory::default()).unwrap();
        // b now asks for a's port explicitly: a moves.
        let (got, _) = assign(
            &DEFAULT_PORT_RANGE,
            &[w("a", None), w("b", Some(30000))],
            &mem,
        )
        .unwrap();
        assert_eq!(got, [30001, 30000]);
    }

    #[test]
    fn an_exhausted_range_names_the_entry() {
        let e = assign(
            &(30000..=30000),
            &[w("a", None), w("b", None)],
            &PortMemory::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "services[b].ports[0].published");
        assert!(
            e.message
                .contains("no tcp port is free in the range 30000-30000")
        );
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("30000-30010").unwrap(), 30000..=30010);
        assert!(parse_range("5-4").is_err());
        assert!(parse_range("0-4").is_err());
        assert!(parse_range("x").is_err());
    }
}
