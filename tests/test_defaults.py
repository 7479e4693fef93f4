"""Our table of DeepSpeed's ZeRO defaults, and the setup's defaults, equal DeepSpeed's own config model."""

import pytest
from zeroest.estimator.core.defaults import DEEPSPEED_ZERO_DEFAULTS
from zeroest.estimator.core.setup import ZeroConfig, ZeroStage

# ZeroConfig fields whose default is DeepSpeed's (same names as deepspeed/runtime/zero/config.py DeepSpeedZeroConfig)
SETUP_FIELDS = ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size", "max_live_parameters",
                "param_persistence_threshold", "sub_group_size", "contiguous_gradients")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_defaults_match_deepspeed_zero_config(stage):
    config = pytest.importorskip("deepspeed.runtime.zero.config")
    ds = config.DeepSpeedZeroConfig(stage=stage)
    for key, ours in DEEPSPEED_ZERO_DEFAULTS.items():
        if key == "overlap_comm":
            assert ds.overlap_comm == (stage == 3), "overlap_comm default is True for stage 3 only"
        else:
            assert getattr(ds, key) == ours, key


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_setup_defaults_are_the_installed_deepspeeds(stage):
    config = pytest.importorskip("deepspeed.runtime.zero.config")
    ds = config.DeepSpeedZeroConfig(stage=stage)
    zero = ZeroConfig(stage=ZeroStage(stage))
    assert zero.overlap == ds.overlap_comm
    for key in SETUP_FIELDS:
        assert getattr(zero, key) == getattr(ds, key), key
