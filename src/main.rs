use clap::Parser;

fn main() {
    // `cowshed tree | head` should end quietly like any Unix tool, not
    // panic on a closed pipe: restore the default SIGPIPE action.
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // color-eyre's panic hook: a panic (a bug) prints a report with a
    // backtrace. Ordinary errors are for operators: one line, no backtrace.
    let _ = color_eyre::config::HookBuilder::default()
        .display_env_section(false)
        .install();
    let cli = cowshed::cli::Cli::parse();
    match cowshed::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("cowshed: {e:#}");
            std::process::exit(1);
        }
    }
}
