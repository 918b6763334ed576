//! Project tasks. Needs nothing but std and anyhow, so it builds on a
//! fresh machine before anything else is installed.
//!
//!   cargo xtask setup               install what the build needs (idempotent)
//!   cargo xtask demo                set up, build, run the demo lab
//!   cargo xtask test                set up, build, run the whole test suite
//!   cargo xtask bench setup         install what the benchmark suites need
//!   cargo xtask bench SUITE [ARGS]  set up, build, run a suite (micro, e2e,
//!                                   scale, churn, converge, all)
//!   cargo xtask upgrade-from        build the previous layout's meshd (for the upgrade test)

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Debian packages: Debian's rustc with a prebuilt BPF `core`
/// (../shared/TOOLCHAIN.md), LLVM 22 for bpf-linker, and the tools the
/// labs use.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "clang-19",
    "bpftool",
    "iproute2",
    "iptables",
    "ethtool",
    "iputils-ping",
    "curl",
    // The Docker tests run their own dockerds and swarms (containerd and
    // runc come with docker.io) and build their image from busybox-static.
    "docker.io",
    "busybox-static",
    // systemd-analyze checks the packaged unit.
    "systemd",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What the benchmark suites run besides the project's own binaries: the
/// load generators (wrk, iperf3), the server (nginx), the userspace proxy
/// compared against (HAProxy), and nft to remove the DNAT baseline's nat
/// table between its turns.
const BENCH_PACKAGES: &[&str] = &["wrk", "iperf3", "nginx-light", "haproxy", "nftables"];

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn usage() -> &'static str {
    "usage: cargo xtask <setup | demo | test [cargo test args] | upgrade-from | bench setup | bench <micro | e2e | scale | churn | converge | all> [--out FILE.json or DIR] [suite options; --help lists them]>\n\
     upgrade-from: build the meshd of the commit tests/upgrade-from names and print its path\n\
     (MESH_UPGRADE_FROM=$(cargo xtask upgrade-from) cargo test -p mesh-tests --test netns_operations upgrade)"
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root();
    match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("demo") => {
            need_root("the demo builds network namespaces and loads BPF programs")?;
            setup()?;
            say("building (release)");
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "-p",
                    "mesh-userspace",
                    "-p",
                    "mesh-tests",
                    "--bins",
                ],
            )?;
            say("running the demo");
            let st = Command::new(root.join("target/release/mesh-demo"))
                .env("MESHD", root.join("target/release/meshd"))
                .status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        Some("test") => {
            need_root(
                "the suite includes tests that load BPF programs and build network namespaces",
            )?;
            setup()?;
            let prev = previous_meshd(&root)?;
            say("building (the end-to-end tests run the meshd binary)");
            cargo(&root, &["build", "--workspace", "--bins"])?;
            say("running the whole test suite");
            let mut a = vec!["test", "--workspace", "--no-fail-fast"];
            a.extend(args[1..].iter().map(String::as_str));
            let prev = prev.display().to_string();
            let upgrade = [("MESH_UPGRADE_FROM", prev.as_str())];
            let all = cargo_env(&root, &a, &upgrade);
            // This kernel has TCX; kernels before 6.6 attach TC through
            // netlink. The end-to-end tests run in that mode too.
            say(
                "running the end-to-end tests again with TC attached through netlink (as before kernel 6.6)",
            );
            let mut e2e = vec!["test", "-p", "mesh-tests", "--no-fail-fast"];
            for t in NETNS_TESTS {
                e2e.extend(["--test", t]);
            }
            e2e.extend(args[1..].iter().map(String::as_str));
            let netlink = cargo_env(
                &root,
                &e2e,
                &[("MESH_TEST_TC_ATTACH", "netlink"), upgrade[0]],
            );
            // meshd intercepts at TC ingress by default; the end-to-end
            // tests run with the intercept at XDP too.
            say(
                "running the end-to-end tests again with the intercept at XDP (meshd --intercept xdp)",
            );
            let xdp = cargo_env(&root, &e2e, &[("MESH_TEST_INTERCEPT", "xdp"), upgrade[0]]);
            all.and(netlink).and(xdp)
        }
        Some("upgrade-from") => {
            setup()?;
            let bin = previous_meshd(&root)?;
            println!("{}", bin.display());
            Ok(())
        }
        Some("bench") if args.get(1).map(String::as_str) == Some("setup") => {
            need_root("installing packages")?;
            setup()?;
            bench_setup()
        }
        Some("bench") if args.len() >= 2 => {
            need_root("the benchmarks load BPF programs and build network namespaces")?;
            setup()?;
            bench_setup()?;
            // mesh-tests' binaries too: the swarm lab (converge) puts
            // mesh-udp-echo, built beside meshd, into its image.
            say("building (release): meshd, the lab's tools and the benchmark");
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "-p",
                    "mesh-userspace",
                    "-p",
                    "mesh-tests",
                    "-p",
                    "mesh-bench",
                    "--bins",
                ],
            )?;
            let st = Command::new(root.join("target/release/mesh-bench"))
                .args(&args[1..])
                .env("MESHD", root.join("target/release/meshd"))
                .status()
                .context("running mesh-bench")?;
            if !st.success() {
                bail!("mesh-bench {} failed ({st})", args[1..].join(" "));
            }
            Ok(())
        }
        Some("-h" | "--help" | "help") | None => {
            println!("{}", usage());
            Ok(())
        }
        Some(other) => bail!("unknown task {other:?}\n{}", usage()),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn say(what: &str) {
    eprintln!("xtask: {what}");
}

fn need_root(why: &str) -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// The end-to-end test binaries (network namespaces, meshd attached).
const NETNS_TESTS: &[&str] = &[
    "netns_e2e",
    "netns_hardening",
    "netns_cluster",
    "netns_forward",
    "netns_node_origin",
    "netns_operations",
];

/// The meshd of the commit `tests/upgrade-from` names (the previous
/// pinned layout), for the upgrade test: built once into
/// target/upgrade-from/<commit>/ from that commit's tree (`git archive`,
/// so no worktree is made), in a target directory of its own: cargo names
/// a path package's artifacts by its place in its workspace, so the old
/// tree's crates built in this target directory would take the place of
/// this tree's (and be taken for up to date).
fn previous_meshd(root: &Path) -> Result<PathBuf> {
    let spec = std::fs::read_to_string(root.join("tests/upgrade-from"))
        .context("reading tests/upgrade-from")?;
    let commit = spec
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .context("tests/upgrade-from names no commit")?
        .to_string();
    let dir = root.join("target/upgrade-from").join(&commit);
    let bin = dir.join("meshd");
    if bin.exists() {
        say(&format!(
            "the previous layout's meshd ({}) is built",
            &commit[..12]
        ));
        return Ok(bin);
    }
    say(&format!(
        "building the meshd of {} (the previous pinned layout) for the upgrade test, once \
         (a few minutes: its own target directory)",
        &commit[..12]
    ));
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let archive = Command::new("git")
        .args([
            "-C",
            &root.display().to_string(),
            "archive",
            "--format=tar",
            &commit,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let st = Command::new("tar")
        .args(["-x", "-C", &src.display().to_string()])
        .stdin(archive.stdout.context("git archive's output")?)
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("unpacking {commit} failed ({st})");
    }
    let manifest = src.join("mesh-userspace/Cargo.toml");
    let m = std::fs::read_to_string(&manifest)?;
    std::fs::write(
        &manifest,
        m.replace("name = \"meshd\"", "name = \"meshd-prev\""),
    )?;
    let target = root.join("target/upgrade-from/build");
    cargo_env(
        &src,
        &["build", "-p", "mesh-userspace", "--bin", "meshd-prev"],
        &[("CARGO_TARGET_DIR", &target.display().to_string())],
    )?;
    std::fs::copy(target.join("debug/meshd-prev"), &bin).context("copying the previous meshd")?;
    Ok(bin)
}

/// Installs Debian packages `pkgs`, without recommends, non-interactively.
fn apt_install(pkgs: &[&str]) -> Result<()> {
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn cargo(dir: &Path, args: &[&str]) -> Result<()> {
    cargo_env(dir, args, &[])
}

fn cargo_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .status()
        .context("running cargo")?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// Installs what is missing, and says so; does nothing when all is there.
fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        say("setup: Debian packages present");
    } else {
        need_root("installing Debian packages")?;
        say(&format!(
            "setup: installing Debian packages: {}",
            missing.join(" ")
        ));
        apt_install(&missing)?;
    }
    if !Path::new("/usr/lib/rustlib/bpfel-unknown-none").exists() {
        bail!(
            "/usr/lib/rustlib/bpfel-unknown-none is missing although libstd-rust-web-dev-bpf is installed"
        );
    }
    let linker = home().join(".cargo/bin/bpf-linker");
    let have = Command::new(&linker)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success());
    match have {
        Some(o) if String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION) => {
            say(&format!("setup: bpf-linker {BPF_LINKER_VERSION} present"));
        }
        _ => {
            say(&format!(
                "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
            ));
            let path = format!(
                "/usr/lib/llvm-22/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            );
            run_cmd(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .args([
                        "install",
                        "bpf-linker",
                        "--version",
                        BPF_LINKER_VERSION,
                        "--locked",
                    ])
                    .args(["--no-default-features", "--features", "llvm-22"])
                    .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                    .env("PATH", path),
            )?;
        }
    }
    Ok(())
}

/// Installs the benchmark suites' tools when missing, and says so; does
/// nothing when all are there.
fn bench_setup() -> Result<()> {
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        say("bench setup: wrk, iperf3, nginx, haproxy, nftables present");
        return Ok(());
    }
    say(&format!(
        "bench setup: installing Debian packages: {}",
        missing.join(" ")
    ));
    apt_install(&missing)?;
    // Debian starts the services it installs where an init system runs;
    // the suites run their own copies, in their labs.
    Ok(())
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn run_cmd(c: &mut Command) -> Result<()> {
    let st = c.status().with_context(|| format!("running {c:?}"))?;
    if !st.success() {
        bail!("{c:?} failed ({st})");
    }
    Ok(())
}
