//! Operations, on real processes: `keyfleet serve --metrics` and
//! `keyfleet-agent run --metrics` scraped over HTTP while a fleet rotates,
//! every value checked against what `status --json`, `history --json` and the
//! agents' own status report; systemd's readiness notification (a socket of
//! the test's own as `NOTIFY_SOCKET`) sent only once the sockets answer; the
//! health check turning 503 when the controller is cut off from the network
//! (an nftables rule in a network namespace) and 200 again after; logs as JSON
//! or as text without colour codes off a terminal.

use crate::support;
use crate::support::netns;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::fleet::{agent_status, Chatter, Fleet};
use support::Proc;

/// A socket standing in for systemd's notification socket.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new(dir: &Path, name: &str) -> Notify {
        let path = dir.join(format!("notify-{name}.sock"));
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify { sock, path }
    }

    /// The first message with READY=1 (panics after 20 s, or if `alive` says the process died).
    fn ready(&self, what: &str, proc: &mut Proc) -> String {
        let end = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == "READY=1") {
                    return msg;
                }
            }
            assert!(proc.alive(), "{what} exited before it was ready");
        }
        panic!("{what} never sent READY=1");
    }

    /// Messages received so far (non-blocking beyond the read timeout).
    fn drain(&self) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        while let Ok(n) = self.sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }
}

/// `metrics on ADDR` in a readiness STATUS line.
fn metrics_addr(ready: &str) -> SocketAddr {
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {ready:?}"));
    status
        .split("metrics on ")
        .nth(1)
        .and_then(|s| s.split(|c: char| c == ';' || c.is_whitespace()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {status:?}"))
}

/// One HTTP/1.1 request with a plain TCP socket: (status code, body).
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
}

/// The samples of an OpenMetrics text: `name{labels}` → value.
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.ends_with("# EOF\n"),
        "an OpenMetrics text ends with # EOF"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn val(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} among {:?}", m.keys()))
}

#[test]
fn metrics_of_serve_and_agents_match_status_history_and_the_agents_own_status() {
    let _heavy = support::heavy();
    let f = Fleet::new(3, "[round]\ndrain_grace_ms = 300\nstale_after_ms = 2000\n");
    f.init_and_enroll();

    // keyfleet serve, JSON logs, metrics on a free port; ready only when its
    // sockets answer.
    let notify = Notify::new(f.dir.path(), "serve");
    let mut serve = Proc::from(
        f.keyfleet(&["serve", "--metrics", "127.0.0.1:0", "--log-format", "json"])
            .env("NOTIFY_SOCKET", &notify.path)
            .stdout(Stdio::null())
            .stderr(f.log("serve"))
            .spawn()
            .unwrap(),
    );
    let ready = notify.ready("keyfleet serve", &mut serve);
    let ctl = metrics_addr(&ready);
    // At READY=1 everything is bound: no retry, no wait.
    assert!(
        std::os::unix::net::UnixStream::connect(f.state().join("control.sock")).is_ok(),
        "the control socket answers at READY=1"
    );
    let (code, body) = get(ctl, "/healthz");
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok", "{h}");
    eprintln!("serve ready: {ready:?}; /healthz {body}");

    // The agents, text logs, each with its own metrics port and readiness.
    let mut agents = Vec::new();
    let mut agent_metrics = Vec::new();
    for (i, n) in f.nodes.iter().enumerate() {
        let notify = Notify::new(f.dir.path(), &n.id);
        let mut p = Proc::from(
            f.agent_command(i)
                .args(["--metrics", "127.0.0.1:0"])
                .env("NOTIFY_SOCKET", &notify.path)
                .spawn()
                .unwrap(),
        );
        let ready = notify.ready(&n.id, &mut p);
        assert!(
            agent_status(&n.state).is_some(),
            "{}'s application socket answers at READY=1",
            n.id
        );
        agent_metrics.push(metrics_addr(&ready));
        agents.push(p);
    }
    f.wait_converged(30_000);

    // Two clean rounds while the applications talk.
    let chatter = Chatter::start(&f, Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        let r = f.json(&["rekey", "--json"]);
        assert_eq!(r["stale"], 0, "{r}");
    }
    let traffic = chatter.finish();
    eprintln!(
        "applications: {} sent, {} received",
        traffic.sent.load(std::sync::atomic::Ordering::Relaxed),
        traffic.received.load(std::sync::atomic::Ordering::Relaxed)
    );

    // A third round with node-02 frozen: it goes stale and is left out.
    agents[2].freeze();
    // A round that left a stale node out exits 3 (README, exit codes).
    let (r, _) = f.json_exit(&["rekey", "--json"], 3);
    assert_eq!(r["stale"], 1, "{r}");

    // The controller's metrics against the management table, node-02 still frozen.
    let m = scrape(ctl);
    let st = f.status();
    let hist = f.history();
    let rounds: Vec<&serde_json::Value> = hist["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == "Completed")
        .collect();
    assert_eq!(rounds.len(), 3, "{hist}");
    let with_stale = rounds.iter().filter(|r| r["stale"] != 0).count() as f64;
    let sum = |k: &str| rounds.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>() as f64;
    eprintln!(
        "controller: epoch {}, rounds {} + {} with stale, acked {}, stale {}",
        val(&m, "keyfleet_group_key_epoch"),
        val(&m, "keyfleet_rounds_total{outcome=\"completed\"}"),
        val(
            &m,
            "keyfleet_rounds_total{outcome=\"completed_with_stale\"}"
        ),
        val(&m, "keyfleet_round_acknowledged_nodes_total"),
        val(&m, "keyfleet_round_stale_nodes_total"),
    );
    assert_eq!(
        val(&m, "keyfleet_group_key_epoch"),
        st["epoch"].as_f64().unwrap()
    );
    assert_eq!(
        val(&m, "keyfleet_rounds_total{outcome=\"completed\"}"),
        rounds.len() as f64 - with_stale
    );
    assert_eq!(
        val(
            &m,
            "keyfleet_rounds_total{outcome=\"completed_with_stale\"}"
        ),
        with_stale
    );
    assert_eq!(
        val(&m, "keyfleet_round_acknowledged_nodes_total"),
        sum("acked")
    );
    assert_eq!(val(&m, "keyfleet_round_stale_nodes_total"), sum("stale"));
    assert_eq!(val(&m, "keyfleet_nodes_marked_stale_total"), 1.0);
    assert_eq!(
        val(
            &m,
            "keyfleet_node_acknowledgements_total{step=\"second_transition\"}"
        ),
        sum("acked")
    );
    assert_eq!(
        val(&m, "keyfleet_round_duration_seconds_count"),
        rounds.len() as f64
    );
    // Phase times: the table's `distributing` is the machine's.
    let distributing: u64 = rounds
        .iter()
        .map(|r| r["phases_ms"]["distributing"].as_u64().unwrap())
        .sum();
    let metric = val(
        &m,
        "keyfleet_round_phase_duration_seconds_sum{phase=\"distributing\"}",
    );
    assert!(
        (metric - distributing as f64 / 1000.0).abs() < 0.0005,
        "distributing: {metric} s in the metrics, {distributing} ms in the history"
    );
    let last = rounds.iter().max_by_key(|r| r["epoch"].as_u64()).unwrap();
    assert_eq!(
        val(&m, "keyfleet_last_round_epoch"),
        last["epoch"].as_f64().unwrap()
    );
    assert_eq!(
        val(&m, "keyfleet_last_round_acked"),
        last["acked"].as_f64().unwrap()
    );
    assert_eq!(
        val(&m, "keyfleet_last_round_stale"),
        last["stale"].as_f64().unwrap()
    );
    let nodes = st["nodes"].as_array().unwrap();
    let stale = nodes.iter().filter(|n| n["stale"] == true).count() as f64;
    assert_eq!(stale, 1.0, "{st}");
    assert_eq!(val(&m, "keyfleet_nodes{status=\"stale\"}"), stale);
    assert_eq!(
        val(&m, "keyfleet_nodes{status=\"active\"}")
            + val(&m, "keyfleet_nodes{status=\"enrolled\"}"),
        nodes.len() as f64 - stale
    );
    assert_eq!(val(&m, "keyfleet_round_in_progress"), 0.0);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let age = val(&m, "keyfleet_group_key_age_seconds");
    let since_last_start = now_s - last["started_at_ms"].as_f64().unwrap() / 1000.0;
    assert!(
        (0.0..=since_last_start).contains(&age),
        "the key is {age} s old; the round that made it started {since_last_start} s ago"
    );
    let triggers = val(
        &m,
        "keyfleet_triggers_total{reason=\"manual\",outcome=\"started\"}",
    );
    assert_eq!(triggers, 3.0);

    agents[2].thaw();
    f.wait_converged(30_000);

    // Each agent's metrics against its own status (read between two scrapes:
    // counters may move, never backwards; the key state is settled).
    for (i, n) in f.nodes.iter().enumerate() {
        let a = agent_metrics[i];
        // A thawed node may still ask the controller once more (a beacon
        // after its silence, a late resync request): compare at a moment
        // when it is synced in both scrapes and its status (at most 20 s).
        let settled = Instant::now() + Duration::from_secs(20);
        let (before, s, after) = loop {
            let before = scrape(a);
            let s = agent_status(&n.state).unwrap();
            let after = scrape(a);
            let synced = val(&before, "keyfleet_agent_synced") == 1.0
                && val(&after, "keyfleet_agent_synced") == 1.0
                && s["running"]["synced"] == true;
            if synced || Instant::now() > settled {
                break (before, s, after);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let run = &s["running"];
        eprintln!(
            "{}: epoch {}, {} datagrams in, {} refused, {} delivered, {} sent, {} undecryptable",
            n.id,
            val(&after, "keyfleet_agent_epoch"),
            val(&after, "keyfleet_agent_datagrams_received_total"),
            run["refused"],
            val(&after, "keyfleet_agent_delivered_total"),
            val(&after, "keyfleet_agent_data_sent_total"),
            val(&after, "keyfleet_agent_undecryptable_total"),
        );
        for m in [&before, &after] {
            assert_eq!(val(m, "keyfleet_agent_epoch"), s["epoch"].as_f64().unwrap());
            assert_eq!(
                val(m, "keyfleet_agent_sealing_epoch"),
                s["sealing_epoch"].as_f64().unwrap()
            );
            assert_eq!(
                val(m, "keyfleet_agent_member"),
                s["member"].as_f64().unwrap()
            );
            assert_eq!(
                val(m, "keyfleet_agent_state{state=\"UpdateCompleted\"}"),
                1.0
            );
            assert_eq!(val(m, "keyfleet_agent_synced"), 1.0);
            assert_eq!(val(m, "keyfleet_agent_undecryptable_total"), 0.0);
            // The applications stopped: these no longer move.
            assert_eq!(
                val(m, "keyfleet_agent_data_sent_total"),
                run["data_sent"].as_f64().unwrap()
            );
            assert_eq!(
                val(m, "keyfleet_agent_delivered_total"),
                run["delivered"].as_f64().unwrap()
            );
        }
        for (key, field) in [
            ("keyfleet_agent_datagrams_received_total", "datagrams_in"),
            ("keyfleet_agent_usage_reports_total", "usage_reports"),
            ("keyfleet_agent_state_saves_total", "persisted"),
            ("keyfleet_agent_send_errors_total", "send_errors"),
            ("keyfleet_agent_send_dropped_total", "send_dropped"),
            ("keyfleet_agent_app_dropped_total", "app_dropped"),
            ("keyfleet_agent_app_backlog_peak", "app_backlog_peak"),
        ] {
            let v = run[field].as_f64().unwrap();
            assert!(
                val(&before, key) <= v && v <= val(&after, key),
                "{key}: {} ≤ {v} ≤ {}",
                val(&before, key),
                val(&after, key)
            );
        }
        let refusals = |m: &HashMap<String, f64>| -> f64 {
            m.iter()
                .filter(|(k, _)| k.starts_with("keyfleet_agent_refusals_total{"))
                .map(|(_, v)| v)
                .sum()
        };
        let refused = run["refused"].as_f64().unwrap();
        assert!(
            refusals(&before) <= refused && refused <= refusals(&after),
            "refusals by kind add up to the status's refused: {} ≤ {refused} ≤ {}",
            refusals(&before),
            refusals(&after)
        );
        let (code, body) = get(a, "/healthz");
        assert_eq!(code, 200, "{body}");
    }

    // The HTTP server refuses what it does not serve, and survives garbage.
    let (code, _) = get(ctl, "/nothing");
    assert_eq!(code, 404);
    let (code, _) = http(
        ctl,
        "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 405);
    let (code, _) = http(ctl, "\x16\x03\x01 not http at all\r\n\r\n");
    assert_eq!(code, 400);
    assert_eq!(get(ctl, "/healthz").0, 200, "still serving after garbage");

    // A clean stop says STOPPING=1; the JSON log is JSON, line by line; the
    // agents' text logs (a file, not a terminal) carry no colour codes.
    let status = serve.terminate();
    assert!(status.success(), "{status}");
    assert!(
        notify
            .drain()
            .iter()
            .any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "STOPPING=1 at the end"
    );
    let log = f.logs("serve");
    assert!(!log.is_empty());
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    for n in &f.nodes {
        let log = f.logs(&n.id);
        assert!(log.contains("INFO"), "{log}");
        assert!(!log.contains('\x1b'), "colour codes in {}'s log file", n.id);
    }
}

/// `ip netns exec NS bash -c` with an HTTP GET through bash's /dev/tcp (the
/// test process is outside the namespace): (status code, body).
fn get_in(ns: &netns::Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf 'GET {path} HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n' >&3 && cat <&3",
        addr.ip(),
        addr.port()
    );
    let out = ns.command("bash").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no HTTP answer: {text:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (
        code,
        text.split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned(),
    )
}

/// Adds an nftables table that drops every UDP datagram the namespace sends
/// (the controller's sends then fail with EPERM); `false` removes it.
fn cut_udp(ns: &netns::Netns, cut: bool) {
    let out = if cut {
        let path = std::env::temp_dir().join(format!("{}-cut.nft", ns.name()));
        std::fs::write(
            &path,
            "table inet keyfleet_cut {\n chain output {\n  type filter hook output priority 0; policy accept;\n  meta l4proto udp drop\n }\n}\n",
        )
        .unwrap();
        let out = ns.command("nft").arg("-f").arg(&path).output().unwrap();
        let _ = std::fs::remove_file(&path);
        out
    } else {
        ns.command("nft")
            .args(["delete", "table", "inet", "keyfleet_cut"])
            .output()
            .unwrap()
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn healthz_turns_503_when_the_controller_is_cut_off_and_200_when_it_is_back() {
    let _heavy = support::heavy();
    let ns = match netns::Netns::create("ops") {
        Ok(ns) => ns,
        Err(reason) => {
            eprintln!("SKIPPED healthz_turns_503_when_the_controller_is_cut_off: {reason}");
            return;
        }
    };
    let mut f = Fleet::new(1, "");
    f.wrap = ["ip", "netns", "exec", ns.name()]
        .map(String::from)
        .to_vec();
    f.init_and_enroll();
    let port = support::free_port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _serve = Proc::from(
        f.keyfleet(&["serve", "--metrics", &metrics.to_string()])
            .stdout(Stdio::null())
            .stderr(f.log("serve"))
            .spawn()
            .unwrap(),
    );
    let _agent = f.agent(0);
    f.wait_converged(30_000);
    let (code, body) = get_in(&ns, metrics, "/healthz");
    assert_eq!(code, 200, "{body}");

    // Cut off: every UDP send fails. A rekey makes the controller send (its
    // retries keep sending until the round gives up on the node).
    cut_udp(&ns, true);
    let mut rekey = Proc::from(
        f.keyfleet(&["rekey"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut seen = None;
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let (code, body) = get_in(&ns, metrics, "/healthz");
        if code == 503 {
            seen = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = seen.expect("/healthz never said 503 while every send failed");
    eprintln!("cut off: 503 {body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "unavailable");
    assert!(
        h["network"].as_str().unwrap().contains("send"),
        "the reason names the network: {h}"
    );
    assert_eq!(h["store"], "ok", "{h}");

    // Back: the next send works and the check is green again.
    cut_udp(&ns, false);
    let mut ok = None;
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let (code, body) = get_in(&ns, metrics, "/healthz");
        if code == 200 {
            ok = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = ok.expect("/healthz stayed 503 after the network came back");
    eprintln!("back: 200 {body}");
    let status = rekey.child.wait().unwrap();
    eprintln!("the rekey begun while cut off exited with {status}");
}

/// A flood of garbage at an agent: its health check keeps answering 200
/// during the flood (a scrape is not starved by the datagrams), and afterwards
/// the refusals by kind add up to what its status counts.
#[test]
fn an_agent_under_a_flood_still_answers_its_health_check_and_counts_every_refusal() {
    let _heavy = support::heavy();
    let f = Fleet::new(1, "");
    let n = &f.nodes[0];
    let notify = Notify::new(f.dir.path(), "flooded");
    let mut agent = Proc::from(
        f.agent_command(0)
            .args(["--metrics", "127.0.0.1:0"])
            .env("NOTIFY_SOCKET", &notify.path)
            .spawn()
            .unwrap(),
    );
    let addr = metrics_addr(&notify.ready("the agent", &mut agent));
    let target = n.listen;
    const FLOOD: u32 = 20_000;
    let flood = std::thread::spawn(move || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..FLOOD {
            let mut b = [0x5au8; 96];
            b[..4].copy_from_slice(&i.to_be_bytes());
            let _ = s.send_to(&b, target);
        }
    });
    let mut answers = Vec::new();
    while !flood.is_finished() {
        let t = Instant::now();
        let (code, _) = get(addr, "/healthz");
        answers.push((code, t.elapsed().as_millis()));
    }
    flood.join().unwrap();
    eprintln!("/healthz during the flood (code, ms): {answers:?}");
    assert!(!answers.is_empty());
    assert!(answers.iter().all(|(c, _)| *c == 200), "{answers:?}");
    // Quiet again: the counts settle.
    let mut last = None;
    support::wait_for("the agent's refusal count to settle", 10_000, || {
        let s = agent_status(&n.state).unwrap()["running"]["refused"].as_u64();
        let settled = s.is_some() && s == last;
        last = s;
        std::thread::sleep(Duration::from_millis(200));
        settled
    });
    let m = scrape(addr);
    let s = agent_status(&n.state).unwrap();
    let refused = s["running"]["refused"].as_f64().unwrap();
    let by_kind: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("keyfleet_agent_refusals_total{"))
        .map(|(_, v)| v)
        .sum();
    let malformed = val(&m, "keyfleet_agent_refusals_total{kind=\"malformed\"}");
    eprintln!(
        "{FLOOD} garbage datagrams sent; the agent received {}, refused {refused} ({malformed} malformed)",
        val(&m, "keyfleet_agent_datagrams_received_total")
    );
    assert_eq!(by_kind, refused);
    assert!(malformed > 0.0 && malformed <= f64::from(FLOOD));
}
