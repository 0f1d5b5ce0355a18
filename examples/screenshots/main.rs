//! `cargo run --example screenshots`: write `screenshots/*.png`, the main
//! scenes of the TUI on the demo fleet (see `scenes.rs`), rendered with the
//! font shipped in `assets/fonts/` (see `render.rs`). Two runs write the
//! same bytes; the PNGs are made by this and never by hand.
//!
//! The hosts scene's remote hosts run this same program as their cowshed
//! (`screenshots agent --stdio`, over ssh): it is cowshed's CLI then.

mod render;
mod scenes;

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).is_some_and(|a| a == "agent") {
        use clap::Parser;
        let cli = cowshed::cli::Cli::parse();
        return match cowshed::cli::run(cli) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("cowshed: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("screenshots: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    // Resolved before the stage changes the working directory.
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("screenshots");
    let fonts = render::Fonts::load().map_err(|e| {
        format!(
            "cannot read the fonts in {}: {e}",
            render::fonts_dir().display()
        )
    })?;
    let grid = fonts.grid();
    let mut stage = scenes::Stage::new()?;
    let mut shots = scenes::all(&mut stage)?;
    drop(stage);
    if let Some(why) = scenes::hosts_unavailable() {
        return Err(format!("the hosts scene cannot be staged: {why}"));
    }
    let agent = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let mut stage = scenes::Stage::hosts(&agent)?;
    shots.push(("hosts", scenes::hosts(&mut stage)?));
    drop(stage);
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    for (name, buf) in shots {
        // A glyph the font lacks would be drawn as a box: refuse instead.
        let missing = fonts.missing_glyphs(&buf);
        if !missing.is_empty() {
            return Err(format!(
                "scene {name}: the shipped font has no glyph for {missing:?}"
            ));
        }
        let png = render::png(&render::svg(&buf, grid), &fonts)?;
        let path = out_dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("{} ({} bytes)", path.display(), png.len());
    }
    Ok(())
}
