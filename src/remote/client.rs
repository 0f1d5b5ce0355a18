//! The local end: ssh to a host, start `cowshed agent --stdio` there,
//! shake hands, then send [`Request`]s and read [`Reply`]s.
//!
//! ssh is the user's own (`ssh` on the PATH, their keys, agent and
//! `~/.ssh/config`), run with `BatchMode=yes` so that it never asks for a
//! password inside the TUI, and with a control master
//! (`ControlMaster=auto`, a socket per host under a private directory,
//! `ControlPersist`) so that every connection to one host shares one TCP
//! connection. Environment variables adjust it: `COWSHED_SSH_CONFIG` (an
//! ssh config file, `ssh -F`), `COWSHED_REMOTE_COMMAND` (how to start
//! cowshed on the other host; default `cowshed`, which must be on the
//! remote PATH of a non-interactive login) and `COWSHED_SSH_CONTROL_DIR`
//! (where the control sockets go; default `$XDG_RUNTIME_DIR/cowshed-ssh`,
//! else `/tmp/cowshed-ssh-UID`).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError};

use std::collections::HashMap;

use super::protocol::{
    decode, encode, Reply, Request, WireCheck, WireDetails, WireError, WireVmUse, PROTOCOL_VERSION,
};
use crate::catalog::{Flag, ImageRecord};
use crate::engine::preflight::VmUser;

/// How long the ssh connection and the agent's hello may take. Generous:
/// a slow link or a loaded host is not an error; a dead one is.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// ssh itself failed (unknown host, refused, no key accepted).
    #[error("{host}: ssh failed: {message}")]
    Ssh { host: String, message: String },
    /// ssh worked but no agent answered: cowshed is not installed there,
    /// or too old to have the agent.
    #[error("{host}: no cowshed agent answered ({message}); install cowshed there: {install}")]
    NoAgent {
        host: String,
        message: String,
        install: String,
    },
    #[error("{host}: {message}; install the same cowshed there: {install}")]
    Version {
        host: String,
        message: String,
        install: String,
    },
    #[error("{host}: connection lost: {reason}")]
    Lost { host: String, reason: String },
    #[error("{host}: the agent said: {message}")]
    Agent { host: String, message: String },
}

/// How ssh is run.
#[derive(Debug, Clone)]
pub struct SshOptions {
    pub program: PathBuf,
    /// `ssh -F`.
    pub config: Option<PathBuf>,
    /// The command that starts cowshed on the other host (a shell word
    /// list, as ssh passes it to the remote shell).
    pub remote_command: String,
    /// Where the control sockets live (one per host).
    pub control_dir: PathBuf,
}

impl SshOptions {
    pub fn from_env() -> SshOptions {
        let control_dir = std::env::var_os("COWSHED_SSH_CONTROL_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("cowshed-ssh"))
            })
            .unwrap_or_else(|| {
                // SAFETY: getuid has no failure mode.
                let uid = unsafe { libc::getuid() };
                PathBuf::from(format!("/tmp/cowshed-ssh-{uid}"))
            });
        SshOptions {
            program: PathBuf::from("ssh"),
            config: std::env::var_os("COWSHED_SSH_CONFIG").map(PathBuf::from),
            remote_command: std::env::var("COWSHED_REMOTE_COMMAND")
                .unwrap_or_else(|_| "cowshed".into()),
            control_dir,
        }
    }

    /// The command that installs this very cowshed on `host`.
    pub fn install_hint(&self, host: &str) -> String {
        let exe =
            std::env::current_exe().map_or_else(|_| "cowshed".into(), |p| p.display().to_string());
        format!(
            "scp {exe} {host}:/usr/local/bin/cowshed (or set COWSHED_REMOTE_COMMAND to the \
             cowshed there)"
        )
    }

    fn command(&self, host: &str) -> std::io::Result<Command> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.control_dir)?;
        // Control sockets let anyone who can reach them use the connection.
        std::fs::set_permissions(&self.control_dir, std::fs::Permissions::from_mode(0o700))?;
        let mut c = Command::new(&self.program);
        if let Some(cfg) = &self.config {
            c.arg("-F").arg(cfg);
        }
        c.args(["-o", "BatchMode=yes", "-o", "ControlMaster=auto"])
            .arg("-o")
            .arg(format!(
                "ControlPath={}",
                self.control_dir.join("%C").display()
            ))
            .args([
                "-o",
                "ControlPersist=60",
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ServerAliveCountMax=3",
                "-T",
                "--",
                host,
            ])
            .arg(format!("{} agent --stdio", self.remote_command))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(c)
    }
}

/// What the reader thread passes on.
enum Incoming {
    Reply(Box<Reply>),
    /// stdout ended; why, as well as ssh's stderr says it.
    Closed,
}

/// One session with one host's agent.
pub struct Connection {
    pub host: String,
    /// The agent's cowshed version and host name (its hello).
    pub agent_version: String,
    pub agent_host: String,
    child: Child,
    stdin: Option<ChildStdin>,
    incoming: Receiver<Incoming>,
    stderr: Arc<Mutex<Vec<u8>>>,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    closed: Option<String>,
}

impl Connection {
    /// Connect to `host` and shake hands.
    pub fn open(host: &str, ssh: &SshOptions) -> Result<Connection, RemoteError> {
        let ssh_err = |message: String| RemoteError::Ssh {
            host: host.to_string(),
            message,
        };
        let mut child = ssh
            .command(host)
            .and_then(|mut c| c.spawn())
            .map_err(|e| ssh_err(format!("cannot run {}: {e}", ssh.program.display())))?;
        let stdout = child.stdout.take();
        let stderr_pipe = child.stderr.take();
        let (tx, incoming) = unbounded();
        let bytes_in = Arc::new(AtomicU64::new(0));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = stdout {
            let bytes = Arc::clone(&bytes_in);
            let _ = std::thread::Builder::new()
                .name(format!("cowshed-ssh-{host}"))
                .spawn(move || {
                    let mut reader = BufReader::with_capacity(1 << 16, out);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                bytes.fetch_add(n as u64, Ordering::Relaxed);
                                let msg = match decode::<Reply>(&line) {
                                    Ok(r) => r,
                                    Err(message) => Reply::Error { message },
                                };
                                if tx.send(Incoming::Reply(Box::new(msg))).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = tx.send(Incoming::Closed);
                });
        }
        if let Some(mut err) = stderr_pipe {
            let tail = Arc::clone(&stderr);
            let _ = std::thread::Builder::new()
                .name(format!("cowshed-ssh-err-{host}"))
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = err.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                        t.extend_from_slice(&buf[..n]);
                        // Only the end says what went wrong.
                        let excess = t.len().saturating_sub(8192);
                        t.drain(..excess);
                    }
                });
        }
        let stdin = child.stdin.take();
        let mut conn = Connection {
            host: host.to_string(),
            agent_version: String::new(),
            agent_host: String::new(),
            child,
            stdin,
            incoming,
            stderr,
            bytes_in,
            bytes_out: 0,
            closed: None,
        };
        conn.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
        })?;
        match conn.recv_timeout(HANDSHAKE_LIMIT) {
            Ok(Some(Reply::Hello {
                protocol,
                version,
                host: agent_host,
            })) if protocol == PROTOCOL_VERSION => {
                conn.agent_version = version;
                conn.agent_host = agent_host;
                Ok(conn)
            }
            Ok(Some(Reply::Hello {
                protocol, version, ..
            })) => Err(RemoteError::Version {
                host: host.to_string(),
                message: format!(
                    "its cowshed {version} speaks agent protocol {protocol}, this one \
                     {PROTOCOL_VERSION}"
                ),
                install: ssh.install_hint(host),
            }),
            Ok(Some(Reply::Refused { message })) => Err(RemoteError::Version {
                host: host.to_string(),
                message,
                install: ssh.install_hint(host),
            }),
            Ok(Some(other)) => Err(RemoteError::NoAgent {
                host: host.to_string(),
                message: format!("it answered {other:?} to hello"),
                install: ssh.install_hint(host),
            }),
            Ok(None) => Err(ssh_err(format!(
                "no answer within {} s",
                HANDSHAKE_LIMIT.as_secs()
            ))),
            Err(RemoteError::Lost { reason, .. }) => {
                // ssh exits 255 for its own errors; anything else is the
                // remote command's end.
                let code = conn.child.wait().ok().and_then(|s| s.code());
                if code == Some(255) {
                    Err(ssh_err(reason))
                } else {
                    Err(RemoteError::NoAgent {
                        host: host.to_string(),
                        message: format!("`{} agent --stdio`: {reason}", ssh.remote_command),
                        install: ssh.install_hint(host),
                    })
                }
            }
            Err(e) => Err(e),
        }
    }

    pub fn send(&mut self, req: &Request) -> Result<(), RemoteError> {
        let line = encode(req);
        let written = match self.stdin.as_mut() {
            Some(s) => s.write_all(&line).and_then(|()| s.flush()),
            None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        };
        match written {
            Ok(()) => {
                self.bytes_out += line.len() as u64;
                Ok(())
            }
            Err(e) => Err(self.lost(format!("cannot send: {e}"))),
        }
    }

    /// The next message, `None` after `limit` without one; an error when
    /// the connection is gone (its reason from ssh's last words).
    pub fn recv_timeout(&mut self, limit: Duration) -> Result<Option<Reply>, RemoteError> {
        if let Some(reason) = &self.closed {
            return Err(RemoteError::Lost {
                host: self.host.clone(),
                reason: reason.clone(),
            });
        }
        match self.incoming.recv_timeout(limit) {
            Ok(Incoming::Reply(r)) => Ok(Some(*r)),
            Ok(Incoming::Closed) | Err(RecvTimeoutError::Disconnected) => {
                Err(self.lost(String::new()))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
        }
    }

    /// A message taken off `incoming` elsewhere (a `select!` that also
    /// waits on other channels), as [`Connection::recv_timeout`] gives it.
    fn take(&mut self, m: Option<Incoming>) -> Result<Option<Reply>, RemoteError> {
        if let Some(reason) = &self.closed {
            return Err(RemoteError::Lost {
                host: self.host.clone(),
                reason: reason.clone(),
            });
        }
        match m {
            Some(Incoming::Reply(r)) => Ok(Some(*r)),
            Some(Incoming::Closed) | None => Err(self.lost(String::new())),
        }
    }

    /// Bytes of protocol read from the agent so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_out
    }

    /// The process id of the local ssh (tests cut the connection there).
    pub fn ssh_pid(&self) -> u32 {
        self.child.id()
    }

    fn lost(&mut self, context: String) -> RemoteError {
        // ssh's stderr comes in on its own thread: give it a moment to
        // say its last words before they are read.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let said = {
            let t = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
            String::from_utf8_lossy(&t).trim().to_string()
        };
        let mut reason = said
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| "the connection closed".into());
        if !context.is_empty() {
            reason = format!("{context} ({reason})");
        }
        self.closed = Some(reason.clone());
        self.stdin = None;
        RemoteError::Lost {
            host: self.host.clone(),
            reason,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing stdin ends the agent's session (its running jobs go on
        // to their end); the ssh client is ended and reaped here.
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One host's forest as its agent built it, ready for [`Forest::graft`].
pub type Grafts = Vec<(ImageRecord, Option<usize>, Vec<Flag>)>;

/// Turn a snapshot's nodes into records of `host`.
pub fn grafts(host: &str, nodes: Vec<super::protocol::WireNode>) -> Result<Grafts, String> {
    nodes
        .into_iter()
        .map(|n| Ok((n.image.into_record(host)?, n.parent, n.flags)))
        .collect()
}

/// The domains of `host` that use its images, by the images' keys there
/// (`host:/path`), from a `vms` message.
pub type HostVms = HashMap<PathBuf, Vec<VmUser>>;

fn host_vms(host: &str, users: Vec<WireVmUse>) -> HostVms {
    users
        .into_iter()
        .map(|u| {
            (
                remote_path(host, &u.key),
                u.vms.into_iter().map(VmUser::from).collect(),
            )
        })
        .collect()
}

/// A `vms` message's unreadable connections, as errors of `host`.
fn vm_errors(host: &str, unreadable: Vec<WireError>) -> Vec<(PathBuf, String)> {
    unreadable
        .into_iter()
        .map(|e| {
            (
                PathBuf::from(format!("{host}:")),
                format!(
                    "libvirt connection {} could not be read: {}",
                    e.path.display(),
                    e.message
                ),
            )
        })
        .collect()
}

/// Give each grafted record the domains that use it.
pub fn apply_vms(nodes: &mut Grafts, vms: &HostVms) {
    for (r, _, _) in nodes {
        r.vms = vms.get(&r.key).cloned().unwrap_or_default();
    }
}

/// Apply a `changes` message of `host` to its forest as last built:
/// nodes upserted by key, removed ones dropped, parents linked by key.
pub fn apply_changes(
    host: &str,
    forest: &mut Grafts,
    nodes: Vec<super::protocol::WireChange>,
    removed: Vec<PathBuf>,
) -> Result<(), String> {
    let keys: Vec<PathBuf> = forest.iter().map(|(r, _, _)| r.key.clone()).collect();
    let mut by_key: HashMap<PathBuf, (ImageRecord, Option<PathBuf>, Vec<Flag>)> = HashMap::new();
    let mut order: Vec<PathBuf> = Vec::with_capacity(forest.len() + nodes.len());
    for (r, parent, flags) in std::mem::take(forest) {
        let parent = parent.and_then(|p| keys.get(p)).cloned();
        order.push(r.key.clone());
        by_key.insert(r.key.clone(), (r, parent, flags));
    }
    for k in removed {
        by_key.remove(&remote_path(host, &k));
    }
    for n in nodes {
        let record = n.image.into_record(host)?;
        let parent = n.parent.map(|p| remote_path(host, &p));
        if !by_key.contains_key(&record.key) {
            order.push(record.key.clone());
        }
        by_key.insert(record.key.clone(), (record, parent, n.flags));
    }
    order.retain(|k| by_key.contains_key(k));
    let index: HashMap<PathBuf, usize> = order
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), i))
        .collect();
    for k in &order {
        if let Some((r, parent, flags)) = by_key.remove(k) {
            let parent = parent.and_then(|p| index.get(&p).copied());
            forest.push((r, parent, flags));
        }
    }
    Ok(())
}

/// Scan `roots` on `host` once: its forest (with the domains there that
/// use its images) and the errors met there (paths as `host:/path`).
pub fn fetch_forest(
    host: &str,
    roots: &[PathBuf],
    ssh: &SshOptions,
) -> Result<(Grafts, Vec<(PathBuf, String)>), RemoteError> {
    let mut conn = Connection::open(host, ssh)?;
    conn.send(&Request::Watch {
        roots: roots.to_vec(),
        live: false,
    })?;
    let mut forest = None;
    loop {
        match conn.recv_timeout(Duration::from_secs(3600))? {
            Some(Reply::Snapshot { nodes, errors }) => {
                let g = grafts(host, nodes).map_err(|message| RemoteError::Agent {
                    host: host.to_string(),
                    message,
                })?;
                forest = Some((g, remote_errors(host, errors)));
            }
            // The domains follow the forest.
            Some(Reply::Vms { users, unreadable }) => {
                if let Some((mut g, mut errors)) = forest.take() {
                    apply_vms(&mut g, &host_vms(host, users));
                    errors.extend(vm_errors(host, unreadable));
                    return Ok((g, errors));
                }
            }
            Some(Reply::Error { message }) => {
                return Err(RemoteError::Agent {
                    host: host.to_string(),
                    message,
                })
            }
            _ => {}
        }
    }
}

pub fn remote_errors(host: &str, errors: Vec<WireError>) -> Vec<(PathBuf, String)> {
    errors
        .into_iter()
        .map(|e| (remote_path(host, &e.path), e.message))
        .collect()
}

/// `host:/path`, the way a user names a remote file.
pub fn remote_path(host: &str, path: &Path) -> PathBuf {
    PathBuf::from(format!("{host}:{}", path.display()))
}

/// A job id no other client run will pick: this process, the time, a
/// counter.
pub fn new_job_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The internal snapshots and persistent bitmaps of `image` (a path on
/// `host`), as its agent reads them there; `Agent` carries the engine's
/// refusal (not qcow2, unreadable).
pub fn list_on_host(
    host: &str,
    ssh: &SshOptions,
    image: &Path,
) -> Result<super::protocol::WireListing, RemoteError> {
    let mut conn = Connection::open(host, ssh)?;
    let id = new_job_id();
    conn.send(&Request::List {
        id: id.clone(),
        image: image.to_path_buf(),
    })?;
    let agent = |message: String| RemoteError::Agent {
        host: host.to_string(),
        message,
    };
    loop {
        match conn.recv_timeout(HANDSHAKE_LIMIT)? {
            Some(Reply::Listing {
                id: got,
                listing,
                error,
            }) if got == id => {
                return match (listing, error) {
                    (Some(l), _) => Ok(l),
                    (None, e) => Err(agent(e.unwrap_or_else(|| "no listing".into()))),
                }
            }
            Some(Reply::Error { message }) => return Err(agent(message)),
            Some(_) => {}
            None => {
                return Err(agent(format!(
                    "no listing of {} within {} s",
                    image.display(),
                    HANDSHAKE_LIMIT.as_secs()
                )))
            }
        }
    }
}

/// Longest wait between two attempts to reach a host again.
pub const BACKOFF_LIMIT: Duration = Duration::from_secs(30);

/// Work for the local job pool that has `host`'s agent run `op`: the job
/// is sent once; its progress feeds the local [`Progress`], a local
/// cancel is passed on, and a lost connection is reopened (with back-off)
/// to ask for the job's outcome, never to send it again.
///
/// [`Progress`]: crate::engine::Progress
///
/// `peers` are the other hosts that see the files `op` changes (shared
/// storage), with the files' paths there: before the job is sent, each is
/// asked to look at them now, and the job is refused when any reports a
/// lock, a holder or a domain, or cannot be asked (see [`check_peers`]).
pub fn remote_work(
    host: String,
    ssh: SshOptions,
    op: super::protocol::JobOp,
    peers: Peers,
) -> crate::jobs::Work {
    use super::protocol::WireJobState;
    use crate::engine::Error;
    Box::new(move |progress, cancel| {
        let id = new_job_id();
        let name = remote_path(&host, Path::new(op.kind()));
        let fail = |m: String| Error::invalid(&name, m);
        if op.changes_shared_files() {
            check_peers(&peers, &ssh).map_err(fail)?;
        }
        let mut submitted = false;
        let mut cancel_sent = false;
        let mut backoff = Duration::from_secs(1);
        let mut done_so_far = 0u64;
        let mut total_set = 0u64;
        loop {
            let mut conn = match Connection::open(&host, &ssh) {
                Ok(c) => c,
                // Never sent: nothing runs there, say why.
                Err(e) if !submitted => return Err(fail(e.to_string())),
                Err(_) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_LIMIT);
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            let first = if submitted {
                Request::Outcome { id: id.clone() }
            } else {
                Request::Job {
                    id: id.clone(),
                    op: op.clone(),
                }
            };
            if conn.send(&first).is_err() {
                continue;
            }
            submitted = true;
            loop {
                if cancel.is_cancelled() && !cancel_sent {
                    if conn.send(&Request::Cancel { id: id.clone() }).is_err() {
                        break;
                    }
                    cancel_sent = true;
                }
                let reply = match conn.recv_timeout(Duration::from_millis(200)) {
                    Ok(r) => r,
                    Err(_) => break,
                };
                let Some(Reply::JobState {
                    id: got,
                    state,
                    message,
                    progress: p,
                    ..
                }) = reply
                else {
                    continue;
                };
                if got != id {
                    continue;
                }
                if p.total != total_set {
                    progress.set_total(p.total);
                    total_set = p.total;
                }
                if p.done > done_so_far {
                    progress.advance(p.done - done_so_far);
                    done_so_far = p.done;
                }
                let why = || message.clone().unwrap_or_default();
                match state {
                    WireJobState::Queued | WireJobState::Running => {}
                    // What it made comes with the host's next snapshot.
                    WireJobState::Done => return Ok(None),
                    WireJobState::Cancelled => return Err(Error::Cancelled),
                    WireJobState::Failed => return Err(fail(why())),
                    WireJobState::Lost => return Err(fail(format!("lost: {}", why()))),
                }
            }
        }
    })
}

/// What a followed host says, for the local catalog.
#[derive(Debug)]
pub enum HostEvent {
    /// The host's whole forest (keys already the host's).
    Snapshot {
        host: String,
        nodes: Grafts,
        errors: Vec<(PathBuf, String)>,
    },
    Sizes {
        host: String,
        key: PathBuf,
        sizes: crate::catalog::Sizes,
    },
    Modified {
        host: String,
        key: PathBuf,
        mtime: Option<std::time::SystemTime>,
    },
    /// The domains there that use its images (the whole set), and the
    /// connections there that could not be read.
    Vms {
        host: String,
        vms: HostVms,
        errors: Vec<(PathBuf, String)>,
    },
    /// The host cannot be reached now; another try comes after `retry`.
    Down {
        host: String,
        reason: String,
        retry: Duration,
    },
}

/// Keep `host`'s roots in view: connect, watch (live), pass on what the
/// agent says, and pass it the paths `refresh` names (images a job of
/// ours changed there) to read again; when the connection is lost, say so
/// and connect again
/// with back-off (1 s doubling to [`BACKOFF_LIMIT`]). Returns when `tx`
/// has no receiver or `stop` is dropped.
pub fn follow(
    host: &str,
    roots: &[PathBuf],
    live: bool,
    ssh: &SshOptions,
    tx: &crossbeam_channel::Sender<HostEvent>,
    stop: &Receiver<()>,
    refresh: &Receiver<Vec<PathBuf>>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let reason = match Connection::open(host, ssh) {
            Err(e) => e.to_string(),
            Ok(mut conn) => {
                backoff = Duration::from_secs(1);
                match serve_followed(&mut conn, roots, live, tx, stop, refresh) {
                    Ok(()) => return,
                    Err(e) => e.to_string(),
                }
            }
        };
        let reason = reason
            .strip_prefix(&format!("{host}: "))
            .unwrap_or(&reason)
            .to_string();
        if tx
            .send(HostEvent::Down {
                host: host.to_string(),
                reason,
                retry: backoff,
            })
            .is_err()
        {
            return;
        }
        match stop.recv_timeout(backoff) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        backoff = (backoff * 2).min(BACKOFF_LIMIT);
    }
}

/// One connection's life; `Ok` when told to stop.
fn serve_followed(
    conn: &mut Connection,
    roots: &[PathBuf],
    live: bool,
    tx: &crossbeam_channel::Sender<HostEvent>,
    stop: &Receiver<()>,
    refresh: &Receiver<Vec<PathBuf>>,
) -> Result<(), RemoteError> {
    conn.send(&Request::Watch {
        roots: roots.to_vec(),
        live,
    })?;
    let host = conn.host.clone();
    let key = |k: &Path| remote_path(&host, k);
    let mut refresh = refresh.clone();
    let confused = |message: String| RemoteError::Agent {
        host: host.clone(),
        message,
    };
    // The host's forest as last built: `changes` apply to it.
    let mut forest: Grafts = Vec::new();
    loop {
        if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
            return Ok(());
        }
        let incoming = conn.incoming.clone();
        let got = crossbeam_channel::select! {
            recv(incoming) -> m => conn.take(m.ok())?,
            recv(refresh) -> paths => {
                match paths {
                    Ok(paths) => conn.send(&Request::Refresh { paths })?,
                    // Nobody asks any more.
                    Err(_) => refresh = crossbeam_channel::never(),
                }
                continue;
            }
            default(Duration::from_millis(500)) => None,
        };
        let ev = match got {
            None => continue,
            Some(Reply::Snapshot { nodes, errors }) => {
                forest = grafts(&host, nodes).map_err(confused)?;
                HostEvent::Snapshot {
                    host: host.clone(),
                    nodes: forest.clone(),
                    errors: remote_errors(&host, errors),
                }
            }
            Some(Reply::Changes {
                nodes,
                removed,
                errors,
            }) => {
                apply_changes(&host, &mut forest, nodes, removed).map_err(confused)?;
                HostEvent::Snapshot {
                    host: host.clone(),
                    nodes: forest.clone(),
                    errors: remote_errors(&host, errors),
                }
            }
            Some(Reply::Sizes { key: k, sizes }) => HostEvent::Sizes {
                host: host.clone(),
                key: key(&k),
                sizes: sizes.into(),
            },
            Some(Reply::Vms { users, unreadable }) => HostEvent::Vms {
                host: host.clone(),
                vms: host_vms(&host, users),
                errors: vm_errors(&host, unreadable),
            },
            Some(Reply::Modified { key: k, mtime }) => HostEvent::Modified {
                host: host.clone(),
                key: key(&k),
                mtime: super::protocol::WireTime::to_system(mtime),
            },
            Some(_) => continue,
        };
        if tx.send(ev).is_err() {
            return Ok(());
        }
    }
}

/// Other hosts that see files a job changes, each with the files' paths
/// there.
pub type Peers = Vec<(String, Vec<PathBuf>)>;

/// The peers of the files `records` (another host's, possibly seen from
/// more hosts): for each other host, the paths there.
pub fn peers<'a>(records: impl IntoIterator<Item = &'a ImageRecord>) -> Peers {
    let mut peers: Peers = Vec::new();
    for r in records {
        for (h, p) in &r.seen_on {
            match peers.iter_mut().find(|(host, _)| host == h) {
                Some((_, paths)) => {
                    if !paths.contains(p) {
                        paths.push(p.clone());
                    }
                }
                None => peers.push((h.clone(), vec![p.clone()])),
            }
        }
    }
    peers
}

/// Ask every peer to look at its files now; `Err` names the host and
/// what uses a file there (a lock, a holder, a domain), or why the host
/// could not be asked: a check that was not made is not a pass.
pub fn check_peers(peers: &[(String, Vec<PathBuf>)], ssh: &SshOptions) -> Result<(), String> {
    for (host, paths) in peers {
        let images = ask_check(host, paths, ssh)
            .map_err(|e| format!("cannot check {host}, which sees these files too: {e}"))?;
        for c in images {
            let name = remote_path(host, &c.path);
            if let Some(v) = c.vms.first() {
                return Err(format!(
                    "{} is used by domain {} ({}, {}) on {host}",
                    name.display(),
                    v.name,
                    v.state,
                    v.connection
                ));
            }
            if let Some(h) = c.holders.first() {
                return Err(format!(
                    "{} is held by {} (pid {}) on {host}",
                    name.display(),
                    h.command,
                    h.pid
                ));
            }
            if c.lock != "none" {
                return Err(format!(
                    "{} is locked ({}) by a process on {host}",
                    name.display(),
                    c.lock
                ));
            }
            if let Some(e) = c.error {
                return Err(format!(
                    "{} could not be checked on {host}: {e}",
                    name.display()
                ));
            }
        }
    }
    Ok(())
}

fn ask_check(
    host: &str,
    paths: &[PathBuf],
    ssh: &SshOptions,
) -> Result<Vec<WireCheck>, RemoteError> {
    let mut conn = Connection::open(host, ssh)?;
    conn.send(&Request::Check {
        paths: paths.to_vec(),
    })?;
    loop {
        match conn.recv_timeout(HANDSHAKE_LIMIT)? {
            Some(Reply::Checked { images }) => return Ok(images),
            Some(Reply::Error { message }) => {
                return Err(RemoteError::Agent {
                    host: host.to_string(),
                    message,
                })
            }
            Some(_) => {}
            None => {
                return Err(RemoteError::Lost {
                    host: host.to_string(),
                    reason: format!("no answer within {} s", HANDSHAKE_LIMIT.as_secs()),
                })
            }
        }
    }
}

/// The details pane's facts of `path` on the host of `conn`, computed
/// there.
pub fn fetch_details(conn: &mut Connection, path: &Path) -> Result<WireDetails, RemoteError> {
    conn.send(&Request::Info {
        path: path.to_path_buf(),
    })?;
    loop {
        match conn.recv_timeout(Duration::from_secs(3600))? {
            Some(Reply::Info { path: p, details }) if p == path => return Ok(*details),
            Some(Reply::Error { message }) => {
                return Err(RemoteError::Agent {
                    host: conn.host.clone(),
                    message,
                })
            }
            _ => {}
        }
    }
}
