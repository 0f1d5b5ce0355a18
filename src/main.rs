use clap::Parser;

fn main() -> color_eyre::Result<()> {
    color_eyre::install()?;
    let cli = cowshed::cli::Cli::parse();
    let code = cowshed::cli::run(cli)?;
    std::process::exit(code);
}
