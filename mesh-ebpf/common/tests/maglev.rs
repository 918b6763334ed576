//! Maglev table construction (`maglev::table`, `maglev::is_prime`):
//! coverage, balance, order independence, and disruption when a backend
//! comes or goes, at slot level and at flow level (through the real flow
//! hash). Run with `-- --nocapture` to see the measured figures.

use std::collections::HashMap;

use mesh_common::abi::IPPROTO_TCP;
use mesh_common::hash::flow_hash4;
use mesh_common::maglev::{is_prime, table};
use mesh_common::testing::Rng;

/// Backend names as the daemon makes them (`BackendKey::maglev_key`).
fn keys(range: std::ops::Range<u32>) -> Vec<String> {
    range
        .map(|i| format!("198.18.{}.{}:8080", 129 + i / 250, 1 + i % 250))
        .collect()
}

/// The table as backend names, so tables over different key lists compare.
fn by_key(keys: &[String], m: u32) -> Vec<&str> {
    table(keys, m)
        .into_iter()
        .map(|i| keys[i as usize].as_str())
        .collect()
}

fn counts(t: &[u32], n: usize) -> Vec<usize> {
    let mut c = vec![0usize; n];
    for &i in t {
        c[i as usize] += 1;
    }
    c
}

/// (max / ideal - 1, 1 - min / ideal) of per-backend counts.
fn imbalance(c: &[usize], total: usize) -> (f64, f64) {
    let ideal = total as f64 / c.len() as f64;
    let max = *c.iter().max().unwrap() as f64;
    let min = *c.iter().min().unwrap() as f64;
    (max / ideal - 1.0, 1.0 - min / ideal)
}

fn moved(a: &[&str], b: &[&str]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

const PRIMES: [u32; 5] = [251, 1021, 4093, 16381, 65521];
const NS: [usize; 6] = [1, 2, 3, 7, 16, 100];

#[test]
fn is_prime_known_values() {
    for p in [
        2u32,
        3,
        5,
        7,
        11,
        13,
        251,
        1021,
        4093,
        16381,
        65521,
        65537,
        1_000_003,
        2_147_483_647,
        4_294_967_291,
    ] {
        assert!(is_prime(p), "{p} is prime");
    }
    for c in [
        0u32,
        1,
        4,
        6,
        9,
        15,
        25,
        49,
        121,
        169,
        1001,
        16383,
        65535,
        65536,
        1_000_001,
        // Squares of primes: the trial division must include sqrt(n).
        65521 * 65521,
        // Product of the two largest primes below 2^16, and u32::MAX.
        65519 * 65521,
        4_294_967_295,
    ] {
        assert!(!is_prime(c), "{c} is composite");
    }
    // Against a sieve for every n below 100 000.
    const N: usize = 100_000;
    let mut sieve = vec![true; N];
    sieve[0] = false;
    sieve[1] = false;
    for i in 2..N {
        if sieve[i] {
            for j in (i * i..N).step_by(i) {
                sieve[j] = false;
            }
        }
    }
    for (n, &p) in sieve.iter().enumerate() {
        assert_eq!(is_prime(n as u32), p, "is_prime({n})");
    }
}

#[test]
fn empty_inputs_give_empty_tables() {
    assert!(table::<String>(&[], 251).is_empty());
    assert!(table(&keys(0..3), 0).is_empty());
    // One slot, one or many backends.
    assert_eq!(table(&keys(0..1), 1), vec![0]);
    assert_eq!(table(&keys(0..5), 1).len(), 1);
}

/// Every slot names a valid backend and every backend has slots; with
/// M >= 100 N the imbalance is within 1% on both sides. In fact each
/// backend gets floor(M/N) or ceil(M/N) slots (the round-robin fill).
#[test]
fn balance_when_m_at_least_100n() {
    println!("maglev slot imbalance (max/ideal-1, 1-min/ideal), M >= 100 N:");
    let mut checked = 0;
    for &n in &NS {
        let k = keys(0..n as u32);
        for &m in &PRIMES {
            if (m as usize) < 100 * n {
                continue;
            }
            let t = table(&k, m);
            assert_eq!(t.len(), m as usize);
            assert!(t.iter().all(|&i| (i as usize) < n));
            let c = counts(&t, n);
            let lo = m as usize / n;
            let hi = lo + !(m as usize).is_multiple_of(n) as usize;
            assert!(c.iter().all(|&x| x == lo || x == hi), "n={n} m={m}: {c:?}");
            let (over, under) = imbalance(&c, m as usize);
            println!(
                "  n={n:>3} m={m:>5}: +{:.4}% / -{:.4}%",
                over * 100.0,
                under * 100.0
            );
            assert!(
                over <= 0.01 && under <= 0.01,
                "n={n} m={m}: +{over} -{under}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20);
}

/// Below M = 100 N the same floor/ceil rule holds, so the imbalance is
/// bounded by N/M (e.g. 100 backends in 1021 slots: up to ~9.8%); with
/// M < N some backends get no slot at all.
#[test]
fn balance_below_100n_is_bounded_by_n_over_m() {
    println!("maglev slot imbalance, M < 100 N (bound N/M):");
    for &n in &NS {
        let k = keys(0..n as u32);
        for &m in &PRIMES {
            if m as usize >= 100 * n {
                continue;
            }
            let t = table(&k, m);
            let c = counts(&t, n);
            assert!(
                c.iter().all(|&x| x > 0),
                "n={n} m={m}: every backend present"
            );
            let (over, under) = imbalance(&c, m as usize);
            let bound = n as f64 / m as f64;
            println!(
                "  n={n:>3} m={m:>5}: +{:.3}% / -{:.3}% (bound {:.3}%)",
                over * 100.0,
                under * 100.0,
                bound * 100.0
            );
            assert!(
                over <= bound + 1e-12 && under <= bound + 1e-12,
                "n={n} m={m}"
            );
        }
    }
    // More backends than slots: every slot filled, distinct backends.
    let k = keys(0..300);
    let t = table(&k, 251);
    assert_eq!(t.len(), 251);
    let c = counts(&t, 300);
    assert_eq!(c.iter().filter(|&&x| x == 1).count(), 251);
    assert_eq!(c.iter().filter(|&&x| x == 0).count(), 49);
}

/// The table depends on the set of keys, not their order: every node
/// builds the same one.
#[test]
fn independent_of_input_order() {
    let mut rng = Rng::new(11);
    for &n in &[2usize, 3, 7, 16, 100] {
        let k = keys(0..n as u32);
        for &m in &[1021u32, 16381] {
            let want = by_key(&k, m);
            for _ in 0..5 {
                let mut s = k.clone();
                rng.shuffle(&mut s);
                assert_eq!(by_key(&s, m), want, "n={n} m={m} order {s:?}");
            }
            let mut r = k.clone();
            r.reverse();
            assert_eq!(by_key(&r, m), want);
        }
    }
    // Keys as byte slices give the same table as Strings.
    let k = keys(0..7);
    let b: Vec<&[u8]> = k.iter().map(|s| s.as_bytes()).collect();
    assert_eq!(table(&b, 1021), table(&k, 1021));
}

/// The disruption bound both disruption tests assert: at most 1.5x the
/// ideal fraction plus 2% of the table. Measured (see the printed
/// figures): ratios 1.00-1.13 for N <= 16; for N = 100 in M = 16381
/// (M/N ~ 164) Maglev moves ~2.3-2.5x the ideal 1%, i.e. ~1.3-1.5
/// percentage points too many, which an independent Maglev with SHA-256
/// permutations reproduces (the excess shrinks as M/N grows). A naive
/// `hash % N` moves N/(N+1) on an add and fails the bound for every N >= 2
/// (for a removal from N >= 3).
fn disruption_bound(ideal: f64) -> f64 {
    1.5 * ideal + 0.02
}

/// (N, M) pairs measured: the production default M = 16381 with several
/// N, and N = 100 again in the largest table.
const DISRUPTION_CASES: [(usize, u32); 6] = [
    (2, 16381),
    (3, 16381),
    (7, 16381),
    (16, 16381),
    (100, 16381),
    (100, 65521),
];

/// Slot-level disruption, "flows moved vs ideal": the fraction of slots
/// whose backend changes when one backend is added to N (ideal 1/(N+1))
/// or removed (ideal 1/N, every removal measured, the worst reported), and
/// for a removal the share of slots that changed although their backend
/// stayed (ideal 0; Maglev does not guarantee 0). A naive `slot % N`
/// table is measured for contrast and must fail the bound Maglev meets.
#[test]
fn disruption_slots_moved_vs_ideal() {
    println!("maglev slots moved vs ideal (ratio = moved / ideal):");
    let mut add_by_m = HashMap::new();
    for &(n, m) in &DISRUPTION_CASES {
        let base = keys(0..n as u32);
        let grown = keys(0..n as u32 + 1);
        let t_base = by_key(&base, m);

        // Add one backend.
        let t_grown = by_key(&grown, m);
        let add = moved(&t_base, &t_grown) as f64 / m as f64;
        let add_ideal = 1.0 / (n + 1) as f64;
        let naive_add = naive_moved(n, n + 1, m);
        // Slots that changed went to the newcomer, or between old backends.
        let newcomer = grown[n].as_str();
        let add_reshuffled = t_base
            .iter()
            .zip(&t_grown)
            .filter(|(a, b)| a != b && **b != newcomer)
            .count() as f64
            / m as f64;

        // Remove each backend in turn.
        let mut rem_worst = 0f64;
        let mut others_worst = 0f64;
        let mut others_sum = 0f64;
        for r in 0..n {
            let mut shrunk = base.clone();
            let gone = shrunk.remove(r);
            let t_shrunk = by_key(&shrunk, m);
            let total = moved(&t_base, &t_shrunk);
            let others = t_base
                .iter()
                .zip(&t_shrunk)
                .filter(|(a, b)| **a != gone && a != b)
                .count();
            // Every slot of the removed backend moves, of course.
            let owned = t_base.iter().filter(|&&a| a == gone).count();
            assert_eq!(total, owned + others);
            assert!(t_shrunk.iter().all(|&b| b != gone));
            rem_worst = rem_worst.max(total as f64 / m as f64);
            others_worst = others_worst.max(others as f64 / m as f64);
            others_sum += others as f64 / m as f64;
        }
        let rem_ideal = 1.0 / n as f64;
        let naive_rem = naive_moved(n, n - 1, m);
        println!(
            "  n={n:>3} m={m:>5}: add {:.3}% (ideal {:.3}%, ratio {:.3}; reshuffled among old {:.3}%; naive {:.1}%) | \
             remove worst {:.3}% (ideal {:.3}%, ratio {:.3}; naive {:.1}%); surviving backends' slots moved: mean {:.3}% worst {:.3}%",
            add * 100.0,
            add_ideal * 100.0,
            add / add_ideal,
            add_reshuffled * 100.0,
            naive_add * 100.0,
            rem_worst * 100.0,
            rem_ideal * 100.0,
            rem_worst / rem_ideal,
            naive_rem * 100.0,
            others_sum / n as f64 * 100.0,
            others_worst * 100.0
        );

        // Never fewer than the ideal: the newcomer needs its share, the
        // removed backend's slots must go.
        assert!(add >= add_ideal * 0.99, "n={n}: add {add}");
        assert!(rem_worst >= rem_ideal * 0.99, "n={n}");
        assert!(
            add <= disruption_bound(add_ideal),
            "n={n} m={m}: add moved {add}, ideal {add_ideal}"
        );
        assert!(
            rem_worst <= disruption_bound(rem_ideal),
            "n={n} m={m}: remove moved {rem_worst}, ideal {rem_ideal}"
        );
        // Collateral moves (slots whose backend survived): measured up to
        // ~1.5% of M; bounded at 3%.
        assert!(
            others_worst <= 0.03,
            "n={n} m={m}: surviving backends' slots moved {others_worst}"
        );
        assert!(
            add_reshuffled <= 0.03,
            "n={n} m={m}: reshuffled on add {add_reshuffled}"
        );
        if n == 2 {
            // 2 -> 1: the survivor takes everything, nothing else can move.
            assert_eq!(others_worst, 0.0);
        }
        // Naive modulo fails the same bound (except the removal 2 -> 1,
        // where moving the removed half is all anyone can do).
        assert!(
            naive_add > disruption_bound(add_ideal),
            "n={n}: naive add {naive_add}"
        );
        if n >= 3 {
            assert!(
                naive_rem > disruption_bound(rem_ideal),
                "n={n}: naive remove {naive_rem}"
            );
        }
        add_by_m.insert((n, m), add);
    }
    // A larger table is closer to the ideal.
    assert!(add_by_m[&(100, 65521)] < add_by_m[&(100, 16381)]);
}

/// Fraction of slots moved by `slot % a` -> `slot % b`, both sides naming
/// backends 0.. (the same backends keep their index).
fn naive_moved(a: usize, b: usize, m: u32) -> f64 {
    (0..m as usize).filter(|s| s % a != s % b).count() as f64 / m as f64
}

/// Random client flows of one TCP service port.
fn flows(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let dport = 8080u16.to_be();
    (0..n)
        .map(|_| flow_hash4(rng.next_u32(), rng.next_u16(), dport, IPPROTO_TCP))
        .collect()
}

fn assign<'a>(hashes: &[u32], t: &[&'a str]) -> Vec<&'a str> {
    let m = t.len() as u32;
    hashes.iter().map(|h| t[(h % m) as usize]).collect()
}

/// Flow level: 100 000 random flows through `flow_hash4 % M` and the
/// table spread evenly over the backends. A binomial count's standard
/// deviation is sqrt(F/N (1 - 1/N)): ~0.9% of the mean for N = 10, ~3.1%
/// for N = 100, so the per-backend tolerance grows with N (about 4-5
/// sigma for the worst of N backends); the chi-square statistic checks
/// the whole distribution (mean N-1, bound N-1 + 5 sqrt(2(N-1))).
#[test]
fn flows_spread_evenly() {
    const F: usize = 100_000;
    const M: u32 = 16381;
    let hashes = flows(F, 21);
    println!("flow spread over backends, {F} flows, M = {M}:");
    for &(n, tol) in &[
        (2usize, 0.02),
        (3, 0.02),
        (7, 0.03),
        (10, 0.04),
        (16, 0.05),
        (100, 0.15),
    ] {
        let k = keys(0..n as u32);
        let t = by_key(&k, M);
        let mut c: HashMap<&str, usize> = HashMap::new();
        for b in assign(&hashes, &t) {
            *c.entry(b).or_default() += 1;
        }
        assert_eq!(c.len(), n, "every backend gets flows");
        let v: Vec<usize> = k.iter().map(|x| c[x.as_str()]).collect();
        let (over, under) = imbalance(&v, F);
        let e = F as f64 / n as f64;
        let chi2: f64 = v.iter().map(|&x| (x as f64 - e).powi(2) / e).sum();
        let dof = (n - 1) as f64;
        println!(
            "  n={n:>3}: +{:.2}% / -{:.2}% (tolerance {:.0}%), chi2 {chi2:.1} (dof {dof})",
            over * 100.0,
            under * 100.0,
            tol * 100.0
        );
        assert!(over <= tol && under <= tol, "n={n}: {v:?}");
        if n > 1 {
            assert!(
                chi2 <= dof + 5.0 * (2.0 * dof).sqrt() + 5.0,
                "n={n}: chi2 {chi2}"
            );
        }
    }
}

/// Flow level, "flows moved vs ideal": the share of 100 000 flows that
/// change backend when one backend is added or one removed, against the
/// ideal and a naive `hash % N`.
#[test]
fn disruption_flows_moved_vs_ideal() {
    const F: usize = 100_000;
    let hashes = flows(F, 22);
    println!("flows moved vs ideal, {F} flows:");
    for &(n, m) in &DISRUPTION_CASES {
        let base = keys(0..n as u32);
        let t_base = by_key(&base, m);
        let a_base = assign(&hashes, &t_base);

        let grown = keys(0..n as u32 + 1);
        let t_add = by_key(&grown, m);
        let a_add = assign(&hashes, &t_add);
        let add = moved(&a_base, &a_add) as f64 / F as f64;
        let add_ideal = 1.0 / (n + 1) as f64;
        let newcomer = grown[n].as_str();
        let reshuffled = a_base
            .iter()
            .zip(&a_add)
            .filter(|(a, b)| a != b && **b != newcomer)
            .count();

        let mut shrunk = base.clone();
        let gone = shrunk.remove(n / 2);
        let t_rem = by_key(&shrunk, m);
        let a_rem = assign(&hashes, &t_rem);
        let rem = moved(&a_base, &a_rem) as f64 / F as f64;
        let rem_ideal = 1.0 / n as f64;
        let others = a_base
            .iter()
            .zip(&a_rem)
            .filter(|(a, b)| **a != gone && a != b)
            .count();

        // Naive: hash % N picks the backend directly.
        let naive = |a: usize, b: usize| {
            hashes
                .iter()
                .filter(|&&h| h as usize % a != h as usize % b)
                .count() as f64
                / F as f64
        };
        println!(
            "  n={n:>3} m={m:>5}: add moved {:.3}% (ideal {:.3}%, ratio {:.3}; reshuffled among old {:.3}%; naive {:.1}%) | \
             remove moved {:.3}% (ideal {:.3}%, ratio {:.3}; flows of surviving backends moved {:.3}%; naive {:.1}%)",
            add * 100.0,
            add_ideal * 100.0,
            add / add_ideal,
            reshuffled as f64 / F as f64 * 100.0,
            naive(n, n + 1) * 100.0,
            rem * 100.0,
            rem_ideal * 100.0,
            rem / rem_ideal,
            others as f64 / F as f64 * 100.0,
            naive(n, n - 1) * 100.0,
        );
        // Statistical: 100k flows sample the slots, so allow 5% under the ideal.
        assert!(
            add >= add_ideal * 0.95 && add <= disruption_bound(add_ideal),
            "n={n} m={m}: add {add}"
        );
        assert!(
            rem >= rem_ideal * 0.95 && rem <= disruption_bound(rem_ideal),
            "n={n} m={m}: remove {rem}"
        );
        assert!(others as f64 / F as f64 <= 0.03 && reshuffled as f64 / F as f64 <= 0.03);
        assert!(naive(n, n + 1) > disruption_bound(add_ideal));
        if n >= 3 {
            assert!(naive(n, n - 1) > disruption_bound(rem_ideal));
        }
    }
}
