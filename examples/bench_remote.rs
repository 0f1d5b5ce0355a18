//! Benchmark helper for `benches/remote.sh` (#14, part 3): remote roots
//! over ssh at scale, in one client process.
//!
//! - time from start to the first full forest: every host connected,
//!   its agent's snapshot received, decoded and grafted with the others
//!   into one `Forest`;
//! - peak RSS of this client and of each agent (VmHWM);
//! - bytes per live update: a scratch overlay under the first host's
//!   roots is written to with qemu-io, and the `sizes`/`modified` lines
//!   that come back are counted;
//! - idle CPU over `--idle` seconds on both ends: this process, its ssh
//!   clients, and each agent (utime+stime from /proc/PID/stat).
//!
//! usage: bench_remote --scratch DIR [--idle SECS] HOST:ROOT...
//! (ssh is set up through COWSHED_SSH_CONFIG etc. as for cowshed itself).
//! Prints one JSON object on stdout.

use std::collections::HashMap;
use std::error::Error;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cowshed::catalog::Forest;
use cowshed::remote::client::{grafts, Connection, SshOptions};
use cowshed::remote::protocol::{encode, Reply, Request};

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn ppid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// ssh's control masters (`ssh: PATH [mux]`) on this machine.
fn master_pids() -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("ssh: ") && cmd.contains("[mux]") {
            out.push(pid);
        }
    }
    out
}

/// Every `cowshed agent --stdio` on this machine (the hosts are aliases
/// of localhost).
fn agent_pids() -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.len() >= 3 && args[1] == b"agent" && args[2] == b"--stdio" {
            out.push(pid);
        }
    }
    out
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut scratch = None;
    let mut idle = 60u64;
    let mut roots = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--scratch" => scratch = args.next().map(PathBuf::from),
            "--idle" => idle = args.next().ok_or("--idle SECS")?.parse()?,
            _ => roots.push(PathBuf::from(a)),
        }
    }
    let scratch = scratch.ok_or("--scratch DIR")?;
    let (_, hosts) = cowshed::remote::split_roots(&roots);
    if hosts.is_empty() {
        return Err("no HOST:ROOT given".into());
    }
    let ssh = SshOptions::from_env();

    // 1. First full forest, all hosts at once.
    let start = Instant::now();
    let mut conns = Vec::new();
    for (i, (host, host_roots)) in hosts.iter().enumerate() {
        let mut c = Connection::open(host, &ssh)?;
        let mut roots = host_roots.clone();
        if i == 0 {
            roots.push(scratch.clone());
        }
        c.send(&Request::Watch { roots, live: true })?;
        conns.push(c);
    }
    let mut forest = Forest::default();
    let mut per_host = Vec::new();
    for c in &mut conns {
        let t = Instant::now();
        let nodes = loop {
            if let Some(Reply::Snapshot { nodes, .. }) = c.recv_timeout(Duration::from_secs(600))? {
                break nodes;
            }
        };
        let n = nodes.len();
        forest.graft(grafts(&c.host, nodes)?);
        per_host.push((
            c.host.clone(),
            n,
            c.bytes_received(),
            t.elapsed().as_secs_f64(),
        ));
    }
    let first_forest = start.elapsed().as_secs_f64();
    let images = forest.nodes.len();

    // 2. Bytes per live update: 10 writes into the scratch overlay.
    let overlay = scratch.join("growing.qcow2");
    let mut sizes_lines = Vec::new();
    let mut modified_lines = Vec::new();
    let key = std::fs::canonicalize(&overlay)?;
    for i in 0..10u64 {
        let st = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P 0x5a {}M 1M", i * 2)])
            .arg(&overlay)
            .output()?;
        if !st.status.success() {
            return Err(format!("qemu-io: {}", String::from_utf8_lossy(&st.stderr)).into());
        }
        let want = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&overlay)?) * 512;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen: Vec<String> = Vec::new();
        loop {
            if Instant::now() > deadline {
                return Err(format!(
                    "no size update of {} to {want} bytes; last messages: {}",
                    key.display(),
                    seen.join(" | ")
                )
                .into());
            }
            let reply = conns[0].recv_timeout(Duration::from_secs(1))?;
            if let Some(r) = &reply {
                let mut text = encode(r);
                text.truncate(300);
                seen.push(String::from_utf8_lossy(&text).into_owned());
                if seen.len() > 5 {
                    seen.remove(0);
                }
            }
            match reply {
                Some(r @ Reply::Sizes { .. }) => {
                    let line = encode(&r).len();
                    if let Reply::Sizes { key: k, sizes } = r {
                        sizes_lines.push(line);
                        if k == key && sizes.allocated == want {
                            break;
                        }
                    }
                }
                Some(r @ Reply::Modified { .. }) => modified_lines.push(encode(&r).len()),
                _ => {}
            }
        }
    }
    // Let the last debounce go out, then drain.
    let drain_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < drain_until {
        for c in &mut conns {
            while let Some(r) = c.recv_timeout(Duration::from_millis(50))? {
                match r {
                    Reply::Sizes { .. } => sizes_lines.push(encode(&r).len()),
                    Reply::Modified { .. } => modified_lines.push(encode(&r).len()),
                    _ => {}
                }
            }
        }
    }

    // 3. Idle CPU on both ends.
    let me = std::process::id();
    let agents = agent_pids();
    let mut ssh_pids: Vec<u32> = conns.iter().map(|c| c.ssh_pid()).collect();
    ssh_pids.extend(master_pids());
    // The sshd session processes that serve the agents.
    let sshd_pids: Vec<u32> = agents.iter().filter_map(|&p| ppid(p)).collect();
    let mut all: Vec<u32> = vec![me];
    all.extend(&agents);
    all.extend(&ssh_pids);
    all.extend(&sshd_pids);
    let before: HashMap<u32, u64> = all
        .iter()
        .filter_map(|&p| Some((p, cpu_ticks(p)?)))
        .collect();
    let bytes_before: u64 = conns.iter().map(|c| c.bytes_received()).sum();
    let t = Instant::now();
    let idle_until = t + Duration::from_secs(idle);
    while Instant::now() < idle_until {
        for c in &mut conns {
            let _ = c.recv_timeout(Duration::from_millis(200))?;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    // SAFETY: sysconf has no failure mode for this name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let pct = |pids: &[u32]| -> f64 {
        pids.iter()
            .filter_map(|p| Some(cpu_ticks(*p)?.saturating_sub(*before.get(p)?)))
            .sum::<u64>() as f64
            / hz
            / secs
            * 100.0
    };
    let bytes_idle: u64 = conns.iter().map(|c| c.bytes_received()).sum::<u64>() - bytes_before;
    let agent_rss: Vec<u64> = agents
        .iter()
        .filter_map(|&p| proc_status_kib(p, "VmHWM:"))
        .collect();
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    let report = serde_json::json!({
        "hosts": hosts.len(),
        "images": images,
        "first_full_forest_s": first_forest,
        "per_host": per_host.iter().map(|(h, n, b, s)| serde_json::json!({
            "host": h, "images": n, "snapshot_bytes": b, "received_after_s": s
        })).collect::<Vec<_>>(),
        "client_vmhwm_kib": proc_status_kib(me, "VmHWM:"),
        "agents_vmhwm_kib": agent_rss,
        "sizes_messages": sizes_lines.len(),
        "bytes_per_sizes_message": mean(&sizes_lines),
        "modified_messages": modified_lines.len(),
        "bytes_per_modified_message": mean(&modified_lines),
        "idle_seconds": secs,
        "idle_cpu_pct_client": pct(&[me]),
        "idle_cpu_pct_ssh_clients": pct(&ssh_pids),
        "idle_cpu_pct_agents": pct(&agents),
        "idle_cpu_pct_sshd_sessions": pct(&sshd_pids),
        "idle_bytes_received": bytes_idle,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
