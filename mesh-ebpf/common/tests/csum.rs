//! Incremental checksum updates (`csum::update32`, `update48`, `udp_fixup`)
//! checked against full recomputation (`csum::checksum` + `csum::pseudo4`).
//!
//! The incremental functions take the raw in-memory 16/32-bit words read
//! in native order (module doc of `csum`), so every test reads the
//! checksum field with `u16::from_ne_bytes` and addresses with
//! `u32::from_ne_bytes`, exactly as `Pkt::load` does in `fwd`/`rev`.

use mesh_common::abi::{IPPROTO_TCP, IPPROTO_UDP};
use mesh_common::csum::{self, checksum, pseudo4, udp_fixup, update32, update48};
use mesh_common::parse::ETH_HLEN;
use mesh_common::testing::Rng;
use mesh_common::testing::frame::{Spec, UdpCsum, View};

const ITERS: usize = 20_000;

fn ne16(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn ne32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

fn put_ne16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_ne_bytes());
}

/// Rewrites the destination (`dst == true`, DNAT) or source (SNAT)
/// address and port of `frame` the way `fwd`/`rev` do, using only the
/// incremental functions.
fn rewrite_incremental(frame: &mut [u8], dst: bool, addr: [u8; 4], port: u16) {
    let v = View(frame);
    let (a_off, p_off) = if dst {
        (ETH_HLEN + 16, v.l4_off() + 2)
    } else {
        (ETH_HLEN + 12, v.l4_off())
    };
    let c_off = v.l4_csum_off();
    let proto = v.proto();

    let old_addr = ne32(frame, a_off);
    let new_addr = u32::from_ne_bytes(addr);
    let old_port = ne16(frame, p_off);
    let new_port = port.to_be();
    let ip_check = ne16(frame, ETH_HLEN + 10);
    let l4_check = ne16(frame, c_off);

    frame[a_off..a_off + 4].copy_from_slice(&addr);
    put_ne16(frame, ETH_HLEN + 10, update32(ip_check, old_addr, new_addr));
    put_ne16(frame, p_off, new_port);
    let c = update48(l4_check, old_addr, new_addr, old_port, new_port);
    let c = if proto == IPPROTO_UDP {
        udp_fixup(l4_check, c)
    } else {
        c
    };
    put_ne16(frame, c_off, c);
}

#[test]
fn fold_reduces_to_16_bits() {
    assert_eq!(csum::fold(0), 0);
    assert_eq!(csum::fold(0xffff), 0xffff);
    assert_eq!(csum::fold(0x1_0000), 1);
    assert_eq!(csum::fold(0x1_fffe), 0xffff);
    // Largest possible input: every carry still folds in.
    assert_eq!(csum::fold(u64::MAX), 0xffff);
    assert_eq!(csum::fold(0xffff_ffff), 0xffff);
    // Agrees with a slow one's-complement sum of 16-bit words.
    let mut rng = Rng::new(1);
    for _ in 0..ITERS {
        let s = rng.next_u64() >> rng.below(64);
        let expect = if s == 0 {
            0
        } else {
            ((s - 1) % 0xffff + 1) as u16
        };
        assert_eq!(csum::fold(s), expect, "fold({s:#x})");
    }
}

#[test]
fn checksum_known_vectors() {
    // RFC 1071 section 3 example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(checksum(&data, 0), !0xddf2);
    // A well-known IPv4 header (checksum field zero): 0xb861.
    let hdr = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(checksum(&hdr, 0), 0xb861);
    // Odd length: the last byte is the high byte of a zero-padded word.
    assert_eq!(checksum(&[0x12], 0), !0x1200);
    assert_eq!(checksum(&[0x12, 0x34, 0x56], 0), !(0x1234u16 + 0x5600));
    // Pseudo-header: plain sum of its big-endian words.
    assert_eq!(
        pseudo4([1, 2, 3, 4], [5, 6, 7, 8], 6, 20),
        0x0102 + 0x0304 + 0x0506 + 0x0708 + 6 + 20
    );
}

/// update32 on random IPv4 headers (with and without options): changing
/// either address gives exactly the recomputed header checksum.
#[test]
fn update32_matches_recomputed_ip_header() {
    let mut rng = Rng::new(2);
    for i in 0..ITERS {
        let ihl = if i % 3 == 0 { rng.range(5, 15) } else { 5 };
        let mut hdr = rng.bytes(ihl * 4);
        hdr[0] = 0x40 | ihl as u8;
        hdr[10] = 0;
        hdr[11] = 0;
        let c = checksum(&hdr, 0);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());

        let off = if rng.bool() { 12 } else { 16 };
        let new = rng.addr();
        let old_w = ne32(&hdr, off);
        let got = update32(ne16(&hdr, 10), old_w, u32::from_ne_bytes(new));

        hdr[off..off + 4].copy_from_slice(&new);
        hdr[10] = 0;
        hdr[11] = 0;
        let want = checksum(&hdr, 0);
        // The field holds `want` big-endian; the update works on its native read.
        assert_eq!(got, u16::from_ne_bytes(want.to_be_bytes()), "iteration {i}");
        put_ne16(&mut hdr, 10, got);
        assert_eq!(
            checksum(&hdr, 0),
            0,
            "iteration {i}: header no longer verifies"
        );
    }
}

/// DNAT and SNAT on random TCP/UDP frames (payload lengths 0..=1472, odd
/// and even, IP and TCP options, UDP with and without checksum): the
/// incrementally rewritten frame is byte-identical to a frame built from
/// scratch with the new address and port.
#[test]
fn update48_rewrite_equals_rebuilt_frame() {
    let mut rng = Rng::new(3);
    let (mut odd, mut even, mut udp_none) = (0, 0, 0);
    for i in 0..ITERS / 4 {
        let spec = Spec::random(&mut rng);
        if spec.payload.len() % 2 == 1 {
            odd += 1;
        } else {
            even += 1;
        }
        if spec.proto == IPPROTO_UDP && spec.udp_csum == UdpCsum::None {
            udp_none += 1;
        }
        let dst = rng.bool();
        let addr = rng.addr();
        let port = rng.next_u16();

        let mut frame = spec.build();
        rewrite_incremental(&mut frame, dst, addr, port);

        let mut want = spec.clone();
        if dst {
            want.daddr = addr.into();
            want.dport = port;
        } else {
            want.saddr = addr.into();
            want.sport = port;
        }
        let want = want.build();
        assert_eq!(frame, want, "iteration {i}: {spec:?} dst={dst}");
        let v = View(&frame);
        assert!(v.ip_csum_valid());
        assert!(v.l4_csum_valid(spec.udp_csum == UdpCsum::None));
    }
    assert!(
        odd > 100 && even > 100 && udp_none > 20,
        "coverage: {odd} odd, {even} even, {udp_none} udp-none"
    );
}

/// The same with only one field changing: update48 with an unchanged
/// port is update32, and with an unchanged address a pure port update.
#[test]
fn update48_degenerates_to_single_field_updates() {
    let mut rng = Rng::new(4);
    for _ in 0..ITERS {
        let c = rng.next_u16();
        if c == 0xffff {
            continue; // -0: normalised to +0, see `minus_zero_input_*`
        }
        let (a, b) = (rng.next_u32(), rng.next_u32());
        let (p, q) = (rng.next_u16(), rng.next_u16());
        assert_eq!(update48(c, a, b, p, p), update32(c, a, b));
        // An unchanged field is a no-op.
        assert_eq!(update32(c, a, a), c);
        assert_eq!(update48(c, a, a, p, p), c);
        // Port only: same as treating the port as the low half of a u32.
        assert_eq!(update48(c, a, a, p, q), update32(c, p as u32, q as u32));
        // Reversible.
        assert_eq!(update32(update32(c, a, b), b, a), c);
        assert_eq!(update48(update48(c, a, b, p, q), b, a, q, p), c);
    }
}

/// RFC 1624's edge cases. A recomputed checksum is 0x0000 when the data
/// sums to -0 (0xffff); eqn. 3 must produce the same 0x0000 (not 0xffff),
/// and UDP must then send 0xffff.
#[test]
fn result_zero_matches_recomputation() {
    let mut rng = Rng::new(5);
    for i in 0..2000 {
        let proto = if i % 2 == 0 { IPPROTO_TCP } else { IPPROTO_UDP };
        let plen = rng.range(0, 200);
        let spec = Spec::new(
            proto,
            rng.addr(),
            rng.next_u16(),
            rng.addr(),
            rng.next_u16(),
        )
        .payload(rng.bytes(plen));
        let frame = spec.build();
        let v = View(&frame);
        let l4 = v.l4().to_vec();

        // Choose the new destination so that the new segment sums to -0:
        // fix its first half, then solve for its second half.
        let mut new = rng.addr();
        new[2] = 0;
        new[3] = 0;
        let mut seg = l4.clone();
        let co = v.l4_csum_off() - v.l4_off();
        seg[co] = 0;
        seg[co + 1] = 0;
        let partial = !checksum(
            &seg,
            pseudo4(spec.saddr.octets(), new, proto, seg.len() as u16),
        );
        new[2..4].copy_from_slice(&(!partial).to_be_bytes());
        assert_eq!(
            checksum(
                &seg,
                pseudo4(spec.saddr.octets(), new, proto, seg.len() as u16)
            ),
            0,
            "setup: the new segment must sum to -0"
        );

        let l4_check = ne16(&frame, v.l4_csum_off());
        let daddr = ne32(&frame, ETH_HLEN + 16);
        let inc = update48(
            l4_check,
            daddr,
            u32::from_ne_bytes(new),
            ne16(&frame, v.l4_off() + 2),
            ne16(&frame, v.l4_off() + 2),
        );
        assert_eq!(
            inc, 0x0000,
            "iteration {i}: eqn. 3 gives +0 like a full recomputation"
        );
        if proto == IPPROTO_UDP {
            assert_eq!(
                udp_fixup(l4_check, inc),
                0xffff,
                "computed zero goes out as 0xffff"
            );
        }

        let mut f = frame.clone();
        rewrite_incremental(&mut f, true, new, spec.dport);
        let mut want = spec.clone();
        want.daddr = new.into();
        assert_eq!(f, want.build(), "iteration {i}");
        let expect_field = if proto == IPPROTO_UDP { 0xffff } else { 0x0000 };
        assert_eq!(View(&f).l4_csum(), expect_field);
    }
}

/// Starting from a checksum field of 0x0000 (TCP, sum -0) or 0xffff (UDP
/// sending a computed zero), a further update is still exact.
#[test]
fn update_from_zero_and_ffff_fields_matches_recomputation() {
    let mut rng = Rng::new(6);
    let mut seen = [0usize; 2];
    for i in 0..4000 {
        let proto = if i % 2 == 0 { IPPROTO_TCP } else { IPPROTO_UDP };
        let plen = rng.range(0, 64);
        let mut spec = Spec::new(proto, rng.addr(), rng.next_u16(), [0; 4], rng.next_u16())
            .payload(rng.bytes(plen));
        // Solve for a destination that makes the original checksum zero.
        let probe = spec.build();
        let v = View(&probe);
        let mut seg = v.l4().to_vec();
        let co = v.l4_csum_off() - v.l4_off();
        seg[co] = 0;
        seg[co + 1] = 0;
        let mut d = rng.addr();
        d[2] = 0;
        d[3] = 0;
        let partial = !checksum(
            &seg,
            pseudo4(spec.saddr.octets(), d, proto, seg.len() as u16),
        );
        d[2..4].copy_from_slice(&(!partial).to_be_bytes());
        spec.daddr = d.into();
        let frame = spec.build();
        let field = View(&frame).l4_csum();
        assert_eq!(field, if proto == IPPROTO_TCP { 0x0000 } else { 0xffff });
        seen[(proto == IPPROTO_UDP) as usize] += 1;

        let (addr, port) = (rng.addr(), rng.next_u16());
        let dst = rng.bool();
        let mut f = frame.clone();
        rewrite_incremental(&mut f, dst, addr, port);
        let mut want = spec.clone();
        if dst {
            want.daddr = addr.into();
            want.dport = port;
        } else {
            want.saddr = addr.into();
            want.sport = port;
        }
        assert_eq!(f, want.build(), "iteration {i}: from field {field:#06x}");
    }
    assert!(seen[0] > 0 && seen[1] > 0);
}

/// A checksum field of 0xffff is -0; eqn. 3 turns it into +0 after an
/// update that changes nothing. Only an all-zero sum makes the result
/// 0xffff, and a real header never sums to zero.
#[test]
fn minus_zero_input_is_normalised() {
    assert_eq!(update32(0xffff, 0x1234_5678, 0x1234_5678), 0x0000);
    assert_eq!(update48(0xffff, 7, 7, 9, 9), 0x0000);
    // The only way to get 0xffff out: every term of the sum is zero.
    assert_eq!(update32(0xffff, 0xffff_ffff, 0), 0xffff);
    assert_eq!(update48(0xffff, 0xffff_ffff, 0, 0xffff, 0), 0xffff);
    let mut rng = Rng::new(7);
    for _ in 0..ITERS {
        let (c, a, b) = (rng.next_u16(), rng.next_u32(), rng.next_u32());
        let r = update32(c, a, b);
        if r == 0xffff {
            assert!(
                c == 0xffff && a == 0xffff_ffff && b == 0,
                "{c:#x} {a:#x} {b:#x}"
            );
        }
    }
}

#[test]
fn udp_fixup_rules() {
    // No checksum stays no checksum, whatever the update computed.
    for u in [0u16, 1, 0x1234, 0xfffe, 0xffff] {
        assert_eq!(udp_fixup(0, u), 0);
    }
    // A computed zero is sent as 0xffff.
    for orig in [1u16, 0x8000, 0xffff] {
        assert_eq!(udp_fixup(orig, 0), 0xffff);
    }
    // Anything else passes through.
    let mut rng = Rng::new(8);
    for _ in 0..ITERS {
        let (o, u) = (rng.next_u16(), rng.next_u16());
        if o != 0 && u != 0 {
            assert_eq!(udp_fixup(o, u), u);
        }
    }
}

/// A UDP datagram without a checksum keeps a zero field through DNAT and
/// SNAT (the field is not "updated" into a bogus value).
#[test]
fn udp_zero_checksum_stays_zero() {
    let mut rng = Rng::new(9);
    for _ in 0..500 {
        let plen = rng.range(0, 100);
        let mut spec = Spec::udp(rng.addr(), rng.next_u16(), rng.addr(), rng.next_u16(), &[])
            .payload(rng.bytes(plen));
        spec.udp_csum = UdpCsum::None;
        let mut f = spec.build();
        assert_eq!(View(&f).l4_csum(), 0);
        rewrite_incremental(&mut f, true, rng.addr(), rng.next_u16());
        assert_eq!(View(&f).l4_csum(), 0);
        assert!(View(&f).ip_csum_valid());
        rewrite_incremental(&mut f, false, rng.addr(), rng.next_u16());
        assert_eq!(View(&f).l4_csum(), 0);
        assert!(View(&f).ip_csum_valid());
    }
}
