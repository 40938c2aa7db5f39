//! What both binaries share for running as a service: log set-up (plain text
//! without colour off a terminal, or one JSON object a line), systemd's
//! readiness notification, and the shell completions and man pages generated
//! from the one clap definition of each program (`keyfleet completions SHELL`,
//! `keyfleet man DIR`, and the same for `keyfleet-agent`; hidden commands that
//! the Debian package build calls).

use std::io::IsTerminal;
use std::path::Path;

/// How log lines are written to stderr (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event; colour only when stderr is a terminal and
    /// `NO_COLOR` is unset (so journald and log files get no escape codes).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields.message`, the
    /// event's fields, `target`, `spans`), for journald's or a collector's parsers.
    Json,
}

/// Whether log lines may carry ANSI colour: stderr is a terminal and `NO_COLOR` is unset.
pub fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Whether stderr is connected to journald (systemd sets `JOURNAL_STREAM` to
/// the `device:inode` of the stream it gives the service; a child that
/// inherited the variable but not the stream does not match).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// Logs to stderr in `format`; `RUST_LOG` overrides `default_filter`. A
/// second call does nothing. Text to journald leaves out the time (the
/// journal records it for each line).
pub fn init_logs(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Above the progress bar while one is drawn (`crate::logs`).
        .with_writer(crate::logs::stderr);
    let _ = match format {
        LogFormat::Text if stderr_is_journal() => {
            builder.with_ansi(false).without_time().try_init()
        }
        LogFormat::Text => builder.with_ansi(colour_on_stderr()).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

/// Tells systemd (`Type=notify`) that the service is ready, with a status
/// line; nothing when not started by systemd (`NOTIFY_SOCKET` unset). A
/// failure is logged, not fatal: the service works, systemd may time it out.
pub fn notify_ready(status: &str) {
    let r = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot tell systemd that the service is ready (NOTIFY_SOCKET)");
    }
}

/// Tells systemd that the service is stopping (nothing outside systemd).
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Writes the completion script for `shell` to stdout.
pub fn print_completions(mut cmd: clap::Command, shell: clap_complete::Shell) {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// Writes the man pages of `cmd` and of each of its visible subcommands
/// (`keyfleet.1`, `keyfleet-rekey.1`, …) into `dir`, creating it.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Each page's title line carries the version, subcommands' too (which
    // take no --version flag, so none is documented).
    fn with_version(cmd: clap::Command) -> clap::Command {
        cmd.version(env!("CARGO_PKG_VERSION"))
            .disable_version_flag(true)
            .mut_subcommands(with_version)
    }
    clap_mangen::generate_to(cmd.mut_subcommands(with_version), dir)
}
