//! What every process-level test needs: loopback ports no other part of the
//! test took, and waiting for a condition with a deadline that names it.
#![allow(dead_code)]

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
