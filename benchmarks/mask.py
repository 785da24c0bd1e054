"""Masking speed: blockws's pure-Python masking, its C speedup, and simpler ways.

    python -m benchmarks.mask

Prints MB/s per payload size and the ratio to a per-byte loop and to a
32-bit-word ``array`` loop; then, for 1 MiB, the big-integer ways the issue
asked about (``int.from_bytes`` and ``to_bytes`` over the whole payload and
in 64 KiB chunks) beside blockws' pure-Python masking. Figures vary with the
machine; the ratios are what to quote.
"""

from __future__ import annotations

import array
import os
import timeit

from blockws.frames import c_apply_mask, py_apply_mask


def mask_loop(data: bytes, key: bytes) -> bytes:
    """The textbook loop: one Python operation per byte."""
    out = bytearray(data)
    for i in range(len(out)):
        out[i] ^= key[i & 3]
    return bytes(out)


def mask_array(data: bytes, key: bytes) -> bytes:
    """32-bit words with the array module, the shape some clients use."""
    n = len(data)
    pad = (-n) % 4
    words = array.array("I", data + b"\x00" * pad)
    k = array.array("I", key)[0]
    for i in range(len(words)):
        words[i] ^= k
    return words.tobytes()[:n]


def mask_bigint(data: bytes, key: bytes) -> bytes:
    """One XOR of two big integers over the whole payload."""
    n = len(data)
    keys = (key * (n // 4 + 1))[:n]
    x = int.from_bytes(data, "little") ^ int.from_bytes(keys, "little")
    return x.to_bytes(n, "little")


def mask_bigint_chunks(data: bytes, key: bytes, chunk: int = 64 * 1024) -> bytes:
    """The same, 64 KiB at a time (a chunk stays in the CPU's cache)."""
    n = len(data)
    out = bytearray(n)
    view = memoryview(data)
    k = int.from_bytes(key * (chunk // 4), "little")
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x = int.from_bytes(view[i : i + m], "little") ^ (k & ((1 << (8 * m)) - 1))
        out[i : i + m] = x.to_bytes(m, "little")
    return bytes(out)


def measure(fn: object, data: bytes, key: bytes, budget: float = 0.3) -> float:
    timer = timeit.Timer(lambda: fn(data, key))  # type: ignore[operator]
    number, _ = timer.autorange()
    best = min(timer.repeat(repeat=3, number=max(1, number)))
    return len(data) * number / best / 1e6


def main() -> None:
    key = os.urandom(4)
    print(
        f"{'size':>9} {'python MB/s':>12} {'x loop':>7} {'x array':>8} {'C MB/s':>9} {'C x py':>7}"
    )
    for size in (32, 1024, 32768, 1 << 20):
        data = os.urandom(size)
        assert py_apply_mask(data, key) == mask_loop(data, key) == mask_array(data, key)
        fast = measure(py_apply_mask, data, key)
        loop = measure(mask_loop, data, key)
        arr = measure(mask_array, data, key)
        c = measure(c_apply_mask, data, key) if c_apply_mask is not None else float("nan")
        row = f"{size:>9} {fast:>12.1f} {fast / loop:>7.1f} {fast / arr:>8.1f}"
        print(f"{row} {c:>9.0f} {c / fast:>7.1f}")
    data = os.urandom(1 << 20)
    assert mask_bigint(data, key) == mask_bigint_chunks(data, key) == py_apply_mask(data, key)
    fast = measure(py_apply_mask, data, key)
    print("\n1 MiB, MB/s (x blockws' pure-Python masking):")
    print(f"  blockws py_apply_mask            {fast:8.1f}")
    ways = (
        ("int.from_bytes, whole", mask_bigint),
        ("int.from_bytes, 64 KiB chunks", mask_bigint_chunks),
    )
    for name, fn in ways:
        rate = measure(fn, data, key)
        print(f"  {name:32} {rate:8.1f} ({rate / fast:.2f})")


if __name__ == "__main__":
    main()
