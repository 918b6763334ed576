//! Internet checksum arithmetic.
//!
//! Incremental updates follow RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`,
//! which never produces the -0 trap of eqn. 2. Values are the raw 16-bit
//! words as they sit in memory, read in native order: one's-complement sums
//! are byte-order independent, so no swapping is needed as long as the
//! checksum field is read the same way.

#[inline(always)]
pub const fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Update `check` for a 32-bit field changing from `old` to `new`.
#[inline(always)]
pub const fn update32(check: u16, old: u32, new: u32) -> u16 {
    let s = (!check) as u64
        + (!old as u64 & 0xffff)
        + ((!old >> 16) as u64)
        + (new as u64 & 0xffff)
        + ((new >> 16) as u64);
    !fold(s)
}

/// Update `check` for a 32-bit field and a 16-bit field changing at once
/// (an address and a port: one fold instead of two).
#[inline(always)]
pub const fn update48(check: u16, old: u32, new: u32, old16: u16, new16: u16) -> u16 {
    let s = (!check) as u64
        + (!old as u64 & 0xffff)
        + ((!old >> 16) as u64)
        + (new as u64 & 0xffff)
        + ((new >> 16) as u64)
        + (!old16) as u64
        + new16 as u64;
    !fold(s)
}

/// Several fields changing under one checksum: collect their changes, then
/// apply them with one fold.
#[derive(Clone, Copy, Debug, Default)]
pub struct Delta(u64);

impl Delta {
    #[inline(always)]
    pub const fn add32(self, old: u32, new: u32) -> Self {
        Self(
            self.0
                + (!old as u64 & 0xffff)
                + ((!old >> 16) as u64)
                + (new as u64 & 0xffff)
                + ((new >> 16) as u64),
        )
    }

    #[inline(always)]
    pub const fn add16(self, old: u16, new: u16) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// Whether no change was added.
    #[inline(always)]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Both sets of changes.
    #[inline(always)]
    pub const fn plus(self, other: Delta) -> Self {
        Self(self.0 + other.0)
    }

    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold((!check) as u64 + self.0)
    }

    /// The changes folded to 16 bits: the difference the kernel's
    /// checksum helpers take (`bpf_l4_csum_replace` with a field size of
    /// 0 adds it as a `__wsum`).
    #[inline(always)]
    pub const fn folded(self) -> u16 {
        fold(self.0)
    }
}

/// Brings the TCP or UDP checksum at `off` of `pkt` up to date by hand:
/// `pseudo` holds the changes of fields the pseudo-header covers (the
/// addresses), `seg` those of fields only the segment covers (ports,
/// options). For a packet whose checksum is complete, as XDP and the host
/// see every packet. A UDP checksum of 0 ("none") stays 0.
#[inline(always)]
pub fn fix_l4(
    pkt: &crate::pkt::Pkt,
    off: usize,
    udp: bool,
    pseudo: Delta,
    seg: Delta,
) -> Option<()> {
    let check: u16 = pkt.load(off)?;
    let new = pseudo.plus(seg).apply(check);
    let new = if udp { udp_fixup(check, new) } else { new };
    pkt.store(off, new)
}

/// UDP over IPv4: a zero checksum means "none" and stays zero; a computed
/// zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_fixup(orig: u16, updated: u16) -> u16 {
    if orig == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

/// Full checksum over `data` (big-endian words), for tests and tools.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut s = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [b] = chunks.remainder() {
        s += (*b as u64) << 8;
    }
    !fold(s)
}

/// The IPv4 pseudo-header sum (big-endian words) for TCP/UDP checksums.
pub fn pseudo4(saddr: [u8; 4], daddr: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    u16::from_be_bytes([saddr[0], saddr[1]]) as u32
        + u16::from_be_bytes([saddr[2], saddr[3]]) as u32
        + u16::from_be_bytes([daddr[0], daddr[1]]) as u32
        + u16::from_be_bytes([daddr[2], daddr[3]]) as u32
        + proto as u32
        + l4_len as u32
}
