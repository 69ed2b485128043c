use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum LuksCmd {
    #[command(hide = true)]
    Placeholderluks,
}

pub fn run(cmd: LuksCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LuksCmd::Placeholderluks => anyhow::bail!("not built yet"),
    }
}
