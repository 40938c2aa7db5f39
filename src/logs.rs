//! What the two programs share on the terminal: logs that do not break a
//! progress bar (the format is [`crate::ops`]'s), errors printed as
//! a chain of causes without a backtrace, and stdout that a closed pipe
//! (`keyfleet status | head -1`) ends quietly instead of with a panic.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

/// The progress bar being drawn, if any: log lines are written above it.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Log lines go above this bar (suspending it while they are written) until it
/// is finished or another one is set.
pub fn set_progress_bar(bar: Option<indicatif::ProgressBar>) {
    if let Ok(mut b) = BAR.lock() {
        *b = bar;
    }
}

/// stderr, but around the progress bar when one is drawn (the log writer).
pub struct Stderr;

/// The log writer: stderr, above the progress bar while one is drawn.
pub fn stderr() -> Stderr {
    Stderr
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bar = BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(pb) if !pb.is_finished() => pb.suspend(|| io::stderr().write_all(buf))?,
            _ => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Logs to stderr at `RUST_LOG`, or `default` when it is unset: see
/// [`crate::ops::init_logs`] (text coloured only on a terminal, or JSON),
/// written through [`stderr`].
pub fn init(default: &str, format: crate::ops::LogFormat) {
    crate::ops::init_logs(default, format);
}

/// An error as the user reads it: the message, then each cause on its own
/// line. No backtrace, whatever `RUST_BACKTRACE` says: errors here are the
/// user's to fix, not bugs (a bug panics, and the panic keeps its backtrace).
pub fn report(program: &str, e: &anyhow::Error) {
    let mut s = format!("{program}: error: {e}");
    for cause in e.chain().skip(1) {
        s.push_str(&format!("\n  caused by: {cause}"));
    }
    eprintln!("{s}");
}

/// `print!`/`println!` of the two programs: stdout, where a reader that went
/// away (a closed pipe) ends the program quietly with exit code 0, as
/// ripgrep does, instead of the standard macros' panic.
pub fn out(args: fmt::Arguments<'_>, newline: bool) {
    let mut o = io::stdout().lock();
    let r = o
        .write_fmt(args)
        .and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) });
    if let Err(e) = r {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}
