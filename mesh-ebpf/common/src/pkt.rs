//! Bounds-checked access to packet bytes.
//!
//! One type serves both worlds: in the kernel `start`/`end` are the XDP or
//! TC context's `data`/`data_end`; on the host they span a `Vec<u8>`. Every
//! access compares `start + off + size` against `end`, which is exactly the
//! shape the verifier needs to accept the access.

use core::mem::size_of;

#[derive(Clone, Copy, Debug)]
pub struct Pkt {
    start: usize,
    end: usize,
    /// The packet's whole length. Equal to `end - start` except for a
    /// socket buffer (TC), whose directly readable part may be shorter
    /// (a GSO packet's payload sits in page fragments).
    wire_len: usize,
    /// A socket buffer's segment size when it stands for several segments
    /// (GSO, GRO), 0 otherwise: what must fit a link is one segment.
    gso_size: usize,
    /// The packets on the wire it stands for (1, or its GSO segments):
    /// what counters count.
    segs: u32,
}

impl Pkt {
    /// # Safety
    /// `start..end` must be readable and writable for as long as the value
    /// is used (a packet's data, or a live buffer).
    #[inline(always)]
    pub unsafe fn new(start: usize, end: usize) -> Self {
        Self {
            start,
            end,
            wire_len: end - start,
            gso_size: 0,
            segs: 1,
        }
    }

    /// A socket buffer: `start..end` is its linear part, `len` its length.
    ///
    /// # Safety
    /// As for [`Pkt::new`].
    #[inline(always)]
    pub unsafe fn with_len(start: usize, end: usize, len: usize) -> Self {
        Self {
            start,
            end,
            wire_len: len,
            gso_size: 0,
            segs: 1,
        }
    }

    /// The same packet, standing for `segs` segments of `gso_size` bytes
    /// of payload (0: one packet).
    #[inline(always)]
    pub fn with_gso(self, gso_size: usize, segs: u32) -> Self {
        Self {
            gso_size,
            segs: if gso_size == 0 || segs == 0 { 1 } else { segs },
            ..self
        }
    }

    /// The whole packet's length, readable or not.
    #[inline(always)]
    pub fn wire_len(&self) -> usize {
        self.wire_len
    }

    /// The payload of each segment this packet stands for (GSO), or 0 when
    /// it is one packet.
    #[inline(always)]
    pub fn gso_size(&self) -> usize {
        self.gso_size
    }

    /// The packets on the wire this one stands for: 1, or a socket
    /// buffer's segments (a GRO packet is counted as what it was received
    /// as, a GSO packet as what it is sent as).
    #[inline(always)]
    pub fn segs(&self) -> u32 {
        self.segs
    }

    /// A view over a host buffer (tests, fixtures, tools).
    #[inline(always)]
    pub fn from_slice(buf: &mut [u8]) -> Self {
        let start = buf.as_mut_ptr() as usize;
        Self {
            start,
            end: start + buf.len(),
            wire_len: buf.len(),
            gso_size: 0,
            segs: 1,
        }
    }

    /// The directly readable length.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    #[inline(always)]
    fn ptr<T>(&self, off: usize) -> Option<*mut T> {
        // Laundered so that LLVM cannot prove this check redundant from
        // earlier ones (it can, the verifier cannot) nor rebuild the
        // pointer differently for the access that follows.
        // `off > len` first: past it `start + off` could wrap around. (In
        // the kernel, offsets are below 64 KiB and the verifier proves every
        // access, so the extra compare is left out there.)
        #[cfg(not(target_arch = "bpf"))]
        if off > self.len() {
            return None;
        }
        let p = opaque(self.start + off);
        if p + size_of::<T>() > self.end {
            return None;
        }
        Some(p as *mut T)
    }

    /// Reads a `T` at `off` (unaligned), or `None` past the end.
    #[inline(always)]
    pub fn load<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: bounds checked by `ptr`; the constructor's contract.
        self.ptr::<T>(off)
            .map(|p| unsafe { core::ptr::read_unaligned(p) })
    }

    /// Writes a `T` at `off` (unaligned); `None` past the end.
    #[inline(always)]
    pub fn store<T: Copy>(&self, off: usize, v: T) -> Option<()> {
        // SAFETY: as for `load`.
        self.ptr::<T>(off)
            .map(|p| unsafe { core::ptr::write_unaligned(p, v) })
    }
}

/// `N` bytes of a packet, bounds-checked once: reads and writes inside them
/// need no further check (the verifier knows the range from the one
/// comparison).
#[derive(Clone, Copy, Debug)]
pub struct View<const N: usize> {
    p: usize,
}

impl Pkt {
    /// The `N` bytes at `off`, or `None` past the end.
    #[inline(always)]
    pub fn view<const N: usize>(&self, off: usize) -> Option<View<N>> {
        self.ptr::<[u8; N]>(off).map(|p| View { p: p as usize })
    }
}

impl<const N: usize> View<N> {
    /// Reads a `T` at `k` (unaligned); `k + size_of::<T>()` must be at
    /// most `N` (checked at compile time where `k` is constant).
    #[inline(always)]
    pub fn get<T: Copy>(&self, k: usize) -> T {
        assert!(k + size_of::<T>() <= N);
        // SAFETY: inside the N bytes checked by `Pkt::view`.
        unsafe { core::ptr::read_unaligned((self.p + k) as *const T) }
    }

    /// Writes a `T` at `k`; as for `get`.
    #[inline(always)]
    pub fn set<T: Copy>(&self, k: usize, v: T) {
        assert!(k + size_of::<T>() <= N);
        // SAFETY: as for `get`.
        unsafe { core::ptr::write_unaligned((self.p + k) as *mut T, v) }
    }
}

/// Hides a value from the optimiser: one register move it cannot see
/// through (an empty asm block would leave two BTF line records on one
/// instruction, which the kernel refuses).
#[inline(always)]
fn opaque(mut x: usize) -> usize {
    #[cfg(target_arch = "bpf")]
    // SAFETY: a register-to-itself move.
    unsafe {
        core::arch::asm!("{0} = {0}", inout(reg) x, options(nomem, nostack, preserves_flags));
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        x = core::hint::black_box(x);
    }
    x
}
