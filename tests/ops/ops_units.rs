//! The systemd units in systemd/ and the files the Debian package is built
//! from, checked against the programs of this build:
//!
//! - `systemd-analyze verify` on each unit, its `/usr/bin/` programs pointed
//!   at this build (CI also verifies the units the installed package put in
//!   /usr/lib/systemd/system, man pages included);
//! - the `ExecStart=` line of each unit, expanded as systemd would (its
//!   `Environment=` default, the state, configuration and credentials
//!   directories, `%i`), run for real: it must parse, bind, send READY=1 to
//!   `NOTIFY_SOCKET` and stop cleanly on SIGTERM;
//! - the hidden `completions` and `man` commands the package build uses.
//!
//! Skipped with the reason printed where `systemd-analyze` is missing.

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::fleet::Fleet;
use support::{Proc, AGENT, KEYFLEET};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(repo().join("systemd").join(name)).unwrap()
}

/// The values of `Key=` in a unit, in order.
fn values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn systemd_analyze_verify_accepts_both_units() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED systemd_analyze_verify_accepts_both_units: no systemd-analyze (Debian package systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, instance) in [
        ("keyfleet.service", "keyfleet.service"),
        ("keyfleet-agent@.service", "keyfleet-agent@pump-7.service"),
    ] {
        let text = unit(name)
            .replace("/usr/bin/keyfleet-agent", AGENT)
            .replace("/usr/bin/keyfleet ", &format!("{KEYFLEET} "));
        let path = dir.path().join(instance);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("systemd-analyze verify {instance}: {} {stderr}", out.status);
        assert!(out.status.success(), "{instance}: {stderr}");
        assert!(
            stderr.trim().is_empty(),
            "{instance} has warnings: {stderr}"
        );
    }
}

#[test]
fn both_units_are_notify_services_in_a_sandbox() {
    for name in ["keyfleet.service", "keyfleet-agent@.service"] {
        let u = unit(name);
        for (key, want) in [
            ("Type", "notify"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
            (
                "RestrictAddressFamilies",
                "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
            ),
            ("StateDirectoryMode", "0700"),
            ("User", "keyfleet"),
        ] {
            assert_eq!(values(&u, key), [want], "{name}: {key}=");
        }
        assert_eq!(values(&u, "ConfigurationDirectory"), ["keyfleet"], "{name}");
        assert_eq!(values(&u, "StateDirectory").len(), 1, "{name}");
    }
}

/// `ExecStart=` of `text` split and expanded as systemd does: `${VAR}` stays
/// one word, `$VAR` alone splits into words; `%i` is the instance.
fn exec_start(text: &str, env: &[(String, String)], instance: &str) -> Vec<String> {
    let line = values(text, "ExecStart")[0].replace("%i", instance);
    let lookup = |k: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("${k} is not set for {line}"))
    };
    let mut words = Vec::new();
    for w in line.split_whitespace() {
        if let Some(var) = w.strip_prefix('$').filter(|v| !v.starts_with('{')) {
            words.extend(lookup(var).split_whitespace().map(String::from));
        } else {
            let mut out = w.to_owned();
            while let Some(start) = out.find("${") {
                let end = out[start..].find('}').unwrap() + start;
                let v = lookup(&out[start + 2..end]);
                out.replace_range(start..=end, &v);
            }
            words.push(out);
        }
    }
    words
}

/// The `Environment=` defaults of a unit (`"K=V"` or `K=V`).
fn environment(text: &str) -> Vec<(String, String)> {
    values(text, "Environment")
        .into_iter()
        .map(|v| {
            let v = v.trim_matches('"');
            let (k, val) = v.split_once('=').unwrap();
            (k.to_owned(), val.to_owned())
        })
        .collect()
}

/// Starts `argv` with `NOTIFY_SOCKET`, waits for READY=1, stops it with SIGTERM.
fn run_until_ready(what: &str, argv: &[String], dir: &Path, log: &Path) -> String {
    run_until_ready_env(what, argv, dir, log, |_| None)
}

/// [`run_until_ready`] with `JOURNAL_STREAM` set from the log file's `(dev, inode)`.
fn run_until_ready_env(
    what: &str,
    argv: &[String],
    dir: &Path,
    log: &Path,
    journal: impl Fn(&std::fs::Metadata) -> Option<String>,
) -> String {
    let notify_path = dir.join(format!("notify-{what}.sock"));
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stderr = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("KEYFLEET_PASSPHRASE")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(v) = journal(&stderr.metadata().unwrap()) {
        cmd.env("JOURNAL_STREAM", v);
    }
    let mut p = Proc::from(cmd.stderr(stderr).spawn().unwrap());
    let end = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    let ready = loop {
        assert!(
            Instant::now() < end,
            "{what} never sent READY=1: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        if let Ok(n) = notify.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            if m.contains("READY=1") {
                break m;
            }
        }
        assert!(
            p.alive(),
            "{what} exited: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    };
    let status = p.terminate();
    assert!(
        status.success(),
        "{what} did not stop cleanly ({status}): {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    ready
}

#[test]
fn the_units_exec_start_lines_run_and_report_ready() {
    let _heavy = support::heavy();
    // A controller with one enrolled node, on loopback.
    let f = Fleet::new(1, "");
    f.init_and_enroll();
    let conf_dir = f.dir.path().join("etc-keyfleet");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::copy(
        f.dir.path().join("keyfleet.toml"),
        conf_dir.join("config.toml"),
    )
    .unwrap();

    let u = unit("keyfleet.service");
    let mut env = environment(&u);
    assert!(
        env.iter()
            .any(|(k, v)| k == "KEYFLEET_SERVE_OPTS" && v.contains("--metrics")),
        "metrics on by default: {env:?}"
    );
    // As /etc/keyfleet/serve.env would: another metrics port (9477 may be taken here).
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| env.push((k.to_owned(), v));
    set(
        &mut env,
        "KEYFLEET_SERVE_OPTS",
        "--metrics 127.0.0.1:0".into(),
    );
    set(
        &mut env,
        "CONFIGURATION_DIRECTORY",
        conf_dir.display().to_string(),
    );
    set(&mut env, "STATE_DIRECTORY", f.state().display().to_string());
    let mut argv = exec_start(&u, &env, "");
    assert_eq!(argv[0], "/usr/bin/keyfleet");
    argv[0] = KEYFLEET.into();
    eprintln!("keyfleet.service runs {argv:?}");
    let ready = run_until_ready(
        "serve",
        &argv,
        f.dir.path(),
        &f.dir.path().join("unit-serve.log"),
    );
    eprintln!("keyfleet.service: {ready:?}");
    assert!(ready.contains("metrics on 127.0.0.1:"), "{ready}");

    // The agent's template for node-00, its key as a credential.
    let u = unit("keyfleet-agent@.service");
    let n = &f.nodes[0];
    let creds = f.dir.path().join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    assert_eq!(
        values(&u, "LoadCredential"),
        ["initial-key:/etc/keyfleet/agent/%i.key"]
    );
    std::fs::copy(&n.key_file, creds.join("initial-key")).unwrap();
    let mut env = environment(&u);
    // What /etc/keyfleet/agent/node-00.env would say for this test's network.
    set(
        &mut env,
        "KEYFLEET_AGENT_OPTS",
        format!(
            "--group {} --iface 127.0.0.1 --listen {} --controller 127.0.0.1:{} --metrics 127.0.0.1:0",
            f.group, n.listen, f.ctl_port
        ),
    );
    set(&mut env, "STATE_DIRECTORY", n.state.display().to_string());
    set(
        &mut env,
        "CREDENTIALS_DIRECTORY",
        creds.display().to_string(),
    );
    let mut argv = exec_start(&u, &env, &n.id);
    assert_eq!(argv[0], "/usr/bin/keyfleet-agent");
    argv[0] = AGENT.into();
    eprintln!("keyfleet-agent@{}.service runs {argv:?}", n.id);
    let ready = run_until_ready(
        "agent",
        &argv,
        f.dir.path(),
        &f.dir.path().join("unit-agent.log"),
    );
    eprintln!("keyfleet-agent@{}.service: {ready:?}", n.id);
    assert!(ready.contains("metrics on 127.0.0.1:"), "{ready}");
    assert!(n.state.join("state.json").exists());
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    for (bin, name, subs) in [
        (
            KEYFLEET,
            "keyfleet",
            &["rekey", "serve", "enroll", "status"][..],
        ),
        (
            AGENT,
            "keyfleet-agent",
            &["run", "status", "send", "recv"][..],
        ),
    ] {
        for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
            let out = Command::new(bin)
                .args(["completions", shell])
                .output()
                .unwrap();
            assert!(out.status.success(), "{name} completions {shell}");
            let text = String::from_utf8_lossy(&out.stdout);
            for s in subs {
                assert!(text.contains(s), "{name} {shell} completions lack {s}");
            }
        }
        let help = Command::new(bin).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(
            !help.contains("completions") && !help.contains(" man "),
            "the package build's commands stay out of --help: {help}"
        );
        let out = Command::new(bin)
            .args(["completions", "tcsh"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "an unknown shell is a usage error"
        );

        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin)
            .arg("man")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pages: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        eprintln!("{name}: {pages:?}");
        assert!(pages.contains(&format!("{name}.1")));
        for s in subs {
            let page = std::fs::read_to_string(dir.path().join(format!("{name}-{s}.1"))).unwrap();
            assert!(
                page.starts_with(".ie") || page.contains(".TH"),
                "{name}-{s}.1 is roff"
            );
            let roff_name = format!("{name}-{s}").replace('-', "\\-");
            assert!(page.contains(&roff_name), "{name}-{s}.1 names itself");
            assert!(
                page.contains(env!("CARGO_PKG_VERSION")),
                "{name}-{s}.1 has the version"
            );
            assert!(
                !page.contains("\\-\\-version"),
                "{name} {s} takes no --version: {page}"
            );
        }
        assert!(
            !pages
                .iter()
                .any(|p| p.contains("-man.") || p.contains("-completions.")),
            "{pages:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    assert!(Command::new(KEYFLEET)
        .arg("man")
        .arg(dir.path())
        .status()
        .unwrap()
        .success());
    let serve = std::fs::read_to_string(dir.path().join("keyfleet-serve.1")).unwrap();
    assert!(
        serve.contains("metrics") && serve.contains("log\\-format"),
        "{serve}"
    );
}

/// Under journald (stderr is the stream `JOURNAL_STREAM` names) the text log
/// leaves the time to the journal; a `JOURNAL_STREAM` inherited by a process
/// whose stderr is elsewhere changes nothing. Never a colour code off a terminal.
#[test]
fn text_logs_leave_the_time_to_journald_only_when_stderr_is_the_journal() {
    let _heavy = support::heavy();
    use std::os::unix::fs::MetadataExt;
    let f = Fleet::new(1, "");
    let n = &f.nodes[0];
    let argv: Vec<String> = [
        AGENT,
        "run",
        "--state",
        &n.state.display().to_string(),
        "--node-id",
        &n.id,
        "--initial-key-file",
        &n.key_file.display().to_string(),
        "--group",
        &f.group.to_string(),
        "--iface",
        "127.0.0.1",
    ]
    .map(String::from)
    .to_vec();
    let journal = f.dir.path().join("journal.log");
    run_until_ready_env("agent-journal", &argv, f.dir.path(), &journal, |m| {
        Some(format!("{}:{}", m.dev(), m.ino()))
    });
    let elsewhere = f.dir.path().join("elsewhere.log");
    run_until_ready_env("agent-elsewhere", &argv, f.dir.path(), &elsewhere, |m| {
        Some(format!("{}:{}", m.dev(), m.ino() + 1))
    });
    let journal = std::fs::read_to_string(journal).unwrap();
    let elsewhere = std::fs::read_to_string(elsewhere).unwrap();
    eprintln!(
        "journald: {}\nelsewhere: {}",
        journal.lines().next().unwrap_or(""),
        elsewhere.lines().next().unwrap_or("")
    );
    let timestamped =
        |l: &str| l.get(..4).is_some_and(|y| y.parse::<u16>().is_ok()) && l.contains('T');
    assert!(journal.lines().count() >= 2, "{journal}");
    for l in journal.lines() {
        assert!(
            l.trim_start().starts_with("INFO") || l.trim_start().starts_with("WARN"),
            "no time first under journald: {l}"
        );
    }
    assert!(elsewhere.lines().all(timestamped), "{elsewhere}");
    assert!(!journal.contains('\x1b') && !elsewhere.contains('\x1b'));
}

/// The system calls each unit allows: its `SystemCallFilter=` lines
/// expanded by `systemd-analyze syscall-filter` (an allow list, then `~`
/// lines that take groups out).
fn allowed_syscalls(unit_text: &str) -> std::collections::BTreeSet<String> {
    fn expand(item: &str, out: &mut std::collections::BTreeSet<String>) {
        if !item.starts_with('@') {
            out.insert(item.to_string());
            return;
        }
        let o = Command::new("systemd-analyze")
            .args(["syscall-filter", item])
            .output()
            .unwrap();
        assert!(o.status.success(), "systemd-analyze syscall-filter {item}");
        for line in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
            let s = line.trim();
            if !s.is_empty() && !s.starts_with('#') {
                expand(s, out);
            }
        }
    }
    let (mut allow, mut deny) = (Default::default(), Default::default());
    for v in values(unit_text, "SystemCallFilter") {
        match v.strip_prefix('~') {
            Some(d) => d.split_whitespace().for_each(|i| expand(i, &mut deny)),
            None => v.split_whitespace().for_each(|i| expand(i, &mut allow)),
        }
    }
    allow.difference(&deny).cloned().collect()
}

/// The system calls of `keyfleet serve` and of `keyfleet-agent run`, each
/// with all its threads, in an `strace -f` log: a thread or child counts
/// for the program its process ran when it was made, until it runs another.
fn syscalls_by_program(
    log: &str,
) -> std::collections::BTreeMap<&'static str, std::collections::BTreeSet<String>> {
    use std::collections::HashMap;
    let program = |path: &str, argv: &str| -> &'static str {
        if path.ends_with("/keyfleet") && argv.contains("\"serve\"") {
            "keyfleet serve"
        } else if path.ends_with("/keyfleet-agent") && argv.contains("\"run\"") {
            "keyfleet-agent run"
        } else {
            "other"
        }
    };
    // Each line: TID, the call's name (or `<... NAME resumed>`), the rest.
    let calls: Vec<(&str, &str, &str)> = log
        .lines()
        .filter_map(|l| {
            let (tid, rest) = l.split_once(' ')?;
            let rest = rest.trim_start();
            let name = match rest.strip_prefix("<... ") {
                Some(r) => r.split_once(' ')?.0,
                None => rest.split_once('(')?.0,
            };
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
                .then_some((tid, name, rest))
        })
        .collect();
    // Who made whom, and what each ran, by line.
    let mut parent: HashMap<&str, (&str, usize)> = HashMap::new();
    let mut execs: HashMap<&str, Vec<(usize, &'static str)>> = HashMap::new();
    for (i, (tid, name, rest)) in calls.iter().enumerate() {
        if matches!(*name, "clone" | "clone3" | "fork" | "vfork") {
            if let Some(child) = rest.rsplit_once("= ").map(|(_, c)| c.trim()) {
                if child.chars().all(|c| c.is_ascii_digit()) {
                    parent.entry(child).or_insert((tid, i));
                }
            }
        }
        if let Some(args) = rest.strip_prefix("execve(\"") {
            if let Some((path, more)) = args.split_once('"') {
                let argv = more.split_once(']').map_or("", |(a, _)| a);
                execs.entry(tid).or_default().push((i, program(path, argv)));
            }
        }
    }
    fn at<'a>(
        tid: &'a str,
        line: usize,
        parent: &HashMap<&'a str, (&'a str, usize)>,
        execs: &HashMap<&'a str, Vec<(usize, &'static str)>>,
        depth: usize,
    ) -> &'static str {
        if let Some((_, p)) = execs
            .get(tid)
            .and_then(|e| e.iter().rev().find(|(l, _)| *l <= line))
        {
            return p;
        }
        match parent.get(tid) {
            Some((p, l)) if depth < 64 => at(p, *l, parent, execs, depth + 1),
            _ => "other",
        }
    }
    let mut used: std::collections::BTreeMap<_, std::collections::BTreeSet<String>> =
        Default::default();
    for (i, (tid, name, _)) in calls.iter().enumerate() {
        let p = at(tid, i, &parent, &execs, 0);
        if p != "other" {
            used.entry(p).or_default().insert((*name).to_string());
        }
    }
    used
}

/// Every system call `keyfleet serve` and `keyfleet-agent run` make (each
/// with its threads: an agent's thread per application client among them)
/// through `keyfleet demo` (enrollment, joins, a rotation, application
/// messages sent and received through the agents' sockets) is one their
/// unit's `SystemCallFilter=` allows: one outside it fails with EPERM
/// under systemd (`SystemCallErrorNumber=EPERM`), which no other test would
/// see. As root, SQLite gives the log files it creates the database's
/// owner (`fchown`), which it skips for the unit's user.
#[test]
fn the_programs_make_no_system_call_their_units_forbid() {
    for tool in ["strace", "systemd-analyze"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("SKIPPED the_programs_make_no_system_call_their_units_forbid: no {tool}");
            return;
        }
    }
    let _heavy = support::heavy();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-s", "1000", "-o"])
        .arg(&log)
        .args([KEYFLEET, "demo", "--agents", "3", "--rounds", "1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keyfleet demo under strace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&log).unwrap();
    let used = syscalls_by_program(&log);
    let root = rustix::process::geteuid().is_root();
    for (program, unit_name) in [
        ("keyfleet serve", "keyfleet.service"),
        ("keyfleet-agent run", "keyfleet-agent@.service"),
    ] {
        let calls = used.get(program).cloned().unwrap_or_default();
        eprintln!("{program}: {} system calls: {calls:?}", calls.len());
        assert!(
            calls.len() > 30 && calls.contains("sendmmsg") && calls.contains("recvmmsg"),
            "{program}: the log was not read right: {calls:?}"
        );
        let allowed = allowed_syscalls(&unit(unit_name));
        let forbidden: Vec<&String> = calls
            .iter()
            .filter(|c| {
                let sqlite_as_root = root && *c == "fchown";
                !(allowed.contains(*c) || sqlite_as_root)
            })
            .collect();
        assert!(
            forbidden.is_empty(),
            "{program} makes system calls {unit_name} forbids: {forbidden:?}"
        );
    }
    // The agents' delivery threads were made and ran under the filter.
    let agent = used.get("keyfleet-agent run").cloned().unwrap_or_default();
    assert!(
        agent.contains("clone3") || agent.contains("clone"),
        "no thread was made: {agent:?}"
    );
}
