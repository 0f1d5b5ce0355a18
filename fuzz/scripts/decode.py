#!/usr/bin/env python3
"""Write the files of one fuzz input into a directory, for triage with
qemu-img and cowshed: decode.py INPUT DIR (prints the selector and the
trailing bytes). Mirrors Input::parse in fuzz/src/harness.rs."""
import os
import struct
import sys

MAX_FILE = 64 << 20
MAX_FILES = 3


def main():
    data = open(sys.argv[1], "rb").read()
    out = sys.argv[2]
    os.makedirs(out, exist_ok=True)
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(data):
            return None
        s = data[pos:pos + n]
        pos += n
        return s

    sel = take(1)
    sel = sel[0] if sel else 0
    nf = take(1)
    nfiles = max((nf[0] if nf else 1) % (MAX_FILES + 1), 1)
    for i in range(nfiles):
        h = take(4)
        if h is None:
            break
        length = min(struct.unpack("<I", h)[0], MAX_FILE)
        n = take(2)
        nchunks = struct.unpack("<H", n)[0] if n else 0
        buf = bytearray()
        done = False
        for _ in range(nchunks):
            hdr = take(6)
            if hdr is None:
                done = True
                break
            off, ln = struct.unpack("<IH", hdr)
            b = take(ln)
            if b is None:
                b = data[pos:]
                pos = len(data)
            if off < MAX_FILE:
                b = b[:MAX_FILE - off]
                if len(buf) < off + len(b):
                    buf.extend(bytes(off + len(b) - len(buf)))
                buf[off:off + len(b)] = b
        if len(buf) < length:
            buf.extend(bytes(length - len(buf)))
        with open(os.path.join(out, f"f{i}"), "wb") as f:
            f.write(buf)
        if done:
            break
    rest = data[pos:]
    print(f"selector {sel}, {len(rest)} trailing bytes: {rest[:64].hex()}")


if __name__ == "__main__":
    main()
