//! `keyfleet`: the installer and controller CLI.
use clap::{Parser, Subcommand};

#[cfg(feature = "drivers")]
mod input;
mod sim;

#[derive(Parser, Debug)]
#[command(
    name = "keyfleet",
    version,
    about = "Keeps one group key fresh across a fleet of appliances"
)]
struct Cli {
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
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => sim::run(args),
        #[cfg(feature = "drivers")]
        Command::ReadKey(a) => input::read_key(a).map(|()| std::process::ExitCode::SUCCESS),
        #[cfg(feature = "drivers")]
        Command::Devices(a) => input::devices(a).map(|()| std::process::ExitCode::SUCCESS),
    }
}
