//! `keyfleet-agent`: the node agent on each appliance.
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "keyfleet-agent",
    version,
    about = "Holds the group key on an appliance"
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
