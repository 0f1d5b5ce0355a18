//! Running `virsh`: read-only connections, C locale (its words are
//! parsed), and a time limit, so a daemon that hangs cannot hang cowshed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use wait_timeout::ChildExt;

use super::domain::{parse_domain, SourceXml};
use super::{domain_from_xml, Domain, ReadError};

/// Generous: a busy daemon on a loaded host answers in well under that.
const TIME_LIMIT: Duration = Duration::from_secs(30);

/// Whether the daemon behind one of the default URIs has its socket in
/// place. virsh would start a session daemon just to answer; looking must
/// not start anything.
pub fn daemon_listening(uri: &str) -> bool {
    let names = [
        "libvirt-sock",
        "libvirt-sock-ro",
        "virtqemud-sock",
        "virtqemud-sock-ro",
    ];
    let dirs: Vec<PathBuf> = match uri {
        "qemu:///system" => vec![PathBuf::from("/run/libvirt"), "/var/run/libvirt".into()],
        "qemu:///session" => {
            let mut dirs = Vec::new();
            if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR") {
                dirs.push(Path::new(&run).join("libvirt"));
            }
            if let Some(home) = std::env::var_os("HOME") {
                dirs.push(Path::new(&home).join(".cache/libvirt"));
            }
            dirs
        }
        // Not a default: the user named it, so it is asked.
        _ => return true,
    };
    dirs.iter()
        .any(|d| names.iter().any(|n| d.join(n).exists()))
}

/// Every domain defined on `uri`, with its state and disks.
pub fn read_connection(uri: &str) -> Result<Vec<Domain>, ReadError> {
    let listing = virsh(uri, &["list", "--all", "--uuid"])?;
    let mut domains = Vec::new();
    for uuid in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Undefined since the listing: it uses nothing any more.
        let state = match virsh(uri, &["domstate", uuid]) {
            Ok(s) => s.trim().to_string(),
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(e),
        };
        let xml = match virsh(uri, &["dumpxml", uuid]) {
            Ok(x) => x,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(e),
        };
        let mut parsed = parse_domain(&xml).map_err(|message| ReadError::BadXml {
            uuid: uuid.to_string(),
            message,
        })?;
        for disk in &mut parsed.disks {
            for source in &mut disk.chain {
                if let SourceXml::Volume { pool, volume } = source {
                    // A volume whose pool is inactive has no path now.
                    *source = match virsh(uri, &["vol-path", "--pool", pool, volume]) {
                        Ok(p) => SourceXml::Path(PathBuf::from(p.trim())),
                        Err(_) => SourceXml::Other,
                    };
                }
            }
        }
        domains.push(domain_from_xml(parsed, state, uri));
    }
    Ok(domains)
}

fn vanished(e: &ReadError) -> bool {
    matches!(e, ReadError::Failed { message, .. }
        if message.contains("failed to get domain") || message.contains("Domain not found"))
}

/// Run `virsh -r -c URI ARGS...` and return its standard output.
fn virsh(uri: &str, args: &[&str]) -> Result<String, ReadError> {
    let command = format!("-c {uri} {}", args.join(" "));
    let mut child = Command::new("virsh")
        .args(["-q", "-r", "-c", uri])
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::NoVirsh,
            _ => ReadError::Failed {
                command: command.clone(),
                message: e.to_string(),
            },
        })?;
    // Drained on threads of their own: a large XML must not fill the pipe
    // and stall virsh while we wait for it to end.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = match child.wait_timeout(TIME_LIMIT) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ReadError::TimedOut {
                command,
                seconds: TIME_LIMIT.as_secs(),
            });
        }
        Err(e) => {
            return Err(ReadError::Failed {
                command,
                message: e.to_string(),
            })
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        let message = stderr
            .lines()
            .map(|l| l.trim().trim_start_matches("error: "))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Err(ReadError::Failed {
            command,
            message: if message.is_empty() {
                format!("exited with {status}")
            } else {
                message
            },
        })
    }
}
