"""Hostile and damaged PNGs for the reader and command tests, written byte by byte.

Each passes the reader's cheap checks (PNG signature, IHDR, IEND at the end), so only the
size limit or a full decode can catch it.
"""
import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width, height, extra=b"", idat=None):
    """An 8-bit grayscale PNG; `extra` chunks go between IHDR and IDAT; idat defaults to black rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height)))
    return SIGNATURE + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb(path, width=20000, height=20000):
    """A header that claims width x height pixels over a few hundred bytes of data."""
    path.write_bytes(png_bytes(width, height, idat=zlib.compress(bytes(1000))))
    return path


def big_chunk(path, kind=b"zTXt", megabytes=4, size=(64, 64)):
    """A small image with a zTXt or iCCP chunk that inflates to `megabytes` MB."""
    name = b"k" if kind == b"zTXt" else b"icc"
    payload = name + b"\x00\x00" + zlib.compress(b"a" * (megabytes << 20))
    path.write_bytes(png_bytes(*size, extra=chunk(kind, payload)))
    return path


def damage_middle(path, n=8):
    """Overwrite n bytes in the middle of the file (inside the compressed pixels) with 0xff."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = b"\xff" * n
    path.write_bytes(bytes(data))
    return path
