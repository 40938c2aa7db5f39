//! `keyfleet`: the installer and controller CLI.
//!
//! Exit codes: 0 done; 1 error (the message says what to do); 2 bad command
//! line; `read-key` has its own (see `keyfleet read-key --help`).
use clap::{Args, CommandFactory, Parser, Subcommand};

/// stdout through [`keyfleet::logs::out`]: a closed pipe (`keyfleet status |
/// head -1`) ends the program quietly instead of with a panic.
macro_rules! println {
    () => { keyfleet::logs::out(format_args!(""), true) };
    ($($t:tt)*) => { keyfleet::logs::out(format_args!($($t)*), true) };
}
macro_rules! print {
    ($($t:tt)*) => { keyfleet::logs::out(format_args!($($t)*), false) };
}

#[cfg(feature = "drivers")]
mod demo;
mod enroll;
mod fleet;
#[cfg(feature = "drivers")]
mod input;
mod rekey;
mod sim;
mod status;

#[derive(Parser, Debug)]
#[command(
    name = "keyfleet",
    version,
    about = "Keeps one group key fresh across a fleet of appliances",
    after_help = "--state, --config and --passphrase-file belong to the controller commands \
(init, enroll, status, rekey, remove, history, serve, config): before or after the command name. \
Configuration: --config FILE, else $KEYFLEET_CONFIG, else $XDG_CONFIG_HOME/keyfleet/config.toml, \
else /etc/keyfleet/config.toml; KEYFLEET_STATE, KEYFLEET_GROUP, KEYFLEET_IFACE and \
KEYFLEET_LISTEN_PORT override it, flags override both (`keyfleet config` shows which file). \
Exit codes: 0 done, 1 error, 2 bad command line; read-key has its own (`keyfleet read-key --help`)."
)]
struct Cli {
    /// The controller commands' flags, given before the command name.
    #[command(flatten)]
    global: fleet::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// A controller command's own flags and the controller flags (--state,
/// --config, --passphrase-file), which may also come after the command name.
#[derive(Args, Debug)]
struct Ctl<T: Args> {
    #[command(flatten)]
    global: fleet::GlobalArgs,
    #[command(flatten)]
    args: T,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulate a fleet through rekey rounds on a lossy network (deterministic by seed).
    Sim(sim::SimArgs),
    /// Read one appliance's initial key from a source and print its check value (never the key).
    #[cfg(feature = "drivers")]
    ReadKey(input::ReadKeyArgs),
    /// List candidate devices for the key sources (hidraw, serial ports, video devices, removable media).
    #[cfg(feature = "drivers")]
    Devices(input::DevicesArgs),
    /// Create the controller: signing key, first group key, management table (never overwrites).
    Init(Ctl<fleet::InitArgs>),
    /// Enroll an appliance: node id and initial key (address optional: learned when it joins).
    Enroll(Ctl<enroll::EnrollArgs>),
    /// The fleet table: every node, its state, epoch, last seen, stale or not.
    Status(Ctl<status::StatusArgs>),
    /// Run one rekey round across the fleet.
    Rekey(Ctl<rekey::RekeyArgs>),
    /// Remove a node: a rekey round that leaves it out.
    Remove(Ctl<rekey::RemoveArgs>),
    /// Let a node whose state was lost run the enrollment handshake again (audited, 10 minutes).
    Rejoin(Ctl<enroll::RejoinArgs>),
    /// Key history (sent to whom and when, acknowledged when), rounds, audit log.
    History(Ctl<status::HistoryArgs>),
    /// The controller daemon: triggers, joins, key requests, usage reports, control socket.
    Serve(Ctl<fleet::ServeArgs>),
    /// Print the configuration in effect and which file it came from (or, with
    /// --print-default, every key with its default).
    Config(Ctl<fleet::ConfigArgs>),
    /// Run a controller and five agents on loopback, rotate the key twice while they exchange messages.
    #[cfg(feature = "drivers")]
    Demo(demo::DemoArgs),
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (keyfleet.1, keyfleet-rekey.1, ...) into DIR.
    #[command(hide = true)]
    Man { dir: std::path::PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            keyfleet::logs::report("keyfleet", &e);
            std::process::ExitCode::from(1)
        }
    }
}

/// The controller flags were given before a command they do not apply to.
fn refuse_controller_flags(g: &fleet::GlobalArgs, command: &str) {
    if let Some(flag) = g.given() {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "{flag} does not apply to `keyfleet {command}` (it is for the controller \
                     commands: init, enroll, status, rekey, remove, history, serve, config)"
                ),
            )
            .exit();
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let top = cli.global;
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cli.command {
        Command::Sim(args) => {
            refuse_controller_flags(&top, "sim");
            sim::run(args)
        }
        #[cfg(feature = "drivers")]
        Command::ReadKey(a) => {
            refuse_controller_flags(&top, "read-key");
            done(input::read_key(a))
        }
        #[cfg(feature = "drivers")]
        Command::Devices(a) => {
            refuse_controller_flags(&top, "devices");
            done(input::devices(a))
        }
        #[cfg(feature = "drivers")]
        Command::Demo(a) => {
            refuse_controller_flags(&top, "demo");
            demo::run(a)
        }
        Command::Init(c) => done(fleet::init(&top.merge(c.global), c.args)),
        Command::Enroll(c) => done(enroll::enroll(&top.merge(c.global), c.args)),
        Command::Status(c) => done(status::status(&top.merge(c.global), c.args)),
        Command::Rekey(c) => rekey::rekey(&top.merge(c.global), c.args),
        Command::Remove(c) => rekey::remove(&top.merge(c.global), c.args),
        Command::Rejoin(c) => done(enroll::rejoin(&top.merge(c.global), c.args)),
        Command::History(c) => done(status::history(&top.merge(c.global), c.args)),
        Command::Serve(c) => done(fleet::serve(&top.merge(c.global), c.args)),
        Command::Config(c) => done(fleet::config(&top.merge(c.global), c.args)),
        Command::Completions { shell } => {
            keyfleet::ops::print_completions(Cli::command(), shell);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => keyfleet::ops::write_man_pages(Cli::command(), &dir)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| anyhow::anyhow!("cannot write the man pages into {}: {e}", dir.display())),
    }
}
