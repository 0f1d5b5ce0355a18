//! `cowshed agent --stdio`: serve a remote root to another cowshed over
//! ssh (see `remote::agent`). Not for people to type.

use clap::Args;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Speak the agent protocol on stdin and stdout (the only transport).
    #[arg(long, required = true)]
    stdio: bool,
}

/// The agent reads its own host's libvirt: its own `--connect`, else that
/// host's config file's `libvirt`, else the default set. The client's
/// `--connect` is not passed on: a URI names a daemon as seen from the
/// machine that opens it (`qemu:///system` there is another daemon than
/// here), and one list for every host cannot say what each host runs.
pub fn run(_a: AgentArgs, session: &super::session::Session) -> color_eyre::Result<i32> {
    Ok(crate::remote::agent::run_stdio(session.connections()?))
}
