use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum OrchCmd {
    #[command(hide = true)]
    Placeholderorch,
}

pub fn run(cmd: OrchCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        OrchCmd::Placeholderorch => anyhow::bail!("not built yet"),
    }
}
