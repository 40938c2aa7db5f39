//! `keyfleet`: the installer and controller CLI.
use clap::{Parser, Subcommand};

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
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
