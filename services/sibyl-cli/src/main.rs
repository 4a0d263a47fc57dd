//! `sibyl`: the command line of the sibyl speculative-decoding server.

mod args;
mod generate;
mod progress;

use clap::{Parser, Subcommand};

/// sibyl serves language models faster with speculative decoding, without changing what
/// they say.
#[derive(Debug, Parser)]
#[command(name = "sibyl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout; a summary goes to stderr.
    Generate(generate::GenerateArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
