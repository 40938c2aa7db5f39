//! The real Wireshark tools for the dissector tests: `tshark` with
//! `contrib/wireshark/keyfleet.lua`, `dumpcap` on loopback and `text2pcap`
//! (all from Debian's `tshark` package, which `scripts/dev deps` installs).
//!
//! Every `tshark` run gets a home and configuration directory of its own, so
//! that a dissector or preference the user installed cannot mix in, and is
//! checked for Lua errors: one raised while loading the script (printed on
//! stderr, tshark still exits 0) fails the test here; one raised while
//! dissecting a packet becomes expert info `Lua Error: …` in that packet,
//! which the tests look for.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The dissector under test.
pub const DISSECTOR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/wireshark/keyfleet.lua"
);

/// Whether `tshark`, `dumpcap` and `text2pcap` can run. When they cannot, the
/// test says so and returns — unless `KEYFLEET_REQUIRE_TSHARK` is set (CI),
/// where their absence is a failure.
pub fn available(test: &str) -> bool {
    let runs = |p: &str| {
        Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = ["tshark", "dumpcap", "text2pcap"]
        .into_iter()
        .filter(|p| !runs(p))
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("KEYFLEET_REQUIRE_TSHARK").is_some() {
        panic!(
            "{test}: KEYFLEET_REQUIRE_TSHARK is set but {} cannot run: install Debian's tshark package (scripts/dev deps does)",
            missing.join(", ")
        );
    }
    eprintln!(
        "SKIPPED {test}: {} not installed (Debian package tshark; scripts/dev deps installs it). Set KEYFLEET_REQUIRE_TSHARK=1 to make this a failure.",
        missing.join(", ")
    );
    false
}

/// Runs `tshark -X lua_script:DISSECTOR -r PCAP ARGS` in a clean
/// configuration; its stdout. Panics when it fails or reports a Lua error.
pub fn run(pcap: &Path, args: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new("tshark")
        .arg("-X")
        .arg(format!("lua_script:{DISSECTOR}"))
        .arg("-r")
        .arg(pcap)
        .args(args)
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join(".config"))
        .env_remove("WIRESHARK_CONFIG_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run tshark");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tshark {args:?} failed: {}\n{stderr}",
        out.status
    );
    let lua: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("Lua") || l.contains("lua"))
        .collect();
    assert!(
        lua.is_empty(),
        "tshark reported Lua errors while loading {DISSECTOR}:\n{}",
        lua.join("\n")
    );
    String::from_utf8(out.stdout).expect("tshark prints UTF-8")
}

/// Writes `datagrams` as UDP datagrams from port 40000 to `port`, one frame
/// each in order (frame N is datagram N-1), into a pcap file made by
/// `text2pcap`. An empty datagram cannot be written and is refused.
pub fn write_pcap(datagrams: &[Vec<u8>], port: u16, pcap: &Path) {
    let dir = pcap.parent().unwrap();
    let text = dir.join("datagrams.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&text).unwrap());
        for d in datagrams {
            assert!(!d.is_empty(), "text2pcap cannot write an empty datagram");
            for (i, chunk) in d.chunks(16).enumerate() {
                write!(f, "{:06x}", i * 16).unwrap();
                for b in chunk {
                    write!(f, " {b:02x}").unwrap();
                }
                writeln!(f).unwrap();
            }
        }
    }
    let out = Command::new("text2pcap")
        .arg("-q")
        .arg("-u")
        .arg(format!("40000,{port}"))
        .arg(&text)
        .arg(pcap)
        .output()
        .expect("run text2pcap");
    assert!(
        out.status.success(),
        "text2pcap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `dumpcap` capture on the loopback interface, stopped by [`Capture::stop`]
/// (or killed when dropped).
pub struct Capture {
    child: super::Proc,
    pub file: PathBuf,
    log: PathBuf,
}

impl Capture {
    /// Starts capturing what `filter` (a capture filter) lets through on
    /// `lo` into `file`; returns once dumpcap says it is capturing.
    pub fn start(filter: &str, file: &Path) -> Capture {
        let log = file.with_extension("dumpcap.log");
        let child = Command::new("dumpcap")
            .args(["-q", "-i", "lo", "-f", filter, "-w"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start dumpcap");
        let mut c = Capture {
            child: super::Proc::from(child),
            file: file.to_owned(),
            log,
        };
        super::wait_for("dumpcap to start capturing on lo", 15_000, || {
            assert!(
                c.child.alive(),
                "dumpcap exited (capturing on lo takes root or the wireshark group): {}",
                c.log_text()
            );
            c.log_text().contains("Capturing on")
        });
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the capture cleanly (SIGTERM: dumpcap writes what it holds) and
    /// prints dumpcap's count of packets captured and dropped.
    pub fn stop(mut self) -> PathBuf {
        // What the kernel still holds for the capture socket.
        std::thread::sleep(Duration::from_millis(300));
        let status = self.child.terminate();
        let log = self.log_text();
        println!("dumpcap: {}", log.trim().replace('\n', "; "));
        assert!(status.success(), "dumpcap: {status}\n{log}");
        // "Packets received/dropped on interface 'Loopback: lo': 98/0 (...)"
        let dropped = log
            .lines()
            .find_map(|l| l.split_once("received/dropped on interface"))
            .and_then(|(_, rest)| rest.split_once("': "))
            .map(|(_, counts)| counts)
            .and_then(|counts| counts.split_whitespace().next())
            .and_then(|rd| rd.split_once('/'))
            .and_then(|(_, d)| d.parse::<u64>().ok());
        assert_eq!(
            dropped,
            Some(0),
            "dumpcap dropped packets (or said nothing): {log}"
        );
        self.file.clone()
    }
}
