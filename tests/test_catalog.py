"""The data-file loader (catalog.files), calibration files (catalog.calibration) and the fit verdict (catalog.fit)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from zeroest.estimator.catalog.calibration import calibration_dir, find_calibration, load_calibration
from zeroest.estimator.catalog.files import load_json, load_yaml
from zeroest.estimator.catalog.fit import FIT_MARGIN, check_margin, fit_verdict, margin_text, usable_bytes
from zeroest.estimator.catalog.gpus import Gpu, gpu_presets
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.units import GiB, MiB

RTX_4090 = 24564 * MiB  # nvidia-smi's total for an RTX 4090


# --- files ---------------------------------------------------------------------------------------------------------


def test_bad_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a": 1,\n  "b": ,\n}')
    with pytest.raises(ValueError, match=rf"^{path}:2:8: invalid JSON \(Expecting value\); fix the file$"):
        load_json(path, "calibration")


def test_bad_yaml_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("presets:\n  a: [1, 2\n  b: 3\n")
    with pytest.raises(ValueError, match=rf"^{path}:3:4: invalid YAML"):
        load_yaml(path, "GPU presets")


@pytest.mark.parametrize(("loader", "text", "kind"), [(load_json, "[1, 2]", "JSON"), (load_yaml, "- 1\n", "YAML")])
def test_content_that_is_not_a_mapping(tmp_path: Path, loader, text: str, kind: str) -> None:
    path = tmp_path / "x"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{path}: expected a {kind} object \(GPU presets\), got list"):
        loader(path, "GPU presets")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"cannot read calibration {tmp_path / 'none.json'}: No such file"):
        load_json(tmp_path / "none.json", "calibration")


# --- calibration ---------------------------------------------------------------------------------------------------


def test_shipped_calibration_is_found_by_the_h100_preset_name() -> None:
    """The h100 preset's name is what calibration files are keyed by; the shipped file must match it."""
    found = find_calibration(gpu_presets()["h100"].name, "2.11.0+cu130", "0.19.8")
    assert found is not None
    shipped = json.loads((calibration_dir() / found.source).read_text())["overheads"]
    assert found.cuda_context_bytes == shipped["cuda_context_bytes"]


def test_calibration_unknown_overhead(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"overheads": {"cuda_context_byte": 1}}))
    with pytest.raises(ValueError, match=r"has unknown overheads \['cuda_context_byte'\]"):
        load_calibration(path)


def test_calibration_value_that_is_not_a_number(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"overheads": {"cuda_context_bytes": "788MiB", "activation_scale": True}}))
    with pytest.raises(ValueError, match=rf"{path}: activation_scale, cuda_context_bytes must be numbers"):
        load_calibration(path)


def test_calibration_of_the_retired_reserved_model_keeps_its_other_overheads(tmp_path: Path) -> None:
    """A file fitted before core.reserved: its reserved fraction meant the old model's, so the defaults replace
    all its reserved values; the rest of the file still holds."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"overheads": {"cuda_context_bytes": 5 * MiB, "reserved_fraction_of_peak": 0.152,
                                              "reserved_fraction_of_transient": 0.053, "reserved_fixed_bytes": 7}}))
    got = load_calibration(path)
    assert got.cuda_context_bytes == 5 * MiB
    assert (got.reserved_fraction_of_peak, got.reserved_fixed_bytes) == (Overheads().reserved_fraction_of_peak,
                                                                        Overheads().reserved_fixed_bytes)


def test_calibration_bare_mapping_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"cuda_context_bytes": 5 * MiB}))
    got = load_calibration(path)
    assert (got.cuda_context_bytes, got.source) == (5 * MiB, "c.json")
    assert got.nccl_communicator_bytes == Overheads().nccl_communicator_bytes


# --- fit -----------------------------------------------------------------------------------------------------------


def test_usable_is_the_floor_of_what_the_margin_leaves() -> None:
    assert usable_bytes(RTX_4090) == math.floor(RTX_4090 * (1 - FIT_MARGIN))
    assert usable_bytes(RTX_4090, 0.0) == RTX_4090
    assert usable_bytes(1001, 0.5) == 500


@pytest.mark.parametrize("margin", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_margin_outside_zero_one_is_refused(margin) -> None:
    with pytest.raises(ValueError, match=r"--margin .* is not a fraction in \[0, 1\)"):
        check_margin(margin)
    with pytest.raises(ValueError, match="--margin"):
        fit_verdict(GiB, gpu_presets()["4090"], margin)


def test_verdict_with_room_to_spare() -> None:
    gpu = gpu_presets()["4090"]
    usable = math.floor(RTX_4090 * (1 - FIT_MARGIN))
    fit = fit_verdict(usable - 3 * GiB, gpu)
    assert (fit.usable_bytes, fit.headroom_bytes, fit.spare_bytes, fit.short_bytes) == (usable, 3 * GiB, 3 * GiB, 0)
    assert fit.fits and fit.margin == FIT_MARGIN
    assert fit.describe() == f"fits 24 GB RTX 4090 ({usable / GiB:.1f} GiB usable at margin 10%): yes, 3.0 GiB spare"


def test_verdict_short_and_exactly_full() -> None:
    gpu = Gpu(name="test", memory_bytes=40 * GiB)
    usable = math.floor(40 * GiB * 0.75)  # 30 GiB at margin 25%
    short = fit_verdict(usable + 4.1 * GiB, gpu, margin=0.25)
    assert not short.fits
    assert short.short_bytes == math.ceil(4.1 * GiB) and short.spare_bytes == 0
    assert short.describe().endswith("usable at margin 25%): no, 4.1 GiB short")
    full = fit_verdict(usable, gpu, margin=0.25)
    assert full.fits and full.headroom_bytes == 0


def test_fractional_device_bytes_round_up() -> None:
    fit = fit_verdict(10.2, Gpu(name="tiny", memory_bytes=100), margin=0.0)
    assert (fit.device_bytes, fit.headroom_bytes) == (11, 89)


@pytest.mark.parametrize("bad", [-1, float("nan"), None])
def test_device_bytes_must_be_a_non_negative_number(bad) -> None:
    with pytest.raises(ValueError, match="device_bytes must be a non-negative number"):
        fit_verdict(bad, Gpu(name="tiny", memory_bytes=100))


def test_margin_text_is_the_percent_every_verdict_writes():
    assert [margin_text(m) for m in (0.1, 0.125, 0.0, 0.25)] == ["10%", "12.5%", "0%", "25%"]
