//! `keyfleet`: the installer and controller CLI.
use clap::{CommandFactory, Parser, Subcommand};

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
    about = "Keeps one group key fresh across a fleet of appliances"
)]
struct Cli {
    #[command(flatten)]
    global: fleet::GlobalArgs,
    #[command(subcommand)]
    command: Command,
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
    Init(fleet::InitArgs),
    /// Enroll an appliance: node id, address, initial key.
    Enroll(enroll::EnrollArgs),
    /// The fleet table: every node, its state, epoch, last seen, stale or not.
    Status(status::StatusArgs),
    /// Run one rekey round across the fleet.
    Rekey(rekey::RekeyArgs),
    /// Remove a node: a rekey round that leaves it out.
    Remove(rekey::RemoveArgs),
    /// Let a node whose state was lost run the enrollment handshake again (audited, 10 minutes).
    Rejoin(enroll::RejoinArgs),
    /// Key history (sent to whom and when, acknowledged when), rounds, audit log.
    History(status::HistoryArgs),
    /// The controller daemon: triggers, joins, key requests, usage reports, control socket.
    Serve(fleet::ServeArgs),
    /// Print the configuration (or, with --print-default, every key with its default).
    Config(fleet::ConfigArgs),
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

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => sim::run(args),
        #[cfg(feature = "drivers")]
        Command::ReadKey(a) => input::read_key(a).map(|()| std::process::ExitCode::SUCCESS),
        #[cfg(feature = "drivers")]
        Command::Devices(a) => input::devices(a).map(|()| std::process::ExitCode::SUCCESS),
        Command::Init(a) => fleet::init(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS),
        Command::Enroll(a) => {
            enroll::enroll(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Status(a) => {
            status::status(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Rekey(a) => rekey::rekey(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS),
        Command::Remove(a) => {
            rekey::remove(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Rejoin(a) => {
            enroll::rejoin(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::History(a) => {
            status::history(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Serve(a) => fleet::serve(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS),
        Command::Config(a) => {
            fleet::config(&cli.global, a).map(|()| std::process::ExitCode::SUCCESS)
        }
        #[cfg(feature = "drivers")]
        Command::Demo(a) => demo::run(a),
        Command::Completions { shell } => {
            keyfleet::ops::print_completions(Cli::command(), shell);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Man { dir } => keyfleet::ops::write_man_pages(Cli::command(), &dir)
            .map(|()| std::process::ExitCode::SUCCESS)
            .map_err(|e| anyhow::anyhow!("cannot write the man pages into {}: {e}", dir.display())),
    }
}
