#!/usr/bin/env python3
"""Side-by-side benchmark of cowshed against qemu-img (and cp) in ONE run.

Reports RATIOS between programs measured alternately on the same machine in
the same minute; it never asserts a time and is not a test. See README.md.

usage: benches/compare.py [options] FIXTURE_DIR

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAKE_FIXTURES = REPO / ".." / "shared" / "bench" / "make-fixtures.sh"
FLEET_N = 1000
ALL_SECTIONS = ("convert", "info", "map", "commit", "write", "convert-qcow2", "rebase",
                "compare")


class BenchError(Exception):
    """A step failed; the message says which command and why."""


# ---------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clip(line: str, n: int = 300) -> str:
    return line if len(line) <= n else line[:n] + f"... [{len(line) - n} more chars]"


def fmt_cmd(cmd: list[str]) -> str:
    return " ".join(str(c) for c in cmd)


def tail(text: str | bytes | None, n: int = 15) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = text.strip().splitlines()
    return "\n".join(lines[-n:])


def run(cmd: list[str], *, cwd: Path | None = None, capture: bool = True,
        timeout: float | None = 900) -> subprocess.CompletedProcess:
    """Run cmd, raising BenchError with the command, exit code and stderr."""
    try:
        return subprocess.run([str(c) for c in cmd], cwd=cwd, check=True,
                              stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout)
    except FileNotFoundError as e:
        raise BenchError(f"cannot run `{cmd[0]}`: {e}") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"`{fmt_cmd(cmd)}` timed out after {timeout}s") from None
    except subprocess.CalledProcessError as e:
        raise BenchError(f"`{clip(fmt_cmd(cmd))}` (cwd={cwd or os.getcwd()}) exited with "
                         f"{e.returncode}:\n{clip(tail(e.stderr), 2000)}") from None


def timed(cmd: list[str], *, cwd: Path | None = None, stdout=subprocess.DEVNULL,
          ok_codes: tuple[int, ...] = (0,)) -> float:
    """Wall-clock seconds of one successful run of cmd (an exit code in
    ok_codes: `compare` exits 1 for images that differ)."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=stdout,
                           stderr=subprocess.PIPE, timeout=900)
        if r.returncode not in ok_codes:
            raise subprocess.CalledProcessError(r.returncode, cmd, stderr=r.stderr)
    except subprocess.CalledProcessError as e:
        raise BenchError(f"`{clip(fmt_cmd(cmd))}` (cwd={cwd or os.getcwd()}) exited with "
                         f"{e.returncode}:\n{clip(tail(e.stderr), 2000)}") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"`{fmt_cmd(cmd)}` timed out") from None
    return time.perf_counter() - t0


def child_cpu() -> float:
    """User + system CPU seconds of all waited-for children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def settle() -> None:
    """Untimed: push out dirty pages left by other processes (concurrent
    builds) so each timed run starts from a similar state."""
    os.sync()


def allocated(p: Path) -> int:
    return p.stat().st_blocks * 512


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------
# Setup: tools, fixtures, build
# ---------------------------------------------------------------------------

def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise BenchError(f"missing tool(s) on PATH: {', '.join(missing)}")


def fixtures_ok(d: Path) -> list[str]:
    """Names of missing fixture files (empty when complete)."""
    missing = [n for n in ("base.qcow2", "base.raw", "CHAIN_TOP") if not (d / n).is_file()]
    if (d / "CHAIN_TOP").is_file():
        top = (d / "CHAIN_TOP").read_text().strip()
        if not top or not (d / top).is_file():
            missing.append(top or "<chain top named in CHAIN_TOP>")
    n = len(glob.glob(str(d / "fleet" / "vm-*.qcow2")))
    if n != FLEET_N:
        missing.append(f"fleet/vm-*.qcow2 ({n} of {FLEET_N})")
    return missing


def ensure_fixtures(d: Path) -> None:
    missing = fixtures_ok(d)
    if not missing:
        return
    script = MAKE_FIXTURES.resolve()
    if not script.is_file():
        raise BenchError(f"fixtures missing in {d} ({', '.join(missing)}) and the generator "
                         f"{script} does not exist")
    log(f"fixtures missing in {d} ({', '.join(missing)}); building with {script} "
        "(takes a few minutes, not timed)")
    d.mkdir(parents=True, exist_ok=True)
    run(["bash", script, d], capture=False, timeout=3600)
    missing = fixtures_ok(d)
    if missing:
        raise BenchError(f"{script} ran but fixtures are still missing: {', '.join(missing)}")


def build_cowshed() -> Path:
    log("cargo build --release")
    try:
        p = subprocess.run(["cargo", "build", "--release", "--bin", "cowshed",
                            "--message-format=json-render-diagnostics"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=1800)
    except FileNotFoundError:
        raise BenchError("cargo not found on PATH") from None
    if p.returncode != 0:
        raise BenchError(f"`cargo build --release` failed (exit {p.returncode}):\n"
                         f"{tail(p.stderr, 40)}")
    exe = None
    for line in p.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (msg.get("reason") == "compiler-artifact" and msg.get("executable")
                and msg.get("target", {}).get("name") == "cowshed"):
            exe = Path(msg["executable"])
    exe = exe or REPO / "target" / "release" / "cowshed"
    if not os.access(exe, os.X_OK):
        raise BenchError(f"build succeeded but {exe} is not an executable")
    return exe


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

@dataclass
class Series:
    name: str
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def med(self) -> float:
        return median(self.times)


def pair_ratios(num: Series, den: Series) -> list[float]:
    return [a / b for a, b in zip(num.times, den.times) if b > 0]


def ratio_cell(r: list[float]) -> str:
    if not r:
        return "n/a"
    return f"**{median(r):.2f}x** ({min(r):.2f}–{max(r):.2f})"


def s(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


@dataclass
class Report:
    header: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    def render(self) -> str:
        out = list(self.header)
        for sec in self.sections:
            out += ["", sec]
        if self.failures:
            out += ["", "## Failures", ""]
            for f in self.failures:
                out += ["```", f, "```"]
        if self.notes:
            out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        out += ["", "<details><summary>Raw samples (seconds)</summary>", "", "```json",
                json.dumps(self.raw, indent=1), "```", "</details>", ""]
        return "\n".join(out)


# ---------------------------------------------------------------------------
# 1. convert -O raw
# ---------------------------------------------------------------------------

def bench_convert(rep: Report, cow: Path, fx: Path, scratch: Path, sources: list[str],
                  runs: int) -> None:
    rows = []
    for src_name in sources:
        src = fx / src_name
        stem = Path(src_name).stem
        if src_name == "base.qcow2" and (fx / "base.raw").is_file():
            # make-fixtures.sh made base.raw with `qemu-img convert -O raw`:
            # the same guest bytes, no need to write 1.5 GiB again.
            ref, own_ref = fx / "base.raw", False
        else:
            ref, own_ref = scratch / f"ref-{stem}.raw", True
            log(f"convert: reference raw of {src_name} for cp (qemu-img convert, untimed)")
            run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, ref])
        out_c, out_q, out_p = (scratch / f"out-{stem}-{w}.raw" for w in ("cowshed", "qemu", "cp"))

        def cp_job(sync: bool):
            def job() -> float:
                t0 = time.perf_counter()
                run(["cp", "--sparse=always", ref, out_p], capture=False)
                if sync:
                    fd = os.open(out_p, os.O_RDONLY)
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
                return time.perf_counter() - t0
            return job

        configs = [
            ("writeback (flushed)",
             ["convert", "-O", "raw"], ["-t", "writeback"], True,
             "`cowshed convert -O raw` (default -t writeback)",
             "`qemu-img convert -t writeback -O raw`", "`cp --sparse=always` + fdatasync"),
            ("unsafe (no flush)",
             ["convert", "-O", "raw", "-t", "unsafe"], [], False,
             "`cowshed convert -O raw -t unsafe`",
             "`qemu-img convert -O raw` (default = unsafe)", "`cp --sparse=always`"),
        ]
        for label, cow_args, q_args, sync, cow_desc, q_desc, cp_desc in configs:
            cow_cmd = [cow, *cow_args, src, out_c]
            q_cmd = ["qemu-img", "convert", *q_args, "-O", "raw", src, out_q]
            jobs = {
                "cowshed": (lambda c=cow_cmd: timed(c), out_c),
                "qemu-img": (lambda c=q_cmd: timed(c), out_q),
                "cp": (cp_job(sync), out_p),
            }
            key = f"convert {src_name} {label}"
            try:
                # Warm-up (untimed) of each; cowshed's and qemu-img's warm-up
                # outputs are compared once per config.
                for o in (out_c, out_q, out_p):
                    unlink(o)
                jobs["cowshed"][0]()
                jobs["qemu-img"][0]()
                cmp = subprocess.run(["cmp", out_c, out_q], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
                if cmp.returncode == 0:
                    identical = "yes"
                else:
                    identical = "**NO**"
                    rep.failures.append(f"{key}: cowshed output differs from qemu-img's:\n"
                                        f"{(cmp.stdout + cmp.stderr).strip()}")
                alloc = (allocated(out_c), allocated(out_q))
                for o in (out_c, out_q):
                    unlink(o)
                if label == configs[0][0]:  # cp's source is warm after this
                    jobs["cp"][0]()
                    unlink(out_p)

                series = {n: Series(n) for n in jobs}
                log(f"convert: {key}: {runs} alternated rounds (cowshed, qemu-img, cp)")
                names = list(jobs)
                for i in range(runs):
                    # Rotate who goes first so no program always holds the
                    # same position in the round (writeback/page-allocation
                    # effects of the previous run land on the next one).
                    for name in names[i % len(names):] + names[:i % len(names)]:
                        job, out = jobs[name]
                        settle()
                        c0 = child_cpu()
                        series[name].times.append(job())
                        series[name].cpu.append(child_cpu() - c0)
                        unlink(out)
                rows.append((src_name, label, cow_desc, q_desc, cp_desc, series, identical, alloc))
                rep.raw[key] = {n: [round(t, 4) for t in v.times] for n, v in series.items()}
                rep.raw[key + " cpu"] = {n: [round(t, 4) for t in v.cpu]
                                         for n, v in series.items()}
            except BenchError as e:
                rep.failures.append(f"{key}: {e}")
                rows.append((src_name, label, cow_desc, q_desc, cp_desc, None, "n/a", None))
            finally:
                for o in (out_c, out_q, out_p):
                    unlink(o)
        if own_ref:
            unlink(ref)

    t = ["## 1. `convert -O raw` (warm cache, output on the fixtures' file system)", "",
         f"{runs} alternated rounds per row (cowshed, qemu-img, cp; the starting program "
         "rotates each round). "
         "Ratios are the median of per-round ratios, min–max in parentheses; "
         "**> 1 means cowshed is faster**.", "",
         "| source | durability | cowshed s | qemu-img s | cp s | qemu-img / cowshed | "
         "cp / cowshed | CPU s cowshed / qemu-img | CPU qemu-img / cowshed | "
         "identical to qemu-img | allocated MiB (cowshed / qemu-img) |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for src_name, label, _cd, _qd, _pd, ser, ident, alloc in rows:
        if ser is None:
            t.append(f"| {src_name} | {label} | FAILED | | | | | | | {ident} | |")
            continue
        c, q, p = ser["cowshed"], ser["qemu-img"], ser["cp"]
        al = f"{alloc[0] / 2**20:.0f} / {alloc[1] / 2**20:.0f}" if alloc else ""
        t.append(f"| {src_name} | {label} | {s(c.med)} | {s(q.med)} | {s(p.med)} | "
                 f"{ratio_cell(pair_ratios(q, c))} | {ratio_cell(pair_ratios(p, c))} | "
                 f"{s(median(c.cpu))} / {s(median(q.cpu))} | "
                 f"{ratio_cell([a / b for a, b in zip(q.cpu, c.cpu) if b > 0])} | "
                 f"{ident} | {al} |")
    t += ["", "Commands: writeback = `cowshed convert -O raw SRC DST` (default `-t writeback`: "
          "fdatasync, rename, fsync dir) vs `qemu-img convert -t writeback -O raw` "
          "(fdatasync at close) vs `cp --sparse=always REF DST` + `fdatasync(DST)`; "
          "unsafe = `cowshed convert -t unsafe` vs `qemu-img convert -O raw` "
          "(qemu-img's default cache mode for convert is unsafe) vs plain `cp --sparse=always`. "
          "REF is a raw file of the same guest bytes made beforehand by `qemu-img convert -O raw` "
          "(untimed; for base.qcow2 the fixture base.raw, which make-fixtures.sh made that way). "
          "CPU = user + system seconds of the program's process (from getrusage), which is "
          "less sensitive than wall time to other load on the machine."]
    rep.sections.append("\n".join(t))


# ---------------------------------------------------------------------------
# 2. info over the fleet
# ---------------------------------------------------------------------------

INFO_FIELDS = ("format", "virtual-size", "actual-size", "cluster-size", "dirty-flag",
               "backing-filename", "full-backing-filename", "backing-filename-format",
               "encrypted")


def bench_info(rep: Report, cow: Path, fx: Path, reps: int) -> None:
    fleet = fx / "fleet"
    files = sorted(Path(p).name for p in glob.glob(str(fleet / "vm-*.qcow2")))
    n = len(files)
    key = "info fleet"

    def cow_single() -> tuple[float, subprocess.CompletedProcess]:
        t0 = time.perf_counter()
        p = subprocess.run([str(cow), "info", "--output", "json", *files], cwd=fleet,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
        return time.perf_counter() - t0, p

    def loop(cmd_of, collect: dict | None = None) -> tuple[float, list[str]]:
        fails = []
        t0 = time.perf_counter()
        for f in files:
            p = subprocess.run(cmd_of(f), cwd=fleet,
                               stdout=subprocess.PIPE if collect is not None else subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=60)
            if p.returncode != 0:
                fails.append(clip(f"{f}: exit {p.returncode}: {tail(p.stderr, 2)}"))
            elif collect is not None:
                collect[f] = p.stdout
        return time.perf_counter() - t0, fails

    q_cmd = lambda f: ["qemu-img", "info", "--output=json", f]
    c_cmd = lambda f: [str(cow), "info", "--output", "json", f]
    t_cmd = lambda f: ["true", f]

    # Warm-up (untimed) of each; also counts failures and checks output.
    log(f"info: warm-up over {n} fleet images")
    _, p = cow_single()
    single_fail_lines = [clip(l) for l in p.stderr.decode(errors="replace").splitlines()
                         if l.strip()]
    try:
        cow_docs = [d for d in json.loads(p.stdout) if isinstance(d, dict)]
    except (json.JSONDecodeError, TypeError) as e:
        cow_docs = []
        rep.failures.append(f"{key}: `cowshed info --output json <{n} files>` (1 process) "
                            f"printed no JSON array ({e}); exit {p.returncode}; stderr:\n"
                            + "\n".join(single_fail_lines[-10:]))
    single_failed = n - len(cow_docs)
    q_out: dict[str, bytes] = {}
    _, q_fails = loop(q_cmd, q_out)
    _, c_fails = loop(c_cmd)

    # Field comparison (informational) against qemu-img, matched by filename.
    by_name = {Path(d.get("filename", "")).name: d for d in cow_docs if isinstance(d, dict)}
    mism: dict[str, int] = {}
    examples: list[str] = []
    compared = 0
    for f, raw in q_out.items():
        qd, cd = json.loads(raw), by_name.get(f)
        if cd is None:
            continue
        compared += 1
        for k in INFO_FIELDS:
            if qd.get(k) != cd.get(k):
                mism[k] = mism.get(k, 0) + 1
                if len(examples) < 5:
                    examples.append(f"{f} `{k}`: qemu-img={qd.get(k)!r} cowshed={cd.get(k)!r}")

    series = {x: Series(x) for x in ("cow1", "qemuN", "cowN", "trueN")}
    log(f"info: {reps} alternated rounds")
    warm_rc = p.returncode

    def cow1() -> float:
        t, pp = cow_single()
        if pp.returncode != warm_rc:
            raise BenchError(f"`cowshed info --output json <{n} files>` exited {pp.returncode} "
                             f"(warm-up: {warm_rc}):\n{tail(pp.stderr)}")
        return t

    steps = {"cow1": cow1, "qemuN": lambda: loop(q_cmd)[0],
             "cowN": lambda: loop(c_cmd)[0], "trueN": lambda: loop(t_cmd)[0]}
    order = list(steps)
    for i in range(reps):
        for k in order[i % len(order):] + order[:i % len(order)]:
            series[k].times.append(steps[k]())
    rep.raw[key] = {k: [round(t, 4) for t in v.times] for k, v in series.items()}

    c1, qn, cn, tn = (series[k] for k in ("cow1", "qemuN", "cowN", "trueN"))

    def row(label: str, ser: Series, failed: int, ratio: str, extra: str = "") -> str:
        if failed >= n:
            return f"| {label} | FAILED (all {n} images) | | | {failed} |"
        warn = " (timing includes failing images)" if failed else ""
        return (f"| {label} | {s(ser.med)}{warn} | {ser.med / n * 1e3:.3f} | {ratio} | "
                f"{failed}{extra} |")

    t = [f"## 2. `info --output json` over the fleet ({n} images)", "",
         f"{reps} alternated rounds (starting program rotates) after one warm-up round; "
         "medians. Ratio = qemu-img loop time / this row's time, median of per-round ratios "
         "(**> 1 means cowshed is faster**).", "",
         "| workload | median s | per image ms | qemu-img loop / this | images failed |",
         "|---|---:|---:|---:|---:|",
         row(f"`cowshed info --output json` x1 process, {n} files", c1, single_failed,
             ratio_cell(pair_ratios(qn, c1))),
         row(f"`qemu-img info --output=json` x{n} processes", qn, len(q_fails), "1.00x"),
         row(f"`cowshed info --output json` x{n} processes", cn, len(c_fails),
             ratio_cell(pair_ratios(qn, cn))),
         f"| `true` x{n} processes (spawn floor of the harness) | {s(tn.med)} | "
         f"{tn.med / n * 1e3:.3f} | — | — |"]
    net = [(q - tt) / (c - tt) for q, c, tt in zip(qn.times, cn.times, tn.times) if c > tt]
    if net:
        t += ["", f"Net of the spawn floor (per-round `(qemu-img loop - true loop) / "
              f"(cowshed loop - true loop)`): {ratio_cell(net)}; per image above the floor: "
              f"qemu-img {(qn.med - tn.med) / n * 1e3:.3f} ms, cowshed "
              f"{(cn.med - tn.med) / n * 1e3:.3f} ms."]
    if mism:
        t += ["", "Field differences vs qemu-img (informational): " +
              ", ".join(f"`{k}` in {v} images" for k, v in sorted(mism.items())) +
              ". Examples: " + "; ".join(examples)]
    elif compared:
        t += ["", f"Fields {', '.join('`%s`' % k for k in INFO_FIELDS)} agree with qemu-img "
              f"for all {compared} images both could read."]
    rep.sections.append("\n".join(t))
    if single_failed and cow_docs:
        rep.failures.append(f"{key}: cowshed x1 process: {single_failed} of {n} image(s) "
                            "missing from the JSON; stderr:\n" + "\n".join(single_fail_lines[:20]))
    for what, fl in (("qemu-img loop", q_fails), ("cowshed loop", c_fails)):
        if fl:
            rep.failures.append(f"{key}: {what}: {len(fl)} image(s) failed:\n" + "\n".join(fl[:20]))


# ---------------------------------------------------------------------------
# 3. map
# ---------------------------------------------------------------------------

def bench_map(rep: Report, cow: Path, fx: Path, top: str, runs: int) -> None:
    key = f"map {top}"
    c_cmd = [cow, "map", "--output", "json", top]
    q_cmd = ["qemu-img", "map", "--output=json", top]
    try:
        log(f"map: warm-up + JSON comparison on {top}")
        c_doc = json.loads(run(c_cmd, cwd=fx).stdout)
        q_doc = json.loads(run(q_cmd, cwd=fx).stdout)
        if c_doc == q_doc:
            equal = f"yes ({len(q_doc)} extents)"
        else:
            equal = f"**NO** (cowshed {len(c_doc)} / qemu-img {len(q_doc)} extents)"
            first = next((i for i, (a, b) in enumerate(zip(c_doc, q_doc)) if a != b),
                         min(len(c_doc), len(q_doc)))
            rep.failures.append(
                f"{key}: JSON differs; first difference at extent {first}:\n"
                f"cowshed:  {c_doc[first] if first < len(c_doc) else '<end>'}\n"
                f"qemu-img: {q_doc[first] if first < len(q_doc) else '<end>'}")
        c, q = Series("cowshed"), Series("qemu-img")
        log(f"map: {runs} alternated rounds")
        for i in range(runs):
            if i % 2 == 0:
                c.times.append(timed(c_cmd, cwd=fx))
                q.times.append(timed(q_cmd, cwd=fx))
            else:
                q.times.append(timed(q_cmd, cwd=fx))
                c.times.append(timed(c_cmd, cwd=fx))
        rep.raw[key] = {"cowshed": [round(x, 5) for x in c.times],
                        "qemu-img": [round(x, 5) for x in q.times]}
        row = (f"| `map --output json` {top} | {s(c.med)} | {s(q.med)} | "
               f"{ratio_cell(pair_ratios(q, c))} | {equal} |")
    except (BenchError, json.JSONDecodeError) as e:
        rep.failures.append(f"{key}: {e}")
        row = f"| `map --output json` {top} | FAILED | | | |"
    rep.sections.append("\n".join([
        f"## 3. `map` on the chain top ({top}, 8-deep chain)", "",
        f"{runs} alternated rounds after one warm-up each; process wall time incl. start-up.", "",
        "| workload | cowshed s | qemu-img s | qemu-img / cowshed | JSON equal (parsed) |",
        "|---|---:|---:|---:|:---:|", row]))


def bench_commit(rep: Report, cow: Path, fx: Path, scratch: Path, runs: int) -> None:
    """commit overlay.qcow2 into base.qcow2 on fresh copies, both flushing."""
    c, q = Series("cowshed"), Series("qemu-img")
    equal = "not checked"
    for i in range(runs + 1):
        order = [("cowshed", c), ("qemu-img", q)] if i % 2 == 0 else [("qemu-img", q), ("cowshed", c)]
        dirs = {}
        for name, series in order:
            d = scratch / f"commit-{name}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            for f in ("base.qcow2", "overlay.qcow2"):
                shutil.copyfile(fx / f, d / f)
            settle()
            cmd = ([cow, "commit", "-q", "overlay.qcow2"] if name == "cowshed"
                   else ["qemu-img", "commit", "-q", "-t", "writeback", "overlay.qcow2"])
            t = timed(cmd, cwd=d)
            if i > 0:  # round 0 warms the cache
                series.times.append(t)
            dirs[name] = d
        if i == 0:
            cmp = subprocess.run(["qemu-img", "compare", str(dirs["cowshed"] / "base.qcow2"),
                                  str(dirs["qemu-img"] / "base.qcow2")],
                                 capture_output=True, text=True)
            chk = subprocess.run(["qemu-img", "check", str(dirs["cowshed"] / "base.qcow2")],
                                 capture_output=True, text=True)
            equal = ("yes" if cmp.returncode == 0 else "**NO**") + \
                    (", check clean" if chk.returncode == 0 else f", check exit {chk.returncode}")
            if cmp.returncode != 0 or chk.returncode != 0:
                rep.failures.append(f"commit: bases differ or check failed:\n{cmp.stdout}{chk.stdout}")
    for name in ("cowshed", "qemu-img"):
        shutil.rmtree(scratch / f"commit-{name}", ignore_errors=True)
    rep.raw["commit overlay.qcow2"] = {"cowshed": [round(x, 4) for x in c.times],
                                       "qemu-img": [round(x, 4) for x in q.times]}
    rep.sections.append("\n".join([
        "## 4. `commit` overlay.qcow2 into base.qcow2 (fresh copies each run)", "",
        f"{runs} alternated rounds after a warm-up round; both flush at the end "
        "(cowshed fsyncs base and top; `qemu-img commit -t writeback`).", "",
        "| workload | cowshed s | qemu-img s | qemu-img / cowshed | bases equal |",
        "|---|---:|---:|---:|:---:|",
        f"| commit | {s(c.med)} | {s(q.med)} | {ratio_cell(pair_ratios(q, c))} | {equal} |"]))


def bench_write(rep: Report, fx: Path, scratch: Path, runs: int) -> None:
    """Sequential 1 MiB writes into a fresh 1 GiB qcow2, flushed at the end."""
    exe = REPO / "target" / "release" / "examples" / "bench_write"
    run(["cargo", "build", "--release", "--quiet", "--example", "bench_write"], cwd=REPO)
    c, q = Series("cowshed"), Series("qemu-img")
    for i in range(runs + 1):
        for name in (("cowshed", "qemu-img") if i % 2 == 0 else ("qemu-img", "cowshed")):
            img = scratch / f"write-{name}.qcow2"
            unlink(img)
            settle()
            if name == "cowshed":
                t = float(run([exe, str(img), "1024"], cwd=scratch).stdout.strip())
                c.times.append(t) if i > 0 else None
            else:
                run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], cwd=scratch)
                t = timed(["qemu-img", "bench", "-q", "-w", "-s", "1M", "-c", "1024", "-d", "1",
                           "-t", "writeback", "-f", "qcow2", str(img)], cwd=scratch)
                q.times.append(t) if i > 0 else None
            unlink(img)
    rep.raw["write 1 GiB in 1 MiB"] = {"cowshed": [round(x, 4) for x in c.times],
                                      "qemu-img": [round(x, 4) for x in q.times]}
    gib = 1.0
    rep.sections.append("\n".join([
        "## 5. The allocating writer: 1024 sequential 1 MiB writes into a fresh 1 GiB qcow2", "",
        "cowshed: `examples/bench_write.rs` (writer open, writes, fsync; create not timed); "
        "qemu-img: `qemu-img bench -w -s 1M -c 1024 -d 1 -t writeback` (process time). "
        "qemu-io would be slower still (one request per command).", "",
        "| workload | cowshed s | qemu-img bench s | qemu-img / cowshed | cowshed MiB/s |",
        "|---|---:|---:|---:|---:|",
        f"| write | {s(c.med)} | {s(q.med)} | {ratio_cell(pair_ratios(q, c))} | "
        f"{gib * 1024 / c.med:.0f} |"]))


def alternate(rounds: int, programs: dict, prepare=None, cleanup=None) -> dict:
    """Time each program once per round, alternating who goes first, after an
    untimed warm-up round. `programs` maps a name to a zero-argument function
    returning seconds; `prepare(name)` runs untimed before each run (fresh
    copies), `cleanup(name)` after."""
    series = {n: Series(n) for n in programs}
    names = list(programs)
    for i in range(rounds + 1):
        for name in names[i % len(names):] + names[:i % len(names)]:
            if prepare:
                prepare(name)
            settle()
            t = programs[name]()
            if i > 0:
                series[name].times.append(t)
            if cleanup:
                cleanup(name)
    return series


def verify_image(rep: Report, key: str, out: Path, src: Path) -> str:
    """`qemu-img compare` against the source and `qemu-img check`: a cell."""
    cmp = subprocess.run(["qemu-img", "compare", str(out), str(src)], capture_output=True, text=True)
    chk = subprocess.run(["qemu-img", "check", str(out)], capture_output=True, text=True)
    if cmp.returncode != 0 or chk.returncode != 0:
        rep.failures.append(f"{key}: compare exit {cmp.returncode}, check exit {chk.returncode}:\n"
                            f"{cmp.stdout}{chk.stdout}{chk.stderr}")
        return "**NO**"
    return "yes"


def bench_convert_qcow2(rep: Report, cow: Path, fx: Path, scratch: Path, top: str,
                        runs: int) -> None:
    """convert -O qcow2, plain and compressed, against qemu-img at equal
    durability (neither flushes: qemu-img convert's default, cowshed -t unsafe)."""
    configs = [
        ("base.raw → qcow2", "base.raw", [], [], True),
        (f"{top} (depth 8) → qcow2", top, [], [], False),
        ("base.raw → qcow2 -c zlib", "base.raw", ["-c"], ["-c", "-W"], False),
        ("base.raw → qcow2 -c zstd", "base.raw", ["-c", "-o", "compression_type=zstd"],
         ["-c", "-W", "-o", "compression_type=zstd"], False),
    ]
    rows = []
    for label, src_name, cow_extra, q_extra, with_cp in configs:
        src = fx / src_name
        outs = {n: scratch / f"conv-{n}.qcow2" for n in ("cowshed", "qemu-img", "cp")}
        programs = {
            "cowshed": lambda: timed([cow, "convert", "-t", "unsafe", "-O", "qcow2", *cow_extra,
                                      src, outs["cowshed"]]),
            "qemu-img": lambda: timed(["qemu-img", "convert", "-O", "qcow2", *q_extra, src,
                                       outs["qemu-img"]]),
        }
        if with_cp:
            programs["cp"] = lambda: timed(["cp", "--sparse=always", src, outs["cp"]])
        log(f"convert -O qcow2: {label}: {runs} alternated rounds")
        # One checked run of each first: same guest data, check clean, sizes.
        for n in ("cowshed", "qemu-img"):
            unlink(outs[n])
            programs[n]()
        ok = verify_image(rep, label, outs["cowshed"], src)
        alloc = (allocated(outs["cowshed"]), allocated(outs["qemu-img"]))
        series = alternate(runs, programs, cleanup=lambda n: unlink(outs[n]))
        for o in outs.values():
            unlink(o)
        rep.raw[f"convert -O qcow2 {label}"] = {n: [round(t, 4) for t in v.times]
                                                for n, v in series.items()}
        c, q = series["cowshed"], series["qemu-img"]
        cp = f"{series['cp'].med / c.med:.2f}" if "cp" in series else "–"
        rows.append(f"| {label} | {s(c.med)} | {s(q.med)} | {ratio_cell(pair_ratios(q, c))} | "
                    f"{cp} | {alloc[0] / alloc[1]:.3f} | {ok} |")
    rep.sections.append("\n".join([
        "## 6. `convert -O qcow2` (plain and compressed)", "",
        f"{runs} alternated rounds after a warm-up; neither flushes (qemu-img convert's default, "
        "`cowshed convert -t unsafe`); compressed: qemu-img with `-W` (its fastest: parallel "
        "compression needs out-of-order writes), cowshed in order.", "",
        "| workload | cowshed s | qemu-img s | qemu-img / cowshed | cp / cowshed | "
        "allocated cowshed / qemu-img | compare + check |",
        "|---|---:|---:|---:|---:|---:|:---:|", *rows]))


def bench_rebase(rep: Report, cow: Path, fx: Path, scratch: Path, runs: int) -> None:
    """Safe rebase of a fresh overlay copy onto base.raw (same content as its
    base.qcow2: everything compared, nothing written) and onto "" (flatten)."""
    rows = []
    for label, args in (("onto base.raw (-F raw)", ["-b", "base.raw", "-F", "raw"]),
                        ('onto "" (flatten)', ["-b", ""])):
        dirs = {n: scratch / f"rebase-{n}" for n in ("cowshed", "qemu-img")}

        def prepare(name: str) -> None:
            d = dirs[name]
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            for f in ("base.qcow2", "base.raw"):
                (d / f).symlink_to(fx / f)
            run(["cp", "--sparse=always", fx / "overlay.qcow2", d / "overlay.qcow2"])

        programs = {
            "cowshed": lambda: timed([cow, "rebase", *args, "overlay.qcow2"], cwd=dirs["cowshed"]),
            "qemu-img": lambda: timed(["qemu-img", "rebase", "-t", "writeback", *args,
                                       "overlay.qcow2"], cwd=dirs["qemu-img"]),
        }
        log(f"rebase {label}: {runs} alternated rounds (fresh overlay copy each, not timed)")
        for n in programs:
            prepare(n)
            programs[n]()
        ok = verify_image(rep, f"rebase {label}", dirs["cowshed"] / "overlay.qcow2",
                          fx / "overlay.qcow2")
        alloc = (allocated(dirs["cowshed"] / "overlay.qcow2"),
                 allocated(dirs["qemu-img"] / "overlay.qcow2"))
        series = alternate(runs, programs, prepare=prepare)
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        rep.raw[f"rebase {label}"] = {n: [round(t, 4) for t in v.times] for n, v in series.items()}
        c, q = series["cowshed"], series["qemu-img"]
        rows.append(f"| rebase {label} | {s(c.med)} | {s(q.med)} | "
                    f"{ratio_cell(pair_ratios(q, c))} | {alloc[0] / alloc[1]:.3f} | {ok} |")
    rep.sections.append("\n".join([
        "## 7. `rebase` (safe) of overlay.qcow2", "",
        f"{runs} alternated rounds after a warm-up, fresh copy of the overlay before each (not "
        "timed); both flush at the end (`qemu-img rebase -t writeback`).", "",
        "| workload | cowshed s | qemu-img s | qemu-img / cowshed | allocated cowshed / qemu-img "
        "| view unchanged + check |",
        "|---|---:|---:|---:|---:|:---:|", *rows]))


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def bench_compare(rep: Report, cow: Path, fx: Path, top: str, runs: int) -> None:
    """`compare` of two images with the same guest data (everything read) and
    of the chain top with its base (they differ early)."""
    rows = []
    for label, a, b in (("base.qcow2 vs base.raw (identical)", "base.qcow2", "base.raw"),
                        (f"{top} vs base.qcow2 (differ)", top, "base.qcow2")):
        key = f"compare {label}"
        c_cmd = [cow, "compare", a, b]
        q_cmd = ["qemu-img", "compare", a, b]
        try:
            log(f"compare: warm-up and verdicts, {label}")
            c_out = subprocess.run(c_cmd, cwd=fx, capture_output=True, text=True)
            q_out = subprocess.run(q_cmd, cwd=fx, capture_output=True, text=True)
            same = (c_out.returncode, c_out.stdout) == (q_out.returncode, q_out.stdout)
            if not same:
                rep.failures.append(f"{key}: cowshed said {c_out.returncode} {c_out.stdout!r}, "
                                    f"qemu-img {q_out.returncode} {q_out.stdout!r}")
            c, q = Series("cowshed"), Series("qemu-img")
            for i in range(runs):
                first, second = ((c, c_cmd), (q, q_cmd)) if i % 2 == 0 else ((q, q_cmd), (c, c_cmd))
                for series, cmd in (first, second):
                    series.times.append(timed(cmd, cwd=fx, ok_codes=(0, 1)))
            rep.raw[key] = {"cowshed": [round(x, 5) for x in c.times],
                            "qemu-img": [round(x, 5) for x in q.times]}
            rows.append(f"| {label} | {s(c.med)} | {s(q.med)} | "
                        f"{ratio_cell(pair_ratios(q, c))} | {'yes' if same else '**NO**'} |")
        except BenchError as e:
            rep.failures.append(f"{key}: {e}")
            rows.append(f"| {label} | FAILED | | | |")
    rep.sections.append("\n".join([
        "## 8. `compare`", "",
        f"{runs} alternated rounds after one warm-up each; process wall time incl. start-up.", "",
        "| images | cowshed s | qemu-img s | qemu-img / cowshed | same verdict and exit code |",
        "|---|---:|---:|---:|:---:|", *rows]))


def busy_processes(window: float = 1.0, min_pct: float = 20.0) -> str:
    """Other processes using a lot of CPU right now (noise indicator)."""
    def sample() -> dict[int, tuple[int, str]]:
        out = {}
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                raw = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            f = raw[raw.rindex(")") + 2:].split()
            out[int(d)] = (int(f[11]) + int(f[12]), comm)
        return out
    a = sample()
    time.sleep(window)
    b = sample()
    hz = os.sysconf("SC_CLK_TCK")
    busy = sorted(((b[p][0] - a[p][0]) / hz / window * 100, b[p][1]) for p in b if p in a)
    top = [f"{name} {pct:.0f}%" for pct, name in reversed(busy) if pct >= min_pct][:5]
    return ", ".join(top) or "none"


def machine_header(cow: Path, fx: Path) -> list[str]:
    def out(cmd, cwd=None) -> str:
        try:
            return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, timeout=30).stdout.strip()
        except OSError:
            return "?"
    qv = out(["qemu-img", "--version"]).splitlines()
    cv = out([str(cow), "--version"])
    rev = out(["git", "rev-parse", "--short", "HEAD"], cwd=REPO) or "no commit"
    dirty = " (+ uncommitted changes)" if out(["git", "status", "--porcelain", "--", "src"],
                                               cwd=REPO) else ""
    fstype = out(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", str(fx)]) or \
        out(["stat", "-f", "-c", "%T", str(fx)])
    return [
        "# cowshed vs qemu-img: side-by-side ratios", "",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs (nproc {out(['nproc'])}), "
        f"{platform.system()} {platform.release()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM",
        f"- qemu-img: {qv[0] if qv else '?'}",
        f"- cowshed: {cv} (git {rev}{dirty}), release build",
        f"- fixtures: {fx} ({fstype}); scratch outputs on the same file system",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"other processes above 20% CPU: {busy_processes()}",
    ]


def section(rep: Report, name: str, fn, *args) -> None:
    """Run one section; a failure is reported and the next section still runs."""
    try:
        fn(*args)
    except BenchError as e:
        rep.failures.append(f"{name}: {e}")
        rep.sections.append(f"## {name}: FAILED (see Failures)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures", type=Path, help="fixture directory (built if missing)")
    ap.add_argument("--out", type=Path, default=REPO / "benches" / "results.md",
                    help="markdown report path (default: benches/results.md)")
    ap.add_argument("--runs", type=int, default=7,
                    help="alternated rounds per convert configuration (default 7, min 1)")
    ap.add_argument("--map-runs", type=int, default=21, help="alternated map rounds (default 21)")
    ap.add_argument("--info-reps", type=int, default=3,
                    help="alternated rounds over the fleet (default 3)")
    ap.add_argument("--only", choices=ALL_SECTIONS, action="append",
                    help="run only these sections (repeatable)")
    ap.add_argument("--cowshed", type=Path,
                    help="use this binary instead of building with cargo build --release")
    a = ap.parse_args()
    if min(a.runs, a.map_runs, a.info_reps) < 1:
        ap.error("run counts must be >= 1")
    sections = set(a.only or ALL_SECTIONS)
    t_start = time.perf_counter()

    try:
        require_tools("qemu-img", "cp", "cmp", "true", "bash")
        fx = a.fixtures.resolve()
        ensure_fixtures(fx)
        top = (fx / "CHAIN_TOP").read_text().strip()
        cow = a.cowshed.resolve() if a.cowshed else build_cowshed()
        log(f"cowshed binary: {cow}")
    except BenchError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2

    rep = Report(header=machine_header(cow, fx))
    scratch = Path(tempfile.mkdtemp(prefix=".cowshed-bench-", dir=fx))
    try:
        if scratch.stat().st_dev != fx.stat().st_dev:
            raise BenchError(f"scratch {scratch} is not on the fixtures' file system")
        if "convert" in sections:
            need = 2 * (fx / "base.qcow2").stat().st_size + (3 << 30)
            free = shutil.disk_usage(scratch).free
            if free < need:
                raise BenchError(f"need ~{need >> 30} GiB free next to the fixtures, have "
                                 f"{free >> 30} GiB")
            section(rep, "convert", bench_convert, rep, cow, fx, scratch,
                    ["base.qcow2", top], a.runs)
        if "info" in sections:
            section(rep, "info", bench_info, rep, cow, fx, a.info_reps)
        if "map" in sections:
            section(rep, "map", bench_map, rep, cow, fx, top, a.map_runs)
        if "commit" in sections:
            section(rep, "commit", bench_commit, rep, cow, fx, scratch, max(3, a.runs // 2 + 1))
        if "write" in sections:
            section(rep, "write", bench_write, rep, fx, scratch, max(3, a.runs // 2 + 1))
        if "convert-qcow2" in sections:
            section(rep, "convert-qcow2", bench_convert_qcow2, rep, cow, fx, scratch, top, a.runs)
        if "rebase" in sections:
            section(rep, "rebase", bench_rebase, rep, cow, fx, scratch, a.runs)
        if "compare" in sections:
            section(rep, "compare", bench_compare, rep, cow, fx, top, a.runs)
    except BenchError as e:
        rep.failures.append(str(e))
    except KeyboardInterrupt:
        print("compare.py: interrupted; no report written", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    elapsed = time.perf_counter() - t_start
    rep.header.append(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                      f"harness wall time {elapsed:.0f} s")
    rep.notes += [
        "Ratios, not absolute times, are the result: each round runs the programs back to back, "
        "and the ratio is taken within the round, so slow drift (other builds, writeback) "
        "mostly cancels. Absolute seconds depend on the machine and its load.",
        "Warm cache: every program runs once untimed first; outputs are deleted between runs "
        "and `sync` is called (untimed) before each timed run.",
        "Times are process wall-clock times measured from Python (spawn included).",
        f"Only {os.cpu_count()} CPUs and other builds may run concurrently: expect noise; read "
        "the min–max spread next to each ratio before drawing conclusions.",
    ]
    text = rep.render()
    print(text)
    try:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        log(f"report written to {a.out}")
    except OSError as e:
        print(f"compare.py: error: cannot write {a.out}: {e}", file=sys.stderr)
        return 2
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
