//! A real sshd on localhost for the remote-root tests: Debian's
//! openssh-server started by the test itself on free high ports, with a
//! throw-away host key and client key, and an ssh config naming the ports
//! as hosts (`host1`, `host2`, ...), each port its own "host" (its own
//! control master, its own connection).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// Running sshd; killed when dropped.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    pub hosts: Vec<String>,
}

/// Why the tests cannot have an sshd here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!(
            "{SSHD} is not installed (.ci/run installs openssh-server)"
        ));
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(path)
        .status()
        .expect("run ssh-keygen");
    assert!(st.success(), "ssh-keygen {}", path.display());
}

impl Sshd {
    /// Start sshd listening on `hosts` ports, one per host name.
    pub fn start(hosts: &[&str]) -> Result<Sshd, String> {
        Sshd::start_with_env(hosts, &[])
    }

    /// The same, with environment variables sshd sets for the sessions of
    /// one host only (`(host, name, value)`, as `Match LocalPort` and
    /// `SetEnv` in its config): what differs between two machines, such as
    /// the config file (`XDG_CONFIG_HOME`) its cowshed agent reads.
    pub fn start_with_env(hosts: &[&str], env: &[(&str, &str, &str)]) -> Result<Sshd, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        let dir = tempfile::Builder::new()
            .prefix("cowshed-sshd-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("keys");
        // sshd's privilege separation needs its directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let ports: Vec<u16> = hosts.iter().map(|_| free_port()).collect();
        let mut server = String::new();
        for p in &ports {
            server.push_str(&format!("Port {p}\n"));
        }
        server.push_str(&format!(
            "ListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nPermitRootLogin yes\nPidFile {d}/sshd.pid\nLogLevel ERROR\n",
            d = d.display()
        ));
        for (h, p) in hosts.iter().zip(&ports) {
            let vars: Vec<String> = env
                .iter()
                .filter(|(host, _, _)| host == h)
                .map(|(_, k, v)| format!("{k}={v}"))
                .collect();
            if !vars.is_empty() {
                server.push_str(&format!(
                    "Match LocalPort {p}
  SetEnv {}
",
                    vars.join(" ")
                ));
            }
        }
        std::fs::write(d.join("sshd_config"), server).expect("sshd config");
        let mut client = String::new();
        for (h, p) in hosts.iter().zip(&ports) {
            client.push_str(&format!(
                "Host {h}\n  HostName 127.0.0.1\n  Port {p}\n  User {user}\n  IdentityFile {d}/client_key\n  \
                 IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n  \
                 StrictHostKeyChecking accept-new\n  LogLevel ERROR\n",
                user = std::env::var("USER").unwrap_or_else(|_| "root".into()),
                d = d.display()
            ));
        }
        std::fs::write(d.join("ssh_config"), client).expect("ssh config");
        let child = Command::new(SSHD)
            .args(["-D", "-f"])
            .arg(d.join("sshd_config"))
            .arg("-E")
            .arg(d.join("sshd.log"))
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {SSHD}: {e}"))?;
        let mut sshd = Sshd {
            child,
            dir,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        // Ready when every port accepts; sshd exiting early is the reason.
        let deadline = Instant::now() + Duration::from_secs(60);
        for p in &ports {
            while TcpStream::connect(("127.0.0.1", *p)).is_err() {
                if let Ok(Some(st)) = sshd.child.try_wait() {
                    let log = std::fs::read_to_string(sshd.dir.path().join("sshd.log"))
                        .unwrap_or_default();
                    return Err(format!("sshd exited ({st}): {log}"));
                }
                if Instant::now() > deadline {
                    return Err(format!("sshd does not listen on port {p}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(sshd)
    }

    /// [`Sshd::start_with_env`], or `None` where this machine has no sshd:
    /// the test then says that it skips, and why.
    pub fn start_or_skip(hosts: &[&str], env: &[(&str, &str, &str)]) -> Option<Sshd> {
        match Sshd::start_with_env(hosts, env) {
            Ok(s) => Some(s),
            Err(why) => {
                eprintln!("SKIPPED: no sshd: {why}");
                None
            }
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ssh_config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    pub fn control_dir(&self) -> PathBuf {
        self.dir.path().join("ctl")
    }

    /// The environment that points cowshed at these hosts, with `remote`
    /// as the command that starts cowshed there.
    pub fn env(&self, remote: &str) -> Vec<(String, String)> {
        vec![
            (
                "COWSHED_SSH_CONFIG".into(),
                self.ssh_config().display().to_string(),
            ),
            (
                "COWSHED_SSH_CONTROL_DIR".into(),
                self.control_dir().display().to_string(),
            ),
            ("COWSHED_REMOTE_COMMAND".into(), remote.into()),
        ]
    }

    /// `cowshed` (a path to the binary that serves as the agent) as the
    /// remote command, with a state directory of this sshd's and `extra`
    /// environment (fault plans).
    pub fn remote_command_of(&self, cowshed: &str, extra: &[(&str, &str)]) -> String {
        let mut cmd = format!(
            "env COWSHED_STATE_DIR={}",
            self.dir.path().join("state").display()
        );
        for (k, v) in extra {
            cmd.push_str(&format!(" {k}={v}"));
        }
        cmd.push(' ');
        cmd.push_str(cowshed);
        cmd
    }

    /// `ssh -O check`'s answer: the pid of the control master for `host`.
    pub fn master_pid(&self, host: &str) -> Option<u32> {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(self.ssh_config())
            .arg("-o")
            .arg(format!("ControlPath={}/%C", self.control_dir().display()))
            .args(["-O", "check", host])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let start = text.find("pid=")? + 4;
        text[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .ok()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // The control masters end with their connections.
        for h in &self.hosts {
            let _ = Command::new("ssh")
                .arg("-F")
                .arg(self.ssh_config())
                .arg("-o")
                .arg(format!("ControlPath={}/%C", self.control_dir().display()))
                .args(["-O", "exit", h])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
