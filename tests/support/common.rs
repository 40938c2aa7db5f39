//! What every process-level test needs: loopback ports no other part of the
//! test took, waiting for a condition with a deadline that names it, and
//! child processes that are killed when dropped.
#![allow(dead_code)]

use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// A child process, SIGKILLed when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.0), sig)
            .unwrap_or_else(|e| panic!("cannot signal process {}: {e}", self.0.id()));
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

    /// SIGTERM (a clean stop), then waits up to 10 s for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = self.0.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < end,
                "process {} ignored SIGTERM",
                self.0.id()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
