//! Protect (`p`): make the selected base read-only on disk, or give it its
//! write permission back, as `cowshed protect [--off]` does. No question
//! asked: it is undone with the same key. The chmod runs as a job, off the
//! UI thread; the key path only reads the catalog's record. An image on
//! another host is protected there, by its agent.

use super::{on_host, usable, JobSpec};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::protect::{protect, unprotect};
use crate::remote::protocol::JobOp;
use crate::tui::rows::file_name;

/// The job that toggles the protection of image `id`, or why not.
pub fn job(f: &Forest, id: NodeId) -> Result<JobSpec, String> {
    usable(f, id)?;
    let node = &f.nodes[id];
    let r = &node.record;
    let name = file_name(&r.path);
    // A read-only image is unprotected even when nothing depends on it
    // any more (its overlays were deleted since).
    let off = r.mode & 0o222 == 0;
    if !off && node.children.is_empty() {
        return Err(format!(
            "{name} is no base: nothing uses it as backing file, so there is nothing to protect"
        ));
    }
    let path = r.path.clone();
    let label = if off {
        format!("unprotect {name} (writable again)")
    } else {
        format!("protect {name} (read-only on disk)")
    };
    if let Some(host) = &r.host {
        return Ok(JobSpec {
            kind: "protect",
            label,
            touches: vec![r.key.clone()],
            // Its agent reads it again when the job ends.
            refresh: vec![crate::remote::client::remote_path(host, &r.path)],
            work: on_host(
                host,
                JobOp::Protect { image: path, off },
                crate::remote::client::peers([r]),
            ),
        });
    }
    Ok(JobSpec {
        kind: "protect",
        label,
        touches: vec![r.key.clone()],
        refresh: vec![path.clone()],
        work: Box::new(move |_, _| {
            if off {
                unprotect(&path)?;
            } else {
                protect(&path)?;
            }
            Ok(None)
        }),
    })
}
