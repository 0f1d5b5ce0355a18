//! The scriptable face: one file per subcommand, flags and JSON mirroring
//! qemu-img. Commands return the process exit code; errors that end a
//! command go up to `main`, where color-eyre prints them.

mod agent;
mod amend;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod demo;
mod doctor;
mod info;
mod map;
mod measure;
mod mv;
mod progress;
mod protect;
mod rebase;
mod reset;
mod resize;
mod rm;
mod session;
mod shell;
mod snapshot;
mod trash;
mod tree;

pub use demo::build_fleet_in as build_demo_fleet;

use clap::{Parser, Subcommand, ValueEnum};

use crate::engine::Format;

#[derive(Debug, Parser)]
#[command(
    name = "cowshed",
    version,
    about = "QEMU disk images and their copy-on-write backing chains",
    long_about = "cowshed reads qcow2 and raw images and their backing chains natively, \
                  with flags and JSON output that mirror qemu-img. Without a \
                  subcommand it opens the terminal UI on the given directories.",
    subcommand_precedence_over_arg = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Directories to open the terminal UI on (default: the config file's
    /// roots, else the current directory).
    pub roots: Vec<std::path::PathBuf>,
    /// Config file (default: $XDG_CONFIG_HOME/cowshed/config.toml).
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// Change nothing: every command that would write is refused, and in
    /// the terminal UI every action key is disabled (the config's
    /// `readonly = true` does the same).
    #[arg(long, global = true)]
    pub readonly: bool,
    /// Read the domains defined on this libvirt connection (several may be
    /// given; default: the config's `libvirt`, else qemu:///system and
    /// qemu:///session where their daemons run). An image a defined domain
    /// uses, even shut off, is not removed, reset, moved, committed,
    /// rebased or resized.
    #[arg(long = "connect", value_name = "URI", global = true)]
    pub connect: Vec<String>,
    /// Go ahead although a libvirt domain uses the image, or although a
    /// connection named with --connect could not be read.
    #[arg(long = "force-vms", global = true)]
    pub force_vms: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show an image's format, sizes, backing file, features and snapshots
    /// (like `qemu-img info`). Several files may be given.
    Info(info::InfoArgs),
    /// Show which layer of the chain serves each range of the disk and how
    /// (like `qemu-img map`).
    Map(map::MapArgs),
    /// Scan directories and print the forest of backing chains: every base
    /// with the overlays that grow on it, broken and cyclic chains flagged.
    Tree(tree::TreeArgs),
    /// List the problems of the backing chains under some directories,
    /// each with its fix: backing format not recorded, absolute backing
    /// names, chains deeper than --max-depth, backings outside the
    /// directories, missing backings and cycles. --fix applies the fixes
    /// that change only a header.
    Doctor(doctor::DoctorArgs),
    /// Make the bases under some directories (images that others use as
    /// backing file) read-only on disk, so that nothing opens them for
    /// writing by mistake; --off gives the write permission back.
    Protect(protect::ProtectArgs),
    /// Check an image's metadata the way `qemu-img check` does: leaks and
    /// corruptions, same JSON and exit codes (0, 1, 2, 3, 63); `-r leaks`
    /// and `-r all` repair as qemu-img does.
    Check(check::CheckArgs),
    /// Copy an overlay's data into its backing file (like `qemu-img
    /// commit`), then empty the overlay unless -d or -b.
    Commit(commit::CommitArgs),
    /// Change options of an existing qcow2 image (like `qemu-img amend
    /// -o`): lazy_refcounts, compat=1.1, size.
    Amend(amend::AmendArgs),
    /// Compare the guest data of two images (like `qemu-img compare`):
    /// exit 0 when they read the same, 1 when they differ (naming the first
    /// differing offset), 2-4 on errors.
    Compare(compare::CompareArgs),
    /// Change an image's backing file (like `qemu-img rebase`): safe mode
    /// copies what differs so the guest view is kept; -u changes the header
    /// only; -b "" flattens.
    ///
    /// Safe mode (the default) keeps what the guest sees: wherever FILE does
    /// not hold a cluster itself and the old and the new backing chains read
    /// differently, the old content is first copied into FILE; then the
    /// header is switched to the new backing in a single write. Both chains
    /// must be readable. Interrupted (Ctrl-C, a crash), FILE keeps its old
    /// backing and reads as before.
    ///
    /// Unsafe mode (-u) only rewrites the backing file name and format in
    /// the header; the old backing need not exist. Use it when the backing
    /// was moved or renamed, or for a copy with the same content: if the new
    /// backing reads differently, the guest sees different data.
    ///
    /// -b "" removes the backing file: in safe mode FILE is flattened
    /// (everything the old chain provides is copied in and FILE becomes
    /// standalone); with -u the reference is just dropped and the guest
    /// sees zeros where the backing used to answer.
    ///
    /// The new name is stored as typed; a relative name is resolved against
    /// FILE's directory. -F is required with a non-empty -b, as in QEMU 10.
    /// FILE is refused while a running QEMU holds it.
    Rebase(rebase::RebaseArgs),
    /// Delete images that no other image uses as its backing file. Deletes
    /// for good by default; --trash moves them into `.cowshed-trash/` in
    /// their directory instead (the TUI's default), where `cowshed trash`
    /// lists, restores and empties them.
    ///
    /// Before anything is deleted, every FILE is checked: it is an image,
    /// no QEMU holds it (its writer locks are taken and held until it is
    /// gone), and no image in its directory or under the --roots uses it as
    /// backing file (images named in the same command do not count: they
    /// go too, leaves first). One refusal, naming the dependents or the
    /// holder, and nothing is deleted (exit 1).
    Rm(rm::RmArgs),
    /// Throw away an overlay's own changes: a fresh empty overlay with the
    /// same backing name and format, size and options replaces it
    /// atomically. Refused while a QEMU holds it, and for an image without
    /// backing, with dependents, internal snapshots, bitmaps or an external
    /// data file.
    Reset(reset::ResetArgs),
    /// The trash of `rm --trash` and the TUI's delete: list, restore, empty.
    Trash(trash::TrashArgs),
    /// Change an image's virtual size (like `qemu-img resize`): +SIZE,
    /// -SIZE or SIZE; shrinking needs --shrink.
    Resize(resize::ResizeArgs),
    /// List, create, apply or delete a qcow2 image's internal snapshots
    /// (like `qemu-img snapshot -l | -c | -a | -d`).
    Snapshot(snapshot::SnapshotArgs),
    /// Add, remove, clear, enable or disable a qcow2 image's persistent
    /// dirty bitmap (like `qemu-img bitmap`).
    Bitmap(bitmap::BitmapArgs),
    /// Create a new image (like `qemu-img create`); never overwrites a file.
    Create(create::CreateArgs),
    /// Flatten an image and its whole backing chain into a new image
    /// (like `qemu-img convert`): raw or qcow2, optionally compressed or
    /// over a new backing file.
    Convert(convert::ConvertArgs),
    /// Rename or move an image, or a directory of images, and re-point
    /// every image that uses it as backing file.
    ///
    /// DST may be a new name or an existing directory (SRC goes into it);
    /// an existing file is never replaced. Every image in SRC's directory
    /// and under the --root directories whose backing file is SRC gets its
    /// backing name rewritten (header only, format kept): a relative name
    /// stays relative, an absolute one becomes DST's absolute path. The
    /// moved image's own relative backing name is rewritten too so that it
    /// still leads to its backing file from the new place. Moving a
    /// directory moves everything in it and re-points the images outside
    /// that use images inside (and images inside whose relative names lead
    /// outside); names inside that lead inside stay as they are.
    ///
    /// On one file system the files are hard-linked to DST, the dependents
    /// re-pointed, then SRC unlinked: every name is valid at every moment.
    /// Across file systems SRC is copied beside DST, made durable, read
    /// back and compared, and renamed to DST before anything is re-pointed;
    /// SRC is removed last.
    ///
    /// Refused, with every file left byte-identical, while a QEMU holds SRC
    /// or a dependent, when DST exists, when a dependent cannot take its
    /// new name, or when a copy would not fit.
    ///
    /// Interrupted: the move keeps a journal (.SRCNAME.cowshed-mv.json
    /// beside SRC). Ctrl-C before any dependent was re-pointed undoes it
    /// (the old layout, exit 130); after that the move finishes. Killed
    /// (a crash, a power cut), every image still opens and reads the same,
    /// and running the same command again completes the move, even when
    /// SRC is already gone.
    Mv(mv::MvArgs),
    /// Compute the size a new image would take, empty (--size) or holding
    /// a copy of a source chain (like `qemu-img measure`).
    Measure(measure::MeasureArgs),
    /// Build a demo fleet (a base with overlays, a chain of depth 3, a raw
    /// disk, a broken overlay), start a simulated guest writing into one
    /// overlay, and open the TUI on it.
    Demo(demo::DemoArgs),
    /// Print shell completions on stdout (see the README: Installing).
    Completions(shell::CompletionsArgs),
    /// Print the man page (roff) on stdout (see the README: Installing).
    Manpage,
    /// Print the default config file: every setting, commented out with
    /// its default (what assets/config.toml holds).
    DefaultConfig,
    /// Serve this host's images to a cowshed elsewhere, which starts it
    /// over ssh for a root named HOST:/PATH (see the README: Remote
    /// roots). Speaks a JSON-lines protocol on stdin and stdout.
    #[command(hide = true)]
    Agent(agent::AgentArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Human,
    Json,
}

pub fn run(cli: Cli) -> color_eyre::Result<i32> {
    let session = session::Session {
        config: cli.config.clone(),
        readonly: cli.readonly,
        connect: cli.connect.clone(),
        force_vms: cli.force_vms,
    };
    let Some(command) = cli.command else {
        if let Some(word) = mistyped_command(&cli.roots) {
            eprintln!(
                "cowshed: unknown command '{word}' (commands: {}); to open the terminal UI \
                 on a directory of that name, write ./{word}",
                shell::command_names().join(", ")
            );
            return Ok(2);
        }
        return crate::tui::run(
            cli.roots,
            cli.config,
            crate::tui::Flags {
                readonly: cli.readonly,
                connect: cli.connect,
            },
        );
    };
    if let Some(what) = command.writes() {
        session.ensure_writable(what)?;
    }
    if let Some(file) = command.rewrites_in_place() {
        let vms = session.vm_users()?;
        crate::engine::preflight::ensure_no_vm_users(file, &vms)?;
    }
    match command {
        Command::Info(a) => info::run(a),
        Command::Map(a) => map::run(a),
        Command::Convert(a) => convert::run(a, &session),
        Command::Check(a) => check::run(a),
        Command::Commit(a) => commit::run(a, &session),
        Command::Amend(a) => amend::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Rebase(a) => rebase::run(a, &session),
        Command::Resize(a) => resize::run(a, &session),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Bitmap(a) => bitmap::run(a),
        Command::Create(a) => create::run(a),
        Command::Rm(a) => rm::run(a, &session),
        Command::Reset(a) => reset::run(a, &session),
        Command::Trash(a) => trash::run(a),
        Command::Tree(a) => tree::run(a, &session),
        Command::Doctor(a) => doctor::run(a),
        Command::Protect(a) => protect::run(a),
        Command::Measure(a) => measure::run(a),
        Command::Mv(a) => mv::run(a, &session),
        Command::Demo(a) => demo::run(a),
        Command::Completions(a) => shell::completions(a),
        Command::Manpage => shell::manpage(),
        Command::DefaultConfig => shell::default_config(),
        Command::Agent(a) => agent::run(a, &session),
    }
}

impl Command {
    /// What the command is called in a refusal, when it would change files.
    fn writes(&self) -> Option<&'static str> {
        let name = match self {
            Command::Commit(_) => "commit",
            Command::Amend(_) => "amend",
            Command::Rebase(_) => "rebase",
            Command::Rm(_) => "rm",
            Command::Reset(_) => "reset",
            Command::Resize(_) => "resize",
            Command::Bitmap(_) => "bitmap",
            Command::Create(_) => "create",
            Command::Convert(_) => "convert",
            Command::Mv(_) => "mv",
            Command::Protect(_) => "protect",
            Command::Demo(_) => "demo",
            Command::Check(a) if a.repairs() => "check -r",
            Command::Snapshot(a) if a.writes() => "snapshot",
            Command::Trash(a) if a.writes() => "trash",
            Command::Doctor(a) if a.fixes() => "doctor --fix",
            _ => return None,
        };
        Some(name)
    }

    /// The image a command changes in place without an engine step that
    /// checks libvirt's domains itself (commit, rebase, resize, rm, reset
    /// and mv take the domains with their options): checked here, once,
    /// before anything is opened for writing.
    fn rewrites_in_place(&self) -> Option<&std::path::Path> {
        match self {
            Command::Amend(a) => Some(a.file()),
            Command::Snapshot(a) if a.writes() => Some(a.file()),
            Command::Bitmap(a) => a.file(),
            Command::Check(a) if a.repairs() => Some(a.file()),
            _ => None,
        }
    }
}

/// The first root, when it is no directory but a word that looks like a
/// command (`cowshed grow x.qcow2 +1G`): the user meant a subcommand,
/// and "grow: no such file or directory" would not say so.
fn mistyped_command(roots: &[std::path::PathBuf]) -> Option<String> {
    let first = roots.first()?.to_str()?;
    let looks_like_a_command = first.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && first
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    (looks_like_a_command && std::fs::symlink_metadata(first).is_err()).then(|| first.to_string())
}

/// Parse a `-f`/`-O` format name.
pub(crate) fn parse_format(s: &str) -> Result<Format, String> {
    match Format::from_name(s) {
        Some(f @ (Format::Qcow2 | Format::Raw)) => Ok(f),
        Some(f) => Err(format!(
            "format '{}' is recognised but not supported",
            f.name()
        )),
        None => Err(format!("unknown format '{s}' (expected qcow2 or raw)")),
    }
}

/// Sizes in binary units, as qemu-img prints them.
pub(crate) fn human_size(bytes: u64) -> String {
    humansize::format_size(bytes, humansize::BINARY)
}

pub(crate) fn display(p: &std::path::Path) -> String {
    p.display().to_string()
}
