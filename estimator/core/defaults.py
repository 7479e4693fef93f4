"""DeepSpeed's own defaults for the ZeRO knobs zeroest models, by ``DeepSpeedZeroConfig`` field name.

Derived from ``vocab.ZERO_KNOBS`` (the one table of knobs, their ds_config keys and defaults, copied from
``deepspeed/runtime/zero/config.py`` of DeepSpeed 0.19.8); ``tests/test_defaults.py`` compares it with the installed
DeepSpeed so drift is caught.
"""

from __future__ import annotations

from zeroest.estimator.core.vocab import ZERO_KNOBS

DEEPSPEED_ZERO_DEFAULTS: dict[str, int | bool | None] = {knob.name: knob.default for knob in ZERO_KNOBS}
