//! The one support module of the integration tests, mounted by every test
//! binary (`tests/<group>/main.rs`) as `pub mod support` (public, so that an
//! item one group uses is not reported unused in another; see tests/README.md
//! for how to find the items no group uses). Here: loopback ports and
//! multicast groups no other test took, waiting for a condition with a
//! deadline that names it, the one child-process wrapper, and the guard that
//! keeps heavy tests one at a time. Beside it: the real-process fleet
//! ([`fleet`]), the one in-process fleet of real machines on real sockets
//! ([`inproc`]), one real `keyfleet` controller ([`ctl`]: the real-process
//! fleet without agents) and real `keyfleet-agent`s ([`agent`]) to put
//! beside it, the
//! attacker ([`adversary`], [`wiretap`]), network namespaces ([`netns`],
//! [`veth`]), `tshark` ([`tshark`]) and a throw-away PostgreSQL ([`testpg`]).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub mod adversary;
pub mod agent;
pub mod ctl;
pub mod fleet;
pub mod inproc;
pub mod netns;
#[path = "../../src/store/testpg.rs"]
pub mod testpg;
pub mod tshark;
pub mod veth;
pub mod wiretap;

pub const KEYFLEET: &str = env!("CARGO_BIN_EXE_keyfleet");
pub const AGENT: &str = env!("CARGO_BIN_EXE_keyfleet-agent");

/// The agent binary: `KEYFLEET_AGENT` if set (e.g. a release build), else this build's.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("KEYFLEET_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| AGENT.into())
}

/// Held by every heavy test (real fleets, network namespaces, the simulator,
/// the model check) for its whole run: `let _heavy = support::heavy();`
/// first. The tests of one binary run in parallel threads; before the
/// groups, the heavy ones lived in binaries of their own that cargo ran one
/// after another, and their deadlines were set for that. Two of them at once
/// on a small machine starve each other's processes. Poison-tolerant: a heavy
/// test that failed does not fail the next one.
pub fn heavy() -> Heavy {
    static HEAVY: Mutex<()> = Mutex::new(());
    Heavy {
        _turn: HEAVY.lock().unwrap_or_else(|e| e.into_inner()),
    }
}

/// A heavy test's turn ([`heavy`]), until dropped. Async tests hold it across
/// their awaits on purpose: the whole test is the turn, and no other task of
/// the test waits for it.
pub struct Heavy {
    _turn: MutexGuard<'static, ()>,
}

/// A multicast group and port of this test alone: the port one this process
/// never handed out before ([`free_port`]), the group's third byte from the
/// process id and its fourth from a counter, so neither the parallel tests of
/// one binary nor another test binary running at the same time hear each
/// other.
pub fn fresh_group() -> SocketAddrV4 {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    SocketAddrV4::new(
        Ipv4Addr::new(239, 255, 80 + (pid % 160) as u8, (n % 250 + 1) as u8),
        free_port(),
    )
}

/// A free UDP port on loopback, never one this process handed out before (the
/// kernel may give a released port again, and the nodes of one test, or
/// parallel fleets, need distinct ones).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `f` every 50 ms for up to `ms`; panics naming `what` if it never holds.
pub fn wait_for(what: &str, ms: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {ms} ms waiting for {what}");
}

/// A child process, SIGKILLed and reaped when dropped; its stderr (and with
/// [`Proc::spawn`] its stdout) in `log` when it has one.
pub struct Proc {
    pub child: Child,
    pub log: Option<PathBuf>,
}

impl From<Child> for Proc {
    fn from(child: Child) -> Proc {
        Proc { child, log: None }
    }
}

impl Proc {
    /// Spawns `cmd` with no stdin and its stdout and stderr in the file `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let err = std::fs::File::create(&log).unwrap();
        let out = err.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: Some(log),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `None` while it runs; its exit status once it died.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Its exit status, once it exits within `limit`; panics naming it if not.
    pub fn wait_timeout(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < end,
                "process {} did not exit within {limit:?}:\n{}",
                self.child.id(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), sig)
            .unwrap_or_else(|e| panic!("cannot signal process {}: {e}", self.child.id()));
    }

    /// SIGSTOP: the process is frozen — it reads no datagram and answers
    /// nothing; what is sent to it waits in its socket buffers — until [`Proc::thaw`].
    pub fn freeze(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// SIGCONT after [`Proc::freeze`].
    pub fn thaw(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    /// SIGTERM (a clean stop), then the exit status (within 10 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait_timeout(Duration::from_secs(10))
    }

    /// SIGINT (Ctrl-C), then the exit status (within 10 s).
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::INT);
        self.wait_timeout(Duration::from_secs(10))
    }

    /// What it wrote to its log so far (empty without one).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `cmd` on a real pseudo-terminal of `rows` × `cols` until it exits
/// (at most 30 s), reading everything it draws; its exit status and the raw
/// bytes (feed them to `vt100` for the screen).
pub fn run_in_pty(
    cmd: portable_pty::CommandBuilder,
    rows: u16,
    cols: u16,
) -> (portable_pty::ExitStatus, Vec<u8>) {
    use std::io::Read;
    use std::sync::Arc;
    let pty = portable_pty::native_pty_system()
        .openpty(portable_pty::PtySize {
            rows,
            cols,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut child = pty.slave.spawn_command(cmd).unwrap();
    drop(pty.slave);
    let mut reader = pty.master.try_clone_reader().unwrap();
    let raw = Arc::new(Mutex::new(Vec::new()));
    let r2 = raw.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            r2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "the program on the terminal did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The reader thread drains what the program wrote last.
    std::thread::sleep(Duration::from_millis(200));
    let bytes = raw.lock().unwrap().clone();
    (status, bytes)
}
