//! `sibyl`: the command line of the sibyl speculative-decoding server.

mod generate;
mod health;
mod index;
mod roles;
mod security;
mod shutdown;
mod suffix;

use clap::{Parser, Subcommand};
use sibyl_bench as bench;

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
    /// Run everything in one process: gateway (HTTP and gRPC), verifier and drafters
    /// (`--draft`; by default n-gram, and retrieval with `--datastore`), wired over loopback
    /// gRPC.
    Serve(roles::ServeArgs),
    /// Run the gateway role: the OpenAI-compatible HTTP API and the gRPC API.
    Gateway(roles::GatewayArgs),
    /// Run the verifier role: the target model, speculating with remote drafters.
    Verifier(roles::VerifierRoleArgs),
    /// Run a drafter role.
    Drafter(roles::DrafterArgs),
    /// Ask a sibyl server's gRPC health once: exit code 0 when it is SERVING.
    Health(health::HealthArgs),
    /// Measure speculation against plain decoding on benchmark prompts (tokens/s, speedup,
    /// accepted tokens per step) and check that outputs are identical.
    Bench(bench::BenchArgs),
    /// Build a retrieval datastore: a corpus (files and folders of text and code) tokenized
    /// with a model's tokenizer, with its suffix array, for `--draft retrieval` and
    /// `sibyl drafter --kind retrieval`.
    Index(index::IndexArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Generate(_) | Command::Bench(_) | Command::Index(_)
    ) {
        sibyl_telemetry::init_command();
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => roles::run_serve(args),
        Command::Gateway(args) => roles::run_gateway(args),
        Command::Verifier(args) => roles::run_verifier(args),
        Command::Drafter(args) => roles::run_drafter(args),
        Command::Bench(args) => bench::run(args),
        Command::Health(args) => health::run_health(args),
        Command::Index(args) => index::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_has_distinct_well_formed_flags() {
        // clap checks this only in debug builds; the tests run in release.
        Cli::command().debug_assert();
    }
}
