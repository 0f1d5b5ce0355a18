//! Remote roots over a real ssh: an sshd started by the test on
//! localhost, its ports named `host1`, `host2` in an ssh config of its
//! own, and the cowshed under test started there as the agent. The
//! forest seen through the agent is compared with the local one, jobs run
//! by the agent with what qemu-img makes of the same operation, and a
//! connection is killed while a job is held at a fault point.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fault::HANG_GUARD;
use common::sshd::Sshd;
use common::{Work, COWSHED, MIB};
use cowshed::remote::client::{Connection, RemoteError, SshOptions};
use cowshed::remote::protocol::{
    encode, BitmapAction, HeaderFixKind, JobOp, Reply, Request, SnapshotAction, WireJobState,
    WireListing,
};
use serde_json::Value;

/// A small fleet: a base with data, two overlays (one with a child), a
/// raw disk, an overlay whose backing is missing.
fn fleet(w: &Work) -> PathBuf {
    w.mkdir("img");
    w.create("img/base.qcow2", "qcow2", "", None, 64 * MIB);
    w.io(
        "qcow2",
        "img/base.qcow2",
        &["write -P 0x11 0 4M".into(), "write -P 0x12 20M 1M".into()],
    );
    w.create(
        "img/web-1.qcow2",
        "qcow2",
        "",
        Some(("base.qcow2", "qcow2")),
        64 * MIB,
    );
    w.io(
        "qcow2",
        "img/web-1.qcow2",
        &[
            "write -P 0x21 1M 2M".into(),
            "write -P 0x22 30M 3M".into(),
            "write -z 40M 1M".into(),
        ],
    );
    w.create(
        "img/web-2.qcow2",
        "qcow2",
        "",
        Some(("base.qcow2", "qcow2")),
        64 * MIB,
    );
    w.create(
        "img/web-1-1.qcow2",
        "qcow2",
        "",
        Some(("web-1.qcow2", "qcow2")),
        64 * MIB,
    );
    w.create("img/disk.raw", "raw", "", None, 8 * MIB);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "img/orphan.qcow2",
        "64M",
    ]);
    w.path("img")
}

fn cowshed_env(sshd: &Sshd, remote: &str, args: &[&str]) -> common::Run {
    let out = Command::new(COWSHED)
        .args(args)
        .envs(sshd.env(remote))
        .stdin(Stdio::null())
        .output()
        .expect("run cowshed");
    common::Run {
        cmdline: format!("cowshed {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `tree --output json` with `host:` taken off every name of that host,
/// and the host field dropped: what the same tree reads like locally.
fn as_local(doc: &Value, host: &str) -> (Vec<Value>, Vec<Value>) {
    let prefix = format!("{host}:");
    let strip = |v: &Value| -> Value {
        match v {
            Value::String(s) => Value::String(s.strip_prefix(&prefix).unwrap_or(s).to_string()),
            other => other.clone(),
        }
    };
    let images = doc["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter(|i| i["host"].as_str() == Some(host))
        .map(|i| {
            let mut i = i.clone();
            let o = i.as_object_mut().expect("object");
            o.remove("host");
            for k in ["filename", "parent"] {
                let v = strip(&o[k]);
                o.insert(k.into(), v);
            }
            let children: Vec<Value> = o["children"]
                .as_array()
                .expect("children")
                .iter()
                .map(strip)
                .collect();
            o.insert("children".into(), Value::Array(children));
            i
        })
        .collect();
    let trees = doc["trees"]
        .as_array()
        .expect("trees")
        .iter()
        .filter(|t| t["root"].as_str().is_some_and(|r| r.starts_with(&prefix)))
        .map(|t| {
            let mut t = t.clone();
            let root = strip(&t["root"]);
            t["root"] = root;
            t
        })
        .collect();
    (images, trees)
}

#[test]
fn tree_over_ssh_is_the_local_tree_per_host() {
    let w = Work::new("remote-tree");
    let Some(sshd) = Sshd::start_or_skip(&["host1", "host2"], &[]) else {
        return;
    };
    let img = fleet(&w);
    let dir = img.display().to_string();
    // host2 and the local root see copies: the same directory from two
    // of them would be one set of files, shown once
    // (shared_storage_is_shown_once_...).
    w.mkdir("copy");
    w.mkdir("mine");
    for f in [
        "base.qcow2",
        "web-1.qcow2",
        "web-2.qcow2",
        "web-1-1.qcow2",
        "disk.raw",
        "orphan.qcow2",
    ] {
        w.copy(&format!("img/{f}"), &format!("copy/{f}"));
        w.copy(&format!("img/{f}"), &format!("mine/{f}"));
    }
    let dir2 = w.path("copy").display().to_string();
    let mine = w.path("mine").display().to_string();
    let local = w.cowshed(&["tree", "--output", "json", &dir]);
    assert!(local.ok(), "{local}");
    let local = w.json(&local);
    let local2 = w.cowshed(&["tree", "--output", "json", &dir2]);
    assert!(local2.ok(), "{local2}");
    let local2 = w.json(&local2);
    let remote = sshd.remote_command(&[]);
    let (h1, h2) = (format!("host1:{dir}"), format!("host2:{dir2}"));
    let all = cowshed_env(
        &sshd,
        &remote,
        &["tree", "--output", "json", &h1, &h2, &mine],
    );
    assert!(all.ok(), "{all}");
    let all = w.json(&all);
    assert_eq!(
        local["images"].as_array().expect("images").len(),
        6,
        "{local:#}"
    );
    for (host, local) in [("host1", &local), ("host2", &local2)] {
        let (images, trees) = as_local(&all, host);
        assert_eq!(
            &images,
            local["images"].as_array().expect("images"),
            "{host}: images differ from the local tree"
        );
        assert_eq!(
            &trees,
            local["trees"].as_array().expect("trees"),
            "{host}: trees"
        );
    }
    // This machine's trees first, then each host's.
    let roots: Vec<&str> = all["trees"]
        .as_array()
        .expect("trees")
        .iter()
        .filter_map(|t| t["root"].as_str())
        .collect();
    let hosts: Vec<&str> = roots
        .iter()
        .map(|r| r.split_once(":/").map_or("", |(h, _)| h))
        .collect();
    let mut sorted = hosts.clone();
    sorted.sort();
    assert_eq!(hosts, sorted, "{roots:?}");
    // The human tree names remote images as host:path.
    let human = cowshed_env(&sshd, &remote, &["tree", &h1]);
    assert!(human.ok(), "{human}");
    assert!(
        human.stdout.contains(&format!("{h1}/web-1.qcow2")),
        "{human}"
    );
}

#[test]
fn a_missing_or_other_agent_is_named_with_the_install_command() {
    let w = Work::new("remote-missing");
    let Some(sshd) = Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    let dir = format!("host1:{}", w.root().display());
    let missing = cowshed_env(&sshd, "/nonexistent/cowshed", &["tree", &dir]);
    assert_eq!(missing.code, Some(1), "{missing}");
    assert!(
        missing.stderr.contains("no cowshed agent answered")
            && missing.stderr.contains("/nonexistent/cowshed")
            && missing.stderr.contains(&format!("scp {COWSHED} host1:")),
        "{missing}"
    );
    // An agent of another protocol version (a stand-in that answers the
    // hello as a future cowshed would).
    let future = "sh -c 'read hello; echo \"{\\\"type\\\":\\\"hello\\\",\\\"protocol\\\":99,\
                  \\\"version\\\":\\\"9.9.9\\\",\\\"host\\\":\\\"h\\\"}\"' #";
    let other = cowshed_env(&sshd, future, &["tree", &dir]);
    assert_eq!(other.code, Some(1), "{other}");
    assert!(
        other
            .stderr
            .contains("cowshed 9.9.9 speaks agent protocol 99, this one 3")
            && other.stderr.contains("install the same cowshed there: scp"),
        "{other}"
    );
    // ssh's own failures say so.
    let unknown = cowshed_env(&sshd, "cowshed", &["tree", "no-such-host.invalid:/x"]);
    assert_eq!(unknown.code, Some(1), "{unknown}");
    assert!(unknown.stderr.contains("ssh failed"), "{unknown}");
}

#[test]
fn the_agent_refuses_another_protocol_version() {
    let mut child = Command::new(COWSHED)
        .args(["agent", "--stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("agent");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"{\"type\":\"hello\",\"protocol\":1}\n")
        .expect("write");
    let out = child.wait_with_output().expect("agent output");
    assert_eq!(out.status.code(), Some(2));
    let line: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(line["type"], "refused");
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("speaks protocol 3, the client protocol 1")),
        "{line}"
    );
}

fn options(sshd: &Sshd, remote: String) -> SshOptions {
    SshOptions {
        program: "ssh".into(),
        config: Some(sshd.ssh_config()),
        remote_command: remote,
        control_dir: sshd.control_dir(),
    }
}

/// Read messages until `id` ends; its state and message.
fn finish(conn: &mut Connection, id: &str) -> (WireJobState, Option<String>, Option<PathBuf>) {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        assert!(Instant::now() < deadline, "job {id} did not end");
        if let Some(Reply::JobState {
            id: got,
            state,
            message,
            created,
            ..
        }) = conn
            .recv_timeout(Duration::from_secs(1))
            .expect("connection")
        {
            if got == id && state.is_finished() {
                return (state, message, created);
            }
        }
    }
}

fn run_job(conn: &mut Connection, id: &str, op: JobOp) -> Option<PathBuf> {
    conn.send(&Request::Job { id: id.into(), op })
        .expect("send job");
    let (state, message, created) = finish(conn, id);
    assert_eq!(state, WireJobState::Done, "job {id}: {message:?}");
    created
}

#[test]
fn jobs_run_by_the_agent_match_qemu_img() {
    let w = Work::new("remote-jobs");
    let Some(sshd) = Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    fleet(&w);
    // The oracle's copies, beside.
    w.mkdir("q");
    for f in ["base.qcow2", "web-1.qcow2"] {
        w.copy(&format!("img/{f}"), &format!("q/{f}"));
    }
    let mut conn =
        Connection::open("host1", &options(&sshd, sshd.remote_command(&[]))).expect("connect");
    assert_eq!(conn.agent_version, env!("CARGO_PKG_VERSION"));

    // commit: the base holds the overlay's data, as after qemu-img commit.
    run_job(
        &mut conn,
        "commit-1",
        JobOp::Commit {
            image: w.path("img/web-1.qcow2"),
            keep_top: false,
        },
    );
    w.qemu_img(&["commit", "-q", "q/web-1.qcow2"]);
    w.same_view("img/base.qcow2", "q/base.qcow2")
        .expect("base after commit");
    w.same_view("img/web-1.qcow2", "q/web-1.qcow2")
        .expect("overlay after commit");
    assert_eq!(w.check_code("img/base.qcow2"), 0);
    assert_eq!(w.check_code("img/web-1.qcow2"), 0);
    // Emptied as qemu-img empties it: nothing of its own left.
    let own = |f: &str| {
        w.info_json(f)["actual-size"].as_u64().expect("size")
            < w.info_json("img/base.qcow2")["actual-size"]
                .as_u64()
                .expect("size")
    };
    assert!(own("img/web-1.qcow2") && own("q/web-1.qcow2"));

    // clone: a new overlay over the base, reading as the base.
    let created = run_job(
        &mut conn,
        "clone-1",
        JobOp::Clone {
            base: w.path("img/base.qcow2"),
            new: w.path("img/web-3.qcow2"),
        },
    );
    assert_eq!(created, Some(w.path("img/web-3.qcow2")));
    let info = w.info_json("img/web-3.qcow2");
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    w.same_view("img/web-3.qcow2", "img/base.qcow2")
        .expect("clone reads as its base");

    // convert: the same guest view as qemu-img convert's, compressed.
    run_job(
        &mut conn,
        "convert-1",
        JobOp::Convert {
            src: w.path("img/web-1-1.qcow2"),
            dst: w.path("img/flat.qcow2"),
            format: "qcow2".into(),
            compress: true,
            cluster_size: None,
            compression_type: None,
            backing: None,
            backing_format: None,
        },
    );
    w.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "img/web-1-1.qcow2",
        "q/flat.qcow2",
    ]);
    w.same_view("img/flat.qcow2", "q/flat.qcow2")
        .expect("convert");
    assert_eq!(w.check_code("img/flat.qcow2"), 0);
    assert_eq!(
        w.info_json("img/flat.qcow2")["backing-filename"],
        Value::Null
    );

    // rebase (flatten): standalone, same view as before.
    w.copy("img/web-2.qcow2", "q/web-2-before.qcow2");
    run_job(
        &mut conn,
        "rebase-1",
        JobOp::Rebase {
            image: w.path("img/web-2.qcow2"),
            backing: String::new(),
            backing_format: None,
            unsafe_header_only: false,
        },
    );
    assert_eq!(
        w.info_json("img/web-2.qcow2")["backing-filename"],
        Value::Null
    );
    w.same_view("img/web-2.qcow2", "img/base.qcow2")
        .expect("flattened web-2 reads as its old base");

    // move and delete: the clone moved (dependents none), then trashed.
    let moved = run_job(
        &mut conn,
        "move-1",
        JobOp::Move {
            src: w.path("img/web-3.qcow2"),
            dst: w.path("img/web-3b.qcow2"),
            roots: vec![w.path("img")],
        },
    );
    assert_eq!(moved, Some(w.path("img/web-3b.qcow2")));
    assert!(!w.path("img/web-3.qcow2").exists());
    run_job(
        &mut conn,
        "delete-1",
        JobOp::Delete {
            paths: vec![w.path("img/web-3b.qcow2")],
            trash: true,
        },
    );
    assert!(!w.path("img/web-3b.qcow2").exists());

    // A refusal comes back as the engine says it, nothing changed: the
    // base has dependents.
    conn.send(&Request::Job {
        id: "delete-2".into(),
        op: JobOp::Delete {
            paths: vec![w.path("img/base.qcow2")],
            trash: false,
        },
    })
    .expect("send");
    let (state, message, _) = finish(&mut conn, "delete-2");
    assert_eq!(state, WireJobState::Failed);
    assert!(
        message.is_some_and(|m| m.contains("web-1")),
        "refusal names a dependent"
    );
    assert!(w.path("img/base.qcow2").exists());

    // An id is never run twice.
    conn.send(&Request::Job {
        id: "commit-1".into(),
        op: JobOp::Commit {
            image: w.path("img/web-1.qcow2"),
            keep_top: false,
        },
    })
    .expect("send");
    let (state, message, _) = finish(&mut conn, "commit-1");
    assert_eq!(state, WireJobState::Failed);
    assert!(message.is_some_and(|m| m.contains("already submitted")));
}

/// Wait until `file` holds `line` (a fault trace reaching a point).
fn wait_for_line(file: &Path, line: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    while !std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .any(|l| l == line)
    {
        assert!(
            Instant::now() < deadline,
            "{} never said {line}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_connection_mid_job_reports_the_outcome_on_reconnect() {
    let w = Work::new("remote-kill");
    let Some(sshd) = Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    fleet(&w);
    w.mkdir("q");
    for f in ["base.qcow2", "web-1.qcow2"] {
        w.copy(&format!("img/{f}"), &format!("q/{f}"));
    }
    let trace = w.path("fault.trace");
    let release = w.path("fault.release");
    let (trace_s, release_s) = (trace.display().to_string(), release.display().to_string());
    let remote = sshd.remote_command(&[
        ("COWSHED_FAULT", "commit.copied:2:pause"),
        ("COWSHED_FAULT_RELEASE", &release_s),
        ("COWSHED_FAULT_TRACE", &trace_s),
    ]);
    let opts = options(&sshd, remote);
    let mut conn = Connection::open("host1", &opts).expect("connect");
    conn.send(&Request::Job {
        id: "kill-commit".into(),
        op: JobOp::Commit {
            image: w.path("img/web-1.qcow2"),
            keep_top: false,
        },
    })
    .expect("send");
    // The commit is held after its second extent: cut the connection
    // there, at its control master (the one TCP connection).
    wait_for_line(&trace, "commit.copied 2");
    let master = sshd.master_pid("host1").expect("a control master");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the connection");
    let lost = loop {
        match conn.recv_timeout(HANG_GUARD) {
            Err(e) => break e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the connection did not end"),
        }
    };
    assert!(matches!(lost, RemoteError::Lost { .. }), "{lost}");
    drop(conn);

    // Reconnect: the job is still running in the first agent.
    let mut again = Connection::open("host1", &opts).expect("reconnect");
    again
        .send(&Request::Outcome {
            id: "kill-commit".into(),
        })
        .expect("send");
    let first = loop {
        if let Some(r @ Reply::JobState { .. }) =
            again.recv_timeout(HANG_GUARD).expect("connection")
        {
            break r;
        }
    };
    assert!(
        matches!(
            &first,
            Reply::JobState {
                state: WireJobState::Running,
                ..
            }
        ),
        "{first:?}"
    );
    // Let it go on: its outcome comes over the new connection.
    std::fs::write(&release, b"").expect("release");
    let (state, message, _) = finish(&mut again, "kill-commit");
    assert_eq!(state, WireJobState::Done, "{message:?}");
    // Run once, not retried: the commit's last step passed once.
    let t = common::fault::Trace::read(&trace);
    assert_eq!(t.hits("commit.emptied"), 1, "{t:?}");
    w.qemu_img(&["commit", "-q", "q/web-1.qcow2"]);
    w.same_view("img/base.qcow2", "q/base.qcow2")
        .expect("base as after qemu-img commit");
    w.same_view("img/web-1.qcow2", "q/web-1.qcow2")
        .expect("overlay as after qemu-img commit");
    assert_eq!(w.check_code("img/base.qcow2"), 0);
    assert_eq!(w.check_code("img/web-1.qcow2"), 0);

    // A job whose agent died before it ended is reported lost, and not
    // run again.
    let state_dir = sshd.dir().join("state/agent-jobs");
    std::fs::write(
        state_dir.join("ghost.json"),
        "{\"id\":\"ghost\",\"kind\":\"commit\",\"state\":\"running\",\"message\":null,\
         \"created\":null,\"progress\":{\"done\":0,\"total\":0,\"copied\":0},\"pid\":999999999}",
    )
    .expect("ghost record");
    again
        .send(&Request::Outcome { id: "ghost".into() })
        .expect("send");
    let (state, message, _) = finish(&mut again, "ghost");
    assert_eq!(state, WireJobState::Lost);
    assert!(message.is_some_and(|m| m.contains("not run again")));
}

#[test]
fn live_sizes_and_new_images_come_over_the_connection() {
    let w = Work::new("remote-live");
    let Some(sshd) = Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    let img = fleet(&w);
    let mut conn =
        Connection::open("host1", &options(&sshd, sshd.remote_command(&[]))).expect("connect");
    conn.send(&Request::Watch {
        roots: vec![img.clone()],
        live: true,
    })
    .expect("send");
    let first = loop {
        if let Some(Reply::Snapshot { nodes, .. }) =
            conn.recv_timeout(HANG_GUARD).expect("connection")
        {
            break nodes;
        }
    };
    assert_eq!(first.len(), 6);
    let key = std::fs::canonicalize(w.path("img/web-2.qcow2")).expect("key");
    w.io("qcow2", "img/web-2.qcow2", &["write -P 0x33 8M 4M".into()]);
    let want = std::fs::metadata(w.path("img/web-2.qcow2"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .expect("stat");
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        assert!(Instant::now() < deadline, "no size update for web-2");
        if let Some(Reply::Sizes { key: k, sizes }) = conn
            .recv_timeout(Duration::from_secs(1))
            .expect("connection")
        {
            if k == key && sizes.allocated == want {
                break;
            }
        }
    }
    w.create(
        "img/web-4.qcow2",
        "qcow2",
        "",
        Some(("base.qcow2", "qcow2")),
        64 * MIB,
    );
    // New images and header changes come as changes against the forest
    // sent, never the whole forest again.
    let snapshot_bytes = encode(&Reply::Snapshot {
        nodes: first.clone(),
        errors: Vec::new(),
    })
    .len();
    let mut forest = cowshed::remote::client::grafts("host1", first).expect("records");
    let canon = |f: &str| std::fs::canonicalize(w.path(f)).expect("canonical");
    let mut next_changes = |conn: &mut Connection, what: &str| loop {
        match conn.recv_timeout(HANG_GUARD).expect("connection") {
            Some(Reply::Snapshot { .. }) => panic!("{what}: the whole forest was sent again"),
            Some(reply @ Reply::Changes { .. }) => {
                let bytes = encode(&reply).len();
                let Reply::Changes { nodes, removed, .. } = reply else {
                    unreachable!()
                };
                let keys: Vec<PathBuf> = nodes.iter().map(|n| n.image.key.clone()).collect();
                let parents: Vec<Option<PathBuf>> =
                    nodes.iter().map(|n| n.parent.clone()).collect();
                cowshed::remote::client::apply_changes(
                    "host1",
                    &mut forest,
                    nodes,
                    removed.clone(),
                )
                .expect("applies");
                break (keys, parents, removed, bytes);
            }
            Some(_) => {}
            None => panic!("{what}: no changes"),
        }
    };
    // The file may be seen while qemu-img still writes it: changes come
    // until it is whole; each names web-4 alone.
    let web4 = canon("img/web-4.qcow2");
    loop {
        let (keys, parents, removed, bytes) = next_changes(&mut conn, "web-4 appearing");
        assert_eq!(keys, vec![web4.clone()]);
        assert!(removed.is_empty());
        assert!(
            bytes * 3 < snapshot_bytes,
            "a change of {bytes} bytes, the forest {snapshot_bytes}"
        );
        if parents == vec![Some(canon("img/base.qcow2"))] {
            break;
        }
    }
    // A header rewritten: web-1-1 loses its backing.
    w.qemu_img(&["rebase", "-u", "-b", "", "img/web-1-1.qcow2"]);
    loop {
        let (keys, parents, _, _) = next_changes(&mut conn, "web-1-1's header");
        assert_eq!(keys, vec![canon("img/web-1-1.qcow2")]);
        if parents == vec![None] {
            break;
        }
    }
    let web2 = canon("img/web-2.qcow2");
    std::fs::remove_file(&web2).expect("rm");
    loop {
        let (_, _, removed, _) = next_changes(&mut conn, "web-2 gone");
        if removed == vec![web2.clone()] {
            break;
        }
    }
    // What the client built from the changes is the forest a new scan
    // finds there.
    let shape = |g: &cowshed::remote::client::Grafts| {
        let mut s: Vec<(PathBuf, Option<PathBuf>, usize)> = g
            .iter()
            .map(|(r, p, f)| (r.key.clone(), p.map(|p| g[p].0.key.clone()), f.len()))
            .collect();
        s.sort();
        s
    };
    let (fresh, _) = cowshed::remote::client::fetch_forest(
        "host1",
        std::slice::from_ref(&img),
        &options(&sshd, sshd.remote_command(&[])),
    )
    .expect("forest");
    assert_eq!(shape(&forest), shape(&fresh));
}

/// The local job pool runs a remote job as a proxy: progress comes over
/// the connection, a cancel goes back, the outcome is the agent's.
#[test]
fn remote_jobs_in_the_local_pool_report_progress_and_cancel() {
    use cowshed::jobs::{JobEvent, JobState, Jobs};
    let w = Work::new("remote-pool");
    let Some(sshd) = Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    fleet(&w);
    w.mkdir("q");
    for f in ["base.qcow2", "web-1.qcow2"] {
        w.copy(&format!("img/{f}"), &format!("q/{f}"));
    }
    let trace = w.path("fault.trace");
    let release = w.path("fault.release");
    let (trace_s, release_s) = (trace.display().to_string(), release.display().to_string());
    let held = options(
        &sshd,
        sshd.remote_command(&[
            ("COWSHED_FAULT", "commit.copied:1:pause"),
            ("COWSHED_FAULT_RELEASE", &release_s),
            ("COWSHED_FAULT_TRACE", &trace_s),
        ]),
    );
    let (tx, rx) = crossbeam_channel::unbounded::<JobEvent>();
    let mut pool = Jobs::new(1, tx);
    let commit = JobOp::Commit {
        image: w.path("img/web-1.qcow2"),
        keep_top: false,
    };
    let id = pool.submit(
        vec![],
        cowshed::remote::client::remote_work("host1".into(), held, commit.clone(), Vec::new()),
    );
    wait_for_line(&trace, "commit.copied 1");
    // Held after its first extent: the progress is known here.
    let deadline = Instant::now() + HANG_GUARD;
    while pool.progress(id).is_none_or(|p| p.total == 0) {
        assert!(Instant::now() < deadline, "no progress came over");
        std::thread::sleep(Duration::from_millis(20));
    }
    pool.cancel(id);
    // Released once the agent has the cancel: the commit stops at its
    // next check.
    wait_for_line(&trace, "agent.cancel_passed_on 1");
    std::fs::write(&release, b"").expect("release");
    let end = loop {
        let e = rx.recv_timeout(HANG_GUARD).expect("job event");
        if e.id == id && e.state.is_finished() {
            break e;
        }
    };
    assert_eq!(end.state, JobState::Cancelled);
    // A cancelled commit leaves the overlay as it was (the base may hold
    // copied data the overlay still covers).
    w.same_view("img/web-1.qcow2", "q/web-1.qcow2")
        .expect("overlay unchanged by a cancelled commit");
    assert_eq!(w.check_code("img/base.qcow2"), 0);
    assert_eq!(w.check_code("img/web-1.qcow2"), 0);

    // Run again, to its end, without a fault plan.
    let plain = options(&sshd, sshd.remote_command(&[]));
    let id = pool.submit(
        vec![],
        cowshed::remote::client::remote_work("host1".into(), plain, commit, Vec::new()),
    );
    let end = loop {
        let e = rx.recv_timeout(HANG_GUARD).expect("job event");
        if e.id == id && e.state.is_finished() {
            break e;
        }
    };
    assert_eq!(end.state, JobState::Done);
    assert_eq!(end.progress.total, 64 * MIB);
    w.same_view("img/base.qcow2", "q/web-1.qcow2")
        .expect("the base reads as the overlay did");
}

/// A libvirt test-driver node (no daemon: `test:///PATH` reads it on every
/// connection) with one domain whose disk is `disk`.
fn test_node(w: &Work, disk: &Path) -> String {
    let xml = format!(
        "<node><domain type='test'><name>guard-vm</name>\
         <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory>\
         <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
         <source file='{}'/><target dev='vda'/></disk></devices></domain></node>",
        disk.display()
    );
    // Replaced whole, never seen half written.
    let tmp = w.path("node.xml.new");
    std::fs::write(&tmp, xml).expect("node xml");
    std::fs::rename(&tmp, w.path("node.xml")).expect("node xml");
    format!("test://{}", w.path("node.xml").display())
}

/// An sshd whose `host1` has its own cowshed config (as another machine
/// would): its agent reads the libvirt test node, host2's does not.
fn sshd_with_vms_on_host1(w: &Work, uri: &str) -> Option<Sshd> {
    w.mkdir("host1-config/cowshed");
    w.write_file(
        "host1-config/cowshed/config.toml",
        format!("libvirt = [\"{uri}\"]\n").as_bytes(),
    );
    let config = w.path("host1-config").display().to_string();
    Sshd::start_or_skip(
        &["host1", "host2"],
        &[("host1", "XDG_CONFIG_HOME", &config)],
    )
}

fn image<'a>(doc: &'a Value, filename: &str) -> &'a Value {
    doc["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["filename"] == filename)
        .unwrap_or_else(|| panic!("{filename} not in {doc:#}"))
}

/// The agent reads its own host's domains and sends, per image, the ones
/// that use it (again when they change); the details pane's facts of a
/// remote image are computed there and agree with qemu-img.
#[test]
fn remote_images_bring_their_domains_and_details() {
    let w = Work::new("remote-vms");
    let img = fleet(&w);
    let uri = test_node(&w, &img.join("web-2.qcow2"));
    let Some(sshd) = sshd_with_vms_on_host1(&w, &uri) else {
        return;
    };
    let remote = sshd.remote_command(&[]);
    let dir = img.display().to_string();
    let tree = cowshed_env(
        &sshd,
        &remote,
        &["tree", "--output", "json", &format!("host1:{dir}")],
    );
    assert!(tree.ok(), "{tree}");
    let doc = w.json(&tree);
    let web2 = image(&doc, &format!("host1:{dir}/web-2.qcow2"));
    assert_eq!(
        web2["used-by-vms"],
        serde_json::json!([{
            "name": "guard-vm",
            "uuid": "6695eb01-f6a4-8304-79aa-97f2502e193f",
            "state": "running",
            "connection": uri,
        }]),
        "{web2:#}"
    );
    for other in ["base.qcow2", "web-1.qcow2", "web-1-1.qcow2"] {
        let i = image(&doc, &format!("host1:{dir}/{other}"));
        assert_eq!(i["used-by-vms"], serde_json::json!([]), "{other}");
    }
    // host2's agent reads its own (default) connections, not host1's.
    let tree2 = cowshed_env(
        &sshd,
        &remote,
        &["tree", "--output", "json", &format!("host2:{dir}")],
    );
    assert!(tree2.ok(), "{tree2}");
    let doc2 = w.json(&tree2);
    assert_eq!(
        image(&doc2, &format!("host2:{dir}/web-2.qcow2"))["used-by-vms"],
        serde_json::json!([])
    );

    // The details of web-1, computed by host1's agent.
    let mut conn = Connection::open("host1", &options(&sshd, remote.clone())).expect("connect");
    let web1 = img.join("web-1.qcow2");
    let d = cowshed::remote::client::fetch_details(&mut conn, &web1).expect("details");
    assert_eq!(d.chain, vec![web1.clone(), img.join("base.qcow2")]);
    assert_eq!(d.chain_error, None);
    let info = d.info.expect("info").into_info().expect("known names");
    let qemu = w.info_json("img/web-1.qcow2");
    assert_eq!(
        Some(info.virtual_size),
        qemu["virtual-size"].as_u64(),
        "{qemu:#}"
    );
    assert_eq!(
        info.qcow2.as_ref().map(|q| q.cluster_size),
        qemu["cluster-size"].as_u64()
    );
    // Each layer's share, as qemu-img map says it.
    let mut served = vec![0u64; 2];
    let mut empty = 0;
    for e in w.map_json("img/web-1.qcow2") {
        let len = e["length"].as_u64().expect("length");
        if e["present"] == true {
            served[e["depth"].as_u64().expect("depth") as usize] += len;
        } else {
            empty += len;
        }
    }
    assert_eq!((d.served, d.empty), (served, empty));
    let missing = cowshed::remote::client::fetch_details(&mut conn, &img.join("nope.qcow2"))
        .expect("an answer");
    assert!(
        missing.info.is_none() && missing.info_error.is_some(),
        "{missing:?}"
    );

    // Live: the domains come after the forest, and again when they change
    // (the agent reads them every 10 s).
    conn.send(&Request::Watch {
        roots: vec![img.clone()],
        live: true,
    })
    .expect("watch");
    let users = |conn: &mut Connection| loop {
        match conn.recv_timeout(HANG_GUARD).expect("connection") {
            Some(Reply::Vms { users, .. }) => {
                break users.into_iter().map(|u| u.key).collect::<Vec<PathBuf>>()
            }
            Some(_) => {}
            None => panic!("no vms message"),
        }
    };
    assert_eq!(users(&mut conn), vec![img.join("web-2.qcow2")]);
    test_node(&w, &img.join("web-1.qcow2"));
    assert_eq!(users(&mut conn), vec![img.join("web-1.qcow2")]);
}

/// Two hosts see one directory (shared storage): every image once, with
/// both hosts; a domain only host1 knows, or a lock, refuses a job sent
/// through host2, and nothing is written.
#[test]
fn shared_storage_is_shown_once_and_guarded_from_every_host() {
    use cowshed::jobs::{JobEvent, JobState, Jobs};
    let w = Work::new("remote-shared");
    let img = fleet(&w);
    let uri = test_node(&w, &img.join("web-2.qcow2"));
    let Some(sshd) = sshd_with_vms_on_host1(&w, &uri) else {
        return;
    };
    let remote = sshd.remote_command(&[]);
    let dir = img.display().to_string();
    let (h1, h2) = (format!("host1:{dir}"), format!("host2:{dir}"));
    // host2 named first: it shows the files and runs their jobs.
    let tree = cowshed_env(&sshd, &remote, &["tree", "--output", "json", &h2, &h1]);
    assert!(tree.ok(), "{tree}");
    let doc = w.json(&tree);
    let images = doc["images"].as_array().expect("images");
    assert_eq!(images.len(), 6, "each file once: {doc:#}");
    for i in images {
        let name = i["filename"].as_str().expect("filename");
        let path = name.strip_prefix("host2:").expect("on host2");
        assert_eq!(i["host"], "host2", "{i:#}");
        assert_eq!(
            i["also-on"],
            serde_json::json!([format!("host1:{path}")]),
            "{i:#}"
        );
    }
    // Only host1 knows the domain; the shared row has it.
    assert_eq!(
        image(&doc, &format!("{h2}/web-2.qcow2"))["used-by-vms"][0]["name"],
        "guard-vm"
    );
    let human = cowshed_env(&sshd, &remote, &["tree", &h2, &h1]);
    assert!(human.ok(), "{human}");
    assert!(
        human
            .stdout
            .contains(&format!("{h2}/web-2.qcow2  also {h1}/web-2.qcow2")),
        "{human}"
    );
    // A local root and a host that see one directory (this machine over
    // ssh): each file once, as this machine's, host1 beside it with its
    // domain.
    let both = cowshed_env(&sshd, &remote, &["tree", "--output", "json", &dir, &h1]);
    assert!(both.ok(), "{both}");
    let doc = w.json(&both);
    let images = doc["images"].as_array().expect("images");
    assert_eq!(images.len(), 6, "each file once: {doc:#}");
    for i in images {
        let name = i["filename"].as_str().expect("filename");
        assert!(i.get("host").is_none_or(|h| h.is_null()), "{i:#}");
        assert_eq!(
            i["also-on"],
            serde_json::json!([format!("host1:{name}")]),
            "{i:#}"
        );
    }
    assert_eq!(
        image(&doc, &format!("{dir}/web-2.qcow2"))["used-by-vms"][0]["name"],
        "guard-vm"
    );

    // The forest as the TUI builds it, and the peers of a commit of web-2
    // (it writes into base too).
    let ssh = options(&sshd, remote.clone());
    let mut forest = cowshed::catalog::Forest::default();
    for host in ["host2", "host1"] {
        let (nodes, errors) =
            cowshed::remote::client::fetch_forest(host, std::slice::from_ref(&img), &ssh)
                .expect("forest");
        assert!(errors.is_empty(), "{errors:?}");
        forest.graft(nodes);
    }
    assert_eq!(forest.nodes.len(), 6);
    let web2 = forest
        .get(Path::new(&format!("{h2}/web-2.qcow2")))
        .expect("web-2");
    let chain: Vec<&cowshed::catalog::ImageRecord> = forest
        .chain(web2)
        .into_iter()
        .map(|id| &forest.nodes[id].record)
        .collect();
    let peers = cowshed::remote::client::peers(chain);
    assert_eq!(
        peers,
        vec![(
            "host1".to_string(),
            vec![img.join("web-2.qcow2"), img.join("base.qcow2")]
        )]
    );
    let before: Vec<Vec<u8>> = ["web-2.qcow2", "base.qcow2", "web-1.qcow2"]
        .iter()
        .map(|f| w.read_file(&format!("img/{f}")))
        .collect();
    let (tx, rx) = crossbeam_channel::unbounded::<JobEvent>();
    let mut pool = Jobs::new(1, tx);
    let mut run = |op: JobOp, peers| {
        let id = pool.submit(
            vec![],
            cowshed::remote::client::remote_work("host2".into(), ssh.clone(), op, peers),
        );
        loop {
            let e = rx.recv_timeout(HANG_GUARD).expect("job event");
            if e.id == id && e.state.is_finished() {
                break e.state;
            }
        }
    };
    // host2's own agent sees no domain: only host1's answer refuses.
    for op in [
        JobOp::Commit {
            image: img.join("web-2.qcow2"),
            keep_top: false,
        },
        JobOp::Delete {
            paths: vec![img.join("web-2.qcow2")],
            trash: false,
        },
    ] {
        match run(op.clone(), peers.clone()) {
            JobState::Failed(m) => assert!(
                m.contains("domain guard-vm (running") && m.contains("on host1"),
                "{op:?}: {m}"
            ),
            other => panic!("{op:?} was not refused: {other:?}"),
        }
    }
    // A writer on the shared file (qemu-io here, seen by both hosts).
    let holder = w.hold_writer("img/web-1.qcow2", "qcow2");
    let tree = cowshed_env(&sshd, &remote, &["tree", "--output", "json", &h2, &h1]);
    let doc = w.json(&tree);
    let web1 = image(&doc, &format!("{h2}/web-1.qcow2"));
    assert_eq!(web1["lock-state"], "writer", "{web1:#}");
    assert!(
        web1["holders"]
            .as_array()
            .is_some_and(|h| h.iter().any(|h| h["command"] == "qemu-io")),
        "{web1:#}"
    );
    let web1_peers = vec![("host1".to_string(), vec![img.join("web-1.qcow2")])];
    match run(
        JobOp::Delete {
            paths: vec![img.join("web-1.qcow2")],
            trash: false,
        },
        web1_peers,
    ) {
        JobState::Failed(m) => assert!(
            m.contains("held by qemu-io") && m.contains("on host1"),
            "{m}"
        ),
        other => panic!("a delete of a held image was not refused: {other:?}"),
    }
    common::release_holder(holder);
    let after: Vec<Vec<u8>> = ["web-2.qcow2", "base.qcow2", "web-1.qcow2"]
        .iter()
        .map(|f| w.read_file(&format!("img/{f}")))
        .collect();
    assert!(before == after, "a refused job changed a file");
}

/// Ask the agent for `image`'s snapshots and bitmaps.
fn list(conn: &mut Connection, id: &str, image: &Path) -> Result<WireListing, String> {
    conn.send(&Request::List {
        id: id.into(),
        image: image.to_path_buf(),
    })
    .expect("send list");
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        assert!(Instant::now() < deadline, "no listing {id}");
        if let Some(Reply::Listing {
            id: got,
            listing,
            error,
        }) = conn
            .recv_timeout(Duration::from_secs(1))
            .expect("connection")
        {
            if got == id {
                return listing.ok_or_else(|| error.unwrap_or_default());
            }
        }
    }
}

/// A job that must fail; its message.
fn refused(conn: &mut Connection, id: &str, op: JobOp) -> String {
    conn.send(&Request::Job { id: id.into(), op })
        .expect("send job");
    let (state, message, _) = finish(conn, id);
    assert_eq!(state, WireJobState::Failed, "job {id}: {message:?}");
    message.unwrap_or_default()
}

/// `qemu-img info`'s snapshots, without the times (taken apart).
fn snapshot_rows(w: &Work, img: &str) -> Vec<(String, String, u64, u64)> {
    w.info_json(img)["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap_or_default().to_string(),
                        s["name"].as_str().unwrap_or_default().to_string(),
                        s["vm-state-size"].as_u64().unwrap_or(u64::MAX),
                        s["vm-clock-nsec"].as_u64().unwrap_or(u64::MAX),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `qemu-img info`'s bitmaps: name, granularity, flags.
fn bitmap_rows(w: &Work, img: &str) -> Value {
    w.info_json(img)["format-specific"]["data"]["bitmaps"].clone()
}

/// Internal snapshots, bitmaps, reset and convert's options, each run by
/// the agent with the engine function the local path uses, and compared
/// with qemu-img doing the same on a twin copy; the listing the dialogs
/// show compared with `qemu-img info`; refusals come back in the engine's
/// words.
#[test]
fn snapshots_bitmaps_reset_and_convert_options_by_the_agent_match_qemu_img() {
    let w = Work::new("remote-v2");
    let Some(sshd) = Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    fleet(&w);
    w.mkdir("q");
    for f in ["base.qcow2", "web-1.qcow2", "web-1-1.qcow2"] {
        w.copy(&format!("img/{f}"), &format!("q/{f}"));
    }
    w.io(
        "qcow2",
        "img/web-1-1.qcow2",
        &["write -P 0x41 5M 2M".into()],
    );
    w.io("qcow2", "q/web-1-1.qcow2", &["write -P 0x41 5M 2M".into()]);
    let mut conn =
        Connection::open("host1", &options(&sshd, sshd.remote_command(&[]))).expect("connect");

    // convert with every option: 128 KiB clusters, zstd, compressed,
    // keeping the backing (-B); qemu-img convert the same on the twin.
    run_job(
        &mut conn,
        "convert-opts",
        JobOp::Convert {
            src: w.path("img/web-1-1.qcow2"),
            dst: w.path("img/conv.qcow2"),
            format: "qcow2".into(),
            compress: true,
            cluster_size: Some(128 * 1024),
            compression_type: Some("zstd".into()),
            backing: Some("web-1.qcow2".into()),
            backing_format: Some("qcow2".into()),
        },
    );
    w.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=131072,compression_type=zstd",
        "-B",
        "web-1.qcow2",
        "-F",
        "qcow2",
        "q/web-1-1.qcow2",
        "q/conv.qcow2",
    ]);
    let (ours, theirs) = (w.info_json("img/conv.qcow2"), w.info_json("q/conv.qcow2"));
    for field in [
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
    ] {
        assert_eq!(ours[field], theirs[field], "{field}");
    }
    assert_eq!(
        ours["format-specific"]["data"]["compression-type"],
        theirs["format-specific"]["data"]["compression-type"]
    );
    assert_eq!(ours["format-specific"]["data"]["compression-type"], "zstd");
    w.same_view("img/conv.qcow2", "img/web-1-1.qcow2")
        .expect("converted reads as its source");
    w.same_view("img/conv.qcow2", "q/conv.qcow2")
        .expect("as qemu-img's convert");
    assert_eq!(w.check_code("img/conv.qcow2"), 0);
    // Only the data above the kept backing is copied, as by qemu-img.
    assert_eq!(
        w.map_json("img/conv.qcow2")
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .count(),
        w.map_json("q/conv.qcow2")
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .count()
    );

    // snapshots: create, write on, apply, delete, against qemu-img snapshot.
    let img = w.path("img/web-1.qcow2");
    let empty = list(&mut conn, "list-0", &img).expect("listing");
    assert_eq!(
        (empty.version, empty.snapshots.len(), empty.bitmaps.len()),
        (3, 0, 0)
    );
    let snapshot = |conn: &mut Connection, id: &str, action: SnapshotAction| {
        run_job(
            conn,
            id,
            JobOp::Snapshot {
                image: img.clone(),
                action,
            },
        )
    };
    snapshot(
        &mut conn,
        "snap-c",
        SnapshotAction::Create {
            name: "before".into(),
        },
    );
    w.qemu_img(&["snapshot", "-c", "before", "q/web-1.qcow2"]);
    assert_eq!(
        snapshot_rows(&w, "img/web-1.qcow2"),
        snapshot_rows(&w, "q/web-1.qcow2")
    );
    let listed = list(&mut conn, "list-1", &img).expect("listing");
    let info = w.info_json("img/web-1.qcow2");
    let qemu_snaps = info["snapshots"].as_array().expect("snapshots");
    assert_eq!(listed.snapshots.len(), 1);
    assert_eq!(
        listed.snapshots[0].id,
        qemu_snaps[0]["id"].as_str().expect("id")
    );
    assert_eq!(listed.snapshots[0].name, "before");
    assert_eq!(
        u64::from(listed.snapshots[0].date_sec),
        qemu_snaps[0]["date-sec"].as_u64().expect("date")
    );
    for f in ["img/web-1.qcow2", "q/web-1.qcow2"] {
        w.io("qcow2", f, &["write -P 0x55 2M 3M".into()]);
    }
    snapshot(
        &mut conn,
        "snap-a",
        SnapshotAction::Apply { id: "1".into() },
    );
    w.qemu_img(&["snapshot", "-a", "1", "q/web-1.qcow2"]);
    w.same_view("img/web-1.qcow2", "q/web-1.qcow2")
        .expect("applied as qemu-img applies");
    w.same_view("img/web-1.qcow2", "img/web-1-1.qcow2")
        .expect_err("the write after the snapshot is gone");
    assert_eq!(w.check_code("img/web-1.qcow2"), 0);
    snapshot(
        &mut conn,
        "snap-d",
        SnapshotAction::Delete { id: "1".into() },
    );
    w.qemu_img(&["snapshot", "-d", "before", "q/web-1.qcow2"]);
    let l = |f: &str| w.qemu_img(&["snapshot", "-l", f]).stdout;
    assert_eq!(l("img/web-1.qcow2"), l("q/web-1.qcow2"));
    assert!(snapshot_rows(&w, "img/web-1.qcow2").is_empty());
    w.check_clean("img/web-1.qcow2")
        .expect("clean after delete");

    // bitmaps: add (one with a granularity), disable, merge, clear,
    // enable, remove, against qemu-img bitmap.
    let steps: Vec<(&str, BitmapAction, Vec<&str>)> = vec![
        ("b0", BitmapAction::Add { granularity: None }, vec!["--add"]),
        (
            "b1",
            BitmapAction::Add {
                granularity: Some(128 * 1024),
            },
            vec!["--add", "-g", "131072"],
        ),
        ("b1", BitmapAction::Disable, vec!["--disable"]),
        (
            "b1",
            BitmapAction::Merge { from: "b0".into() },
            vec!["--merge", "b0"],
        ),
        ("b0", BitmapAction::Clear, vec!["--clear"]),
        ("b1", BitmapAction::Enable, vec!["--enable"]),
        ("b0", BitmapAction::Remove, vec!["--remove"]),
    ];
    for (i, (name, action, qemu)) in steps.into_iter().enumerate() {
        let verb = action.verb();
        run_job(
            &mut conn,
            &format!("bitmap-{i}"),
            JobOp::Bitmap {
                image: img.clone(),
                name: name.into(),
                action,
            },
        );
        let mut args = vec!["bitmap"];
        args.extend(qemu);
        args.extend(["q/web-1.qcow2", name]);
        w.qemu_img(&args);
        assert_eq!(
            bitmap_rows(&w, "img/web-1.qcow2"),
            bitmap_rows(&w, "q/web-1.qcow2"),
            "after {verb} {name}"
        );
        w.check_clean("img/web-1.qcow2")
            .unwrap_or_else(|e| panic!("after {verb} {name}: {e}"));
        // The listing the dialog shows is what qemu-img sees.
        let listed = list(&mut conn, &format!("list-b{i}"), &img).expect("listing");
        let qemu = bitmap_rows(&w, "img/web-1.qcow2");
        let qemu = qemu.as_array().cloned().unwrap_or_default();
        assert_eq!(listed.bitmaps.len(), qemu.len(), "after {verb} {name}");
        for (b, q) in listed.bitmaps.iter().zip(&qemu) {
            assert_eq!(b.name, q["name"].as_str().expect("name"));
            assert_eq!(b.granularity, q["granularity"].as_u64().expect("g"));
            let flags: Vec<&str> = q["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(b.auto, flags.contains(&"auto"), "{} {flags:?}", b.name);
            assert_eq!(b.in_use, flags.contains(&"in-use"), "{} {flags:?}", b.name);
        }
    }

    // reset: web-2 gets data of its own, then a fresh overlay on the same
    // backing replaces it, as `qemu-img create -b` makes one.
    w.io("qcow2", "img/web-2.qcow2", &["write -P 0x66 0 2M".into()]);
    run_job(
        &mut conn,
        "reset-1",
        JobOp::Reset {
            image: w.path("img/web-2.qcow2"),
            roots: vec![w.path("img")],
        },
    );
    w.create(
        "q/fresh.qcow2",
        "qcow2",
        "",
        Some(("../img/base.qcow2", "qcow2")),
        64 * MIB,
    );
    w.same_view("img/web-2.qcow2", "q/fresh.qcow2")
        .expect("reset reads as a fresh overlay");
    let (ours, fresh) = (w.info_json("img/web-2.qcow2"), w.info_json("q/fresh.qcow2"));
    assert_eq!(ours["backing-filename"], "base.qcow2");
    for field in ["virtual-size", "cluster-size", "backing-filename-format"] {
        assert_eq!(ours[field], fresh[field], "{field}");
    }
    // Nothing of its own: every extent comes from the base, as in the
    // fresh overlay.
    assert_eq!(w.map_json("img/web-2.qcow2"), w.map_json("q/fresh.qcow2"));
    assert_eq!(w.check_code("img/web-2.qcow2"), 0);

    // Refusals in the engine's words, nothing changed: a reset of an
    // image with bitmaps (and dependents), a snapshot of an image a QEMU
    // writes, a listing of a raw disk.
    let kept = std::fs::read(w.path("img/web-1.qcow2")).expect("read");
    let why = refused(
        &mut conn,
        "reset-2",
        JobOp::Reset {
            image: w.path("img/web-1.qcow2"),
            roots: vec![w.path("img")],
        },
    );
    assert!(why.contains("persistent bitmaps"), "{why}");
    assert_eq!(
        std::fs::read(w.path("img/web-1.qcow2")).expect("read"),
        kept
    );
    let before = std::fs::read(w.path("img/web-2.qcow2")).expect("read");
    let holder = w.hold_writer("img/web-2.qcow2", "qcow2");
    let why = refused(
        &mut conn,
        "snap-held",
        JobOp::Snapshot {
            image: w.path("img/web-2.qcow2"),
            action: SnapshotAction::Create { name: "x".into() },
        },
    );
    common::release_holder(holder);
    assert!(why.contains("lock") && why.contains("qemu-io"), "{why}");
    assert_eq!(
        std::fs::read(w.path("img/web-2.qcow2")).expect("read"),
        before
    );
    let why = list(&mut conn, "list-raw", &w.path("img/disk.raw")).expect_err("raw");
    assert!(why.contains("raw"), "{why}");
}

/// The doctor's header fix (an absolute backing name made relative) and
/// protect, run by the agent: the header as `qemu-img rebase -u` leaves
/// a twin, the mode as `cowshed protect` leaves a twin here.
#[test]
fn header_fix_and_protect_by_the_agent() {
    use std::os::unix::fs::PermissionsExt;
    let w = Work::new("remote-fix");
    let Some(sshd) = Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    fleet(&w);
    let base = w.path("img/base.qcow2").display().to_string();
    for f in ["img/abs.qcow2", "img/abs-twin.qcow2"] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", f]);
        w.io("qcow2", f, &["write -P 0x77 3M 1M".into()]);
    }
    let mut conn =
        Connection::open("host1", &options(&sshd, sshd.remote_command(&[]))).expect("connect");
    run_job(
        &mut conn,
        "fix-1",
        JobOp::HeaderFix {
            image: w.path("img/abs.qcow2"),
            fix: HeaderFixKind::MakeBackingNameRelative,
        },
    );
    w.qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img/abs-twin.qcow2",
    ]);
    let (ours, twin) = (
        w.info_json("img/abs.qcow2"),
        w.info_json("img/abs-twin.qcow2"),
    );
    assert_eq!(ours["backing-filename"], "base.qcow2");
    for field in [
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
    ] {
        assert_eq!(ours[field], twin[field], "{field}");
    }
    w.same_view("img/abs.qcow2", "img/abs-twin.qcow2")
        .expect("the guest view is kept");
    assert_eq!(w.check_code("img/abs.qcow2"), 0);

    // protect: the base read-only, then its mode back.
    w.mkdir("t");
    w.copy("img/base.qcow2", "t/base.qcow2");
    w.create(
        "t/vm.qcow2",
        "qcow2",
        "",
        Some(("base.qcow2", "qcow2")),
        64 * MIB,
    );
    let mode = |f: &str| {
        std::fs::metadata(w.path(f))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    };
    for f in ["img/base.qcow2", "t/base.qcow2"] {
        std::fs::set_permissions(w.path(f), std::fs::Permissions::from_mode(0o664)).expect("chmod");
    }
    run_job(
        &mut conn,
        "protect-1",
        JobOp::Protect {
            image: w.path("img/base.qcow2"),
            off: false,
        },
    );
    let here = w.cowshed(&["protect", &w.path("t").display().to_string()]);
    assert!(here.ok(), "{here}");
    assert_eq!(mode("img/base.qcow2"), mode("t/base.qcow2"));
    assert_eq!(mode("img/base.qcow2"), 0o444);
    run_job(
        &mut conn,
        "protect-2",
        JobOp::Protect {
            image: w.path("img/base.qcow2"),
            off: true,
        },
    );
    assert_eq!(mode("img/base.qcow2"), 0o664, "the recorded mode");
}

/// `refresh` reads images again at once and sends what changed: without
/// a live watch nothing else would say that web-2's header changed.
#[test]
fn refresh_reads_the_named_images_again() {
    let w = Work::new("remote-refresh");
    let Some(sshd) = Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    let img = fleet(&w);
    let mut conn =
        Connection::open("host1", &options(&sshd, sshd.remote_command(&[]))).expect("connect");
    conn.send(&Request::Watch {
        roots: vec![img.clone()],
        live: false,
    })
    .expect("send");
    let backing_of = |nodes: &[cowshed::remote::protocol::WireNode]| {
        nodes
            .iter()
            .find(|n| n.image.path.ends_with("web-2.qcow2"))
            .and_then(|n| n.image.summary.as_ref())
            .and_then(|s| s.backing_filename.clone())
    };
    let snapshot = |conn: &mut Connection| {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            assert!(Instant::now() < deadline, "no snapshot came");
            if let Some(Reply::Snapshot { nodes, .. }) = conn
                .recv_timeout(Duration::from_secs(1))
                .expect("connection")
            {
                break nodes;
            }
        }
    };
    let first = snapshot(&mut conn);
    assert_eq!(backing_of(&first).as_deref(), Some("base.qcow2"));
    w.qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "web-1.qcow2",
        "-F",
        "qcow2",
        "img/web-2.qcow2",
    ]);
    conn.send(&Request::Refresh {
        paths: vec![w.path("img/web-2.qcow2")],
    })
    .expect("send");
    // What changed comes over: web-2 with its new header, hung on web-1.
    let deadline = Instant::now() + HANG_GUARD;
    let changed = loop {
        assert!(Instant::now() < deadline, "no changes came");
        if let Some(Reply::Changes { nodes, .. }) = conn
            .recv_timeout(Duration::from_secs(1))
            .expect("connection")
        {
            if let Some(n) = nodes
                .into_iter()
                .find(|n| n.image.path.ends_with("web-2.qcow2"))
            {
                break n;
            }
        }
    };
    assert_eq!(
        changed
            .image
            .summary
            .as_ref()
            .and_then(|s| s.backing_filename.as_deref()),
        Some("web-1.qcow2")
    );
    let web1 = std::fs::canonicalize(w.path("img/web-1.qcow2")).expect("key");
    assert_eq!(changed.parent, Some(web1));
}
