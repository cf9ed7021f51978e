"""Times the state codec through its Python entry points (``encode_state``, ``decode_state``),
by hand, not as a test: medians of repeated runs for a 1 MiB and a 16 MiB ``bytes`` and for
10k small values. With the wheel built in release into a virtualenv:

    python3 -m venv /tmp/codec-venv && /tmp/codec-venv/bin/pip install 'maturin>=1.9,<2'
    VIRTUAL_ENV=/tmp/codec-venv /tmp/codec-venv/bin/maturin develop --release -m dory-python/Cargo.toml
    /tmp/codec-venv/bin/python dory-python/scripts/codec_timing.py
"""
import os
import statistics
import time

from dory import _dory


def timed(f, rounds):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, min(times) * 1e3


cases = {
    "1 MiB bytes": {"blob": os.urandom(1 << 20), "count": 7},
    "16 MiB bytes": {"blob": os.urandom(16 << 20)},
    "10k small values": {
        "counts": {f"k{i}": i for i in range(5000)},
        "items": [("x" * 10, i * 0.5, None) for i in range(5000)],
    },
}
for name, state in cases.items():
    rounds = 20 if "16" in name else 200
    data = _dory.encode_state(1, state)
    assert _dory.decode_state(data) == (1, state)
    enc = timed(lambda: _dory.encode_state(1, state), rounds)
    dec = timed(lambda: _dory.decode_state(data), rounds)
    print(f"{name:18} {len(data):>9} B  encode median {enc[0]:7.3f} ms (min {enc[1]:7.3f})"
          f"  decode median {dec[0]:7.3f} ms (min {dec[1]:7.3f})")
