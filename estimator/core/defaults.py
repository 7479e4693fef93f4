"""DeepSpeed's own defaults for the ZeRO knobs zeroest models.

Copied from ``deepspeed/runtime/zero/config.py`` (class ``DeepSpeedZeroConfig``, DeepSpeed 0.19.8); the keys are that
class's field names. ``tests/test_defaults.py`` compares this table with the installed DeepSpeed so drift is caught.
``overlap_comm`` is ``None`` there and resolved by the validator ``overlap_comm_valid``: True for stage 3 only.
"""

from __future__ import annotations

DEEPSPEED_ZERO_DEFAULTS: dict[str, int | bool | None] = {
    "contiguous_gradients": True,
    "overlap_comm": None,
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "prefetch_bucket_size": 50_000_000,
    "max_live_parameters": 1_000_000_000,
    "max_reuse_distance": 1_000_000_000,
    "param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000,
}
