//! meshd's command line: validation before anything touches the kernel.

use std::process::Command;

use mesh_tests::lab::meshd_path;

fn meshd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(meshd_path().unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn state_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD: &str = "[[nodes]]\nname = \"n1\"\naddr = \"198.18.128.1\"\n\n[[services]]\nname = \"web\"\n\
    ports = [ { protocol = \"tcp\", published = 30080, target = 8080 } ]\n\n\
    [[tasks]]\nservice = \"web\"\nnode = \"n1\"\naddr = \"198.18.129.2\"\n";

#[test]
fn check_accepts_a_good_file_and_says_what_the_node_serves() {
    let p = state_file("good.toml", GOOD);
    let (code, out, err) = meshd(&["check", "--state", p.to_str().unwrap(), "--node", "n1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tcp/30080 -> web target 8080 (1 tasks, 1 on this node), replies via-ingress"),
        "{out}"
    );
}

/// A service's traffic mode and allow list are shown as `run` would serve
/// them.
#[test]
fn check_shows_traffic_mode_and_source_ranges() {
    let p = state_file(
        "policy.toml",
        &GOOD.replace(
            "name = \"web\"",
            "name = \"web\"\ntraffic = \"local\"\nsource_ranges = [\"198.18.0.0/15\", \"198.18.200.7\"]",
        ),
    );
    let (code, out, err) = meshd(&["check", "--state", p.to_str().unwrap(), "--node", "n1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("traffic local, sources 198.18.0.0/15 198.18.200.7/32"),
        "{out}"
    );
}

/// A service's client affinity is shown with its timeout.
#[test]
fn check_shows_affinity() {
    let p = state_file(
        "affinity-ok.toml",
        &GOOD.replace(
            "name = \"web\"",
            "name = \"web\"\naffinity = \"client\"\naffinity_timeout = 900",
        ),
    );
    let (code, out, err) = meshd(&["check", "--state", p.to_str().unwrap(), "--node", "n1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("affinity client for 900s"), "{out}");
}

/// The encapsulation port cannot be one of Docker's, nor one a published
/// port could be assigned.
#[test]
fn check_refuses_an_encap_port_docker_or_the_port_range_uses() {
    let p = state_file("encap.toml", GOOD);
    let p = p.to_str().unwrap();
    for (port, says) in [("4789", "Docker"), ("30500", "inside --port-range")] {
        let (code, _, err) = meshd(&["check", "--state", p, "--node", "n1", "--encap-port", port]);
        assert_eq!(code, 64, "--encap-port {port}: {err}");
        assert!(err.contains(says), "--encap-port {port}: {err}");
    }
    let (code, out, err) = meshd(&[
        "check",
        "--state",
        p,
        "--node",
        "n1",
        "--encap-port",
        "6100",
        "--reply-mode",
        "direct",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replies direct"), "{out}");
}

/// Published ports left out of the file are assigned from the range, and
/// `check` says which (and that run keeps them in the state directory).
#[test]
fn check_shows_the_ports_it_would_assign() {
    let text = GOOD.replace("published = 30080, ", "");
    let p = state_file("assign.toml", &text);
    let dir = p.parent().unwrap().join("empty-state-dir");
    let (code, out, err) = meshd(&[
        "check",
        "--state",
        p.to_str().unwrap(),
        "--node",
        "n1",
        "--state-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tcp/30000 -> web target 8080"), "{out}");
    assert!(out.contains("web/tcp/8080/0 -> 30000"), "{out}");
    assert!(!dir.exists(), "check writes nothing");
}

#[test]
fn check_refuses_bad_input_naming_file_field_and_value() {
    let cases = [
        (
            "dup.toml",
            GOOD.replace(
                "target = 8080 } ]",
                "target = 8080 }, { protocol = \"tcp\", published = 30080, target = 9 } ]",
            ),
            "services[0].ports[1].published: tcp port 30080",
        ),
        (
            "range.toml",
            GOOD.replace("30080", "65536"),
            "services[0].ports[0].published: 65536 is not a port",
        ),
        (
            "addr.toml",
            GOOD.replace("198.18.129.2", "198.18.129"),
            "tasks[0].addr: \"198.18.129\" is not an IPv4 address",
        ),
        (
            "node.toml",
            GOOD.replace("node = \"n1\"", "node = \"n7\""),
            "tasks[0].node: \"n7\" is not a node",
        ),
        (
            "field.toml",
            GOOD.replace("name = \"web\"", "name = \"web\"\nmode = \"global\""),
            "unknown field `mode`",
        ),
        (
            "hostbits.toml",
            GOOD.replace(
                "name = \"web\"",
                "name = \"web\"\nsource_ranges = [\"198.18.0.0/16\", \"198.19.0.1/16\"]",
            ),
            "services[0].source_ranges[1]: \"198.19.0.1/16\" has host bits set: the range is 198.19.0.0/16",
        ),
        (
            "nosources.toml",
            GOOD.replace("name = \"web\"", "name = \"web\"\nsource_ranges = []"),
            "services[0].source_ranges: an empty list would refuse every client",
        ),
        (
            "traffic.toml",
            GOOD.replace("name = \"web\"", "name = \"web\"\ntraffic = \"nearby\""),
            "services[0].traffic: \"nearby\" is not \"cluster\" or \"local\"",
        ),
        (
            "affinity.toml",
            GOOD.replace("name = \"web\"", "name = \"web\"\naffinity = \"ClientIP\""),
            "services[0].affinity: \"ClientIP\" is not \"client\" or \"none\"",
        ),
        (
            "affinitytimeout.toml",
            GOOD.replace("name = \"web\"", "name = \"web\"\naffinity_timeout = 60"),
            "services[0].affinity_timeout: is set without affinity = \"client\"",
        ),
        (
            "availability.toml",
            GOOD.replace(
                "addr = \"198.18.128.1\"",
                "addr = \"198.18.128.1\"\navailability = \"asleep\"",
            ),
            "nodes[0].availability: \"asleep\" is not",
        ),
    ];
    for (name, text, want) in cases {
        let p = state_file(name, &text);
        let args = format!("check --state {} --node n1", p.display());
        refused(&args, name);
        refused(&args, want);
    }
    refused(
        "check --state /nonexistent/state.toml --node n1",
        "/nonexistent/state.toml: cannot read",
    );
}

/// Runs meshd with `args` (split on white space) and checks it refuses the
/// configuration (EX_USAGE, 64: not the 1 of a node that failed) saying
/// `want`.
fn refused(args: &str, want: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    let (code, _, err) = meshd(&args);
    assert_eq!(code, 64, "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: wanted {want:?} in: {err}");
}

#[test]
fn run_refuses_bad_flags_before_touching_the_kernel() {
    let p = state_file("run.toml", GOOD);
    let run = |rest: &str| format!("run --state {} {rest}", p.display());
    refused(
        &run("--iface no-such-if0 --node n1"),
        "interface \"no-such-if0\" does not exist",
    );
    // lo has IPv4 forwarding off on these machines: said before loading.
    // (Where it is on, meshd would go on to attach to lo: not tried.)
    if std::fs::read_to_string("/proc/sys/net/ipv4/conf/lo/forwarding")
        .unwrap()
        .trim()
        == "0"
    {
        refused(&run("--iface lo --node n1"), "IPv4 forwarding is off on lo");
        refused(&run("--iface lo --node n1"), "sysctl -w");
    }
    refused(
        &run("--iface lo --node n1 --maglev-size 1000"),
        "--maglev-size 1000: must be a prime",
    );
    refused(
        &run("--iface lo --node n9"),
        "this node (\"n9\") is not in nodes[]",
    );
    // Without --iface: the interface that holds the node's address.
    refused(
        &run("--node n1"),
        "no interface holds this node's address 198.18.128.1 (pass --iface)",
    );
    let args = run("--iface lo --port-range 5-4");
    let (code, _, err) = meshd(&args.split_whitespace().collect::<Vec<_>>());
    assert_eq!(code, 2, "clap refuses it: {err}");
}

/// Exactly one source: --docker or --state; --docker takes no --node
/// (Docker says which node this is).
#[test]
fn run_takes_docker_or_a_state_file() {
    refused(
        "run",
        "say where state comes from: --docker [URL] or --state FILE",
    );
    for args in [
        "run --docker --state /x.toml",
        "run --docker --node n1",
        "run --docker unix:///x.sock --port-range 1-2",
    ] {
        let (code, _, err) = meshd(&args.split_whitespace().collect::<Vec<_>>());
        assert_eq!(code, 2, "{args}: clap refuses it: {err}");
        assert!(err.contains("cannot be used with"), "{args}: {err}");
    }
    refused(
        "run --docker ftp://host",
        "--docker \"ftp://host\": not a Docker address",
    );
}

#[test]
fn help_explains_every_run_flag() {
    let (code, out, _) = meshd(&["run", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--docker",
        "--peer-port",
        "--state",
        "--iface",
        "--node",
        "--port-range",
        "--node-addr",
        "--task-iface",
        "--xdp-mode",
        "--maglev-size",
        "--max-services",
        "--max-backends",
        "--ct-entries",
        "--admin-addr",
        "--watch-interval-ms",
        "--bpf-log-level",
        "--health-addr",
        "--health-max-sync-age",
    ] {
        assert!(out.contains(flag), "run --help lacks {flag}");
    }
}

/// `check` runs the same validation, planner and limits as `run`: what
/// `run` would refuse, `check` refuses too, with the same words.
#[test]
fn check_refuses_what_run_would_refuse() {
    // One task behind five published ports: its replies could belong to
    // five (node address, published port) pairs; the reply table holds 4.
    let mut five = String::from(
        "[[nodes]]\nname = \"n1\"\naddr = \"198.18.128.1\"\n\n[[services]]\nname = \"web\"\nports = [\n",
    );
    for p in 0..5 {
        five += &format!(
            "  {{ protocol = \"tcp\", published = {}, target = 8080 }},\n",
            30080 + p
        );
    }
    five += "]\n\n[[tasks]]\nservice = \"web\"\nnode = \"n1\"\naddr = \"198.18.129.2\"\n";
    let p = state_file("five.toml", &five);
    refused(
        &format!("check --state {} --node n1", p.display()),
        "5 (node address, published port) pairs; at most 4",
    );
    let run = format!("run --state {} --node n1 --iface lo", p.display());
    refused(&run, "5 (node address, published port) pairs; at most 4");

    // 300 published ports; the default limit is 256.
    let mut many = String::from("[[nodes]]\nname = \"n1\"\naddr = \"198.18.128.1\"\n");
    for s in 0..300 {
        many += &format!(
            "\n[[services]]\nname = \"s{s}\"\nports = [ {{ protocol = \"udp\", target = 53 }} ]\n"
        );
    }
    let p = state_file("many.toml", &many);
    refused(
        &format!("check --state {} --node n1", p.display()),
        "300 published ports exceed --max-services 256",
    );
    // ... and accepts it with the limit raised, as run would.
    let (code, out, err) = meshd(&[
        "check",
        "--state",
        p.to_str().unwrap(),
        "--node",
        "n1",
        "--max-services",
        "512",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("udp/30299 -> s299"), "{out}");
}

/// Runs meshd with `args`, killing it after `limit`; returns its exit code
/// and stderr, or fails naming the hang.
fn meshd_within(args: &[&str], limit: std::time::Duration) -> (i32, String) {
    let mut child = Command::new(meshd_path().unwrap())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (st.code().unwrap_or(-1), err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("meshd {args:?} still running after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A state file must be a regular file of sane size: a symlink to
/// /dev/zero would grow meshd's memory without end, a FIFO would block it
/// forever.
#[test]
fn non_regular_or_huge_state_files_are_refused_promptly() {
    let dir = std::env::temp_dir().join(format!("mesh-cli-odd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let zero = dir.join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let fifo = dir.join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: plain syscall with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let huge = dir.join("huge.toml");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len(65 << 20).unwrap();
    let limit = std::time::Duration::from_secs(10);
    for (p, want) in [
        (&zero, "not a regular file"),
        (&fifo, "not a regular file"),
        (&huge, "larger than"),
    ] {
        let (code, err) = meshd_within(
            &["check", "--state", p.to_str().unwrap(), "--node", "n1"],
            limit,
        );
        assert_eq!(code, 64, "{}: {err}", p.display());
        assert!(
            err.contains(want),
            "{}: wanted {want:?} in {err}",
            p.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `meshd drain` without a running meshd: the drain is kept for the
/// meshd that starts next; `undrain` ends it. A bad reason is refused.
#[test]
fn drain_and_undrain_without_a_daemon_keep_the_drain_for_the_next_one() {
    let dir = std::env::temp_dir().join(format!("mesh-cli-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    // Nothing listens on this admin address.
    let admin = "127.0.0.1:1";
    let (code, out, err) = meshd(&[
        "drain",
        "--state-dir",
        d,
        "--admin-addr",
        admin,
        "--reason",
        "disk swap",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("drained:") && out.contains("no meshd answers"),
        "{out}"
    );
    let kept = std::fs::read_to_string(dir.join("drain")).unwrap();
    assert!(kept.contains("disk swap"), "{kept}");
    let (code, out, err) = meshd(&["undrain", "--state-dir", d, "--admin-addr", admin]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("undrained:"), "{out}");
    assert!(!dir.join("drain").exists());
    let (code, out, _) = meshd(&["undrain", "--state-dir", d, "--admin-addr", admin]);
    assert_eq!(code, 0);
    assert!(out.contains("not drained"), "{out}");
    let (code, _, err) = meshd(&["drain", "--state-dir", d, "--reason", "a\nb"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--reason: one line"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_refuses_a_health_address_that_is_not_one() {
    let (code, _, err) = meshd(&["run", "--state", "/x.toml", "--health-addr", "9471"]);
    assert_eq!(code, 2, "clap refuses it: {err}");
    assert!(err.contains("is not ADDR:PORT"), "{err}");
}

/// Completions come from the command line's own definition: every
/// subcommand is in them.
#[test]
fn completions_know_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = meshd(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for sub in ["run", "check", "drain", "undrain", "cleanup", "completions"] {
            assert!(out.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let (code, _, err) = meshd(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
}

/// `--help` on every subcommand teaches: it says what the command does
/// and how it ends.
#[test]
fn every_subcommand_has_help() {
    for sub in ["run", "check", "drain", "undrain", "cleanup", "completions"] {
        let (code, out, err) = meshd(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub}: {err}");
        assert!(out.len() > 200, "{sub} --help says little: {out}");
        assert!(
            out.contains("--log-format"),
            "{sub}: the global flag is listed"
        );
    }
}

/// With --log-format json every line meshd writes is one JSON object, the
/// final error included.
#[test]
fn json_logs_are_one_object_per_line() {
    let (code, _, err) = meshd(&[
        "--log-format",
        "json",
        "check",
        "--state",
        "/nonexistent.toml",
    ]);
    assert_eq!(code, 64);
    let lines: Vec<&str> = err.lines().collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
        assert!(
            v["message"].as_str().unwrap().contains("cannot read"),
            "{v}"
        );
        assert_eq!(v["level"], "ERROR");
    }
}

#[test]
fn status_without_a_meshd_or_pins_says_so() {
    let (code, _, err) = meshd(&[
        "status",
        "--admin-addr",
        "127.0.0.1:1",
        "--bpffs",
        "/nonexistent",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no meshd answers on 127.0.0.1:1") && err.contains("nothing is pinned"),
        "{err}"
    );
}

/// The repository's root.
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The systemd unit passes `systemd-analyze verify` (with ExecStart
/// pointing at this build's meshd, since verify checks it is there).
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(root().join("packaging/systemd/meshd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/meshd run --docker"));
    let dir = std::env::temp_dir().join(format!("mesh-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("meshd.service");
    let bin = meshd_path().unwrap();
    std::fs::write(
        &p,
        unit.replace("/usr/local/bin/meshd", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", p.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (the systemd package) is needed for this test");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("meshd.service"),
        "systemd-analyze has something to say about the unit: {err}"
    );
    // What the unit runs is a command line meshd takes.
    let (code, _, err) = meshd(&["run", "--docker", "--help"]);
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The stack file is a valid compose file for `docker stack deploy`, and
/// says what it must: one task per node, the host's network, the
/// capabilities, bpffs and the Docker socket mounted.
#[test]
fn the_stack_file_deploys_a_global_host_network_service() {
    let f = root().join("packaging/docker/mesh-stack.yml");
    let out = Command::new("docker")
        .args(["stack", "config", "-c", f.to_str().unwrap()])
        .output()
        .expect("docker (the docker.io package) is needed for this test");
    let cfg = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for says in [
        "mode: global",
        "name: host",
        "SYS_ADMIN",
        "BPF",
        "target: /sys/fs/bpf",
        "target: /var/run/docker.sock",
        "target: /var/lib/mesh",
        "- --docker",
    ] {
        assert!(cfg.contains(says), "{says:?} not in the stack:\n{cfg}");
    }
}
