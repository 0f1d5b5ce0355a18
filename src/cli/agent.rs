//! `cowshed agent --stdio`: serve a remote root to another cowshed over
//! ssh (see `remote::agent`). Not for people to type.

use clap::Args;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Speak the agent protocol on stdin and stdout (the only transport).
    #[arg(long, required = true)]
    stdio: bool,
}

pub fn run(_a: AgentArgs) -> color_eyre::Result<i32> {
    Ok(crate::remote::agent::run_stdio())
}
