#!/usr/bin/env python3
"""Catalog and live-update benchmark of cowshed (issue 3), in ONE run.

1. scan:    `cowshed tree --output json FLEET` (scan + forest) on the 10,000-image
            fleet vs a loop of `qemu-img info --backing-chain --output=json`
            over a random sample of the same files, scaled to all of them;
            peak RSS of cowshed (/usr/bin/time -f %M).
2. latency: time from a qemu-io write into an overlay (qemu-io's exit) to the
            new allocated size drawn by the real App (examples/bench_latency.rs,
            ratatui TestBackend, real catalog worker and watcher).
3. idle:    CPU of the release TUI in a detached tmux session on the fleet:
            idle, while an overlay grows (qemu-io every 300 ms), and after.

It reports; it does not assert. Results go to stdout and benches/results-scan.md
(generated: do not edit by hand). See README.md. Python 3.11 stdlib only.

usage: benches/scan_live.py [options] FIXTURE_DIR   (FIXTURE_DIR/fleet is scanned)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAKE_FIXTURES = REPO / ".." / "shared" / "bench" / "make-fixtures.sh"
TMUX_SOCKET = "benchsock"
TMUX_SESSION = "cowshed-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A step failed; the message says which command and why."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))}: exit {p.returncode}: {p.stderr.strip()[-800:]}")
    return p


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def busy_processes() -> list[str]:
    """Other processes using > 20% CPU right now (from ps)."""
    p = run(["ps", "-eo", "pcpu=,pid=,comm=", "--sort=-pcpu"], check=False)
    out = []
    for line in p.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and float(parts[0]) > 20 and int(parts[1]) != os.getpid():
            out.append(f"{parts[2]} (pid {parts[1]}, {parts[0]}%)")
    return out


def pct(xs: list[float], q: float) -> float:
    """Percentile by linear interpolation (q in 0..100)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}")


def ensure_fixtures(d: Path, n: int) -> None:
    fleet = d / "fleet"
    have = len(list(fleet.glob("vm-*.qcow2"))) if fleet.is_dir() else 0
    if have >= n:
        return
    log(f"{fleet}: {have} vm images, want {n}: building fixtures (several minutes)")
    env = dict(os.environ, FLEET_N=str(n))
    p = subprocess.run(["bash", str(MAKE_FIXTURES.resolve()), str(d), "0.1"], env=env)
    if p.returncode != 0:
        raise BenchError(f"make-fixtures.sh failed (exit {p.returncode})")


def build(skip: bool) -> tuple[Path, Path, Path]:
    cowshed = REPO / "target" / "release" / "cowshed"
    example = REPO / "target" / "release" / "examples" / "bench_latency"
    forest = REPO / "target" / "release" / "examples" / "bench_forest"
    keys = REPO / "target" / "release" / "examples" / "bench_keys"
    if not skip:
        log("cargo build --release --bin cowshed --example bench_latency --example bench_forest "
            "--example bench_keys")
        p = subprocess.run(
            ["cargo", "build", "--release", "--bin", "cowshed", "--example", "bench_latency",
             "--example", "bench_forest", "--example", "bench_keys"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise BenchError(f"cargo build failed:\n{p.stderr[-3000:]}")
    for b in (cowshed, example, forest, keys):
        if not b.exists():
            raise BenchError(f"{b} missing (run without --skip-build)")
    return cowshed, example, forest


# ---------------------------------------------------------------------------
# 1. Scan
# ---------------------------------------------------------------------------

def time_cowshed_tree(cowshed: Path, fleet: Path, scratch: Path, output: str = "json") -> dict:
    """One run of `cowshed tree --output OUTPUT` under /usr/bin/time."""
    tf = scratch / "time.txt"
    cmd = ["/usr/bin/time", "-o", str(tf), "-f", "%M %U %S",
           str(cowshed), "tree", "--output", output, str(fleet)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr[-500:]}")
    rss, user, sys_ = tf.read_text().split()[-3:]
    return {"wall": wall, "rss_kib": int(rss), "cpu": float(user) + float(sys_)}


def bench_scan(cowshed: Path, forest_bin: Path, fleet: Path, scratch: Path, runs: int,
               sample: int, seed: int) -> dict:
    log(f"scan: checking `cowshed tree --output json {fleet}`")
    p = run([cowshed, "tree", "--output", "json", fleet])
    doc = json.loads(p.stdout)
    files = sorted(img["filename"] for img in doc["images"])
    n = len(files)
    log(f"scan: {n} images, {len(doc['trees'])} trees, {len(doc['errors'])} errors; "
        f"{runs} timed runs after 1 warm-up")
    time_cowshed_tree(cowshed, fleet, scratch)  # warm-up
    rs = [time_cowshed_tree(cowshed, fleet, scratch) for _ in range(runs)]
    walls = [r["wall"] for r in rs]
    log(f"scan: cowshed median {statistics.median(walls) * 1e3:.0f} ms")
    # The same scan with the human output: what the JSON document costs.
    hs = [time_cowshed_tree(cowshed, fleet, scratch, "human") for _ in range(3)]
    # The pieces, in one process (examples/bench_forest.rs).
    log("scan: breakdown (examples/bench_forest)")
    parts = json.loads(run([forest_bin, fleet, "--runs", str(runs)], timeout=300).stdout.strip().splitlines()[-1])

    k = min(sample, n)
    pick = random.Random(seed).sample(files, k)
    # Spawn cost of the harness itself: a loop of `true`.
    log(f"scan: loop of {k} `true` (harness spawn cost)")
    t0 = time.perf_counter()
    for _ in pick:
        subprocess.run(["true"])
    true_s = time.perf_counter() - t0
    log(f"scan: loop of `qemu-img info --backing-chain --output=json` over {k} of {n} files")
    failures = 0
    t0 = time.perf_counter()
    for f in pick:
        r = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", f],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        failures += r.returncode != 0
    qemu_s = time.perf_counter() - t0
    med = statistics.median(walls)
    per_img_q = qemu_s / k
    per_img_c = med / n
    return {
        "images": n, "trees": len(doc["trees"]), "errors": len(doc["errors"]),
        "runs": runs, "walls": walls,
        "wall_med": med, "wall_min": min(walls), "wall_max": max(walls),
        "rss_max_kib": max(r["rss_kib"] for r in rs),
        "rss_med_kib": statistics.median(r["rss_kib"] for r in rs),
        "cpu_med": statistics.median(r["cpu"] for r in rs),
        "human_wall_med": statistics.median(r["wall"] for r in hs),
        "human_rss_max_kib": max(r["rss_kib"] for r in hs),
        "parts": parts,
        "sample": k, "qemu_sample_s": qemu_s, "qemu_failures": failures,
        "true_sample_s": true_s,
        "qemu_per_img_ms": per_img_q * 1e3, "cowshed_per_img_ms": per_img_c * 1e3,
        "qemu_est_s": per_img_q * n,
        "ratio": per_img_q / per_img_c,
        "ratio_minus_spawn": (qemu_s - true_s) / k / per_img_c,
    }


# ---------------------------------------------------------------------------
# 2. Write-to-screen latency
# ---------------------------------------------------------------------------

def bench_latency(example: Path, scratch: Path, writes: int) -> dict:
    log(f"latency: {writes} writes (examples/bench_latency)")
    p = subprocess.run([str(example), "--writes", str(writes), "--dir", str(scratch)],
                       capture_output=True, text=True, timeout=writes * 5 + 60)
    if p.returncode != 0:
        raise BenchError(f"bench_latency: exit {p.returncode}: {p.stderr[-1500:]}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    screen = [x for x in d["screen_ms"] if x is not None]
    state = [x for x in d["state_ms"] if x is not None]
    d["missed"] = sum(x is None for x in d["screen_ms"])
    # A miss counts as the timeout in the percentiles (an upper bound is unknown).
    screen_all = screen + [float(d["timeout_ms"])] * d["missed"]
    d["screen"] = {q: pct(screen_all, v) for q, v in (("p50", 50), ("p95", 95), ("max", 100))}
    d["state"] = {q: pct(state, v) for q, v in (("p50", 50), ("p95", 95), ("max", 100))}
    d["qemu_io"] = {q: pct(d["qemu_io_ms"], v) for q, v in (("p50", 50), ("p95", 95), ("max", 100))}
    d["screen"]["min"] = min(screen_all) if screen_all else float("nan")
    return d


def bench_keys(fleet: Path, rounds: int) -> dict:
    """Key press to redrawn screen in the real App on the fleet (examples/bench_keys)."""
    example = REPO / "target" / "release" / "examples" / "bench_keys"
    log(f"keys: {rounds} rounds (examples/bench_keys)")
    p = subprocess.run([str(example), str(fleet), "--rounds", str(rounds)],
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise BenchError(f"bench_keys: exit {p.returncode}: {p.stderr[-1500:]}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    return {k: {q: pct(v, x) for q, x in (("p50", 50), ("p95", 95), ("max", 100))} | {"min": min(v)}
            for k, v in d.items()}


# ---------------------------------------------------------------------------
# 3. CPU of the TUI in tmux
# ---------------------------------------------------------------------------

def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["tmux", "-L", TMUX_SOCKET, *args], check=check)


def proc_cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15.
    return int(fields[11]) + int(fields[12])


def proc_ctxsw(pid: int) -> int:
    """Context switches (voluntary + not) summed over all threads: wakeups."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def thread_stats(pid: int) -> dict[str, tuple[str, int, int]]:
    """tid -> (thread name, utime+stime ticks, context switches)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
            name = head.split("(", 1)[1]
            fields = rest.split()
            ctx = 0
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        ctx += int(line.split()[1])
            out[tid] = (name, int(fields[11]) + int(fields[12]), ctx)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def sample(pid: int, out_file: Path, seconds: float) -> dict:
    t0, c0, x0 = time.perf_counter(), proc_cpu_ticks(pid), proc_ctxsw(pid)
    th0 = thread_stats(pid)
    b0 = out_file.stat().st_size if out_file.exists() else 0
    time.sleep(seconds)
    t1, c1, x1 = time.perf_counter(), proc_cpu_ticks(pid), proc_ctxsw(pid)
    th1 = thread_stats(pid)
    b1 = out_file.stat().st_size if out_file.exists() else 0
    wall = t1 - t0
    # Per thread name: CPU ms and wakeups/s (threads that came and went
    # inside the window are only in the process total).
    per: dict[str, list[float]] = {}
    for tid, (name, cpu, ctx) in th1.items():
        _, cpu0, ctx0 = th0.get(tid, (name, 0, 0))
        acc = per.setdefault(name, [0.0, 0.0])
        acc[0] += (cpu - cpu0) / CLK_TCK * 1e3
        acc[1] += (ctx - ctx0) / wall
    threads = {k: v for k, v in sorted(per.items(), key=lambda kv: -kv[1][0]) if v[0] > 0 or v[1] >= 0.5}
    return {"wall": wall, "cpu_s": (c1 - c0) / CLK_TCK, "cpu_pct": (c1 - c0) / CLK_TCK / wall * 100,
            "wakeups_per_s": (x1 - x0) / wall, "out_bytes": b1 - b0, "threads": threads}


def bench_idle(cowshed: Path, fleet: Path, scratch: Path, seconds: float) -> dict:
    require_tools("tmux")
    live = scratch / "live"
    live.mkdir()
    run(["qemu-img", "create", "-q", "-f", "qcow2", live / "grow-base.qcow2", "256M"])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "grow-base.qcow2",
         live / "grow-top.qcow2"])
    out_file = scratch / "pane-output.bin"
    tmux("kill-server", check=False)  # a stale server of this socket only
    res: dict = {"roots": [str(fleet), str(live)]}
    try:
        cmd = "exec " + " ".join(shlex.quote(str(x)) for x in (cowshed, fleet, live))
        tmux("new-session", "-d", "-s", TMUX_SESSION, "-x", "120", "-y", "40", cmd)
        pid = int(tmux("list-panes", "-t", TMUX_SESSION, "-F", "#{pane_pid}").stdout.split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if comm != "cowshed":
            raise BenchError(f"pane process is {comm!r}, not cowshed")
        # Wait until the scan is done and the screen drawn.
        t0 = time.perf_counter()
        screen = ""
        while time.perf_counter() - t0 < 60:
            screen = tmux("capture-pane", "-p", "-t", TMUX_SESSION).stdout
            if "image" in screen and "scanning" not in screen:
                break
            time.sleep(0.1)
        else:
            raise BenchError(f"the TUI did not finish its scan in 60 s; screen:\n{screen}")
        res["ready_s"] = time.perf_counter() - t0
        res["header"] = screen.splitlines()[0].strip() if screen else ""
        res["rss_kib"] = rss_kib(pid)
        time.sleep(2)  # let the watcher take the scan's records and go quiet
        tmux("pipe-pane", "-o", "-t", TMUX_SESSION, f"cat >> {shlex.quote(str(out_file))}")
        time.sleep(0.5)
        log(f"idle: TUI ready after {res['ready_s']:.2f} s; sampling {seconds:.0f} s idle")
        res["idle"] = sample(pid, out_file, seconds)

        log(f"idle: sampling {seconds:.0f} s while grow-top.qcow2 grows (qemu-io every 300 ms)")
        writes = {"n": 0, "stop": False}
        import threading

        def writer() -> None:
            i = 0
            while not writes["stop"]:
                nxt = time.perf_counter() + 0.3
                subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                f"write -P {(i % 250) + 1} {(i * (1 << 20)) % (250 << 20)} 1M",
                                str(live / "grow-top.qcow2")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                i += 1
                writes["n"] = i
                time.sleep(max(0.0, nxt - time.perf_counter()))

        th = threading.Thread(target=writer, daemon=True)
        th.start()
        time.sleep(1.0)  # growth shows, the tick starts
        res["growing"] = sample(pid, out_file, seconds)
        writes["stop"] = True
        th.join(timeout=5)
        res["writes"] = writes["n"]
        res["grow_screen"] = next((ln.strip() for ln in
                                   tmux("capture-pane", "-p", "-t", TMUX_SESSION).stdout.splitlines()
                                   if "grow-top" in ln), "")
        # is_moving() stays true 5 s after the last growth report, and the
        # catalog re-sends growth every 1 s until the sparkline is flat.
        log("idle: writes stopped; waiting 7 s, then sampling after")
        time.sleep(7)
        res["after"] = sample(pid, out_file, seconds)
        res["rss_end_kib"] = rss_kib(pid)
    finally:
        tmux("kill-session", "-t", TMUX_SESSION, check=False)
        tmux("kill-server", check=False)
    return res


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def report(args, meta: dict, scan: dict | None, lat: dict | None, idle: dict | None,
           failures: list[str], keys: dict | None = None) -> str:
    L: list[str] = []
    L.append("# cowshed catalog benchmark: scan, live latency, idle CPU")
    L.append("")
    L.append("Generated by `benches/scan_live.py` (do not edit by hand). "
             f"{meta['date']}, {meta['host']}, {os.cpu_count()} CPUs, git `{meta['git']}`.")
    L.append("")
    L.append(f"Load average (1/5/15 min): start {meta['load_start']}; " +
             "; ".join(f"before {k} {v}" for k, v in meta["load"].items()) +
             f"; end {meta.get('load_end', '?')}.")
    if meta["busy"]:
        L.append(f"Other busy processes at start: {', '.join(meta['busy'])}.")
    L.append("")
    L.append("| measure | value | target | met |")
    L.append("|---|---|---|---|")
    if keys:
        worst = max(v["max"] for v in keys.values())
        best = min(v["min"] for v in keys.values())
        L.append(f"| key → redrawn screen, {len(keys)} kinds of key × {args.key_rounds} | "
                 f"{best:.1f}–{worst:.1f} ms | < 50 ms | {ok(worst < 50)} |")
    if scan:
        L.append(f"| scan+forest, {scan['images']} images (`cowshed tree --output json`), median of {scan['runs']} | "
                 f"{scan['wall_med'] * 1e3:.0f} ms (min {scan['wall_min'] * 1e3:.0f}, max {scan['wall_max'] * 1e3:.0f}); "
                 f"{scan['cowshed_per_img_ms']:.3f} ms/image | < 1 s | {ok(scan['wall_med'] < 1)} |")
        L.append(f"| qemu-img info --backing-chain loop, per image (sample {scan['sample']} of {scan['images']}, scaled) | "
                 f"{scan['qemu_per_img_ms']:.2f} ms/image; est. {scan['qemu_est_s']:.1f} s for all | | |")
        L.append(f"| ratio qemu-img loop / cowshed | {scan['ratio']:.0f}× "
                 f"({scan['ratio_minus_spawn']:.0f}× with the harness's spawn cost taken off the loop) | ≥ 100× | "
                 f"{ok(scan['ratio'] >= 100)} |")
        L.append(f"| peak RSS of `cowshed tree` (max of {scan['runs']}) | {scan['rss_max_kib'] / 1024:.1f} MiB | < 64 MiB | "
                 f"{ok(scan['rss_max_kib'] < 64 * 1024)} |")
    if lat:
        s = lat["screen"]
        L.append(f"| write → new size on screen, {lat['writes']} writes | p50 {s['p50']:.0f} ms, p95 {s['p95']:.0f} ms, "
                 f"max {s['max']:.0f} ms ({lat['missed']} missed) | p95 < 300 ms | {ok(s['p95'] < 300 and lat['missed'] == 0)} |")
    if idle:
        L.append(f"| TUI start → first full scan drawn (fleet + 1 overlay, tmux) | {idle['ready_s']:.2f} s; "
                 f"VmHWM {idle['rss_kib'] / 1024:.1f} MiB | | |")
        for k, label in (("idle", "TUI idle"), ("growing", "TUI, one overlay growing"), ("after", "TUI after growth stops")):
            if k in idle:
                v = idle[k]
                tgt = "~0%" if k != "growing" else "(ticks)"
                met = ok(v["cpu_pct"] < 0.5) if k != "growing" else ""
                L.append(f"| CPU, {label}, {v['wall']:.0f} s | {v['cpu_pct']:.2f}% of a core; "
                         f"{v['wakeups_per_s']:.1f} wakeups/s; {v['out_bytes']} bytes drawn | {tgt} | {met} |")
    L.append("")
    if scan:
        L.append("## 1. Scan")
        L.append("")
        L.append(f"- `cowshed tree --output json {args.fixtures}/fleet` > /dev/null, warm cache (1 untimed run "
                 f"first), {scan['runs']} runs: " + ", ".join(f"{w * 1e3:.0f}" for w in scan["walls"]) +
                 f" ms. CPU (user+sys) median {scan['cpu_med'] * 1e3:.0f} ms: the scan uses both cores. "
                 f"Peak RSS median {scan['rss_med_kib'] / 1024:.1f} MiB, max {scan['rss_max_kib'] / 1024:.1f} MiB.")
        L.append(f"- Same scan with the human output (`cowshed tree FLEET`, 3 runs): median "
                 f"{scan['human_wall_med'] * 1e3:.0f} ms, peak RSS max {scan['human_rss_max_kib'] / 1024:.1f} MiB. "
                 "The difference from the JSON runs is the cost of building and printing the JSON document.")
        pa = scan["parts"]
        L.append(f"- Breakdown in one process (`examples/bench_forest.rs`, medians of {pa['runs']}): "
                 f"`scan_all` {pa['scan_all_ms']:.0f} ms; `Forest::build` of a clone of the {pa['images']} "
                 f"records {pa['forest_build_ms']:.0f} ms (the clone alone {pa['records_clone_ms']:.1f} ms); "
                 "the rest of `cowshed tree --output json` is process start, JSON and output. The TUI's catalog "
                 "worker runs `Forest::build` on every publish (at most every 100 ms while a scan streams or a "
                 "file changes). Inserting the records one by one with a linear key search, as the worker's "
                 f"`upsert` does while a scan streams: {pa['linear_upsert_all_ms']:.0f} ms in total.")
        L.append(f"- Found {scan['images']} images in {scan['trees']} trees, {scan['errors']} scan errors.")
        L.append(f"- `qemu-img info --backing-chain --output=json FILE` for a random sample of {scan['sample']} "
                 f"of the same {scan['images']} files (seed {args.seed}), one process each: "
                 f"{scan['qemu_sample_s']:.2f} s, {scan['qemu_per_img_ms']:.2f} ms per image; "
                 f"{scan['qemu_failures']} exited non-zero (the fleet has broken chains and a cycle on "
                 "purpose); scaled to all files: "
                 f"{scan['qemu_est_s']:.1f} s. **The qemu-img loop is a sample scaled, not measured over all.**")
        L.append(f"- A loop of {scan['sample']} `true` from the same harness: {scan['true_sample_s']:.2f} s "
                 f"({scan['true_sample_s'] / scan['sample'] * 1e3:.2f} ms per spawn).")
        L.append("")
    if lat:
        s, st, q = lat["screen"], lat["state"], lat["qemu_io"]
        L.append("## 2. Write → screen latency")
        L.append("")
        L.append("`examples/bench_latency.rs`: the real `App` (catalog worker, inotify watcher with its "
                 "default 200 ms debounce) driven by a copy of the loop in `tui::run_with`, drawing with "
                 "`view::draw` into a ratatui `TestBackend` (160×40). A writer thread runs "
                 "`qemu-io -f qcow2 -c 'write -P N OFF 1M' top.qcow2` (new 1 MiB each time, 300–700 ms "
                 "apart, each after the last was seen), notes when qemu-io exits and `stat`s the file. "
                 "Latency = qemu-io exit → the first redraw whose `top.qcow2` row shows that allocated size "
                 "(formatted by `view::human`), with the record in `app.forest` equal to st_blocks×512. "
                 "The loop differs from `run_with` only in waking every 50–100 ms to notice a miss "
                 f"(timeout {lat['timeout_ms']} ms, counted as the timeout).")
        L.append("")
        L.append("| | p50 | p95 | max |")
        L.append("|---|---|---|---|")
        L.append(f"| on screen (after draw) | {s['p50']:.1f} ms | {s['p95']:.1f} ms | {s['max']:.1f} ms |")
        L.append(f"| in app state (before draw) | {st['p50']:.1f} ms | {st['p95']:.1f} ms | {st['max']:.1f} ms |")
        L.append(f"| qemu-io run (for scale) | {q['p50']:.1f} ms | {q['p95']:.1f} ms | {q['max']:.1f} ms |")
        L.append("")
        early = sum(1 for x in lat["screen_ms"] if x is not None and x < 5)
        L.append(f"{lat['writes']} writes, {lat['missed']} missed, min {s['min']:.1f} ms. Most of the latency is "
                 "the watcher's debounce (200 ms quiet time before an event is reported). "
                 f"{early} write(s) showed in < 5 ms: the size was already on screen when qemu-io exited "
                 "(qemu-io ran longer than the debounce, so the event fired before its exit).")
        L.append("")
    if keys:
        L.append("## Keys on the fleet")
        L.append("")
        L.append("`examples/bench_keys.rs`: the real `App` on the fleet (catalog worker and watcher running), "
                 "each key as `App::update` then `view::draw` into a 160×40 `TestBackend`, the answers it "
                 "asked for (details) handled before the next press; the terminal's own drawing is not in it.")
        L.append("")
        L.append("| key | p50 | p95 | max |")
        L.append("|---|---|---|---|")
        for k, v in keys.items():
            L.append(f"| {k} | {v['p50']:.1f} ms | {v['p95']:.1f} ms | {v['max']:.1f} ms |")
        L.append("")
    if idle:
        L.append("## 3. CPU of the TUI")
        L.append("")
        L.append(f"Release binary in a detached tmux session (`tmux -L {TMUX_SOCKET}`, 120×40) on "
                 f"`{idle['roots'][0]}` plus a scratch directory with one overlay (`grow-top.qcow2`). "
                 f"Ready (scan done, drawn) {idle['ready_s']:.2f} s after start; header: `{idle['header']}`. "
                 f"Peak RSS (VmHWM) {idle['rss_kib'] / 1024:.1f} MiB after the scan, "
                 f"{idle.get('rss_end_kib', 0) / 1024:.1f} MiB at the end. "
                 "CPU = Δ(utime+stime) of the process (all threads) from /proc/PID/stat over the window; "
                 "wakeups = Δ context switches over all threads; bytes drawn = terminal output captured by "
                 "`tmux pipe-pane` (0 means no redraw). No input is sent.")
        L.append("")
        L.append("| phase | window | CPU | wakeups/s | bytes drawn | by thread: CPU ms, wakeups/s |")
        L.append("|---|---|---|---|---|---|")
        for k, label in (("idle", "idle (nothing changes)"),
                         ("growing", f"overlay growing (qemu-io every 300 ms, {idle.get('writes', 0)} writes)"),
                         ("after", "after the writes stop (+7 s)")):
            if k in idle:
                v = idle[k]
                L.append(f"| {label} | {v['wall']:.1f} s | {v['cpu_s'] * 1e3:.0f} ms = {v['cpu_pct']:.2f}% | "
                         f"{v['wakeups_per_s']:.1f} | {v['out_bytes']} | " +
                         "; ".join(f"{n} {c:.0f}, {w:.1f}" for n, (c, w) in v["threads"].items()) + " |")
        if idle.get("grow_screen"):
            L.append("")
            L.append(f"Row of the growing overlay at the end of the writes: `{idle['grow_screen']}`")
        L.append("")
    if failures:
        L.append("## Failures")
        L.append("")
        for f in failures:
            L.append("```")
            L.append(f.strip())
            L.append("```")
        L.append("")
    L.append(f"Run time of the script: {meta.get('runtime_s', 0):.0f} s.")
    L.append("")
    return "\n".join(L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures", type=Path, help="fixture directory (its fleet/ is scanned)")
    ap.add_argument("--fleet-n", type=int, default=10000,
                    help="fleet size to build if FIXTURE_DIR/fleet is smaller (default 10000)")
    ap.add_argument("--runs", type=int, default=7, help="timed scans (default 7, at least 5)")
    ap.add_argument("--sample", type=int, default=1000, help="qemu-img loop sample size (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--writes", type=int, default=40, help="writes for the latency test (default 40)")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--key-rounds", type=int, default=20, help="presses of each key (default 20)")
    ap.add_argument("--only", action="append", choices=["scan", "latency", "keys", "idle"])
    ap.add_argument("--skip-build", action="store_true", help="use the existing target/release binaries")
    ap.add_argument("--out", type=Path, default=REPO / "benches" / "results-scan.md")
    args = ap.parse_args()
    args.fixtures = args.fixtures.resolve()
    only = set(args.only or ["scan", "latency", "keys", "idle"])
    started = time.perf_counter()
    meta = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M %Z").strip(), "host": platform.node(),
            "load_start": loadavg(), "busy": busy_processes(), "load": {}}
    meta["git"] = run(["git", "-C", REPO, "describe", "--always", "--dirty"], check=False).stdout.strip() or "?"
    try:
        require_tools("qemu-img", "qemu-io", "/usr/bin/time", "cargo")
        ensure_fixtures(args.fixtures, args.fleet_n)
        cowshed, example, forest_bin = build(args.skip_build)
    except BenchError as e:
        log(f"setup: {e}")
        return 2
    fleet = args.fixtures / "fleet"
    scratch = Path(tempfile.mkdtemp(prefix=".scan-live.", dir=args.fixtures))
    failures: list[str] = []
    scan = lat = idle = keys = None
    try:
        if "scan" in only:
            meta["load"]["scan"] = loadavg()
            try:
                scan = bench_scan(cowshed, forest_bin, fleet, scratch, max(args.runs, 1), args.sample, args.seed)
            except (BenchError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                failures.append(f"scan: {e}")
        if "latency" in only:
            meta["load"]["latency"] = loadavg()
            try:
                lat = bench_latency(example, scratch, args.writes)
            except (BenchError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                failures.append(f"latency: {e}")
        if "keys" in only:
            meta["load"]["keys"] = loadavg()
            try:
                keys = bench_keys(fleet, args.key_rounds)
            except (BenchError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                failures.append(f"keys: {e}")
        if "idle" in only:
            meta["load"]["idle"] = loadavg()
            try:
                idle = bench_idle(cowshed, fleet, scratch, args.idle_seconds)
            except (BenchError, OSError, ValueError) as e:
                failures.append(f"idle: {e}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta["load_end"] = loadavg()
    meta["runtime_s"] = time.perf_counter() - started
    text = report(args, meta, scan, lat, idle, failures, keys)
    args.out.write_text(text)
    print(text)
    log(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
