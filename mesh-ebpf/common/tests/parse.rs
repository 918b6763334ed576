//! `parse::ipv4`, `parse::ports`, `parse::check_l4` (and `Pkt`) on
//! hand-built frames: well-formed, with options, malformed, truncated.

use mesh_common::abi::{IPPROTO_TCP, IPPROTO_UDP};
use mesh_common::parse::{self, ETH_HLEN, Ip4, L4Error};
use mesh_common::pkt::Pkt;
use mesh_common::testing::Rng;
use mesh_common::testing::frame::{Spec, TCP_ACK, ip_options, tcp_options};

const CLIENT: [u8; 4] = [198, 19, 113, 7];
const NODE: [u8; 4] = [198, 18, 0, 1];

fn ipv4(buf: &mut [u8]) -> Option<Ip4> {
    parse::ipv4(&Pkt::from_slice(buf))
}

fn set_tot_len(f: &mut [u8], v: usize) {
    f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&(v as u16).to_be_bytes());
}

fn tcp_frame(payload: usize) -> Vec<u8> {
    Spec::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK)
        .payload(vec![0x5a; payload])
        .build()
}

fn udp_frame(payload: usize) -> Vec<u8> {
    Spec::udp(CLIENT, 40000, NODE, 5353, &[])
        .payload(vec![0x5a; payload])
        .build()
}

/// Runs all three parsers the way `fwd::process` does; the point is that
/// none of them panics or reads outside the buffer, whatever the input.
/// What `parse_all` found: the IPv4 header, the ports, the L4 check.
type Parsed = (Option<Ip4>, Option<(u16, u16)>, Option<Result<(), L4Error>>);

fn parse_all(buf: &mut [u8]) -> Parsed {
    let pkt = Pkt::from_slice(buf);
    let Some(ip) = parse::ipv4(&pkt) else {
        return (None, None, None);
    };
    assert!(
        ip.l4_off <= ip.l3_end && ip.l3_end <= buf.len(),
        "{ip:?} in {} bytes",
        buf.len()
    );
    let ports = parse::ports(&pkt, &ip);
    let l4 = parse::check_l4(&pkt, &ip);
    if l4.is_ok() {
        assert!(ports.is_some(), "a valid L4 header has readable ports");
    }
    (Some(ip), ports, Some(l4))
}

#[test]
fn pkt_bounds() {
    let mut buf = [1u8, 2, 3, 4, 5];
    let p = Pkt::from_slice(&mut buf);
    assert_eq!(p.len(), 5);
    assert!(!p.is_empty());
    assert_eq!(p.load::<u8>(4), Some(5));
    assert_eq!(p.load::<u8>(5), None);
    assert_eq!(p.load::<u32>(1), Some(u32::from_ne_bytes([2, 3, 4, 5])));
    assert_eq!(p.load::<u32>(2), None);
    assert_eq!(p.load::<u16>(usize::MAX / 2), None);
    assert_eq!(p.store::<u16>(4, 0xffff), None);
    assert_eq!(p.store::<u16>(3, 0x0a0b), Some(()));
    let w = 0x0a0bu16.to_ne_bytes();
    assert_eq!(buf, [1, 2, 3, w[0], w[1]]);

    let mut empty: [u8; 0] = [];
    let p = Pkt::from_slice(&mut empty);
    assert!(p.is_empty());
    assert_eq!(p.load::<u8>(0), None);
}

#[test]
fn plain_tcp_and_udp() {
    for (mut f, proto, dport) in [
        (tcp_frame(11), IPPROTO_TCP, 8080u16),
        (udp_frame(11), IPPROTO_UDP, 5353),
    ] {
        let len = f.len();
        let pkt = Pkt::from_slice(&mut f);
        let ip = parse::ipv4(&pkt).expect("parses");
        assert_eq!(ip.l4_off, ETH_HLEN + 20);
        assert_eq!(ip.l3_end, len);
        assert_eq!(ip.saddr, u32::from_ne_bytes(CLIENT));
        assert_eq!(ip.daddr, u32::from_ne_bytes(NODE));
        assert_eq!(ip.proto, proto);
        assert!(!ip.first_fragment && !ip.later_fragment);
        assert_eq!(
            parse::ports(&pkt, &ip),
            Some((40000u16.to_be(), dport.to_be()))
        );
        assert_eq!(parse::check_l4(&pkt, &ip), Ok(()));
        let csum_at = if proto == IPPROTO_TCP { 16 } else { 6 };
        assert_eq!(parse::l4_csum_off(&ip), ip.l4_off + csum_at);
    }
}

/// IHL 6..=15: the L4 header starts after the options.
#[test]
fn ip_options_move_l4() {
    for ihl in 5..=15usize {
        for udp in [false, true] {
            let mut spec = if udp {
                Spec::udp(CLIENT, 1111, NODE, 2222, &[])
            } else {
                Spec::tcp(CLIENT, 1111, NODE, 2222, TCP_ACK)
            };
            spec.ip_opts = ip_options((ihl - 5) * 4);
            spec.payload = vec![7; 3];
            let mut f = spec.build();
            let len = f.len();
            let pkt = Pkt::from_slice(&mut f);
            let ip = parse::ipv4(&pkt).unwrap_or_else(|| panic!("ihl {ihl}"));
            assert_eq!(ip.l4_off, ETH_HLEN + ihl * 4, "ihl {ihl}");
            assert_eq!(ip.l3_end, len);
            assert_eq!(
                parse::ports(&pkt, &ip),
                Some((1111u16.to_be(), 2222u16.to_be()))
            );
            assert_eq!(parse::check_l4(&pkt, &ip), Ok(()), "ihl {ihl} udp {udp}");
        }
    }
}

#[test]
fn ihl_below_5_is_not_ours() {
    for ihl in 0..5u8 {
        let mut f = tcp_frame(40);
        f[ETH_HLEN] = 0x40 | ihl;
        assert_eq!(ipv4(&mut f), None, "ihl {ihl}");
    }
}

#[test]
fn version_other_than_4_is_not_ours() {
    for version in [0u8, 1, 5, 6, 15] {
        let mut f = tcp_frame(40);
        f[ETH_HLEN] = (version << 4) | 5;
        assert_eq!(ipv4(&mut f), None, "version {version}");
    }
}

#[test]
fn other_ethertypes_and_protocols_are_not_ours() {
    for et in [0x86ddu16, 0x8100, 0x0806, 0x0008] {
        let mut f = tcp_frame(10);
        f[12..14].copy_from_slice(&et.to_be_bytes());
        assert_eq!(ipv4(&mut f), None, "ethertype {et:#06x}");
    }
    for proto in [0u8, 1, 2, 41, 47, 50, 132, 255] {
        let mut f = tcp_frame(10);
        f[ETH_HLEN + 9] = proto;
        assert_eq!(ipv4(&mut f), None, "protocol {proto}");
    }
}

/// Every prefix of a frame, from 0 bytes to the whole frame: nothing
/// panics, and only the whole frame parses (its total length says so).
#[test]
fn truncated_frames_at_every_length() {
    let mut specs = vec![
        Spec::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK).payload(vec![1; 9]),
        Spec::udp(CLIENT, 40000, NODE, 53, &[]).payload(vec![2; 9]),
    ];
    let mut s = Spec::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK).payload(vec![3; 5]);
    s.ip_opts = ip_options(8);
    s.tcp_opts = tcp_options(12);
    specs.push(s);
    let mut s = Spec::udp(CLIENT, 40000, NODE, 53, &[]);
    s.ip_opts = ip_options(40);
    specs.push(s);

    for spec in &specs {
        let full = spec.build();
        for len in 0..=full.len() {
            let mut b = full[..len].to_vec();
            let (ip, ports, l4) = parse_all(&mut b);
            if len < full.len() {
                assert_eq!(ip, None, "len {len} of {}", full.len());
            } else {
                assert!(ip.is_some() && ports.is_some() && l4 == Some(Ok(())));
            }
        }
    }
}

/// Prefixes again, but with the total length shrunk to what is left (a
/// consistent IPv4 header over a cut L4 header): the L4 checks say
/// exactly why the header is unusable.
#[test]
fn datagram_cut_inside_l4_header() {
    for (proto, hdr) in [(IPPROTO_TCP, 20usize), (IPPROTO_UDP, 8)] {
        let full = if proto == IPPROTO_TCP {
            tcp_frame(6)
        } else {
            udp_frame(6)
        };
        for len in 0..=full.len() {
            let mut b = full[..len].to_vec();
            if len >= ETH_HLEN + 4 {
                set_tot_len(&mut b, len - ETH_HLEN);
            }
            let (ip, ports, l4) = parse_all(&mut b);
            if len < ETH_HLEN + 20 {
                assert_eq!(ip, None, "len {len}");
                continue;
            }
            let ip = ip.expect("consistent header parses");
            assert_eq!(ip.l3_end, len);
            assert_eq!(ports.is_some(), len >= ETH_HLEN + 20 + 4, "len {len}");
            let l4 = l4.unwrap();
            let l4_len = len - ETH_HLEN - 20;
            if l4_len < hdr {
                assert_eq!(l4, Err(L4Error::Truncated), "{proto} len {len}");
            } else if proto == IPPROTO_UDP && l4_len < 8 + 6 {
                // The UDP length still says 14: past the datagram.
                assert_eq!(l4, Err(L4Error::BadLength), "len {len}");
            } else {
                assert_eq!(l4, Ok(()), "{proto} len {len}");
            }
        }
    }
}

#[test]
fn total_length_vs_frame_and_header() {
    let full = tcp_frame(10);
    let tot = full.len() - ETH_HLEN;
    let cases: &[(usize, bool)] = &[
        (tot + 1, false), // longer than the frame
        (0xffff, false),  // far longer
        (tot, true),      // exact
        (20, true),       // exactly the IP header, no L4 at all
        (19, false),      // shorter than the header
        (0, false),
    ];
    for &(t, ok) in cases {
        let mut f = full.clone();
        set_tot_len(&mut f, t);
        let (ip, ports, l4) = parse_all(&mut f);
        assert_eq!(ip.is_some(), ok, "tot_len {t}");
        if let Some(ip) = ip {
            assert_eq!(ip.l3_end, ETH_HLEN + t);
        }
        if t == 20 {
            assert_eq!(ports, None);
            assert_eq!(l4, Some(Err(L4Error::Truncated)));
        }
    }
    // With options: the total length must cover them too.
    let mut s = Spec::udp(CLIENT, 1, NODE, 2, &[]);
    s.ip_opts = ip_options(16);
    let full = s.build();
    for t in [35usize, 36, 37] {
        let mut f = full.clone();
        set_tot_len(&mut f, t);
        let ip = ipv4(&mut f);
        assert_eq!(ip.is_some(), t >= 36, "tot_len {t} with ihl 9");
    }
}

/// Short frames padded to the Ethernet minimum: `l3_end` stops at the end
/// of the datagram, and the padding is not taken as L4 bytes.
#[test]
fn ethernet_padding_is_excluded() {
    // UDP with 2 bytes of payload: 14 + 20 + 10 = 44, padded to 60.
    let mut s = Spec::udp(CLIENT, 40000, NODE, 53, &[]).payload(vec![9, 9]);
    s.pad = 16;
    let mut f = s.build();
    assert_eq!(f.len(), 60);
    let (ip, ports, l4) = parse_all(&mut f);
    let ip = ip.unwrap();
    assert_eq!(ip.l3_end, 44);
    assert_eq!(ports, Some((40000u16.to_be(), 53u16.to_be())));
    assert_eq!(l4, Some(Ok(())));

    // A UDP length that reaches into the padding is past the datagram.
    let mut g = f.clone();
    g[ip.l4_off + 4..ip.l4_off + 6].copy_from_slice(&20u16.to_be_bytes());
    assert_eq!(parse_all(&mut g).2, Some(Err(L4Error::BadLength)));

    // TCP: a bare header (40 bytes of IP) padded to 60; a data offset
    // that only fits by counting the padding is truncated.
    let mut s = Spec::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK);
    s.pad = 6;
    let mut f = s.build();
    assert_eq!(f.len(), 60);
    let (ip, _, l4) = parse_all(&mut f);
    assert_eq!(ip.unwrap().l3_end, 54);
    assert_eq!(l4, Some(Ok(())));
    f[ETH_HLEN + 20 + 12] = 6 << 4;
    assert_eq!(parse_all(&mut f).2, Some(Err(L4Error::Truncated)));

    // A header cut by the total length but "completed" by padding.
    let mut s = Spec::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK);
    s.pad = 20;
    let mut f = s.build();
    set_tot_len(&mut f, 30);
    let (ip, ports, l4) = parse_all(&mut f);
    assert_eq!(ip.unwrap().l3_end, 44);
    assert!(ports.is_some());
    assert_eq!(l4, Some(Err(L4Error::Truncated)));
}

#[test]
fn fragments() {
    // (flags+offset word, first_fragment, later_fragment)
    let cases = [
        (0x0000u16, false, false), // not fragmented
        (0x4000, false, false),    // DF
        (0x2000, true, false),     // MF, offset 0: first fragment
        (0x6000, true, false),     // DF|MF (odd but possible), offset 0
        (0x2001, false, true),     // MF, offset 8
        (0x0001, false, true),     // last fragment
        (0x1fff, false, true),     // largest offset
        (0x8000, false, false),    // reserved bit only
        (0xa000, true, false),     // reserved|MF
        (0x3fff, false, true),
    ];
    for (frag, first, later) in cases {
        let mut s = Spec::udp(CLIENT, 1, NODE, 2, &[]).payload(vec![0; 8]);
        s.frag = frag;
        let mut f = s.build();
        let ip = ipv4(&mut f).unwrap();
        assert_eq!(
            (ip.first_fragment, ip.later_fragment),
            (first, later),
            "frag {frag:#06x}"
        );
    }
}

#[test]
fn tcp_data_offset() {
    for doff in 0..=15u8 {
        // Enough options for any data offset: 40 bytes.
        let mut s = Spec::tcp(CLIENT, 40000, NODE, 8080, TCP_ACK);
        s.tcp_opts = tcp_options(40);
        let mut f = s.build();
        f[ETH_HLEN + 20 + 12] = doff << 4;
        let (_, _, l4) = parse_all(&mut f);
        let want = if doff < 5 {
            Err(L4Error::BadLength)
        } else {
            Ok(())
        };
        assert_eq!(l4, Some(want), "doff {doff}");

        // Header only (20 bytes): any offset above 5 runs past the end.
        let mut f = tcp_frame(0);
        f[ETH_HLEN + 20 + 12] = doff << 4;
        let (_, _, l4) = parse_all(&mut f);
        let want = match doff {
            0..=4 => Err(L4Error::BadLength),
            5 => Ok(()),
            _ => Err(L4Error::Truncated),
        };
        assert_eq!(l4, Some(want), "doff {doff}, no room");
    }
    // With payload, the offset may point into it (the payload then counts
    // as options): fine as long as it stays inside the datagram.
    let mut f = tcp_frame(8);
    f[ETH_HLEN + 20 + 12] = 7 << 4;
    assert_eq!(parse_all(&mut f).2, Some(Ok(())));
    f[ETH_HLEN + 20 + 12] = 8 << 4;
    assert_eq!(parse_all(&mut f).2, Some(Err(L4Error::Truncated)));
}

#[test]
fn udp_length() {
    let payload = 10usize;
    let datagram = 8 + payload;
    for ulen in [0usize, 1, 7, 8, 9, 17, 18, 19, 100, 0xffff] {
        let mut f = udp_frame(payload);
        f[ETH_HLEN + 20 + 4..ETH_HLEN + 20 + 6].copy_from_slice(&(ulen as u16).to_be_bytes());
        let (_, _, l4) = parse_all(&mut f);
        // Shorter than the IP payload is accepted (the rest is trailing
        // bytes); shorter than its own header or past the datagram is not.
        let want = if ulen < 8 || ulen > datagram {
            Err(L4Error::BadLength)
        } else {
            Ok(())
        };
        assert_eq!(l4, Some(want), "udp length {ulen}");
    }
    // Exactly 8: no payload at all.
    let mut f = udp_frame(0);
    assert_eq!(f.len(), ETH_HLEN + 28);
    assert_eq!(parse_all(&mut f).2, Some(Ok(())));
    // Fewer than 8 bytes of UDP in the datagram.
    for l in 0..8 {
        let mut f = udp_frame(0);
        set_tot_len(&mut f, 20 + l);
        let (ip, ports, l4) = parse_all(&mut f);
        assert!(ip.is_some());
        assert_eq!(ports.is_some(), l >= 4);
        assert_eq!(l4, Some(Err(L4Error::Truncated)), "{l} bytes of UDP");
    }
}

/// Random garbage and random mutations of valid frames never panic, and
/// whatever parses is self-consistent (checked in `parse_all`).
#[test]
fn fuzz_never_panics() {
    let mut rng = Rng::new(42);
    for _ in 0..20_000 {
        let mut f = if rng.bool() {
            let n = rng.range(0, 120);
            let mut b = rng.bytes(n);
            if b.len() >= 15 && rng.bool() {
                b[12] = 0x08;
                b[13] = 0x00;
                b[14] = 0x40 | (b[14] & 0x0f);
            }
            b
        } else {
            let mut f = Spec::random(&mut rng).build();
            for _ in 0..rng.range(1, 4) {
                let i = rng.range(0, (ETH_HLEN + 80).min(f.len() - 1));
                f[i] = rng.next_u8();
            }
            let keep = rng.range(0, f.len());
            f.truncate(keep);
            f
        };
        parse_all(&mut f);
    }
}

/// `Pkt::load`/`store` are safe functions, so any offset must be refused
/// when it does not fit, including offsets that overflow `start + off`.
/// Today `start + off` is computed unchecked: in a debug build it panics
/// ("attempt to add with overflow"), in a release build it wraps, and
/// `off = usize::MAX` then reads (or writes) the byte just before the
/// buffer. No caller in the crate passes such an offset (they are all
/// below 14 + 60 + 60), so only direct users of `Pkt` are exposed.
#[test]
fn pkt_offset_overflow_is_out_of_bounds() {
    let mut buf = [0u8; 16];
    let p = Pkt::from_slice(&mut buf[1..]);
    for off in [usize::MAX, usize::MAX - 1, usize::MAX - 3, usize::MAX - 15] {
        assert_eq!(p.load::<u8>(off), None, "load at {off:#x}");
        assert_eq!(p.load::<u32>(off), None, "load u32 at {off:#x}");
        assert_eq!(p.store::<u8>(off, 0xee), None, "store at {off:#x}");
    }
    assert_eq!(buf[0], 0, "the byte before the view is untouched");
}

/// A socket buffer whose readable part holds only the headers (a GSO
/// packet's payload sits in page fragments): its datagram is still parsed,
/// the length checks use the whole length, and nothing past the readable
/// part is read.
#[test]
fn socket_buffer_longer_than_its_readable_part() {
    let mut f = tcp_frame(4000);
    let whole = f.len();
    let readable = ETH_HLEN + 20 + 20;
    let start = f.as_mut_ptr() as usize;
    // SAFETY: start..start+readable lies inside `f`.
    let pkt = unsafe { Pkt::with_len(start, start + readable, whole) };
    let ip = parse::ipv4(&pkt).expect("parsed from its headers");
    assert_eq!(ip.l3_end, whole);
    assert_eq!(parse::check_l4(&pkt, &ip), Ok(()));
    // The same view without the whole length is a lying total length.
    // SAFETY: as above.
    let short = unsafe { Pkt::new(start, start + readable) };
    assert_eq!(parse::ipv4(&short), None);
    // A total length past even the whole packet is still refused.
    set_tot_len(&mut f, whole);
    // SAFETY: as above.
    let lying = unsafe {
        Pkt::with_len(
            f.as_mut_ptr() as usize,
            f.as_mut_ptr() as usize + readable,
            whole,
        )
    };
    assert_eq!(parse::ipv4(&lying), None);
}

/// `f`'s first `linear` bytes as a socket buffer's linear part, `f` the
/// whole packet (as `skb::headers` sees a GSO or GRO buffer).
fn linear(f: &mut [u8], linear: usize) -> Pkt {
    let start = f.as_mut_ptr() as usize;
    // SAFETY: start..start + linear lies inside `f`, which outlives the use.
    unsafe { Pkt::with_len(start, start + linear.min(f.len()), f.len()) }
}

const ALL: usize = 128;
const ENCAP: u16 = mesh_common::abi::DEFAULT_ENCAP_PORT;

/// What the uplink's TC intercept pulls: a plain TCP or UDP packet only
/// its headers, however much payload follows (a GSO or GRO buffer holds
/// just those in its linear part, and must not be pulled).
#[test]
fn readable_needed_is_the_headers_of_a_plain_datagram() {
    let cases = [
        (Spec::tcp(CLIENT, 40000, NODE, 30080, TCP_ACK), 14 + 20 + 20),
        (
            Spec {
                tcp_opts: tcp_options(12),
                ..Spec::tcp(CLIENT, 40000, NODE, 30080, TCP_ACK)
            },
            14 + 20 + 32,
        ),
        (
            Spec {
                ip_opts: ip_options(8),
                tcp_opts: tcp_options(40),
                ..Spec::tcp(CLIENT, 40000, NODE, 30080, TCP_ACK)
            },
            14 + 28 + 60,
        ),
        (Spec::udp(CLIENT, 40000, NODE, 30053, &[]), 14 + 20 + 8),
        (
            Spec {
                ip_opts: ip_options(40),
                ..Spec::udp(CLIENT, 40000, NODE, 30053, &[])
            },
            14 + 60 + 8,
        ),
    ];
    for (spec, headers) in cases {
        let mut f = spec.payload(vec![0x5a; 9000]).build();
        // The same whether the linear part holds the headers alone or the
        // whole packet.
        for lin in [headers, 200, f.len()] {
            let need = parse::readable_needed(&linear(&mut f, lin), ALL, ENCAP.to_be());
            assert_eq!(need, headers, "linear part of {lin} bytes");
        }
    }
}

#[test]
fn readable_needed_is_everything_for_what_reads_deeper() {
    // To the encapsulation port: the outer headers, the mesh header and
    // the inner headers are read.
    let mut f = Spec::udp(CLIENT, 40000, NODE, ENCAP, &[0; 2000]).build();
    assert_eq!(
        parse::readable_needed(&linear(&mut f, 42), ALL, ENCAP.to_be()),
        ALL
    );
    // ICMP: an error's quote.
    let quoted = Spec::tcp(NODE, 30080, CLIENT, 40000, TCP_ACK);
    let mut f = mesh_common::testing::frame::IcmpErrSpec::frag_needed(
        CLIENT.into(),
        NODE.into(),
        1400,
        quoted,
    )
    .build();
    assert_eq!(
        parse::readable_needed(&linear(&mut f, 34), ALL, ENCAP.to_be()),
        ALL
    );
    // The bytes that decide are not readable: the IPv4 header cut, the
    // TCP data offset or the UDP port beyond the linear part.
    let mut f = Spec::tcp(CLIENT, 40000, NODE, 30080, TCP_ACK)
        .payload(vec![0; 3000])
        .build();
    for lin in [0, 20, 33, 34 + 12] {
        let need = parse::readable_needed(&linear(&mut f, lin), ALL, ENCAP.to_be());
        assert_eq!(need, ALL, "linear part of {lin} bytes");
    }
    let mut f = Spec::udp(CLIENT, 40000, NODE, 30053, &[0; 3000]).build();
    assert_eq!(
        parse::readable_needed(&linear(&mut f, 34 + 3), ALL, ENCAP.to_be()),
        ALL
    );
    // Never more than `all`.
    let mut f = Spec {
        ip_opts: ip_options(40),
        tcp_opts: tcp_options(40),
        ..Spec::tcp(CLIENT, 40000, NODE, 30080, TCP_ACK)
    }
    .payload(vec![0; 3000])
    .build();
    assert_eq!(
        parse::readable_needed(&linear(&mut f, 200), 100, ENCAP.to_be()),
        100
    );
}

#[test]
fn readable_needed_is_little_for_what_the_path_passes() {
    // Not IPv4 (ARP, IPv6): nothing.
    let mut f = Spec::tcp(CLIENT, 40000, NODE, 30080, TCP_ACK).build();
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert_eq!(
        parse::readable_needed(&linear(&mut f, 40), ALL, ENCAP.to_be()),
        0
    );
    // Another protocol (GRE): its IPv4 header.
    let mut f = Spec::new(47, CLIENT, 0, NODE, 0)
        .payload(vec![0; 3000])
        .build();
    assert_eq!(
        parse::readable_needed(&linear(&mut f, 34), ALL, ENCAP.to_be()),
        34
    );
}

/// Whatever the frame, the forward path's parsers find in the bytes
/// `readable_needed` asks for what they find in the whole frame.
#[test]
fn readable_needed_is_enough_for_the_parsers() {
    let mut rng = Rng::new(7);
    for _ in 0..5000 {
        let mut f = Spec::random(&mut rng).build();
        let need = parse::readable_needed(&Pkt::from_slice(&mut f), ALL, ENCAP.to_be());
        let whole = {
            let p = Pkt::from_slice(&mut f);
            let ip = parse::ipv4(&p);
            let ports = ip.and_then(|ip| parse::ports(&p, &ip));
            let l4 = ip.map(|ip| parse::check_l4(&p, &ip));
            (ip, ports, l4)
        };
        let part = {
            let p = linear(&mut f, need);
            let ip = parse::ipv4(&p);
            let ports = ip.and_then(|ip| parse::ports(&p, &ip));
            let l4 = ip.map(|ip| parse::check_l4(&p, &ip));
            (ip, ports, l4)
        };
        assert_eq!(part, whole, "{need} of {} bytes", f.len());
    }
}
