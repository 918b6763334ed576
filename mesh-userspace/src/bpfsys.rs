//! The bpf(2) calls aya 0.14 does not wrap that meshd and its benchmark
//! need: loading a program of a few hand-assembled instructions (no
//! compiler: meshd's tick probe, the benchmark's empty TC program), one
//! BPF_PROG_TEST_RUN of a program by descriptor, batched reads of a hash
//! map (conntrack's counts and sweep), an object's info and a link by id
//! (the pinned links' devices).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};
pub use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_type};

/// The bpf syscall with `attr`.
pub fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: the bpf syscall with a fully initialized attribute union of
    // the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An attribute union with every field zero, as the kernel expects in the
/// fields a command does not use.
pub fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a plain C union; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// One BPF instruction, encoded: opcode, registers (dst low nibble, src
/// high nibble), offset, immediate.
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// `BPF_ALU64 | BPF_MOV | BPF_K`, `BPF_JMP | BPF_CALL`, `BPF_JMP | BPF_EXIT`.
pub const MOV64_IMM: u8 = 0x07 | 0xb0;
pub const CALL: u8 = 0x05 | 0x80;
pub const EXIT: u8 = 0x05 | 0x90;

/// Loads a GPL program of type `ty` from encoded instructions `insns`,
/// named `name` (at most 15 bytes kept).
pub fn load_prog(ty: bpf_prog_type, insns: &[[u8; 8]], name: &str) -> Result<OwnedFd> {
    let code: Vec<u8> = insns.concat();
    let license = CString::new("GPL").unwrap();
    let mut attr = zeroed_attr();
    // SAFETY: writing the BPF_PROG_LOAD member of a zeroed union.
    unsafe {
        let a = &mut attr.__bindgen_anon_3;
        a.prog_type = ty as u32;
        a.insn_cnt = insns.len() as u32;
        a.insns = code.as_ptr() as u64;
        a.license = license.as_ptr() as u64;
        for (d, s) in a.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s as libc::c_char;
        }
    }
    let fd = sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
        .with_context(|| format!("loading the program {name}"))?;
    // SAFETY: BPF_PROG_LOAD returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One BPF_PROG_TEST_RUN (repeat = 1) of the program `prog` on `frame`
/// with context `ctx` (empty: none): its return value and the
/// kernel-reported duration (ns).
pub fn test_run_fd(prog: BorrowedFd<'_>, frame: &[u8], ctx: &[u8]) -> Result<(u32, u64)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = zeroed_attr();
    // SAFETY: writing the BPF_PROG_TEST_RUN member of a zeroed union; the
    // buffers outlive the call.
    unsafe {
        let t = &mut attr.test;
        t.prog_fd = prog.as_raw_fd() as u32;
        t.data_in = frame.as_ptr() as u64;
        t.data_size_in = frame.len() as u32;
        t.data_out = out.as_mut_ptr() as u64;
        t.data_size_out = out.len() as u32;
        if !ctx.is_empty() {
            t.ctx_in = ctx.as_ptr() as u64;
            t.ctx_size_in = ctx.len() as u32;
        }
        t.repeat = 1;
    }
    sys_bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    // SAFETY: the kernel filled the union's test member.
    let (ret, ns) = unsafe { (attr.test.retval, attr.test.duration) };
    Ok((ret, ns as u64))
}

/// Calls `f` with each entry (key and value bytes) of hash map `map`,
/// whose keys and values are `key_size` and `value_size` bytes, read with
/// BPF_MAP_LOOKUP_BATCH (a few system calls for hundreds of thousands of
/// entries; entries written meanwhile may or may not be seen); returns
/// how many there were.
pub fn for_each_entry(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut f: impl FnMut(&[u8], &[u8]),
) -> Result<u64> {
    const BATCH: u32 = 4096;
    let (ks, vs) = (key_size, value_size);
    let mut keys = vec![0u8; ks * BATCH as usize];
    let mut values = vec![0u8; vs * BATCH as usize];
    // The batch token of a hash map is a bucket index.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut total = 0u64;
    let mut first = true;
    loop {
        let mut attr = zeroed_attr();
        // SAFETY: writing the batch member of a zeroed union; the buffers
        // (`count` keys and values) and the tokens outlive the call.
        unsafe {
            let b = &mut attr.batch;
            b.in_batch = if first {
                0
            } else {
                &token_in as *const u64 as u64
            };
            b.out_batch = &mut token_out as *mut u64 as u64;
            b.keys = keys.as_mut_ptr() as u64;
            b.values = values.as_mut_ptr() as u64;
            b.count = BATCH;
            b.map_fd = map.as_raw_fd() as u32;
        }
        let r = sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: the kernel sets the entries it copied in the batch
        // member's count, the last call (ENOENT) included.
        let n = unsafe { attr.batch.count } as usize;
        for i in 0..n {
            f(&keys[i * ks..(i + 1) * ks], &values[i * vs..(i + 1) * vs]);
        }
        total += n as u64;
        match r {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Err(e) => return Err(anyhow::Error::new(e).context("BPF_MAP_LOOKUP_BATCH")),
        }
        token_in = token_out;
        first = false;
    }
}

/// BPF_OBJ_GET_INFO_BY_FD: the kernel's info on object `fd`, written into
/// `info` (zeroed, at least the info struct's size).
pub fn obj_info(fd: BorrowedFd<'_>, info: &mut [u64]) -> Result<()> {
    let mut attr = zeroed_attr();
    // SAFETY: writing the info member of a zeroed union; `info` outlives
    // the call and is `info_len` bytes.
    unsafe {
        let a = &mut attr.info;
        a.bpf_fd = fd.as_raw_fd() as u32;
        a.info_len = std::mem::size_of_val(info) as u32;
        a.info = info.as_mut_ptr() as u64;
    }
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(())
}

/// A descriptor of BPF link `id`.
pub fn link_fd_by_id(id: u32) -> Result<OwnedFd> {
    let mut attr = zeroed_attr();
    // The id of the GET_FD_BY_ID member of a zeroed union (a plain write).
    attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
    let fd = sys_bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr).context("BPF_LINK_GET_FD_BY_ID")?;
    // SAFETY: the kernel returned a new descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
