//! libvirt awareness against a real libvirtd: throw-away domains (unique
//! names, undefined at the end even when a check fails) whose disks live in
//! the test's temporary directory. Where the daemon cannot be reached or
//! started, a case says why and skips; the cases that need none (a named
//! connection that cannot be read, --readonly) always run.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use common::{Work, MIB};
use serde_json::Value;

const SYSTEM: &str = "qemu:///system";

fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-c", SYSTEM])
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("cannot run virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// libvirtd on qemu:///system, started here when it is installed but not
/// running (as .ci/run does); Err says why the cases that need it skip.
fn daemon() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            if virsh(&["version"]).is_ok() {
                return Ok(());
            }
            let installed = |p: &str| Path::new(p).exists();
            if !installed("/usr/sbin/libvirtd") {
                return Err("libvirtd is not installed (.ci/run installs it)".into());
            }
            // SAFETY: geteuid cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return Err("libvirtd is not running and only root may start it".into());
            }
            // Both daemonize themselves; virtlogd keeps a running QEMU's log.
            let _ = Command::new("virtlogd").arg("-d").status();
            let _ = Command::new("libvirtd").arg("-d").status();
            // Waits on the daemon's answer, not on a guess at its speed.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            loop {
                match virsh(&["version"]) {
                    Ok(_) => return Ok(()),
                    Err(e) if std::time::Instant::now() > deadline => {
                        return Err(format!("libvirtd did not come up: {e}"))
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
                }
            }
        })
        .clone()
}

macro_rules! need_daemon {
    ($case:expr) => {
        if let Err(why) = daemon() {
            eprintln!("SKIP {}: {why}", $case);
            return;
        }
    };
}

/// A defined domain, destroyed and undefined when dropped (also when the
/// test panics).
struct Domain {
    name: String,
}

impl Domain {
    fn define(w: &Work, case: &str, disk: &Path) -> Domain {
        let name = format!("cowshed-test-{case}-{}", std::process::id());
        // ACPI on: libvirt 9.0 would otherwise pass -no-acpi, which QEMU 10
        // no longer knows.
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
             <vcpu>1</vcpu><features><acpi/></features>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>",
            disk.display()
        );
        w.write_file("domain.xml", xml.as_bytes());
        let path = w.path("domain.xml");
        let d = Domain { name };
        virsh(&["define", path.to_str().expect("utf-8 path")])
            .unwrap_or_else(|e| panic!("[{case}] {e}"));
        d
    }

    fn uuid(&self) -> String {
        virsh(&["domuuid", &self.name]).expect("domuuid")
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// The `used-by-vms` of `file` in `tree --output json` over the work dir.
fn used_by(w: &Work, file: &str, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["tree", "--output", "json", "--connect", SYSTEM];
    args.extend(extra);
    args.push("imgs");
    let r = w.cowshed(&args);
    assert!(r.ok(), "[{}] {r}", w.case);
    let doc = w.json(&r);
    let images = doc["images"].as_array().expect("images");
    let img = images
        .iter()
        .find(|i| i["filename"].as_str().is_some_and(|f| f.ends_with(file)))
        .unwrap_or_else(|| panic!("[{}] {file} not in the tree: {r}", w.case));
    img["used-by-vms"].as_array().expect("used-by-vms").clone()
}

/// imgs/base.qcow2 with imgs/ov.qcow2 on it, and imgs/spare.qcow2.
fn fleet(w: &Work) {
    w.mkdir("imgs");
    w.create("imgs/base.qcow2", "qcow2", "", None, 64 * MIB);
    w.create(
        "imgs/ov.qcow2",
        "qcow2",
        "",
        Some(("base.qcow2", "qcow2")),
        64 * MIB,
    );
    w.create("imgs/spare.qcow2", "qcow2", "", None, 64 * MIB);
}

#[test]
fn shut_off_domain_guards_its_disk_by_inode() {
    let case = "shut_off";
    need_daemon!(case);
    let w = Work::new(case);
    fleet(&w);
    // The domain names the disk through a link: matching is by inode.
    std::os::unix::fs::symlink(w.path("imgs"), w.path("via")).expect("symlink");
    let dom = Domain::define(&w, case, &w.path("via/ov.qcow2"));

    let users = used_by(&w, "imgs/ov.qcow2", &[]);
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(users[0]["name"], dom.name.as_str());
    assert_eq!(users[0]["uuid"], dom.uuid().as_str());
    assert_eq!(users[0]["state"], "shut off");
    assert_eq!(users[0]["connection"], SYSTEM);
    assert!(used_by(&w, "imgs/spare.qcow2", &[]).is_empty());

    let human = w.cowshed(&["tree", "--connect", SYSTEM, "imgs"]);
    assert!(
        human
            .stdout
            .contains(&format!("vm: {} (shut off)", dom.name)),
        "{human}"
    );

    // Every guarded operation is refused, naming the domain and where it
    // was found, and changes nothing.
    let before = (w.read_file("imgs/ov.qcow2"), w.read_file("imgs/base.qcow2"));
    w.create("imgs/other.qcow2", "qcow2", "", None, 64 * MIB);
    let refused: [&[&str]; 11] = [
        &["rm", "imgs/ov.qcow2"],
        &["reset", "imgs/ov.qcow2"],
        &["resize", "imgs/ov.qcow2", "+1M"],
        &["commit", "imgs/ov.qcow2"],
        &["rebase", "-u", "-b", "", "imgs/ov.qcow2"],
        &["mv", "imgs/ov.qcow2", "imgs/moved.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "imgs/ov.qcow2"],
        &["snapshot", "-c", "s1", "imgs/ov.qcow2"],
        &["bitmap", "--add", "imgs/ov.qcow2", "b0"],
        &["check", "-r", "all", "imgs/ov.qcow2"],
        // Replacing it with another image's content.
        &[
            "convert",
            "-O",
            "qcow2",
            "imgs/other.qcow2",
            "imgs/ov.qcow2",
        ],
    ];
    for args in refused {
        // Global flags go after the subcommand: before it, words are roots.
        let mut all = vec![args[0], "--connect", SYSTEM];
        all.extend(&args[1..]);
        let r = w.cowshed(&all);
        assert_eq!(r.code, Some(1), "{r}");
        assert!(
            r.stderr.contains(&dom.name)
                && r.stderr.contains(SYSTEM)
                && r.stderr.contains("shut off")
                && r.stderr.contains("--force-vms"),
            "{r}"
        );
        assert_eq!(
            (w.read_file("imgs/ov.qcow2"), w.read_file("imgs/base.qcow2")),
            before,
            "{r}"
        );
    }
    // The default connections find it too (the daemon runs).
    let r = w.cowshed(&["reset", "imgs/ov.qcow2"]);
    assert_eq!(r.code, Some(1), "{r}");
    // --force-vms goes ahead.
    let r = w.cowshed(&["reset", "--connect", SYSTEM, "--force-vms", "imgs/ov.qcow2"]);
    assert!(r.ok(), "{r}");
    assert_eq!(w.check_code("imgs/ov.qcow2"), 0);
    // Once undefined, nothing guards it.
    drop(dom);
    assert!(used_by(&w, "imgs/ov.qcow2", &[]).is_empty());
    let r = w.cowshed(&["rm", "--connect", SYSTEM, "imgs/ov.qcow2"]);
    assert!(r.ok(), "{r}");
}

#[test]
fn running_domain_records_its_backing_chain() {
    let case = "running";
    need_daemon!(case);
    let w = Work::new(case);
    fleet(&w);
    let dom = Domain::define(&w, case, &w.path("imgs/ov.qcow2"));
    if let Err(e) = virsh(&["start", &dom.name]) {
        eprintln!("SKIP {case}: the domain cannot start under TCG here: {e}");
        return;
    }
    // A running domain's XML has the <backingStore> chain: the base is its
    // disk too.
    for file in ["imgs/ov.qcow2", "imgs/base.qcow2"] {
        let users = used_by(&w, file, &[]);
        assert_eq!(users.len(), 1, "{file}: {users:?}");
        assert_eq!(users[0]["state"], "running", "{file}");
    }
    virsh(&["suspend", &dom.name]).expect("suspend");
    assert_eq!(used_by(&w, "imgs/base.qcow2", &[])[0]["state"], "paused");
    let r = w.cowshed(&[
        "resize",
        "--connect",
        SYSTEM,
        "--force-vms",
        "imgs/base.qcow2",
        "+1M",
    ]);
    // QEMU's lock refuses it even when the VM check is waived.
    assert_eq!(r.code, Some(1), "{r}");
}

#[test]
fn a_named_connection_that_cannot_be_read_stops_writes() {
    let w = Work::new("unreadable");
    fleet(&w);
    let bad = "qemu+unix:///system?socket=/nonexistent/cowshed-test.sock";
    let before = w.read_file("imgs/spare.qcow2");
    let r = w.cowshed(&["rm", "--connect", bad, "imgs/spare.qcow2"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr.contains("could not be made") && r.stderr.contains(bad),
        "{r}"
    );
    assert_eq!(w.read_file("imgs/spare.qcow2"), before);
    let r = w.cowshed(&["tree", "--connect", bad, "imgs"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains(bad), "{r}");
    let r = w.cowshed(&["rm", "--connect", bad, "--force-vms", "imgs/spare.qcow2"]);
    assert!(r.ok(), "{r}");
    assert!(!w.path("imgs/spare.qcow2").exists());
}

#[test]
fn readonly_refuses_every_write() {
    let w = Work::new("readonly");
    fleet(&w);
    let before = w.read_file("imgs/ov.qcow2");
    for args in [
        &["rm", "--readonly", "imgs/ov.qcow2"][..],
        &[
            "create",
            "--readonly",
            "-f",
            "qcow2",
            "imgs/new.qcow2",
            "1M",
        ],
        &["check", "--readonly", "-r", "all", "imgs/ov.qcow2"],
        &["snapshot", "--readonly", "-c", "s1", "imgs/ov.qcow2"],
        // Global flags also go before the subcommand.
        &["--readonly", "reset", "imgs/ov.qcow2"],
    ] {
        let r = w.cowshed(args);
        assert_eq!(r.code, Some(1), "{r}");
        assert!(r.stderr.contains("read-only"), "{r}");
    }
    assert_eq!(w.read_file("imgs/ov.qcow2"), before);
    assert!(!w.path("imgs/new.qcow2").exists());
    // Reading is fine.
    assert!(w.cowshed(&["info", "--readonly", "imgs/ov.qcow2"]).ok());
    assert!(w.cowshed(&["--readonly", "info", "imgs/ov.qcow2"]).ok());
    assert!(w.cowshed(&["check", "--readonly", "imgs/ov.qcow2"]).ok());
    // The config's setting does the same.
    w.write_file("cowshed.toml", b"readonly = true\n");
    let r = w.cowshed(&["reset", "--config", "cowshed.toml", "imgs/ov.qcow2"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("read-only"), "{r}");
    assert_eq!(w.read_file("imgs/ov.qcow2"), before);
}

/// The terminal UI, driven in memory: App, its worker threads (the
/// inventory's included) and a TestBackend.
struct Ui {
    app: cowshed::tui::App,
    rx: crossbeam_channel::Receiver<cowshed::tui::Event>,
    term: ratatui::Terminal<ratatui::backend::TestBackend>,
}

impl Ui {
    fn start(root: &Path, config: cowshed::tui::Config) -> Ui {
        let (tx, rx) = crossbeam_channel::unbounded();
        let app = cowshed::tui::App::new(
            vec![root.to_path_buf()],
            config,
            true,
            tx,
            ratatui::layout::Rect::new(0, 0, 140, 30),
        )
        .expect("start the app");
        let mut ui = Ui {
            app,
            rx,
            term: ratatui::Terminal::new(ratatui::backend::TestBackend::new(140, 30))
                .expect("terminal"),
        };
        ui.until("the first scan", |a| !a.scanning && !a.rows.is_empty());
        ui
    }

    /// Feed events until `cond` holds (a generous limit: libvirt answers
    /// in seconds, the inventory is read again every 10 s).
    fn until(&mut self, what: &str, cond: impl Fn(&cowshed::tui::App) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !cond(&self.app) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.app.update(ev),
                Err(_) => panic!("waited in vain for {what}"),
            }
        }
    }

    fn key(&mut self, c: char) {
        self.code(ratatui::crossterm::event::KeyCode::Char(c));
    }

    fn code(&mut self, code: ratatui::crossterm::event::KeyCode) {
        use ratatui::crossterm::event::{Event, KeyEvent, KeyModifiers};
        self.app
            .update(cowshed::tui::Event::Input(Event::Key(KeyEvent::new(
                code,
                KeyModifiers::NONE,
            ))));
    }

    fn select(&mut self, name: &str) {
        let at = self
            .app
            .rows
            .iter()
            .position(|r| self.app.forest.nodes[r.id].record.path.ends_with(name))
            .unwrap_or_else(|| panic!("{name} is not in the tree"));
        while self.app.selected != at {
            self.key(if self.app.selected < at { 'j' } else { 'k' });
        }
    }

    fn screen(&mut self) -> String {
        self.term
            .draw(|f| cowshed::tui::view::draw(&self.app, f))
            .expect("draw");
        format!("{}", self.term.backend())
    }
}

#[test]
fn the_terminal_ui_shows_the_domain_and_its_disks() {
    let case = "tui";
    need_daemon!(case);
    let w = Work::new(case);
    fleet(&w);
    let dom = Domain::define(&w, case, &w.path("imgs/ov.qcow2"));
    let config = cowshed::tui::Config {
        libvirt: vec![SYSTEM.to_string()],
        ..Default::default()
    };
    let mut ui = Ui::start(&w.path("imgs"), config);
    let name = dom.name.clone();
    ui.until("the domain", |a| {
        a.inventory.domains.iter().any(|d| d.name == name)
    });
    ui.select("ov.qcow2");
    let screen = ui.screen();
    assert!(screen.contains(" VM "), "{screen}");
    // The column is narrow: the name's start and the state show in it.
    assert!(screen.contains("cowshed-test-tui"), "{screen}");
    // The details pane lists the domain and its disk.
    assert!(
        screen.contains(&format!("vm {} (shut off, {SYSTEM})", dom.name)),
        "{screen}"
    );
    assert!(screen.contains("disk vda: ▸ov.qcow2"), "{screen}");
    // Reset asks, warning about the domain.
    ui.key('R');
    let screen = ui.screen();
    assert!(screen.contains("Used by libvirt domain"), "{screen}");
    // So do flatten, delete and move: every dialog whose yes goes ahead in
    // spite of the domain names it first.
    for (key, title) in [('f', "flatten?"), ('d', "delete?"), ('M', "move ov.qcow2")] {
        ui.code(ratatui::crossterm::event::KeyCode::Esc);
        ui.key(key);
        let screen = ui.screen();
        assert!(screen.contains(title), "{key}: {screen}");
        assert!(screen.contains("Used by libvirt domain"), "{key}: {screen}");
    }
    // The snapshots and bitmaps dialogs write the image at every step:
    // they name the domain from the moment they open (they list what the
    // details pane read).
    ui.until("ov.qcow2's details", |a| {
        a.details
            .as_ref()
            .is_some_and(|d| d.key.ends_with("ov.qcow2"))
    });
    for (key, title) in [('S', "snapshots of ov.qcow2"), ('B', "bitmaps of ov.qcow2")] {
        ui.code(ratatui::crossterm::event::KeyCode::Esc);
        ui.key(key);
        let screen = ui.screen();
        assert!(screen.contains(title), "{key}: {screen}");
        assert!(screen.contains("Used by libvirt domain"), "{key}: {screen}");
    }
}

#[test]
fn read_only_terminal_ui_disables_action_keys() {
    let w = Work::new("tui_readonly");
    fleet(&w);
    let config = cowshed::tui::Config {
        readonly: true,
        ..Default::default()
    };
    let mut ui = Ui::start(&w.path("imgs"), config);
    ui.select("ov.qcow2");
    for key in ['c', 'R', 'd', 'm'] {
        ui.key(key);
        assert!(ui.app.dialog.is_none(), "{key} opened a dialog");
        let status = ui.app.status.as_ref().map(|s| s.text.clone());
        assert!(
            status.as_deref().is_some_and(|s| s.contains("read-only")),
            "{key}: {status:?}"
        );
    }
    let names: Vec<_> = std::fs::read_dir(w.path("imgs"))
        .expect("list")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

/// Another host's agent checks that host's domains before its jobs write:
/// reset, flatten, a snapshot and a bitmap of a domain's disk are refused
/// there, naming the domain, and the file is left as it was.
#[test]
fn a_remote_agent_refuses_a_disk_its_hosts_domain_uses() {
    use cowshed::remote::client::{Connection, SshOptions};
    use cowshed::remote::protocol::{
        BitmapAction, JobOp, Reply, Request, SnapshotAction, WireJobState,
    };
    let case = "remote_agent";
    need_daemon!(case);
    let Some(sshd) = common::sshd::Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    let w = Work::new(case);
    fleet(&w);
    let dom = Domain::define(&w, case, &w.path("imgs/ov.qcow2"));
    let before = std::fs::read(w.path("imgs/ov.qcow2")).expect("read");
    let ssh = SshOptions {
        program: "ssh".into(),
        config: Some(sshd.ssh_config()),
        remote_command: sshd.remote_command(&[]),
        control_dir: sshd.control_dir(),
    };
    let mut conn = Connection::open("host1", &ssh).expect("connect");
    let image = w.path("imgs/ov.qcow2");
    let ops = [
        JobOp::Reset {
            image: image.clone(),
            roots: vec![w.path("imgs")],
        },
        JobOp::Rebase {
            image: image.clone(),
            backing: String::new(),
            backing_format: None,
            unsafe_header_only: false,
        },
        JobOp::Snapshot {
            image: image.clone(),
            action: SnapshotAction::Create { name: "s".into() },
        },
        JobOp::Bitmap {
            image: image.clone(),
            name: "b".into(),
            action: BitmapAction::Add { granularity: None },
        },
    ];
    for (i, op) in ops.into_iter().enumerate() {
        let id = format!("vm-{i}");
        let kind = op.kind();
        conn.send(&Request::Job { id: id.clone(), op })
            .expect("send");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let (state, message) = loop {
            assert!(std::time::Instant::now() < deadline, "{kind} did not end");
            if let Some(Reply::JobState {
                id: got,
                state,
                message,
                ..
            }) = conn
                .recv_timeout(std::time::Duration::from_secs(1))
                .expect("connection")
            {
                if got == id && state.is_finished() {
                    break (state, message.unwrap_or_default());
                }
            }
        };
        assert_eq!(state, WireJobState::Failed, "{kind}: {message}");
        assert!(message.contains(&dom.name), "{kind}: {message}");
        assert_eq!(
            std::fs::read(w.path("imgs/ov.qcow2")).expect("read"),
            before,
            "{kind} changed the disk"
        );
    }
}
