#!/usr/bin/env python3
"""Encode files into one fuzz input (the container of fuzz/src/harness.rs).

encode.py OUT SELECTOR REST_HEX FILE...

    selector:u8 nfiles:u8 { len:u32 nchunks:u16 { offset:u32 n:u16 bytes[n] }* }* rest

Only the non-zero 512-byte sectors of each file are stored, so a sparse
image with 2 MiB clusters stays a small input.
"""
import struct
import sys

SECTOR = 512
CHUNK_MAX = 32768


def chunks(data):
    runs = []
    start = None
    zero = bytes(SECTOR)
    for off in range(0, len(data), SECTOR):
        piece = data[off:off + SECTOR]
        nonzero = piece != zero[:len(piece)]
        if nonzero and start is None:
            start = off
        elif not nonzero and start is not None:
            runs.append((start, off))
            start = None
    if start is not None:
        runs.append((start, len(data)))
    for a, b in runs:
        while a < b:
            n = min(CHUNK_MAX, b - a)
            yield a, data[a:a + n]
            a += n


def main():
    out, selector, rest_hex, *files = sys.argv[1:]
    blob = bytearray([int(selector) & 0xFF, len(files)])
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        cs = list(chunks(data))
        blob += struct.pack("<IH", len(data), len(cs))
        for off, b in cs:
            blob += struct.pack("<IH", off, len(b)) + b
    blob += bytes.fromhex(rest_hex)
    with open(out, "wb") as f:
        f.write(blob)


if __name__ == "__main__":
    main()
