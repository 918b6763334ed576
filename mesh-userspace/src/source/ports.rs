//! Published ports left out of a state file, assigned from a range as
//! Docker does for `--publish target` without a published port: the lowest
//! port of the range that no other entry holds. (Docker assigns its own
//! ports; only the state file needs this.)

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

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

/// The published port of each entry of `wanted`, in order. Explicit ports
/// are taken first, so that an assignment never takes one of them; the
/// others get the lowest free port of `range`, in order. Explicit ports
/// may lie outside the range; two entries asking for the same port are
/// left for [`crate::model::State::validate`] to name.
pub fn assign(range: &RangeInclusive<u16>, wanted: &[Wanted]) -> Result<Vec<u16>, Invalid> {
    let mut taken: BTreeMap<(Proto, u16), &str> = BTreeMap::new();
    for w in wanted {
        if let Some(p) = w.published {
            taken.entry((w.protocol, p)).or_insert(w.service);
        }
    }
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let port = match w.published {
            Some(p) => p,
            None => {
                let free = range
                    .clone()
                    .find(|p| !taken.contains_key(&(w.protocol, *p)))
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
                taken.insert((w.protocol, free), w.service);
                free
            }
        };
        out.push(port);
    }
    Ok(out)
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
        let got = assign(
            &DEFAULT_PORT_RANGE,
            &[w("a", None), w("b", Some(30000)), w("c", None)],
        )
        .unwrap();
        assert_eq!(got, [30001, 30000, 30002]);
    }

    #[test]
    fn an_exhausted_range_names_the_entry() {
        let e = assign(&(30000..=30000), &[w("a", None), w("b", None)]).unwrap_err();
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
