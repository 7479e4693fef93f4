"""Our table of DeepSpeed's ZeRO defaults equals DeepSpeed's own config model, so drift is caught."""

import pytest
from zeroest.estimator.core.defaults import DEEPSPEED_ZERO_DEFAULTS
from zeroest.estimator.core.setup import ZeroConfig, ZeroStage


def test_defaults_match_deepspeed_zero_config():
    config = pytest.importorskip("deepspeed.runtime.zero.config")
    for stage in (0, 1, 2, 3):
        ds = config.DeepSpeedZeroConfig(stage=stage)
        for key, ours in DEEPSPEED_ZERO_DEFAULTS.items():
            if key == "overlap_comm":
                assert ds.overlap_comm == (stage == 3), "overlap_comm default is True for stage 3 only"
                assert ZeroConfig(stage=ZeroStage(stage)).overlap == ds.overlap_comm
            else:
                assert getattr(ds, key) == ours, key


def test_setup_defaults_are_deepspeeds():
    zero = ZeroConfig()
    for key in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size", "max_live_parameters",
                "param_persistence_threshold", "sub_group_size", "contiguous_gradients"):
        assert getattr(zero, key) == DEEPSPEED_ZERO_DEFAULTS[key]
