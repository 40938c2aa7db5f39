//! What the two programs share on the terminal: logs on stderr (plain text,
//! coloured only on a terminal, or one JSON object a line for journald and
//! log collectors), logs that do not break a progress bar, errors printed as
//! a chain of causes without a backtrace, and stdout that a closed pipe
//! (`keyfleet status | head -1`) ends quietly instead of with a panic.

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text an event; coloured when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object an event (tracing-subscriber's json format): `timestamp`,
    /// `level`, `target`, `fields` (with `message`), `span`/`spans`.
    Json,
}

/// The progress bar being drawn, if any: log lines are written above it.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Log lines go above this bar (suspending it while they are written) until it
/// is finished or another one is set.
pub fn set_progress_bar(bar: Option<indicatif::ProgressBar>) {
    if let Ok(mut b) = BAR.lock() {
        *b = bar;
    }
}

/// stderr, but around the progress bar when one is drawn.
struct Stderr;

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

/// Logs to stderr at `RUST_LOG`, or `default` when it is unset. Colours only
/// when stderr is a terminal (and `NO_COLOR` is unset).
pub fn init(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Stderr);
    let _ = match format {
        LogFormat::Text => b
            .with_ansi(io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .try_init(),
        LogFormat::Json => b.json().with_ansi(false).try_init(),
    };
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
