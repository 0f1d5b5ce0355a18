//! The screenshot scenes: the real `App` on the demo fleet, driven through
//! `App::update` like `tests/tui_journeys.rs` does, drawn by the real
//! `view::draw` on ratatui's `TestBackend`.
//!
//! Everything on screen must be the same on every run. The fleet is built
//! fresh (sizes of images made by qemu-img/qemu-io are stable on ext4), its
//! root is given as a relative path so the header and every path say
//! `demo-fleet`, not a temporary directory, and growth (a rate and its
//! sparkline, which would otherwise need a guest writing in real time) is
//! injected as the watcher's `Event::Growth`. Nothing shown is a time, date
//! or pid: no process holds the images.
//!
//! The `hosts` scene is a forest of three machines: a local directory and
//! two "hosts" reached over a real ssh (an sshd of its own on localhost,
//! with throw-away keys, as the remote tests start it) whose agents are
//! real `cowshed agent --stdio` processes. The domains come from libvirt's
//! test driver (`test:///FILE.xml`, read through `virsh` like any other
//! connection; no daemon): each machine its own file, so each host shows
//! its own domains. Its images live in a fixed directory
//! ([`HOSTS_DIR`]), since a remote root is an absolute path and the
//! header shows it.
//!
//! Shared by `examples/screenshots` and `tests/screenshots.rs` (by path).

use std::path::Path;
use std::time::Duration;

use cowshed::tui::{view, App, Config, Event};
use crossbeam_channel::Receiver;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{Event as CtEvent, KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::Rect;
use ratatui::Terminal;
use tempfile::TempDir;

#[allow(dead_code)] // The remote tests' sshd; the scene uses part of it.
#[path = "../../tests/common/sshd.rs"]
mod sshd;

pub const W: u16 = 120;
pub const H: u16 = 36;
/// The fleet's directory, and what the header shows as the root.
pub const FLEET_DIR: &str = "demo-fleet";
const SETTLE: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

pub struct Stage {
    pub app: App,
    rx: Receiver<Event>,
    term: Terminal<TestBackend>,
    // Kept for its Drop: the fleet goes when the stage does.
    _tmp: Option<TempDir>,
    // The hosts scene's sshd, stopped when the stage goes.
    _sshd: Option<sshd::Sshd>,
}

/// A chain of the hosts scene: (directory, base, [(overlay, MiB the guest
/// wrote)]).
type Chain = (&'static str, &'static str, &'static [(&'static str, u64)]);

/// A machine of the hosts scene and its libvirt's domains: (name,
/// [(domain, image, run state)]), run states as libvirt's test driver
/// numbers them (1 running, 3 paused, 5 shut off).
type Machine = (&'static str, &'static [Domain]);
type Domain = (&'static str, &'static str, u8);

/// Where the hosts scene builds its machines' images (wiped first).
pub const HOSTS_DIR: &str = "/tmp/cowshed-shots";

impl Stage {
    /// Build the demo fleet in a new temporary directory and open the app
    /// on it, settled. This changes the process's working directory to
    /// that temporary directory (to scan a relative root), so a process
    /// must not run two stages at once.
    pub fn new() -> Result<Stage, String> {
        let tmp = tempfile::Builder::new()
            .prefix("cowshed-screenshots-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let (_, with_data) = cowshed::cli::build_demo_fleet(&tmp.path().join(FLEET_DIR))
            .map_err(|e| format!("building the demo fleet: {e:#}"))?;
        if !with_data {
            return Err(
                "qemu-io not found (Debian: apt-get install qemu-utils): the demo fleet \
                 would hold no data and the screenshots would show empty images"
                    .into(),
            );
        }
        std::env::set_current_dir(tmp.path())
            .map_err(|e| format!("cd {}: {e}", tmp.path().display()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        // Not live: the watcher would only add timing to a still fleet.
        let app = App::new(
            vec![Path::new(FLEET_DIR).to_path_buf()],
            Config::default(),
            false,
            tx,
            Rect::new(0, 0, W, H),
        )
        .map_err(|e| format!("starting the app: {e}"))?;
        let term = Terminal::new(TestBackend::new(W, H)).map_err(|e| e.to_string())?;
        let mut stage = Stage {
            app,
            rx,
            term,
            _tmp: Some(tmp),
            _sshd: None,
        };
        stage.settle()?;
        Ok(stage)
    }

    /// The hosts scene's stage: `lab/` here, `host1:HOSTS_DIR/hv1` and
    /// `host2:HOSTS_DIR/hv2` over ssh, and `HOSTS_DIR/nfs` seen by both
    /// hosts (shared storage, shown once). `agent` is the cowshed binary
    /// the hosts run as `agent --stdio`. Changes the working directory to
    /// [`HOSTS_DIR`] and sets the `COWSHED_SSH_*` variables of this process.
    pub fn hosts(agent: &Path) -> Result<Stage, String> {
        let dir = Path::new(HOSTS_DIR);
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| format!("rm -r {HOSTS_DIR}: {e}"))?;
        }
        for sub in ["lab", "hv1", "hv2", "nfs", "libvirt"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("mkdir {sub}: {e}"))?;
        }
        let chains: [Chain; 4] = [
            ("lab", "debian-12.qcow2", &[("ci-runner.qcow2", 96)]),
            (
                "hv1",
                "ubuntu-24.04.qcow2",
                &[("web-1.qcow2", 180), ("web-2.qcow2", 40)],
            ),
            ("hv2", "rocky-9.qcow2", &[("db-1.qcow2", 320)]),
            (
                "nfs",
                "golden.qcow2",
                &[("build-7.qcow2", 24), ("build-8.qcow2", 60)],
            ),
        ];
        for (sub, base, overlays) in chains {
            let d = dir.join(sub);
            qemu(&d, "qemu-img", &["create", "-q", "-f", "qcow2", base, "4G"])?;
            qemu(&d, "qemu-io", &["-c", "write -P 0x11 0 256M", base])?;
            for (overlay, mib) in overlays {
                qemu(
                    &d,
                    "qemu-img",
                    &[
                        "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay,
                    ],
                )?;
                let write = format!("write -P 0x22 1G {mib}M");
                qemu(&d, "qemu-io", &["-c", &write, overlay])?;
            }
        }
        let machines: [Machine; 3] = [
            ("local", &[("ci-runner", "lab/ci-runner.qcow2", 1)]),
            (
                "host1",
                &[
                    ("web-1", "hv1/web-1.qcow2", 1),
                    ("web-2", "hv1/web-2.qcow2", 5),
                    ("build-7", "nfs/build-7.qcow2", 1),
                ],
            ),
            (
                "host2",
                &[
                    ("db-1", "hv2/db-1.qcow2", 3),
                    ("build-8", "nfs/build-8.qcow2", 5),
                ],
            ),
        ];
        let mut uris = Vec::new();
        let mut first_uuid = 1;
        for (machine, domains) in machines {
            let xml = dir.join("libvirt").join(format!("{machine}.xml"));
            let node = test_driver_node(dir, domains, first_uuid);
            first_uuid += domains.len();
            std::fs::write(&xml, node).map_err(|e| format!("{}: {e}", xml.display()))?;
            uris.push((machine, format!("test://{}", xml.display())));
        }
        // The hosts' agents read their own config (XDG_CONFIG_HOME per host).
        let mut host_env = Vec::new();
        for (machine, uri) in &uris[1..] {
            let config = dir.join("libvirt").join(format!("{machine}-config"));
            std::fs::create_dir_all(config.join("cowshed"))
                .and_then(|()| {
                    std::fs::write(
                        config.join("cowshed/config.toml"),
                        format!("libvirt = [\"{uri}\"]\n"),
                    )
                })
                .map_err(|e| format!("{}: {e}", config.display()))?;
            host_env.push((*machine, config.display().to_string()));
        }
        let env: Vec<(&str, &str, &str)> = host_env
            .iter()
            .map(|(h, c)| (*h, "XDG_CONFIG_HOME", c.as_str()))
            .collect();
        let sshd = sshd::Sshd::start_with_env(&["host1", "host2"], &env)?;
        let agent = agent.display().to_string();
        for (k, v) in sshd.env(&sshd.remote_command_of(&agent, &[])) {
            std::env::set_var(k, v);
        }
        std::env::set_current_dir(dir).map_err(|e| format!("cd {HOSTS_DIR}: {e}"))?;
        let roots = vec![
            "lab".into(),
            format!("host1:{HOSTS_DIR}/hv1").into(),
            format!("host1:{HOSTS_DIR}/nfs").into(),
            format!("host2:{HOSTS_DIR}/hv2").into(),
            format!("host2:{HOSTS_DIR}/nfs").into(),
        ];
        let config = Config {
            libvirt: vec![uris[0].1.clone()],
            ..Config::default()
        };
        // A still app reads no libvirt of its own: this machine's domains
        // are read once here, as the live app's inventory thread reads them.
        let local_vms = cowshed::inventory::Inventory::read(
            &cowshed::inventory::Connections::from_named(&config.libvirt),
        );
        let (tx, rx) = crossbeam_channel::unbounded();
        let app = App::new(roots, config, false, tx, Rect::new(0, 0, W, H))
            .map_err(|e| format!("starting the app: {e}"))?;
        let term = Terminal::new(TestBackend::new(W, H)).map_err(|e| e.to_string())?;
        let mut stage = Stage {
            app,
            rx,
            term,
            _tmp: None,
            _sshd: Some(sshd),
        };
        stage
            .app
            .update(Event::Inventory(std::sync::Arc::new(local_vms)));
        // Each machine's forest and domains arrive on their own: wait
        // until every one of the scene's domains is on its image.
        let deadline = std::time::Instant::now() + SETTLE;
        loop {
            stage.settle()?;
            let missing: Vec<&str> = machines
                .iter()
                .flat_map(|(_, domains)| domains.iter())
                .filter(|(name, image, _)| !stage.shows_domain(image, name))
                .map(|(name, _, _)| *name)
                .collect();
            if missing.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "after {SETTLE:?}, domains not shown on their images: {}",
                    missing.join(", ")
                ));
            }
            if let Ok(ev) = stage.rx.recv_timeout(Duration::from_millis(200)) {
                stage.app.update(ev);
            }
        }
        stage.settle()?;
        Ok(stage)
    }

    /// Whether domain `name` shows on the image at `image` (relative to
    /// [`HOSTS_DIR`]), a local one from the app's inventory, a remote one
    /// from its host's agent.
    fn shows_domain(&self, image: &str, name: &str) -> bool {
        let file = Path::new(image).file_name();
        self.app.forest.nodes.iter().any(|n| {
            n.record.path.file_name() == file
                && (n.record.vms.iter().any(|v| v.name == name)
                    || self
                        .app
                        .vms
                        .of(&n.record.path)
                        .iter()
                        .any(|v| v.name == name))
        })
    }

    fn settle(&mut self) -> Result<(), String> {
        if self.app.settle(&self.rx, SETTLE) {
            Ok(())
        } else {
            Err("the app did not become idle".into())
        }
    }

    pub fn key(&mut self, code: KeyCode) -> Result<(), String> {
        self.app.update(Event::Input(CtEvent::Key(KeyEvent::new(
            code,
            KeyModifiers::NONE,
        ))));
        self.settle()
    }

    /// Move the selection to the image called `name` with the arrow keys.
    pub fn select(&mut self, name: &str) -> Result<(), String> {
        let forest = &self.app.forest;
        let target = self
            .app
            .rows
            .iter()
            .position(|r| cowshed::tui::app::file_name(&forest.nodes[r.id].record.path) == name)
            .ok_or_else(|| format!("no row for {name}"))?;
        while self.app.selected != target {
            let code = if self.app.selected < target {
                KeyCode::Down
            } else {
                KeyCode::Up
            };
            let before = self.app.selected;
            self.key(code)?;
            if self.app.selected == before {
                return Err(format!("the selection does not move towards {name}"));
            }
        }
        Ok(())
    }

    /// What the watcher reports while a guest writes into `name`: `rate`
    /// bytes per second and the bytes grown in each recent second.
    pub fn grow(&mut self, name: &str, rate: f64, history: &[u64]) -> Result<(), String> {
        let node = self
            .app
            .forest
            .nodes
            .iter()
            .find(|n| cowshed::tui::app::file_name(&n.record.path) == name)
            .ok_or_else(|| format!("no image {name}"))?;
        let (key, allocated) = (node.record.key.clone(), node.record.sizes.allocated);
        self.app.update(Event::Growth {
            key,
            allocated,
            rate,
            history: history.to_vec(),
        });
        self.settle()
    }

    /// Make `name` look last written `days` ago: the reclaim view's ages
    /// then read the same on every run (a file made seconds ago would not).
    pub fn written_days_ago(&mut self, name: &str, days: u64) -> Result<(), String> {
        let path = self
            .app
            .forest
            .nodes
            .iter()
            .find(|n| cowshed::tui::app::file_name(&n.record.path) == name)
            .map(|n| n.record.path.clone())
            .ok_or_else(|| format!("no image {name}"))?;
        let when = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(when))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn draw(&mut self) -> Result<Buffer, String> {
        self.term
            .draw(|f| view::draw(&self.app, f))
            .map_err(|e| e.to_string())?;
        Ok(self.term.backend().buffer().clone())
    }
}

/// The first scene: the forest with two overlays growing, the busier one
/// selected.
pub fn forest(stage: &mut Stage) -> Result<Buffer, String> {
    stage.grow(
        "web-1.qcow2",
        3.4 * MIB as f64,
        &[MIB / 2, MIB, 2 * MIB, 3 * MIB, 3 * MIB, 4 * MIB],
    )?;
    stage.grow(
        "db-1-1-1.qcow2",
        0.5 * MIB as f64,
        &[MIB / 4, MIB / 2, 0, MIB / 4, MIB, MIB / 2],
    )?;
    stage.select("web-1.qcow2")?;
    stage.draw()
}

/// The hosts scene: three machines in one forest, the VM column filled
/// from each machine's libvirt, a shared directory shown once.
pub fn hosts(stage: &mut Stage) -> Result<Buffer, String> {
    stage.select("web-1.qcow2")?;
    stage.draw()
}

/// Why the hosts scene cannot be staged here, if it cannot: it needs
/// Debian's openssh-server (sshd) and libvirt's virsh (libvirt-clients).
pub fn hosts_unavailable() -> Option<String> {
    if let Some(why) = sshd::unavailable() {
        return Some(why);
    }
    let virsh = std::process::Command::new("virsh")
        .arg("--version")
        .output();
    match virsh {
        Ok(out) if out.status.success() => None,
        _ => Some("virsh is not installed (.ci/run installs libvirt)".into()),
    }
}

/// Run `program` in `dir`, for the hosts scene's images.
fn qemu(dir: &Path, program: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("{program}: {e} (Debian: apt-get install qemu-utils)"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A libvirt test-driver node file defining `domains` (name, image under
/// `dir`, run state) with fixed uuids numbered from `first_uuid`, so every
/// run shows the same.
fn test_driver_node(dir: &Path, domains: &[Domain], first_uuid: usize) -> String {
    let mut xml = String::from("<node>\n");
    for (i, (name, image, state)) in domains.iter().enumerate() {
        xml.push_str(&format!(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
             <name>{name}</name><uuid>00000000-0000-4000-8000-{n:012}</uuid>\
             <memory>65536</memory><os><type>hvm</type></os>\
             <test:runstate>{state}</test:runstate><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{path}'/><target dev='vda' bus='virtio'/></disk>\
             </devices></domain>\n",
            n = first_uuid + i,
            path = dir.join(image).display()
        ));
    }
    xml.push_str("</node>\n");
    xml
}

/// Every scene in order, named as its PNG is: the fleet changes in the
/// last one (a clone is made).
pub fn all(stage: &mut Stage) -> Result<Vec<(&'static str, Buffer)>, String> {
    let mut shots = vec![("forest", forest(stage)?)];
    // A chain of four: the allocation bar has a part for each layer.
    stage.select("db-1-1-1.qcow2")?;
    shots.push(("details", stage.draw()?));
    stage.key(KeyCode::Char('?'))?;
    shots.push(("help", stage.draw()?));
    stage.key(KeyCode::Esc)?;
    stage.select("web-2.qcow2")?;
    stage.key(KeyCode::Char('c'))?;
    shots.push(("clone", stage.draw()?));
    // The convert dialog, compression set to zstd.
    stage.select("web-2.qcow2")?;
    stage.key(KeyCode::Char('v'))?;
    for code in [KeyCode::Down, KeyCode::Down, KeyCode::Right, KeyCode::Right] {
        stage.key(code)?;
    }
    shots.push(("convert", stage.draw()?));
    stage.key(KeyCode::Esc)?;
    // A batch: three marked images, one of which cannot be flattened.
    for name in ["web-1.qcow2", "db-1-1-1.qcow2", "orphan.qcow2"] {
        stage.select(name)?;
        stage.key(KeyCode::Char(' '))?;
    }
    stage.key(KeyCode::Char('f'))?;
    shots.push(("batch", stage.draw()?));
    stage.key(KeyCode::Esc)?;
    stage.key(KeyCode::Char('u'))?;
    // The reclaim view, with ages set and two images marked in it.
    for (name, days) in [
        ("web-1.qcow2", 2),
        ("web-2-1.qcow2", 1),
        ("db-1-1-1.qcow2", 45),
        ("win11.raw", 120),
        ("orphan.qcow2", 400),
    ] {
        stage.written_days_ago(name, days)?;
    }
    stage.key(KeyCode::Char('r'))?;
    stage.key(KeyCode::Char('D'))?;
    stage.key(KeyCode::Char(' '))?;
    stage.key(KeyCode::Char(' '))?;
    shots.push(("reclaim", stage.draw()?));
    stage.key(KeyCode::Esc)?;
    Ok(shots)
}
