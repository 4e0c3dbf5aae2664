"""Seeds derived from a base seed and an index: the one rule every seeded stream of a run uses.

`derived_seed(seed, i, stride)` is ``seed * stride + i`` (within torch's 63-bit seed range).
Each kind of stream has its own prime stride, so streams of neighbouring base seeds do not
overlap for any index a run reaches (indices stay far below the strides).

A sample that must not depend on where it sits (reference sample i of a prompt, whichever shard,
batch or run draws it) takes `keyed_seed(seed, key, i)` instead, from a digest of its key. One
seed drives one row's draws through `uniform_stream`: a counter-based stream (uniform t of a
row is a hash of its seed and t), so a row's tokens do not depend on the batch around it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

DRAW_STRIDE = 1_000_003  # an engine's sampling streams (per request / row) and the optimizer's rounding
ROLLOUT_STRIDE = 1_000_033  # the trainer's rollout seed of each step, passed to the engine
ORDER_STRIDE = 7919  # the trainer's prompt order of each epoch; the optimizer's step within its stream


def derived_seed(seed: int, index: int, stride: int = DRAW_STRIDE) -> int:
    """The seed of stream `index` under base `seed`.

    >>> derived_seed(3, 7), derived_seed(0, 5, ORDER_STRIDE)
    (3000016, 5)
    """
    return (seed * stride + index) % (1 << 63)


def keyed_seed(seed: int, key: str, index: int) -> int:
    """The seed of sample `index` of the item named `key` (e.g. a prompt's digest) under base
    `seed`: a 63-bit digest of the three, so it follows the item, not its position.

    >>> keyed_seed(0, "37+48=?", 3) == keyed_seed(0, "37+48=?", 3) != keyed_seed(0, "37+48=?", 4)
    True
    """
    digest = hashlib.sha256(f"{seed}\x1f{index}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniform_stream(seeds: Sequence[int], length: int) -> np.ndarray:
    """(len(seeds), length) float64 uniforms in [0, 1): row r, column t is splitmix64 of (seed r, t).

    >>> a = uniform_stream([5, 9], 4)
    >>> bool((a[1] == uniform_stream([9], 4)[0]).all()), bool(((0 <= a) & (a < 1)).all())
    (True, True)
    """
    rows = _splitmix(np.asarray([s % (1 << 64) for s in seeds], dtype=np.uint64))[:, None]
    with np.errstate(over="ignore"):
        z = _splitmix(rows + np.arange(length, dtype=np.uint64)[None, :] * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
