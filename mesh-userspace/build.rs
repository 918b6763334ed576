//! Builds the BPF objects (mesh-ebpf/programs) for bpfel-unknown-none with
//! Debian's rustc, which ships a prebuilt `core` for BPF (no rust-src is
//! needed; see ../shared/TOOLCHAIN.md), checks that their maps and programs
//! are exactly the ones `mesh_common::abi` names, and exposes their paths
//! to the crate for `include_bytes!`: MESH_BPF_OBJ (the dataplane) and
//! MESH_FLOOR_OBJ (the benchmark's floor programs).
//!
//! MESH_BPF_SKIP=1 builds against empty objects instead, for editors and
//! linters on machines without the BPF toolchain; such a build cannot load
//! a dataplane.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_common::abi;
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

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
    println!("cargo:rerun-if-env-changed=MESH_BPF_SKIP");
    if std::env::var("MESH_BPF_SKIP").as_deref() == Ok("1") {
        skip();
        return;
    }
    let target_dir = root.join("target/bpf");
    let cargo = std::env::var("MESH_BPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    let rustc = std::env::var("MESH_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    println!("cargo:rerun-if-env-changed=MESH_BPF_CARGO");
    println!("cargo:rerun-if-env-changed=MESH_BPF_RUSTC");
    if !Path::new(&cargo).exists() || !Path::new(&rustc).exists() {
        panic!(
            "building the BPF programs needs Debian's cargo and rustc ({cargo}, {rustc}) with the \
             BPF core library; run `cargo xtask setup` (or `cargo xtask test`/`demo`, which run it). \
             To check or lint user space without them, set MESH_BPF_SKIP=1 (the result cannot \
             load a dataplane)"
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
    check_object(
        &obj,
        abi::MAP_NAMES,
        abi::LOG_MAP_NAMES,
        abi::PROG_NAMES,
        "MAP_NAMES",
        "PROG_NAMES",
    );
    check_object(
        &floor,
        abi::FLOOR_MAP_NAMES,
        &[],
        abi::FLOOR_PROG_NAMES,
        "FLOOR_MAP_NAMES",
        "FLOOR_PROG_NAMES",
    );
    println!("cargo:rustc-env=MESH_BPF_OBJ={}", obj.display());
    println!("cargo:rustc-env=MESH_FLOOR_OBJ={}", floor.display());
}

/// Empty objects in place of the real ones.
fn skip() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let empty = out.join("skipped-bpf-object");
    std::fs::write(&empty, []).expect("write an empty object");
    println!(
        "cargo:warning=MESH_BPF_SKIP=1: built without the BPF objects (for editors and \
         linters); this build cannot load a dataplane"
    );
    println!("cargo:rustc-env=MESH_BPF_OBJ={}", empty.display());
    println!("cargo:rustc-env=MESH_FLOOR_OBJ={}", empty.display());
}

/// Fails the build unless the object at `path` has exactly the maps
/// `maps` (plus any of `extra_maps`) and exactly the programs `progs`: the
/// names in `#[map(name = ...)]` and of the program functions must be the
/// ones user space loads by.
fn check_object(
    path: &Path,
    maps: &[&str],
    extra_maps: &[&str],
    progs: &[&str],
    maps_list: &str,
    progs_list: &str,
) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let file = object::File::parse(&*data)
        .unwrap_or_else(|e| panic!("{}: not an object file: {e}", path.display()));
    let (found_maps, found_progs) = names(&file);
    let mut errors = Vec::new();
    let want_maps: BTreeSet<&str> = maps.iter().copied().collect();
    for m in &want_maps {
        if !found_maps.contains(*m) {
            errors.push(format!(
                "map {m:?} is in abi::{maps_list} but not in the object (is it spelled the \
                 same in #[map(name = ...)] in mesh-ebpf/programs/src?)"
            ));
        }
    }
    for m in &found_maps {
        if !want_maps.contains(m.as_str()) && !extra_maps.contains(&m.as_str()) {
            errors.push(format!(
                "map {m:?} is in the object but not in abi::{maps_list} (add its name to \
                 mesh-ebpf/common/src/abi.rs)"
            ));
        }
    }
    let want_progs: BTreeSet<&str> = progs.iter().copied().collect();
    for p in &want_progs {
        if !found_progs.contains(*p) {
            errors.push(format!(
                "program {p:?} is in abi::{progs_list} but not in the object"
            ));
        }
    }
    for p in &found_progs {
        if !want_progs.contains(p.as_str()) {
            errors.push(format!(
                "program {p:?} is in the object but not in abi::{progs_list}"
            ));
        }
    }
    if !errors.is_empty() {
        panic!(
            "the BPF object {} does not match mesh-ebpf/common/src/abi.rs:\n  {}",
            path.display(),
            errors.join("\n  ")
        );
    }
}

/// The maps (symbols in the `maps` or `.maps` section) and the programs
/// (global functions in any other executable section than `.text`, which
/// holds only BPF-to-BPF subprograms) of an object.
fn names(file: &object::File) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut maps, mut progs) = (BTreeSet::new(), BTreeSet::new());
    for sym in file.symbols() {
        let (Some(index), Ok(name)) = (sym.section_index(), sym.name()) else {
            continue;
        };
        let Ok(section) = file.section_by_index(index) else {
            continue;
        };
        let section = section.name().unwrap_or("");
        if section == "maps" || section == ".maps" {
            maps.insert(name.to_string());
        } else if sym.kind() == SymbolKind::Text && sym.is_global() && section != ".text" {
            progs.insert(name.to_string());
        }
    }
    (maps, progs)
}
