"""Seeds derived from a base seed and an index: the one rule every seeded stream of a run uses.

`derived_seed(seed, i, stride)` is ``seed * stride + i`` (within torch's 63-bit seed range).
Each kind of stream has its own prime stride, so streams of neighbouring base seeds do not
overlap for any index a run reaches (indices stay far below the strides).
"""

from __future__ import annotations

DRAW_STRIDE = 1_000_003  # an engine's sampling streams (per chunk / request) and the optimizer's rounding
ROLLOUT_STRIDE = 1_000_033  # the trainer's rollout seed of each step, passed to the engine
ORDER_STRIDE = 7919  # the trainer's prompt order of each epoch; the optimizer's step within its stream


def derived_seed(seed: int, index: int, stride: int = DRAW_STRIDE) -> int:
    """The seed of stream `index` under base `seed`.

    >>> derived_seed(3, 7), derived_seed(0, 5, ORDER_STRIDE)
    (3000016, 5)
    """
    return (seed * stride + index) % (1 << 63)
