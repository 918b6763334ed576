//! The kernel's tick rate, for conntrack's clock in the programs
//! ([`JiffyClock`]): they read the tick count (`bpf_jiffies64`, one load
//! once inlined) instead of calling a clock helper on every packet, and
//! need `CONFIG_HZ` to turn ticks into time.
//!
//! The rate is not published anywhere a process can read on every
//! kernel (`/proc/config.gz` is optional and compressed, `/boot/config-*`
//! often absent), so it is read off the tick itself: `/proc/timer_list`
//! gives the monotonic clock and the tick count in one read, and a 64-bit
//! kernel starts the count at `2^32 - 300 * HZ`; one rate fits. Near five
//! minutes after boot the rates cannot be told apart that way, and two
//! reads a quarter of a second apart measure it instead. (Cilium measures
//! it the same way, from `/proc/schedstat`, which needs `SCHEDSTATS`.)
//! Docker masks `/proc/timer_list` in containers that are not privileged
//! (meshd's swarm service is not): there the tick is read by running a
//! two-instruction BPF program (`r0 = bpf_jiffies64(); exit`) with
//! BPF_PROG_TEST_RUN, twice, a quarter of a second apart.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_common::abi::JiffyClock;

/// The rates a kernel may be built with (`kernel/Kconfig.hz`).
const RATES: [u32; 4] = [100, 250, 300, 1000];

const TIMER_LIST: &str = "/proc/timer_list";

/// The clock the programs should use: the kernel's tick if its rate can
/// be read (else the coarse clock helper, with a warning: correct, and
/// tens of nanoseconds a packet slower).
pub fn jiffy_clock() -> JiffyClock {
    match kernel_hz() {
        Ok(hz) => JiffyClock::for_hz(hz),
        Err(e) => {
            tracing::warn!(
                "conntrack reads the coarse clock helper on every packet: the kernel's tick \
                 rate is unknown ({e:#})"
            );
            JiffyClock::default()
        }
    }
}

/// `CONFIG_HZ` of the running kernel.
pub fn kernel_hz() -> Result<u32> {
    match hz_from_timer_list() {
        Ok(hz) => Ok(hz),
        Err(e) => hz_from_bpf().map_err(|b| b.context(format!("{e:#}"))),
    }
}

/// The rate, from `/proc/timer_list`.
pub fn hz_from_timer_list() -> Result<u32> {
    let (now_ns, jiffies) = sample()?;
    if let Some(hz) = by_start(now_ns, jiffies) {
        return Ok(hz);
    }
    std::thread::sleep(Duration::from_millis(250));
    let (now2, j2) = sample()?;
    by_rate(now2.saturating_sub(now_ns), j2.wrapping_sub(jiffies))
        .with_context(|| format!("{jiffies} ticks at {now_ns} ns, {j2} at {now2} ns"))
}

/// The one rate whose start (`2^32 - 300 * HZ` ticks at boot) explains
/// `jiffies` at monotonic time `now_ns`, within two seconds of ticks (the
/// tick starts counting a little after the clock); `None` when no rate or
/// more than one does.
pub fn by_start(now_ns: u64, jiffies: u64) -> Option<u32> {
    let fits: Vec<u32> = RATES
        .into_iter()
        .filter(|&hz| {
            let hz = hz as i128;
            let expected = (1i128 << 32) - 300 * hz + now_ns as i128 * hz / 1_000_000_000;
            (jiffies as i128 - expected).abs() <= 2 * hz
        })
        .collect();
    match fits[..] {
        [hz] => Some(hz),
        _ => None,
    }
}

/// The rate nearest `ticks` in `ns`, if within a tenth of it.
pub fn by_rate(ns: u64, ticks: u64) -> Result<u32> {
    if ns == 0 {
        bail!("the monotonic clock did not move");
    }
    let measured = ticks as f64 * 1e9 / ns as f64;
    let nearest = RATES
        .into_iter()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .expect("RATES is not empty");
    if (nearest as f64 - measured).abs() > nearest as f64 / 10.0 {
        bail!("the tick ran at {measured:.0} a second, no kernel's rate");
    }
    Ok(nearest)
}

/// The rate, from the tick count a BPF program reads, measured over a
/// quarter of a second of the monotonic clock.
pub fn hz_from_bpf() -> Result<u32> {
    let prog = TickProgram::load()?;
    let (t0, j0) = (monotonic_ns(), prog.read()?);
    std::thread::sleep(Duration::from_millis(250));
    let (t1, j1) = (monotonic_ns(), prog.read()?);
    by_rate(t1.saturating_sub(t0), j1.wrapping_sub(j0) as u64)
        .context("measuring the tick with bpf_jiffies64")
}

fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Clock `id`'s time, in nanoseconds.
fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall into a local.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Conntrack time now, from the monotonic clock: the time the programs'
/// clock counts, whichever of the two they read (a tick apart at most),
/// without reading the tick (meshd's conntrack sweep).
pub fn ct_now_monotonic() -> u32 {
    mesh_common::abi::now_units(monotonic_ns())
}

/// `r0 = bpf_jiffies64(); exit`, as a socket filter: its test run's
/// return value is the tick count's low 32 bits.
struct TickProgram(std::os::fd::OwnedFd);

impl TickProgram {
    fn load() -> Result<Self> {
        use crate::bpfsys::{CALL, EXIT, bpf_prog_type, insn, load_prog};
        const BPF_FUNC_JIFFIES64: i32 = 118;
        load_prog(
            bpf_prog_type::BPF_PROG_TYPE_SOCKET_FILTER,
            &[
                insn(CALL, 0, 0, 0, BPF_FUNC_JIFFIES64),
                insn(EXIT, 0, 0, 0, 0),
            ],
            "mesh_ticks",
        )
        .map(Self)
        .context("a program that reads bpf_jiffies64")
    }

    fn read(&self) -> Result<u32> {
        use std::os::fd::AsFd;
        let (ticks, _) = crate::bpfsys::test_run_fd(self.0.as_fd(), &[0u8; 64], &[])
            .context("running the program that reads bpf_jiffies64")?;
        Ok(ticks)
    }
}

/// Monotonic nanoseconds and the tick count, from one read of
/// `/proc/timer_list`.
fn sample() -> Result<(u64, u64)> {
    let text =
        std::fs::read_to_string(TIMER_LIST).with_context(|| format!("reading {TIMER_LIST}"))?;
    parse(&text).with_context(|| format!("no \"now at\" and \"jiffies:\" lines in {TIMER_LIST}"))
}

fn parse(text: &str) -> Option<(u64, u64)> {
    let now = text.lines().find_map(|l| {
        l.strip_prefix("now at ")?
            .strip_suffix(" nsecs")?
            .trim()
            .parse()
            .ok()
    })?;
    let jiffies = text
        .lines()
        .find_map(|l| l.strip_prefix("jiffies:")?.trim().parse().ok())?;
    Some((now, jiffies))
}

/// Conntrack time now, as the programs read it with `clock` (the
/// tests' and benchmark's entries are written with it).
pub fn ct_now(clock: &JiffyClock) -> Result<u32> {
    if clock.ns_per_jiffy == 0 {
        return Ok(mesh_common::abi::now_units(clock_ns(
            libc::CLOCK_MONOTONIC_COARSE,
        )));
    }
    Ok(clock.units(sample()?.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_of_the_count_names_the_rate() {
        // This machine: HZ 250, 22,514 s after boot.
        assert_eq!(by_start(22_514_183_083_000, 4_300_520_788), Some(250));
        for hz in RATES {
            let now_ns = 86_400 * 1_000_000_000u64;
            let j = (1u64 << 32) - 300 * hz as u64 + 86_400 * hz as u64 - hz as u64 / 2;
            assert_eq!(by_start(now_ns, j), Some(hz), "{hz}");
        }
        // Five minutes after boot every rate has the same count.
        assert_eq!(by_start(300_000_000_000, 1 << 32), None);
        // Nothing fits a count from elsewhere.
        assert_eq!(by_start(86_400_000_000_000, 12345), None);
    }

    #[test]
    fn a_measured_rate_snaps_to_a_kernels_rate() {
        assert_eq!(by_rate(250_000_000, 62).unwrap(), 250);
        assert_eq!(by_rate(250_000_000, 76).unwrap(), 300);
        assert_eq!(by_rate(1_000_000_000, 999).unwrap(), 1000);
        assert!(by_rate(1_000_000_000, 500).is_err());
        assert!(by_rate(0, 5).is_err());
    }

    #[test]
    fn timer_list_lines_are_read() {
        let t = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 22514183083000 nsecs\n\ncpu: 0\n  .idle_jiffies   : 4300520301\njiffies: 4300520788\n";
        assert_eq!(parse(t), Some((22_514_183_083_000, 4_300_520_788)));
        assert_eq!(parse("now at x nsecs\njiffies: 1\n"), None);
    }

    #[test]
    fn jiffies_and_the_coarse_clock_agree() {
        let hz = 250;
        let c = JiffyClock::for_hz(hz);
        // 22,514 s after boot.
        let j = (1u64 << 32) - 300 * hz as u64 + 22_514 * hz as u64;
        assert_eq!(
            c.units(j),
            mesh_common::abi::now_units(22_514 * 1_000_000_000)
        );
    }

    #[test]
    fn a_time_a_little_ahead_is_now() {
        use mesh_common::abi::{CtLifetimes, CtValue, IPPROTO_UDP, age};
        assert_eq!(age(10, 7), 3);
        assert_eq!(age(10, 11), 0);
        let lt = CtLifetimes::from_secs([60, 60, 10, 60]);
        let seen_ahead = CtValue {
            seen: 1001,
            ..CtValue::default()
        };
        assert!(!seen_ahead.expired(IPPROTO_UDP, 1000, &lt));
        assert!(seen_ahead.expired(IPPROTO_UDP, 1001 + lt.udp + 1, &lt));
    }
}
