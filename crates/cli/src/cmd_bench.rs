use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// AES-XTS throughput against `openssl speed -evp aes-256-xts`
    Cipher {
        /// One JSON object per row
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Cipher { json: _ } => anyhow::bail!("bench cipher: not built yet"),
    }
}
