"""Parsing sizes and counts, and the setup's validation: one actionable message per bad input."""

import pytest
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.units import parse_bytes, parse_count, round_up_bytes

TINY_LLAMA = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}


@pytest.fixture
def tiny_shape():
    return shape_from_config(TINY_LLAMA, "tiny-llama")


@pytest.mark.parametrize("text,count", [("1.3B", 1_300_000_000), ("350M", 350_000_000), ("70b", 70_000_000_000),
                                        ("5e8", 500_000_000), ("124439808", 124_439_808), ("1T", 10**12)])
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["1.3Q", "", "abc", "-5B", "0"])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError, match="parameter count"):
        parse_count(text)


# GiB is 2**30 bytes, GB is 10**9 (written out here, not taken from the module under test)
@pytest.mark.parametrize("text,size", [("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("80GB", 80 * 10**9),
                                       ("1024", 1024)])
def test_parse_bytes(text, size):
    assert parse_bytes(text) == size


def test_parse_bytes_rejects():
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("24 parsecs")


def test_setup_rejects(tiny_shape):
    from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig

    with pytest.raises(ValueError, match="--gpus"):
        Parallelism(gpus_per_node=0)
    with pytest.raises(ValueError, match="stage"):
        ZeroConfig(stage=4)
    with pytest.raises(ValueError, match="parameter offload needs ZeRO stage 3"):
        ZeroConfig(stage=2, offload_optimizer="cpu", offload_params="cpu")
    with pytest.raises(ValueError, match="--micro-batch"):
        Workload(micro_batch=0)
    with pytest.raises(ValueError, match="DeepSpeedCPUAdam"):
        TrainingSetup(model=tiny_shape, optimizer=Optimizer(impl="fused"),
                      zero=ZeroConfig(stage=2, offload_optimizer="cpu"))
    with pytest.raises(ValueError, match="--optimizer-impl torch"):
        TrainingSetup(model=tiny_shape, optimizer=Optimizer(name="sgd", impl="fused"))


def test_round_up_bytes_takes_a_float_sum_to_the_next_whole_block():
    mib2 = 2 * 2**20
    assert round_up_bytes(0.0, mib2) == 0
    assert round_up_bytes(-5.5, mib2) == 0
    assert round_up_bytes(0.25, mib2) == mib2  # any fraction of a byte still needs a block
    assert round_up_bytes(float(mib2), mib2) == mib2
    assert round_up_bytes(mib2 + 0.5, mib2) == 2 * mib2
    assert round_up_bytes(3 * mib2 - 1.5, mib2) == 3 * mib2
