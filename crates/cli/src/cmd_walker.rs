use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum WalkCmd {
    #[command(hide = true)]
    Placeholderwalker,
}

pub fn run(cmd: WalkCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        WalkCmd::Placeholderwalker => anyhow::bail!("not built yet"),
    }
}
