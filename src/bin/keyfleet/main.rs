//! `keyfleet`: the installer and controller CLI.
use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => sim::run(args),
    }
}
