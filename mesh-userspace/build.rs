//! Builds the BPF objects (mesh-ebpf/programs) for bpfel-unknown-none with
//! Debian's rustc, which ships a prebuilt `core` for BPF (no rust-src is
//! needed; see ../shared/TOOLCHAIN.md), and exposes their paths to the
//! crate for `include_bytes!`: MESH_BPF_OBJ (the dataplane) and
//! MESH_FLOOR_OBJ (the benchmark's floor programs).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap();
    let progs = root.join("mesh-ebpf/programs");
    let common = root.join("mesh-ebpf/common");
    for p in [
        progs.join("src"),
        progs.join("Cargo.toml"),
        common.join("src"),
        common.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let target_dir = root.join("target/bpf");
    let cargo = std::env::var("MESH_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    let rustc = std::env::var("MESH_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    println!("cargo:rerun-if-env-changed=MESH_BPF_CARGO");
    println!("cargo:rerun-if-env-changed=MESH_BPF_RUSTC");
    if !Path::new(&cargo).exists() || !Path::new(&rustc).exists() {
        panic!(
            "building the BPF programs needs Debian's cargo and rustc ({cargo}, {rustc}) with the \
             BPF core library; run `cargo xtask setup` (or `cargo xtask test`/`demo`, which run it)"
        );
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let mut path = std::env::var("PATH").unwrap_or_default();
    if let Ok(home) = std::env::var("HOME") {
        // bpf-linker is installed by `cargo install` into ~/.cargo/bin.
        path = format!("{home}/.cargo/bin:{path}");
    }
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&progs)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "RUSTFLAGS",
            format!(
                "-C link-arg=--btf -C debuginfo=2 --cfg=bpf_target_arch=\"{arch}\" \
                 -C target-feature=+allows-misaligned-mem-access"
            ),
        )
        .env("PATH", path);
    // Do not leak the outer build's settings into the BPF build.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" || k == "RUSTC_WRAPPER" {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let status = cmd.status().expect("run cargo for the BPF programs");
    if !status.success() {
        panic!("building the BPF programs failed ({status}); see the errors above");
    }
    let out = target_dir.join("bpfel-unknown-none/release");
    let (obj, floor) = (out.join("mesh"), out.join("mesh-floor"));
    println!("cargo:rustc-env=MESH_BPF_OBJ={}", obj.display());
    println!("cargo:rustc-env=MESH_FLOOR_OBJ={}", floor.display());
}
