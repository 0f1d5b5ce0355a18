//! `cowshed completions SHELL`, `cowshed manpage` and `cowshed
//! default-config`: what installing cowshed needs besides the binary, all
//! generated from the same definitions the program runs on (clap's for the
//! first two, the key table for the config).

use clap::{Args, CommandFactory};

use super::Cli;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    shell: clap_complete::Shell,
}

pub fn completions(a: CompletionsArgs) -> color_eyre::Result<i32> {
    let mut cmd = Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "cowshed", &mut std::io::stdout());
    Ok(0)
}

pub fn manpage() -> color_eyre::Result<i32> {
    clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
    Ok(0)
}

pub fn default_config() -> color_eyre::Result<i32> {
    print!("{}", crate::tui::config::default_config());
    Ok(0)
}

/// The subcommands' names, for the message about an unknown one.
pub fn command_names() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect()
}
