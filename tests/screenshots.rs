//! The screenshot pipeline of `cargo run --example screenshots` (its
//! modules, included by path): the forest scene on the demo fleet, drawn
//! by the real view, turned into SVG and PNG. Checks that the SVG is the
//! screen, glyph for glyph on the grid, and that the shipped font draws
//! every glyph. One test only: the stage changes the working directory.

#[allow(dead_code)] // Shared with the example, which uses all of it.
#[path = "../examples/screenshots/render.rs"]
mod render;
#[allow(dead_code)] // Shared with the example, which uses all of it.
#[path = "../examples/screenshots/scenes.rs"]
mod scenes;

use ratatui::buffer::Buffer;

/// The `<text>` elements of `svg` put back on the grid: one string per row.
fn text_grid(svg: &str, grid: render::Grid, width: usize, height: usize) -> Vec<Vec<char>> {
    let mut rows = vec![vec![' '; width]; height];
    for el in svg.split("<text ").skip(1) {
        let attr = |name: &str| -> f32 {
            let start = el.find(&format!("{name}=\"")).expect("attribute") + name.len() + 2;
            let len = el[start..].find('"').expect("closing quote");
            el[start..start + len].parse().expect("a number")
        };
        let content = &el[el.find('>').expect(">") + 1..el.find("</text>").expect("</text>")];
        let content = content
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&amp;", "&");
        let mut chars = content.chars();
        let c = chars.next().expect("one glyph");
        assert!(chars.next().is_none(), "one glyph per <text>: {content:?}");
        let x = (attr("x") / grid.cell_w).round() as usize;
        let y = ((attr("y") - grid.baseline) / grid.cell_h).round() as usize;
        assert_eq!(rows[y][x], ' ', "two glyphs in cell ({x}, {y})");
        rows[y][x] = c;
    }
    rows
}

fn buffer_rows(buf: &Buffer) -> Vec<Vec<char>> {
    let a = buf.area;
    (0..a.height)
        .map(|y| {
            (0..a.width)
                .map(|x| {
                    let cell = &buf[(x, y)];
                    if render::is_ink(cell) {
                        cell.symbol().chars().next().expect("a symbol")
                    } else {
                        ' '
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn forest_scene_becomes_svg_and_png() {
    let fonts = render::Fonts::load().expect("fonts in assets/fonts");
    let grid = fonts.grid();
    let mut stage = scenes::Stage::new().expect("stage");
    let buf = scenes::forest(&mut stage).expect("forest scene");
    let svg = render::svg(&buf, grid);

    // One <text> per cell with ink, and each at its cell.
    let ink = buf.content.iter().filter(|c| render::is_ink(c)).count();
    assert_eq!(svg.matches("<text ").count(), ink);
    let (w, h) = (usize::from(scenes::W), usize::from(scenes::H));
    let rows = text_grid(&svg, grid, w, h);
    assert_eq!(rows, buffer_rows(&buf));
    let screen: Vec<String> = rows.iter().map(|r| r.iter().collect()).collect();
    let screen = screen.join("\n");
    for name in [
        "debian-12.qcow2",
        "web-1.qcow2",
        "db-1-1-1.qcow2",
        "orphan.qcow2",
    ] {
        assert!(screen.contains(name), "{name} not on screen:\n{screen}");
    }
    // The injected growth, and the root shown as given, not the temp dir.
    assert!(screen.contains("3.4 MiB/s"), "{screen}");
    assert!(screen
        .lines()
        .next()
        .unwrap()
        .contains("cowshed  demo-fleet"));
    assert!(
        !svg.contains("/tmp"),
        "a temporary path leaks into the picture"
    );

    // The selected row's background is drawn, the rest is the default.
    assert!(svg.contains("fill=\"#3e4451\""), "no selection background");
    assert!(svg.contains("font-weight=\"bold\""));

    // Every glyph is in the shipped font: no boxes in the picture.
    assert_eq!(fonts.missing_glyphs(&buf), Vec::<char>::new());
    let png = render::png(&svg, &fonts).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    assert_eq!(dim(16), (f32::from(scenes::W) * grid.cell_w).round() as u32);
    assert_eq!(dim(20), (f32::from(scenes::H) * grid.cell_h).round() as u32);
    drop(stage);

    // The hosts scene: real agents over a real sshd, each machine's own
    // libvirt (test driver, read through virsh).
    if let Some(why) = scenes::hosts_unavailable() {
        eprintln!("SKIPPED: the hosts scene: {why}");
        return;
    }
    let agent = std::path::Path::new(env!("CARGO_BIN_EXE_cowshed"));
    let mut stage = scenes::Stage::hosts(agent).expect("hosts stage");
    let buf = scenes::hosts(&mut stage).expect("hosts scene");
    let screen: Vec<String> = buffer_rows(&buf)
        .iter()
        .map(|r| r.iter().collect())
        .collect();
    let screen = screen.join("\n");
    // The shared directory once, under both hosts; each machine's domains
    // on its own images, with their states.
    assert_eq!(screen.matches("golden.qcow2").count(), 1, "{screen}");
    assert!(screen.contains("host1+host2: golden.qcow2"), "{screen}");
    for (image, domain) in [
        ("ci-runner.qcow2", "ci-runner running"),
        ("web-1.qcow2", "web-1 running"),
        ("web-2.qcow2", "web-2 shut off"),
        ("db-1.qcow2", "db-1 paused"),
        ("build-7.qcow2", "build-7 running"),
        ("build-8.qcow2", "build-8 shut off"),
    ] {
        assert!(
            screen
                .lines()
                .any(|l| l.contains(image) && l.contains(domain)),
            "{domain} not on {image}'s row:\n{screen}"
        );
    }
    assert_eq!(fonts.missing_glyphs(&buf), Vec::<char>::new());
}
