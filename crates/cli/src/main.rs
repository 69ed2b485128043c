//! The `luksify` command line. Each group of subcommands lives in its own module
//! (`cmd_*.rs`) and is flattened in here, so that each crate's owner extends only
//! its own file.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod bench_device;
mod cmd_bench;
mod cmd_luks;
mod cmd_orch;
mod cmd_walker;
mod keyfile;

#[derive(Parser, Debug)]
#[command(
    name = "luksify",
    version,
    about = "Encrypt Linux block devices in place to LUKS2"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure throughput (cipher, device) against reference tools
    #[command(subcommand)]
    Bench(cmd_bench::BenchCmd),
    #[command(flatten)]
    Luks(cmd_luks::LuksCmd),
    #[command(flatten)]
    Walk(cmd_walker::WalkCmd),
    #[command(flatten)]
    Orch(cmd_orch::OrchCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Bench(c) => cmd_bench::run(c),
        Cmd::Luks(c) => cmd_luks::run(c),
        Cmd::Walk(c) => cmd_walker::run(c),
        Cmd::Orch(c) => cmd_orch::run(c),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            // One line: what went wrong and how to fix it (errors carry both).
            eprintln!("luksify: {e:#}");
            ExitCode::from(1)
        }
    }
}
