#!/usr/bin/env python3
"""Allocation of cowshed against qemu-img over a matrix of variants (issue #13).

For commit, safe rebase and flatten, over cluster sizes 512 B / 64 KiB / 2 MiB,
extended L2 off/on and a qcow2 or raw bottom: the same seeded qemu-io workload
(data, subcluster-sized and unaligned writes, zero writes) is built once,
copied (sparse, `cp -a`) into twin directories, and the operation is run by
qemu-img in one and by cowshed in the other. Each row prints the allocation
of the image written (qcow2: `qemu-img check` allocated clusters; raw: bytes
on disk), cowshed's and qemu-img's, their ratio, whether the guest views are
equal (`qemu-img compare`) and whether `qemu-img map` (host offsets aside)
is the same.

    python3 benches/alloc_matrix.py PATH/TO/cowshed [SCRATCH_DIR]
"""
import json, os, random, shutil, subprocess, sys
COW = sys.argv[1]
ROOT = sys.argv[2] if len(sys.argv) > 2 else '/tmp/cowshed-alloc-matrix'
SIZE = 32 << 20
def sh(*a, cwd=None):
    r = subprocess.run(a, cwd=cwd, capture_output=True, text=True)
    if r.returncode not in (0,):
        raise SystemExit(f"{a}: {r.returncode} {r.stderr}")
    return r.stdout
def create(d, name, opts, backing=None, bfmt='qcow2', fmt='qcow2'):
    a = ['qemu-img', 'create', '-q', '-f', fmt]
    if fmt == 'qcow2': a += ['-o', opts]
    if backing: a += ['-b', backing, '-F', bfmt]
    sh(*a, name, str(SIZE), cwd=d)
def io(d, name, cmds, fmt='qcow2'):
    for i in range(0, len(cmds), 200):
        a = ['qemu-io', '-f', fmt]
        for c in cmds[i:i+200]: a += ['-c', c]
        sh(*a, name, cwd=d)
def writes(seed, cs, zeros):
    r = random.Random(seed); cmds = []
    for k in range(120):
        sub = max(cs // 32, 512)
        kind = r.random()
        if kind < 0.3:   # subcluster/sector sized
            off = r.randrange(0, SIZE // sub) * sub; ln = sub * r.randint(1, 4)
        elif kind < 0.6: # a few clusters, unaligned
            off = r.randrange(0, SIZE // 512) * 512; ln = r.randint(1, 3 * cs // 512 + 8) * 512
        else:            # whole clusters
            c = max(cs, 65536); off = r.randrange(0, SIZE // c) * c; ln = c * r.randint(1, 4)
        ln = min(ln, SIZE - off)
        if zeros and r.random() < 0.35:
            cmds.append(f"write -z {off} {ln}")
        else:
            cmds.append(f"write -P {k % 250 + 1} {off} {ln}")
    return cmds
def mapof(path, fmt):
    m = json.loads(subprocess.run(['qemu-img', 'map', '-f', fmt, '--output=json', path], capture_output=True, text=True).stdout)
    out = []
    for e in m:
        k = (e['depth'], e['data'], e['zero'], 'offset' in e)
        if out and out[-1][0] == k and out[-1][1] + out[-1][2] == e['start']:
            out[-1][2] += e['length']
        else:
            out.append([k, e['start'], e['length']])
    return out
def alloc(path, fmt):
    if fmt == 'raw':
        return os.stat(path).st_blocks * 512
    j = json.loads(subprocess.run(['qemu-img', 'check', '--output=json', path], capture_output=True, text=True).stdout)
    assert not j.get('corruptions') and not j.get('leaks'), (path, j)
    return j['allocated-clusters']
def build(d, op, cs, ext, bottom):
    opts = f"cluster_size={cs}" + (",extended_l2=on" if ext else "")
    bfmt = 'raw' if bottom == 'raw' else 'qcow2'
    bname = 'base.' + bfmt
    create(d, bname, opts, fmt=bfmt)
    io(d, bname, [f"write -P 0x11 0 {SIZE * 3 // 4}"] + writes(1, cs, False), fmt=bfmt)
    if op == 'rebase':
        create(d, 'mid.qcow2', opts, bname, bfmt); io(d, 'mid.qcow2', writes(2, cs, True))
        create(d, 'top.qcow2', opts, 'mid.qcow2'); io(d, 'top.qcow2', writes(3, cs, True))
        return (['rebase', '-b', bname, '-F', bfmt, 'top.qcow2'], 'top.qcow2', 'qcow2')
    create(d, 'top.qcow2', opts, bname, bfmt); io(d, 'top.qcow2', writes(3, cs, True))
    if op == 'flatten':
        return (['rebase', '-b', '', 'top.qcow2'], 'top.qcow2', 'qcow2')
    return (['commit', 'top.qcow2'], bname, bfmt)
rows = []
for op in ['commit', 'rebase', 'flatten']:
    for bottom in ['qcow2', 'raw']:
        for cs in [512, 65536, 2 << 20]:
            for ext in [False, True]:
                if ext and cs < 16384: continue
                d = f"{ROOT}/{op}-{bottom}-{cs}-{int(ext)}"
                shutil.rmtree(d, ignore_errors=True); os.makedirs(d + '/q'); os.makedirs(d + '/c')
                args, img, fmt = build(d + '/q', op, cs, ext, bottom)
                sh("sh", "-c", f"cp -a {d}/q/. {d}/c/")
                sh('qemu-img', *args, cwd=d + '/q'); sh(COW, *args, cwd=d + '/c')
                view = 'top.qcow2' if op == 'commit' else img
                same = subprocess.run(['qemu-img', 'compare', f"{d}/q/{view}", f"{d}/c/{view}"], capture_output=True).returncode == 0
                a, b = alloc(f"{d}/c/{img}", fmt), alloc(f"{d}/q/{img}", fmt)
                mapeq = 'map=' if mapof(d + '/c/' + img, fmt) == mapof(d + '/q/' + img, fmt) else 'map!='
                unit = 'bytes' if fmt == 'raw' else 'clusters'
                rows.append((op, bottom, cs, ext, a, b, unit, same))
                print(f"| {op} | {bottom} | {cs} | {'on' if ext else 'off'} | {a} | {b} {unit} | {a / b if b else float('nan'):.3f} | {'same' if same else 'DIFFERENT'} | {mapeq} |", flush=True)
