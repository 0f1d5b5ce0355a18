//! The command line around the operations (issue 11): a mistyped command
//! is named as such, `-p` progress reads well in a log, and the shell
//! completions and the man page are generated from clap.

mod common;

use common::Work;

/// Defect 12: a word that is no directory and looks like a command is an
/// unknown command, with the list of commands; a directory of that name
/// still opens (`./word`), and a missing path is still "no such file".
#[test]
fn an_unknown_command_is_named_with_the_list_of_commands() {
    let w = Work::new("unknown-command");
    let r = w.cowshed(&["grow", "x.qcow2", "+1G"]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(
        r.stderr.contains("unknown command 'grow'")
            && r.stderr.contains("info")
            && r.stderr.contains("convert"),
        "{r}"
    );
    assert!(!r.stderr.contains("no such file"), "{r}");
    let r = w.cowshed(&["missing/dir"]);
    assert!(r.stderr.contains("no such file"), "{r}");
}

/// Defect 5: `convert -p` on a pipe prints one report per line, never two
/// on one line, never 100% before the work, and ends at 100%.
#[test]
fn convert_progress_in_a_log_is_one_report_a_line() {
    let w = Work::new("progress-lines");
    w.create("src.qcow2", "qcow2", "", None, 64 << 20);
    w.io("qcow2", "src.qcow2", &["write -P 7 0 16M".to_string()]);
    let r = w.cowshed(&["convert", "-p", "-O", "qcow2", "src.qcow2", "dst.qcow2"]);
    assert!(r.ok(), "{r}");
    assert!(!r.stderr.contains('\r'), "{r}");
    let reports: Vec<&str> = r.stderr.lines().filter(|l| l.contains("/100%)")).collect();
    assert!(!reports.is_empty(), "{r}");
    for l in &reports {
        assert_eq!(
            l.matches("/100%)").count(),
            1,
            "two reports on a line: {l:?}"
        );
    }
    let pcts: Vec<f64> = reports
        .iter()
        .map(|l| {
            let open = l.find('(').expect("(") + 1;
            l[open..l.find('/').expect("/")]
                .trim()
                .parse()
                .expect("a number")
        })
        .collect();
    assert!(pcts.windows(2).all(|p| p[0] <= p[1]), "{pcts:?}");
    assert_eq!(pcts.last(), Some(&100.0), "{r}");
    assert!(
        pcts.iter().filter(|&&p| p == 100.0).count() == 1,
        "100% said more than once: {r}"
    );
}

/// Defect 14: completions for each shell clap knows, and a man page,
/// generated from the same definitions the program parses.
#[test]
fn completions_and_man_page_are_generated() {
    let w = Work::new("completions");
    for (shell, marker) in [
        ("bash", "_cowshed()"),
        ("zsh", "#compdef cowshed"),
        ("fish", "complete -c cowshed"),
    ] {
        let r = w.cowshed(&["completions", shell]);
        assert!(r.ok(), "{r}");
        assert!(
            r.stdout.contains(marker),
            "{shell}: {}",
            &r.stdout[..200.min(r.stdout.len())]
        );
        for cmd in ["convert", "rebase", "commit"] {
            assert!(r.stdout.contains(cmd), "{shell}: no {cmd}");
        }
    }
    let r = w.cowshed(&["completions", "tcsh"]);
    assert!(!r.ok(), "{r}");
    let r = w.cowshed(&["manpage"]);
    assert!(r.ok(), "{r}");
    assert!(
        r.stdout.starts_with(".ie") || r.stdout.contains(".TH cowshed"),
        "{}",
        &r.stdout[..200]
    );
    assert!(r.stdout.contains(".TH cowshed 1"), "{}", &r.stdout[..300]);
    // man itself reads it.
    w.write_file("cowshed.1", r.stdout.as_bytes());
    let man = std::process::Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(w.path("cowshed.1"))
        .env("MANWIDTH", "100")
        .output();
    if let Ok(out) = man {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("cowshed") && text.contains("convert"),
            "{text}"
        );
    }
}
