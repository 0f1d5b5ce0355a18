//! The one table of keys, in layers: one layer per mode of the UI (the
//! tree, the filter prompt, text input, yes/no confirmations, the backing
//! picker, each dialog that has keys of its own, the jobs pane, help, the
//! log). Dispatch, the footer, every dialog's hints, the `?` help and the
//! shipped `assets/config.toml` all read the same [`Keymap`], and config
//! overrides replace entries in any layer, so what the screen says is what
//! the keys do (yazi's keymap: one section per layer).

use std::collections::BTreeMap;
use std::fmt;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// A set of keys that is active together. The config file names it as
/// `[keys.<name>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layer {
    Tree,
    Filter,
    Input,
    Confirm,
    Pick,
    Rebase,
    Convert,
    Batch,
    Reclaim,
    Delete,
    Doctor,
    Snapshot,
    Jobs,
    Job,
    Log,
    Help,
}

impl Layer {
    pub const ALL: [Layer; 16] = [
        Layer::Tree,
        Layer::Filter,
        Layer::Input,
        Layer::Confirm,
        Layer::Pick,
        Layer::Rebase,
        Layer::Convert,
        Layer::Batch,
        Layer::Reclaim,
        Layer::Delete,
        Layer::Doctor,
        Layer::Snapshot,
        Layer::Jobs,
        Layer::Job,
        Layer::Log,
        Layer::Help,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Layer::Tree => "tree",
            Layer::Filter => "filter",
            Layer::Input => "input",
            Layer::Confirm => "confirm",
            Layer::Pick => "pick",
            Layer::Rebase => "rebase",
            Layer::Convert => "convert",
            Layer::Batch => "batch",
            Layer::Reclaim => "reclaim",
            Layer::Delete => "delete",
            Layer::Doctor => "doctor",
            Layer::Snapshot => "snapshot",
            Layer::Jobs => "jobs",
            Layer::Job => "job",
            Layer::Log => "log",
            Layer::Help => "help",
        }
    }

    /// What the layer is for: the help's section titles and the config
    /// file's comments.
    pub fn title(self) -> &'static str {
        match self {
            Layer::Tree => "the tree",
            Layer::Filter => "typing a filter (/)",
            Layer::Input => "typing a name or a path (C, M, t in the picker)",
            Layer::Confirm => "yes/no questions (commit, flatten, rebase, delete, reset)",
            Layer::Pick => "picking a new backing in the tree (b)",
            Layer::Rebase => "the rebase dialog",
            Layer::Convert => "the convert dialog (v)",
            Layer::Batch => "a batch's confirm list (f, v, m, b with marks)",
            Layer::Reclaim => "the reclaim view (D): what nothing uses",
            Layer::Delete => "the delete dialog (d)",
            Layer::Doctor => "the doctor (!): the image's problems and their fixes",
            Layer::Snapshot => "the internal snapshots of an image (S)",
            Layer::Jobs => "the jobs pane (Tab)",
            Layer::Job => "one job, opened from the jobs pane",
            Layer::Log => "the log of warnings and job results",
            Layer::Help => "this help",
        }
    }

    fn from_name(s: &str) -> Option<Layer> {
        Layer::ALL.into_iter().find(|l| l.name() == s)
    }
}

/// Layers that are read together in one mode: a key may not mean two
/// actions within one of these sets.
pub const MODES: &[&[Layer]] = &[
    &[Layer::Tree],
    &[Layer::Filter],
    &[Layer::Input],
    &[Layer::Confirm],
    &[Layer::Pick],
    &[Layer::Rebase, Layer::Confirm],
    &[Layer::Convert],
    &[Layer::Batch, Layer::Confirm],
    &[Layer::Batch, Layer::Rebase, Layer::Confirm],
    &[Layer::Reclaim],
    &[Layer::Delete, Layer::Confirm],
    &[Layer::Doctor],
    &[Layer::Snapshot],
    &[Layer::Jobs],
    &[Layer::Job],
    &[Layer::Log],
    &[Layer::Help],
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    // Moving (tree, picker, jobs, help, log).
    Up,
    Down,
    Left,
    Right,
    Fold,
    Top,
    Bottom,
    PageUp,
    PageDown,
    // The tree.
    Filter,
    ClearFilter,
    Sort,
    Clone,
    CloneAs,
    Commit,
    Rebase,
    Flatten,
    Convert,
    Mark,
    MarkTree,
    ClearMarks,
    CloneMany,
    Reclaim,
    DeleteImage,
    ResetImage,
    Doctor,
    Protect,
    Snapshots,
    Move,
    CancelJob,
    FocusJobs,
    Log,
    Rescan,
    Help,
    Quit,
    // Prompts and dialogs.
    Keep,
    Clear,
    Delete,
    ClearInput,
    Submit,
    Cancel,
    Yes,
    No,
    Choose,
    TypePath,
    Safe,
    Unsafe,
    SwitchFormat,
    NextField,
    PrevField,
    Change,
    ChangeBack,
    ForGood,
    Stream,
    Open,
    Back,
    Close,
    NewSnapshot,
    ApplySnapshot,
    DeleteSnapshot,
}

impl Action {
    /// Keys that start something that changes files: disabled read-only.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Action::Clone
                | Action::CloneAs
                | Action::CloneMany
                | Action::Commit
                | Action::Rebase
                | Action::Flatten
                | Action::Convert
                | Action::Move
                | Action::DeleteImage
                | Action::ResetImage
                | Action::Protect
                | Action::Snapshots
                | Action::Doctor
        )
    }
}

/// One row of the table.
pub struct ActionInfo {
    pub layer: Layer,
    pub action: Action,
    /// The name used in the config file's `[keys.<layer>]` table.
    pub name: &'static str,
    pub defaults: &'static [&'static str],
    /// Shown in the help popup.
    pub description: &'static str,
    /// Short label for the footer and the dialogs' hint lines; `None`
    /// keeps it out of them (the arrows need no advertising).
    pub hint: Option<&'static str>,
}

const fn row(
    layer: Layer,
    action: Action,
    name: &'static str,
    defaults: &'static [&'static str],
    description: &'static str,
    hint: Option<&'static str>,
) -> ActionInfo {
    ActionInfo {
        layer,
        action,
        name,
        defaults,
        description,
        hint,
    }
}

use Action as A;
use Layer as L;

pub const ACTIONS: &[ActionInfo] = &[
    // The tree.
    row(
        L::Tree,
        A::Up,
        "up",
        &["Up", "k"],
        "select the previous image",
        None,
    ),
    row(
        L::Tree,
        A::Down,
        "down",
        &["Down", "j"],
        "select the next image",
        None,
    ),
    row(
        L::Tree,
        A::Left,
        "left",
        &["Left", "h"],
        "fold the image, or go to its backing image",
        None,
    ),
    row(
        L::Tree,
        A::Right,
        "right",
        &["Right", "l"],
        "unfold the image, or go to its first overlay",
        None,
    ),
    row(
        L::Tree,
        A::Fold,
        "fold",
        &["Enter"],
        "fold or unfold the overlays of the image",
        None,
    ),
    row(
        L::Tree,
        A::Top,
        "top",
        &["Home", "g"],
        "select the first row",
        None,
    ),
    row(
        L::Tree,
        A::Bottom,
        "bottom",
        &["End", "G"],
        "select the last row",
        None,
    ),
    row(
        L::Tree,
        A::PageUp,
        "page_up",
        &["PageUp", "ctrl+b"],
        "one screen up",
        None,
    ),
    row(
        L::Tree,
        A::PageDown,
        "page_down",
        &["PageDown", "ctrl+f"],
        "one screen down",
        None,
    ),
    row(
        L::Tree,
        A::Filter,
        "filter",
        &["/"],
        "filter by name or path",
        Some("filter"),
    ),
    row(
        L::Tree,
        A::ClearFilter,
        "clear_filter",
        &["Esc"],
        "clear the filter",
        None,
    ),
    row(
        L::Tree,
        A::Sort,
        "sort",
        &["s"],
        "sort by name, size or growth",
        Some("sort"),
    ),
    row(
        L::Tree,
        A::Clone,
        "clone",
        &["c"],
        "clone: new overlay <name>-<n>.qcow2 next to the image",
        Some("clone"),
    ),
    row(
        L::Tree,
        A::CloneAs,
        "clone_as",
        &["C"],
        "clone, asking for the new image's name",
        None,
    ),
    row(
        L::Tree,
        A::Commit,
        "commit",
        &["m"],
        "commit the overlay into its backing image (asks first)",
        Some("commit"),
    ),
    row(
        L::Tree,
        A::Rebase,
        "rebase",
        &["b"],
        "rebase onto another backing (pick it in the tree)",
        Some("rebase"),
    ),
    row(
        L::Tree,
        A::Flatten,
        "flatten",
        &["f"],
        "flatten: copy the chain in, drop the backing (asks)",
        Some("flatten"),
    ),
    row(
        L::Tree,
        A::Convert,
        "convert",
        &["v"],
        "convert to a new image (format, compression, -B, …)",
        Some("convert"),
    ),
    row(
        L::Tree,
        A::Mark,
        "mark",
        &["Space"],
        "mark/unmark and go on; f v m b then act on every marked image",
        None,
    ),
    row(
        L::Tree,
        A::MarkTree,
        "mark_tree",
        &["*"],
        "mark the image and everything under it (again: unmark them)",
        None,
    ),
    row(
        L::Tree,
        A::ClearMarks,
        "clear_marks",
        &["u"],
        "unmark every image",
        None,
    ),
    row(
        L::Tree,
        A::CloneMany,
        "clone_many",
        &["N"],
        "N clones at once: type how many (<prefix>01 … <prefix>NN)",
        None,
    ),
    row(
        L::Tree,
        A::Reclaim,
        "reclaim",
        &["D"],
        "reclaim: what nothing uses and nobody holds, by size × age",
        None,
    ),
    row(
        L::Tree,
        A::DeleteImage,
        "delete",
        &["d"],
        "delete: into the trash or for good (asks, says what it frees)",
        None,
    ),
    row(
        L::Tree,
        A::ResetImage,
        "reset",
        &["R"],
        "reset the overlay: throw away its own changes (asks first)",
        None,
    ),
    row(
        L::Tree,
        A::Doctor,
        "doctor",
        &["!"],
        "the doctor: the image's chain problems, Enter applies a fix",
        None,
    ),
    row(
        L::Tree,
        A::Protect,
        "protect",
        &["p"],
        "protect the base (read-only on disk), or unprotect it",
        None,
    ),
    row(
        L::Tree,
        A::Snapshots,
        "snapshots",
        &["S"],
        "the image's internal snapshots: create, apply, delete",
        None,
    ),
    row(
        L::Tree,
        A::Move,
        "move",
        &["M"],
        "move or rename the image, re-pointing what uses it",
        // The footer is full; `?` lists it.
        None,
    ),
    row(
        L::Tree,
        A::CancelJob,
        "cancel_job",
        &["x"],
        "cancel the newest unfinished job",
        Some("cancel"),
    ),
    row(
        L::Tree,
        A::FocusJobs,
        "focus_jobs",
        &["Tab"],
        "go to the jobs pane (select, open, cancel jobs)",
        None,
    ),
    row(
        L::Tree,
        A::Log,
        "log",
        &["e"],
        "the log: every warning and job result since start",
        Some("log"),
    ),
    row(
        L::Tree,
        A::Rescan,
        "rescan",
        &["r"],
        "scan the roots again",
        None,
    ),
    row(
        L::Tree,
        A::Help,
        "help",
        &["?"],
        "show the keys of every mode",
        Some("help"),
    ),
    row(
        L::Tree,
        A::Quit,
        "quit",
        &["q", "ctrl+c"],
        "quit",
        Some("quit"),
    ),
    // Typing a filter.
    row(
        L::Filter,
        A::Keep,
        "keep",
        &["Enter"],
        "keep the filter and go back to the tree",
        Some("keep"),
    ),
    row(
        L::Filter,
        A::Clear,
        "clear",
        &["Esc"],
        "clear the filter",
        Some("clear"),
    ),
    row(
        L::Filter,
        A::Delete,
        "delete",
        &["Backspace"],
        "delete the last character",
        None,
    ),
    row(
        L::Filter,
        A::Up,
        "up",
        &["Up"],
        "select the previous match",
        None,
    ),
    row(
        L::Filter,
        A::Down,
        "down",
        &["Down"],
        "select the next match",
        None,
    ),
    // Typing a name or a path.
    row(
        L::Input,
        A::Submit,
        "submit",
        &["Enter"],
        "use what was typed",
        Some("ok"),
    ),
    row(
        L::Input,
        A::Cancel,
        "cancel",
        &["Esc"],
        "cancel",
        Some("cancel"),
    ),
    row(
        L::Input,
        A::Delete,
        "delete",
        &["Backspace"],
        "delete the last character",
        None,
    ),
    row(
        L::Input,
        A::ClearInput,
        "clear",
        &["ctrl+u"],
        "delete everything typed",
        None,
    ),
    row(
        L::Input,
        A::NextField,
        "next_field",
        &["Tab"],
        "the next field (the clone dialog: name, count)",
        None,
    ),
    // Yes or no.
    row(
        L::Confirm,
        A::Yes,
        "yes",
        &["y", "Enter"],
        "yes: do it",
        Some("yes"),
    ),
    row(
        L::Confirm,
        A::No,
        "no",
        &["n", "Esc"],
        "no: change nothing",
        Some("cancel"),
    ),
    // Picking a backing.
    row(
        L::Pick,
        A::Up,
        "up",
        &["Up", "k"],
        "select the previous image",
        None,
    ),
    row(
        L::Pick,
        A::Down,
        "down",
        &["Down", "j"],
        "select the next image",
        None,
    ),
    row(
        L::Pick,
        A::Left,
        "left",
        &["Left", "h"],
        "fold, or go to the backing image",
        None,
    ),
    row(
        L::Pick,
        A::Right,
        "right",
        &["Right", "l"],
        "unfold, or go to the first overlay",
        None,
    ),
    row(L::Pick, A::Fold, "fold", &["Space"], "fold or unfold", None),
    row(
        L::Pick,
        A::Top,
        "top",
        &["Home", "g"],
        "select the first row",
        None,
    ),
    row(
        L::Pick,
        A::Bottom,
        "bottom",
        &["End", "G"],
        "select the last row",
        None,
    ),
    row(
        L::Pick,
        A::PageUp,
        "page_up",
        &["PageUp", "ctrl+b"],
        "one screen up",
        None,
    ),
    row(
        L::Pick,
        A::PageDown,
        "page_down",
        &["PageDown", "ctrl+f"],
        "one screen down",
        None,
    ),
    row(
        L::Pick,
        A::Choose,
        "choose",
        &["Enter"],
        "choose the selected image as the new backing",
        Some("choose"),
    ),
    row(
        L::Pick,
        A::Filter,
        "filter",
        &["/"],
        "filter the images to pick from (the tree's filter is set aside)",
        Some("filter"),
    ),
    row(
        L::Pick,
        A::TypePath,
        "type_path",
        &["t"],
        "type the new backing's path instead",
        Some("type a path"),
    ),
    row(
        L::Pick,
        A::Cancel,
        "cancel",
        &["Esc"],
        "clear the picker's filter, else cancel the rebase",
        Some("cancel"),
    ),
    // The rebase dialog (with the confirm layer).
    row(
        L::Rebase,
        A::Safe,
        "safe",
        &["s"],
        "safe: copy what differs, the guest sees the same disk",
        Some("safe"),
    ),
    row(
        L::Rebase,
        A::Unsafe,
        "unsafe",
        &["u"],
        "unsafe: change the header only",
        Some("unsafe"),
    ),
    row(
        L::Rebase,
        A::SwitchFormat,
        "format",
        &["F"],
        "switch the new backing's format (qcow2, raw)",
        Some("format"),
    ),
    // The convert dialog.
    row(
        L::Convert,
        A::NextField,
        "next_field",
        &["Down", "Tab"],
        "next field",
        Some("field"),
    ),
    row(
        L::Convert,
        A::PrevField,
        "prev_field",
        &["Up", "BackTab"],
        "previous field",
        None,
    ),
    row(
        L::Convert,
        A::Change,
        "change",
        &["Right", "Space"],
        "next value of the field",
        Some("change"),
    ),
    row(
        L::Convert,
        A::ChangeBack,
        "change_back",
        &["Left"],
        "previous value of the field",
        None,
    ),
    row(
        L::Convert,
        A::Delete,
        "delete",
        &["Backspace"],
        "delete the last character of the name",
        None,
    ),
    row(
        L::Convert,
        A::Submit,
        "submit",
        &["Enter"],
        "start the convert",
        Some("convert"),
    ),
    row(
        L::Convert,
        A::Cancel,
        "cancel",
        &["Esc"],
        "cancel",
        Some("cancel"),
    ),
    // A batch's confirm list.
    row(L::Batch, A::Up, "up", &["Up", "k"], "scroll up", None),
    row(
        L::Batch,
        A::Down,
        "down",
        &["Down", "j"],
        "scroll down",
        None,
    ),
    row(
        L::Batch,
        A::PageUp,
        "page_up",
        &["PageUp", "ctrl+b"],
        "one screen up",
        None,
    ),
    row(
        L::Batch,
        A::PageDown,
        "page_down",
        &["PageDown", "ctrl+f"],
        "one screen down",
        None,
    ),
    row(
        L::Batch,
        A::Top,
        "top",
        &["Home", "g"],
        "the first image",
        None,
    ),
    row(
        L::Batch,
        A::Bottom,
        "bottom",
        &["End", "G"],
        "the last image",
        None,
    ),
    // The reclaim view.
    row(
        L::Reclaim,
        A::Up,
        "up",
        &["Up", "k"],
        "select the previous image",
        None,
    ),
    row(
        L::Reclaim,
        A::Down,
        "down",
        &["Down", "j"],
        "select the next image",
        None,
    ),
    row(
        L::Reclaim,
        A::PageUp,
        "page_up",
        &["PageUp", "ctrl+b"],
        "one screen up",
        None,
    ),
    row(
        L::Reclaim,
        A::PageDown,
        "page_down",
        &["PageDown", "ctrl+f"],
        "one screen down",
        None,
    ),
    row(
        L::Reclaim,
        A::Top,
        "top",
        &["Home", "g"],
        "the first image",
        None,
    ),
    row(
        L::Reclaim,
        A::Bottom,
        "bottom",
        &["End", "G"],
        "the last image",
        None,
    ),
    row(
        L::Reclaim,
        A::Mark,
        "mark",
        &["Space"],
        "mark or unmark the image and go to the next",
        Some("mark"),
    ),
    row(
        L::Reclaim,
        A::MarkTree,
        "mark_all",
        &["*"],
        "mark every image of the list (again: unmark them)",
        Some("mark all"),
    ),
    row(
        L::Reclaim,
        A::ClearMarks,
        "clear_marks",
        &["u"],
        "unmark every image",
        None,
    ),
    row(
        L::Reclaim,
        A::DeleteImage,
        "delete",
        &["d"],
        "delete the marked images (or the selected one): asks first, trash by default",
        Some("delete"),
    ),
    row(
        L::Reclaim,
        A::Rescan,
        "rescan",
        &["r"],
        "scan the roots again (the list follows)",
        None,
    ),
    row(
        L::Reclaim,
        A::Close,
        "close",
        &["Esc", "q", "D"],
        "back to the tree (the marks stay)",
        Some("close"),
    ),
    // The delete dialog (with the confirm layer).
    row(
        L::Delete,
        A::ForGood,
        "for_good",
        &["f"],
        "switch between the trash (restorable) and deleting for good",
        Some("trash/for good"),
    ),
    row(
        L::Delete,
        A::Stream,
        "stream",
        &["s"],
        "stream it out: rebase its dependents onto its backing, then delete it",
        Some("stream"),
    ),
    // The doctor.
    row(
        L::Doctor,
        A::Up,
        "up",
        &["Up", "k"],
        "select the previous problem",
        Some("select"),
    ),
    row(
        L::Doctor,
        A::Down,
        "down",
        &["Down", "j"],
        "select the next problem",
        None,
    ),
    row(
        L::Doctor,
        A::Submit,
        "apply",
        &["Enter"],
        "apply the selected fix (flatten and commit open their dialogs)",
        Some("apply"),
    ),
    row(
        L::Doctor,
        A::Close,
        "close",
        &["Esc", "q", "!"],
        "close the doctor",
        Some("close"),
    ),
    // The snapshots dialog.
    row(
        L::Snapshot,
        A::Up,
        "up",
        &["Up", "k"],
        "select the previous snapshot",
        Some("select"),
    ),
    row(
        L::Snapshot,
        A::Down,
        "down",
        &["Down", "j"],
        "select the next snapshot",
        None,
    ),
    row(
        L::Snapshot,
        A::NewSnapshot,
        "create",
        &["c"],
        "create a snapshot of the image as it is now (asks for a name)",
        Some("create"),
    ),
    row(
        L::Snapshot,
        A::ApplySnapshot,
        "apply",
        &["a"],
        "apply the selected snapshot: the image reads as it did then (asks)",
        Some("apply"),
    ),
    row(
        L::Snapshot,
        A::DeleteSnapshot,
        "delete",
        &["d"],
        "delete the selected snapshot (asks)",
        Some("delete"),
    ),
    row(
        L::Snapshot,
        A::Close,
        "close",
        &["Esc", "q", "S"],
        "close the snapshots dialog",
        Some("close"),
    ),
    // The jobs pane.
    row(
        L::Jobs,
        A::Up,
        "up",
        &["Up", "k"],
        "select the newer job",
        Some("select"),
    ),
    row(
        L::Jobs,
        A::Down,
        "down",
        &["Down", "j"],
        "select the older job",
        None,
    ),
    row(
        L::Jobs,
        A::Open,
        "open",
        &["Enter"],
        "open the job: its whole label, progress and error",
        Some("open"),
    ),
    row(
        L::Jobs,
        A::CancelJob,
        "cancel_job",
        &["x"],
        "cancel the selected job",
        Some("cancel"),
    ),
    row(
        L::Jobs,
        A::Back,
        "back",
        &["Tab", "Esc"],
        "back to the tree",
        Some("tree"),
    ),
    // One job.
    row(
        L::Job,
        A::CancelJob,
        "cancel_job",
        &["x"],
        "cancel this job",
        Some("cancel"),
    ),
    row(
        L::Job,
        A::Close,
        "close",
        &["Esc", "Enter", "q"],
        "close",
        Some("close"),
    ),
    // The log.
    row(L::Log, A::Up, "up", &["Up", "k"], "scroll up", None),
    row(L::Log, A::Down, "down", &["Down", "j"], "scroll down", None),
    row(
        L::Log,
        A::PageUp,
        "page_up",
        &["PageUp", "ctrl+b"],
        "one screen up",
        None,
    ),
    row(
        L::Log,
        A::PageDown,
        "page_down",
        &["PageDown", "ctrl+f"],
        "one screen down",
        None,
    ),
    row(
        L::Log,
        A::Top,
        "top",
        &["Home", "g"],
        "the oldest entry",
        None,
    ),
    row(
        L::Log,
        A::Bottom,
        "bottom",
        &["End", "G"],
        "the newest entry",
        None,
    ),
    row(
        L::Log,
        A::Close,
        "close",
        &["Esc", "q", "e"],
        "close the log",
        Some("close"),
    ),
    // Help.
    row(
        L::Help,
        A::Up,
        "up",
        &["Up", "k"],
        "scroll up",
        Some("scroll"),
    ),
    row(
        L::Help,
        A::Down,
        "down",
        &["Down", "j"],
        "scroll down",
        None,
    ),
    row(
        L::Help,
        A::PageUp,
        "page_up",
        &["PageUp", "ctrl+b"],
        "one screen up",
        None,
    ),
    row(
        L::Help,
        A::PageDown,
        "page_down",
        &["PageDown", "ctrl+f", "Space"],
        "one screen down",
        None,
    ),
    row(L::Help, A::Top, "top", &["Home", "g"], "the top", None),
    row(L::Help, A::Bottom, "bottom", &["End", "G"], "the end", None),
    row(
        L::Help,
        A::Close,
        "close",
        &["Esc", "q", "?"],
        "close the help",
        Some("close"),
    ),
];

/// A key as the table knows it. Shift is part of a character (`C`), not a
/// modifier, because terminals disagree on reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub code: KeyCode,
    pub ctrl: bool,
    pub alt: bool,
}

impl Key {
    pub fn from_event(ev: &KeyEvent) -> Key {
        Key {
            code: ev.code,
            ctrl: ev.modifiers.contains(KeyModifiers::CONTROL),
            alt: ev.modifiers.contains(KeyModifiers::ALT),
        }
    }

    /// The character typed, for text fields: a plain character key.
    pub fn typed(&self) -> Option<char> {
        match self.code {
            KeyCode::Char(c) if !self.ctrl && !self.alt => Some(c),
            _ => None,
        }
    }

    /// Parse `c`, `C`, `?`, `Enter`, `Space`, `Up`, `F5`, `ctrl+x`,
    /// `alt+Enter`, ... (names are case-insensitive, single characters are
    /// not).
    pub fn parse(s: &str) -> Result<Key, String> {
        let mut ctrl = false;
        let mut alt = false;
        let mut rest = s;
        loop {
            let lower = rest.to_ascii_lowercase();
            if rest.chars().count() > 1
                && (lower.starts_with("ctrl+") || lower.starts_with("ctrl-"))
            {
                ctrl = true;
                rest = &rest[5..];
            } else if rest.chars().count() > 1
                && (lower.starts_with("alt+") || lower.starts_with("alt-"))
            {
                alt = true;
                rest = &rest[4..];
            } else {
                break;
            }
        }
        let mut chars = rest.chars();
        let code = match (chars.next(), chars.next()) {
            (Some(c), None) => KeyCode::Char(c),
            (None, _) => return Err(format!("empty key name in '{s}'")),
            _ => match rest.to_ascii_lowercase().as_str() {
                "enter" | "return" => KeyCode::Enter,
                "space" => KeyCode::Char(' '),
                "esc" | "escape" => KeyCode::Esc,
                "tab" => KeyCode::Tab,
                "backtab" | "shift+tab" => KeyCode::BackTab,
                "backspace" => KeyCode::Backspace,
                "delete" | "del" => KeyCode::Delete,
                "up" => KeyCode::Up,
                "down" => KeyCode::Down,
                "left" => KeyCode::Left,
                "right" => KeyCode::Right,
                "home" => KeyCode::Home,
                "end" => KeyCode::End,
                "pageup" => KeyCode::PageUp,
                "pagedown" => KeyCode::PageDown,
                f if f.starts_with('f') => match f[1..].parse::<u8>() {
                    Ok(n @ 1..=12) => KeyCode::F(n),
                    _ => return Err(format!("unknown key '{s}'")),
                },
                _ => return Err(format!("unknown key '{s}'")),
            },
        };
        if ctrl || alt {
            if let KeyCode::Char(c) = code {
                // Ctrl+C arrives as 'c' with CONTROL whatever the case.
                return Ok(Key {
                    code: KeyCode::Char(c.to_ascii_lowercase()),
                    ctrl,
                    alt,
                });
            }
        }
        Ok(Key { code, ctrl, alt })
    }

    /// The name [`Key::parse`] reads back (the config file's spelling).
    pub fn config_name(&self) -> String {
        let mut s = String::new();
        if self.ctrl {
            s.push_str("ctrl+");
        }
        if self.alt {
            s.push_str("alt+");
        }
        match self.code {
            KeyCode::Char(' ') => s.push_str("Space"),
            KeyCode::Char(c) => s.push(c),
            KeyCode::Up => s.push_str("Up"),
            KeyCode::Down => s.push_str("Down"),
            KeyCode::Left => s.push_str("Left"),
            KeyCode::Right => s.push_str("Right"),
            _ => s.push_str(&self.to_string()),
        }
        s
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ctrl {
            f.write_str("ctrl+")?;
        }
        if self.alt {
            f.write_str("alt+")?;
        }
        match self.code {
            KeyCode::Char(' ') => f.write_str("Space"),
            KeyCode::Char(c) => write!(f, "{c}"),
            KeyCode::Enter => f.write_str("Enter"),
            KeyCode::Esc => f.write_str("Esc"),
            KeyCode::Tab => f.write_str("Tab"),
            KeyCode::BackTab => f.write_str("BackTab"),
            KeyCode::Backspace => f.write_str("Backspace"),
            KeyCode::Delete => f.write_str("Delete"),
            KeyCode::Up => f.write_str("↑"),
            KeyCode::Down => f.write_str("↓"),
            KeyCode::Left => f.write_str("←"),
            KeyCode::Right => f.write_str("→"),
            KeyCode::Home => f.write_str("Home"),
            KeyCode::End => f.write_str("End"),
            KeyCode::PageUp => f.write_str("PageUp"),
            KeyCode::PageDown => f.write_str("PageDown"),
            KeyCode::F(n) => write!(f, "F{n}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// One entry of a hint line or the footer: the keys as shown, and what
/// they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub layer: Layer,
    pub action: Action,
    /// The bound keys as the screen shows them, `/`-separated (`y/Enter`).
    pub keys: String,
    pub label: String,
}

/// The table in effect: defaults with the config's overrides applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keymap {
    bindings: Vec<(Layer, Action, Vec<Key>)>,
}

impl Default for Keymap {
    fn default() -> Self {
        Keymap {
            bindings: ACTIONS
                .iter()
                .map(|a| {
                    let keys = a
                        .defaults
                        .iter()
                        .filter_map(|k| Key::parse(k).ok())
                        .collect();
                    (a.layer, a.action, keys)
                })
                .collect(),
        }
    }
}

/// Overrides from the config: layer name → action name → keys.
pub type Overrides = BTreeMap<String, BTreeMap<String, Vec<String>>>;

impl Keymap {
    /// Apply overrides, each replacing one action's keys in one layer.
    /// Unknown layers, actions and key names, and a key that would mean two
    /// things in one mode, are errors.
    pub fn with_overrides(overrides: &Overrides) -> Result<Keymap, String> {
        let mut map = Keymap::default();
        for (layer_name, actions) in overrides {
            let Some(layer) = Layer::from_name(layer_name) else {
                let known: Vec<&str> = Layer::ALL.iter().map(|l| l.name()).collect();
                return Err(format!(
                    "[keys.{layer_name}]: unknown layer (known: {})",
                    known.join(", ")
                ));
            };
            for (name, keys) in actions {
                let Some(info) = ACTIONS.iter().find(|a| a.layer == layer && a.name == name) else {
                    let known: Vec<&str> = ACTIONS
                        .iter()
                        .filter(|a| a.layer == layer)
                        .map(|a| a.name)
                        .collect();
                    return Err(format!(
                        "[keys.{layer_name}]: unknown action '{name}' (known: {})",
                        known.join(", ")
                    ));
                };
                if keys.is_empty() {
                    return Err(format!("[keys.{layer_name}]: '{name}' has no key"));
                }
                let parsed = keys
                    .iter()
                    .map(|k| Key::parse(k).map_err(|e| format!("[keys.{layer_name}] {name}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                if let Some(slot) = map
                    .bindings
                    .iter_mut()
                    .find(|(l, a, _)| *l == layer && *a == info.action)
                {
                    slot.2 = parsed;
                }
            }
        }
        map.check_conflicts()?;
        Ok(map)
    }

    fn check_conflicts(&self) -> Result<(), String> {
        for layers in MODES {
            let in_mode: Vec<&(Layer, Action, Vec<Key>)> = self
                .bindings
                .iter()
                .filter(|(l, _, _)| layers.contains(l))
                .collect();
            for (i, (la, a, keys)) in in_mode.iter().enumerate() {
                for k in keys {
                    if let Some((lb, b, _)) = in_mode[i + 1..]
                        .iter()
                        .find(|(_, _, other)| other.contains(k))
                    {
                        return Err(format!(
                            "[keys]: '{}' is bound to both '{}' and '{}' ({})",
                            k.config_name(),
                            qualified(*la, *a),
                            qualified(*lb, *b),
                            if la == lb {
                                format!("in [keys.{}]", la.name())
                            } else {
                                "read together".to_string()
                            }
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The action `key` means in the first of `layers` that binds it.
    pub fn action_for(&self, layers: &[Layer], key: Key) -> Option<Action> {
        layers.iter().find_map(|l| {
            self.bindings
                .iter()
                .find(|(bl, _, keys)| bl == l && keys.contains(&key))
                .map(|(_, a, _)| *a)
        })
    }

    pub fn keys(&self, layer: Layer, action: Action) -> &[Key] {
        self.bindings
            .iter()
            .find(|(l, a, _)| *l == layer && *a == action)
            .map_or(&[], |(_, _, k)| k.as_slice())
    }

    /// The keys of an action as a hint shows them: `y/Enter`.
    pub fn keys_text(&self, layer: Layer, action: Action) -> String {
        let keys: Vec<String> = self
            .keys(layer, action)
            .iter()
            .map(Key::to_string)
            .collect();
        keys.join("/")
    }

    /// A hint for one action with its table label, or `label` instead
    /// (a dialog says what "yes" does: "commit", "flatten").
    pub fn hint(&self, layer: Layer, action: Action, label: Option<&str>) -> Hint {
        let label = label
            .map(str::to_string)
            .or_else(|| info(layer, action).and_then(|i| i.hint.map(str::to_string)))
            .unwrap_or_default();
        Hint {
            layer,
            action,
            keys: self.keys_text(layer, action),
            label,
        }
    }

    /// The footer of a layer: its hinted actions, in table order, with the
    /// first key of each (the footer is one line).
    pub fn footer(&self, layer: Layer) -> Vec<Hint> {
        ACTIONS
            .iter()
            .filter(|a| a.layer == layer)
            .filter_map(|a| {
                let label = a.hint?;
                let key = self.keys(layer, a.action).first()?;
                Some(Hint {
                    layer,
                    action: a.action,
                    keys: key.to_string(),
                    label: label.to_string(),
                })
            })
            .collect()
    }

    /// The help: per layer, `(keys, description)` for every action.
    pub fn help(&self) -> Vec<(Layer, Vec<Hint>)> {
        Layer::ALL
            .iter()
            .map(|&layer| {
                let rows = ACTIONS
                    .iter()
                    .filter(|a| a.layer == layer)
                    .map(|a| {
                        let keys: Vec<String> = self
                            .keys(layer, a.action)
                            .iter()
                            .map(Key::to_string)
                            .collect();
                        Hint {
                            layer,
                            action: a.action,
                            keys: keys.join(" "),
                            label: a.description.to_string(),
                        }
                    })
                    .collect();
                (layer, rows)
            })
            .collect()
    }
}

pub fn info(layer: Layer, action: Action) -> Option<&'static ActionInfo> {
    ACTIONS
        .iter()
        .find(|a| a.layer == layer && a.action == action)
}

fn qualified(layer: Layer, action: Action) -> String {
    info(layer, action).map_or_else(
        || format!("{action:?}"),
        |i| format!("{}.{}", layer.name(), i.name),
    )
}

/// The `[keys.*]` part of the default config file, generated from the
/// table: every layer, every action with its default keys, commented out.
pub fn default_config_keys() -> String {
    let mut out = String::new();
    for layer in Layer::ALL {
        out.push_str(&format!("\n[keys.{}]\n# {}\n", layer.name(), layer.title()));
        for a in ACTIONS.iter().filter(|a| a.layer == layer) {
            let keys: Vec<String> = a
                .defaults
                .iter()
                .map(|k| format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            let value = if keys.len() == 1 {
                keys[0].clone()
            } else {
                format!("[{}]", keys.join(", "))
            };
            out.push_str(&format!("# {} = {value}\n", a.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(layer: &str, action: &str, keys: &[&str]) -> Overrides {
        let mut o = Overrides::new();
        o.entry(layer.to_string()).or_default().insert(
            action.to_string(),
            keys.iter().map(|k| k.to_string()).collect(),
        );
        o
    }

    #[test]
    fn every_default_key_parses_and_no_mode_has_a_conflict() {
        let map = Keymap::with_overrides(&Overrides::new()).expect("defaults are consistent");
        for a in ACTIONS {
            assert_eq!(
                map.keys(a.layer, a.action).len(),
                a.defaults.len(),
                "{}.{}",
                a.layer.name(),
                a.name
            );
        }
        // Names are unique within a layer (the config addresses them so).
        for (i, a) in ACTIONS.iter().enumerate() {
            assert!(
                !ACTIONS[i + 1..]
                    .iter()
                    .any(|b| b.layer == a.layer && (b.name == a.name || b.action == a.action)),
                "{}.{} twice",
                a.layer.name(),
                a.name
            );
        }
        // Every layer is read in some mode, and has rows.
        for l in Layer::ALL {
            assert!(MODES.iter().any(|m| m.contains(&l)), "{l:?}");
            assert!(ACTIONS.iter().any(|a| a.layer == l), "{l:?}");
        }
    }

    #[test]
    fn overrides_replace_defaults_in_their_layer_and_conflicts_are_errors() {
        let map = Keymap::with_overrides(&overrides("tree", "clone", &["n"])).expect("valid");
        let n = Key::parse("n").expect("key");
        let c = Key::parse("c").expect("key");
        assert_eq!(map.action_for(&[Layer::Tree], n), Some(Action::Clone));
        assert_eq!(map.action_for(&[Layer::Tree], c), None);
        assert!(map
            .footer(Layer::Tree)
            .iter()
            .any(|h| h.keys == "n" && h.label == "clone"));
        // Another layer is untouched.
        assert_eq!(map.action_for(&[Layer::Confirm], n), Some(Action::No));

        let map = Keymap::with_overrides(&overrides("confirm", "yes", &["o"])).expect("valid");
        assert_eq!(map.hint(Layer::Confirm, Action::Yes, None).keys, "o");

        let mut o = overrides("tree", "clone", &["n"]);
        o.get_mut("tree")
            .expect("tree")
            .insert("quit".into(), vec!["n".into()]);
        let err = Keymap::with_overrides(&o).expect_err("conflict");
        assert!(err.contains("bound to both"), "{err}");
        // Layers read together conflict too: rebase's keys and confirm's.
        let err =
            Keymap::with_overrides(&overrides("rebase", "safe", &["y"])).expect_err("conflict");
        assert!(err.contains("read together"), "{err}");

        let err = Keymap::with_overrides(&overrides("tree", "explode", &["x"]))
            .expect_err("unknown action");
        assert!(err.contains("unknown action 'explode'"), "{err}");
        let err = Keymap::with_overrides(&overrides("dialogs", "yes", &["x"]))
            .expect_err("unknown layer");
        assert!(err.contains("unknown layer"), "{err}");
    }

    #[test]
    fn key_names() {
        let k = Key::parse("ctrl+C").expect("key");
        assert_eq!(
            k,
            Key {
                code: KeyCode::Char('c'),
                ctrl: true,
                alt: false
            }
        );
        assert_eq!(Key::parse("Space").expect("key").code, KeyCode::Char(' '));
        assert_eq!(Key::parse("F5").expect("key").code, KeyCode::F(5));
        assert_eq!(Key::parse("BackTab").expect("key").code, KeyCode::BackTab);
        assert!(Key::parse("Hyper").is_err());
        assert!(Key::parse("").is_err());
        // Every default key's config name reads back as the same key.
        for a in ACTIONS {
            for d in a.defaults {
                let k = Key::parse(d).expect("default");
                assert_eq!(Key::parse(&k.config_name()), Ok(k), "{d}");
            }
        }
    }
}
