//! Roots on other hosts: `cowshed host1:/srv/images` runs `cowshed agent
//! --stdio` on host1 over the user's ssh, and the agent serves the same
//! catalog and engine there ([`agent`]), speaking [`protocol`]; the local
//! side ([`client`]) merges what it says into the forest and sends it the
//! jobs for its files.
//!
//! Which roots are remote: `HOST:/ABSOLUTE/PATH` (and `USER@HOST:/...`),
//! where HOST holds no `/`. Anything else is a local path, even with a `:`
//! in it (`vm:1.qcow2`, `./host:/x`, `a/b:/c`): to name a local relative
//! path that looks like a remote root, start it with `./`.

pub mod agent;
pub mod client;
pub mod protocol;

use std::path::{Path, PathBuf};

/// A root as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    Local(PathBuf),
    Remote { host: String, path: PathBuf },
}

impl Root {
    pub fn parse(spec: &Path) -> Root {
        let local = || Root::Local(spec.to_path_buf());
        let Some(text) = spec.to_str() else {
            return local();
        };
        let Some((host, path)) = text.split_once(':') else {
            return local();
        };
        if host.is_empty() || host.contains('/') || !path.starts_with('/') {
            return local();
        }
        Root::Remote {
            host: host.to_string(),
            path: PathBuf::from(path),
        }
    }
}

/// Local roots, and remote ones by host in the order hosts are first
/// named (one connection per host serves all its roots).
pub fn split_roots(roots: &[PathBuf]) -> (Vec<PathBuf>, Vec<(String, Vec<PathBuf>)>) {
    let mut local = Vec::new();
    let mut remote: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for r in roots {
        match Root::parse(r) {
            Root::Local(p) => local.push(p),
            Root::Remote { host, path } => match remote.iter_mut().find(|(h, _)| *h == host) {
                Some((_, paths)) => paths.push(path),
                None => remote.push((host, vec![path])),
            },
        }
    }
    (local, remote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Root {
        Root::parse(Path::new(s))
    }

    fn remote(host: &str, path: &str) -> Root {
        Root::Remote {
            host: host.into(),
            path: path.into(),
        }
    }

    #[test]
    fn remote_only_when_host_has_no_slash_and_path_is_absolute() {
        assert_eq!(parse("host1:/srv/images"), remote("host1", "/srv/images"));
        assert_eq!(parse("root@db-2:/var/lib"), remote("root@db-2", "/var/lib"));
        for local in [
            "/var/lib/libvirt/images",
            "vms",
            "vm:1.qcow2",
            "./host:/x",
            "a/b:/c",
            ":/x",
            "host:relative",
            "/abs/with:/colon",
        ] {
            assert_eq!(parse(local), Root::Local(local.into()), "{local}");
        }
    }

    #[test]
    fn roots_group_by_host_in_first_seen_order() {
        let roots: Vec<PathBuf> = ["h2:/a", "/l", "h1:/b", "h2:/c"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let (local, remote) = split_roots(&roots);
        assert_eq!(local, vec![PathBuf::from("/l")]);
        assert_eq!(
            remote,
            vec![
                ("h2".to_string(), vec!["/a".into(), "/c".into()]),
                ("h1".to_string(), vec!["/b".into()]),
            ]
        );
    }
}
