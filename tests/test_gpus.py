"""``--gpu`` parsing (catalog.gpus) and the table behind it (data/gpus.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from zeroest.estimator.catalog.files import data_path
from zeroest.estimator.catalog.gpus import gpu_presets, load_gpu_catalog, normalise, parse_gpu
from zeroest.estimator.units import GB, GiB, MiB

from zeroest.cli.options import GPU_HELP

# (what a user types, preset key, MiB total as nvidia-smi / rocm-smi reports it)
PRESETS = [
    ("4090", "4090", 24564), ("4080", "4080", 16376), ("4070ti", "4070ti", 12282), ("3090", "3090", 24576),
    ("3090ti", "3090ti", 24564), ("3080", "3080", 10240), ("3080-12g", "3080-12g", 12288),
    ("a4000", "a4000", 16376), ("a5000", "a5000", 24564), ("a6000", "a6000", 49140),
    ("rtx6000-ada", "rtx6000-ada", 49140), ("l4", "l4", 23034), ("l40", "l40", 46068), ("l40s", "l40s", 46068),
    ("a10", "a10", 23028), ("a10g", "a10g", 23028), ("t4", "t4", 15360), ("v100-16g", "v100-16g", 16160),
    ("v100-32g", "v100-32g", 32510), ("a100-40g", "a100-40g", 40960), ("a100-80g", "a100-80g", 81920),
    ("h100", "h100", 81559), ("h100-nvl", "h100-nvl", 95330), ("h200", "h200", 143771),
    ("gh200", "gh200", 97871), ("b200", "b200", 183359), ("mi250x", "mi250x", 65536),
    ("mi300x", "mi300x", 196592), ("mi325x", "mi325x", 262144),
]
ALIASES = [
    ("rtx4090", "4090"), ("rtx 4090", "4090"), ("RTX 4090", "4090"), ("NVIDIA GeForce RTX 4090", "4090"),
    ("a100-80gb", "a100-80g"), ("A100-80GB", "a100-80g"), ("a100_40gb", "a100-40g"), ("h100-80gb", "h100"),
    ("H100", "h100"), ("L40S", "l40s"), ("rtx 6000 ada", "rtx6000-ada"), ("RTX A6000", "a6000"),
    ("Tesla T4", "t4"), ("AMD Instinct MI300X", "mi300x"), ("4070 Ti", "4070ti"), ("  3090  ", "3090"),
]


@pytest.mark.parametrize(("text", "key", "mib"), PRESETS, ids=[p[0] for p in PRESETS])
def test_preset_memory_is_the_driver_total(text: str, key: str, mib: int) -> None:
    gpu = parse_gpu(text)
    assert (gpu.preset, gpu.memory_bytes) == (key, mib * MiB)


def test_every_preset_is_listed_once_and_has_a_size() -> None:
    presets = gpu_presets()
    assert sorted(presets) == sorted(key for _, key, _ in PRESETS)
    assert all(gpu.memory_bytes > 0 and gpu.name and gpu.label and gpu.source for gpu in presets.values())


@pytest.mark.parametrize(("text", "key"), ALIASES)
def test_aliases_and_case(text: str, key: str) -> None:
    assert parse_gpu(text) == gpu_presets()[key]


def test_gpus_yaml_keys_are_strings() -> None:
    """An unquoted 4090 loads as an int, which no string lookup matches."""
    raw = yaml.safe_load(data_path("gpus.yaml").read_text())
    for section in ("presets", "ambiguous"):
        assert [key for key in raw[section] if not isinstance(key, str)] == []


def test_unquoted_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "gpus.yaml"
    path.write_text("presets:\n  4090: {name: x, label: x, memory_mib: 1, source: x}\n")
    with pytest.raises(ValueError, match=rf'{path}: presets key 4090 is a YAML int: quote it \("4090"\)'):
        load_gpu_catalog(path)


def test_two_presets_spelled_alike_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpus.yaml"
    entry = "{name: x, label: x, memory_mib: 1, source: x}"
    path.write_text(f'presets:\n  "a100-80g": {entry}\n  "A100 80GB": {entry}\n')
    with pytest.raises(ValueError, match="reads as 'a100-80g' too"):
        load_gpu_catalog(path)


@pytest.mark.parametrize(("text", "size_bytes", "name"), [
    ("24GB", 24 * GB, "24 GB GPU"), ("24GiB", 24 * GiB, "24 GiB GPU"), ("24 GB", 24 * GB, "24 GB GPU"),
    ("24gib", 24 * GiB, "24 GiB GPU"), ("80.5GB", 80_500_000_000, "80.5 GB GPU"), ("1TiB", 2**40, "1 TiB GPU"),
    ("16384MiB", 16 * GiB, "16384 MiB GPU"),
])
def test_sizes_with_units(text: str, size_bytes: int, name: str) -> None:
    gpu = parse_gpu(text)
    assert (gpu.memory_bytes, gpu.name, gpu.preset) == (size_bytes, name, None)


@pytest.mark.parametrize("text", ["24", "24.5", "5090", "80G", "80 g", "512M"])
def test_bare_numbers_and_bare_g_ask_for_a_unit(text: str) -> None:
    value = f"{float(text.rstrip('GgM ').strip()):g}"
    with pytest.raises(ValueError, match=rf"write {value}GB \(10\*\*9 bytes.*\) or {value}GiB \(2\*\*30 bytes\)"):
        parse_gpu(text)


def test_bare_number_near_a_preset_names_it_too() -> None:
    with pytest.raises(ValueError, match=r"'5090' is a bare number: .*; or a preset: 4090"):
        parse_gpu("5090")


@pytest.mark.parametrize("text", ["24B", "24KB", "24 parsecs"])
def test_other_units_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="GB, GiB, MB, MiB, TB or TiB"):
        parse_gpu(text)


@pytest.mark.parametrize(("text", "choices"), [
    ("a100", "a100-40g .40 GB A100., a100-80g .80 GB A100."), ("A100", "a100-40g"),
    ("v100", "v100-16g .16 GB V100., v100-32g .32 GB V100."),
])
def test_names_of_several_cards_are_refused(text: str, choices: str) -> None:
    with pytest.raises(ValueError, match=rf"names cards of different memory: pass one of {choices}"):
        parse_gpu(text)


@pytest.mark.parametrize(("text", "near"), [
    ("l40ss", ["l40s"]), ("l40z", ["l40", "l40s"]), ("h1000", ["h100"]), ("a100-80", ["a100-80g", "a100-40g"]),
    ("mi300", ["mi300x"]),
])
def test_unknown_names_list_the_nearest(text: str, near: list[str]) -> None:
    with pytest.raises(ValueError, match=rf"unknown GPU {text!r}: did you mean {', '.join(near)}\? "):
        parse_gpu(text)


def test_near_misses_of_l40s_never_suggest_l4() -> None:
    for typo in ("l40ss", "l40-ss", "l40z", "l4os"):
        with pytest.raises(ValueError) as caught:
            parse_gpu(typo)
        suggested = str(caught.value).split("did you mean ")[1].split("?")[0].split(", ")
        assert "l4" not in suggested


def test_unknown_name_without_near_preset_lists_all() -> None:
    with pytest.raises(ValueError, match=r"unknown GPU 'zzzz': presets: 4090, 4080, .*, mi325x; or give a size"):
        parse_gpu("zzzz")


def test_errors_are_one_line() -> None:
    for text in ("24", "80G", "a100", "l40ss", "zzzz", "24B"):
        with pytest.raises(ValueError) as caught:
            parse_gpu(text)
        assert "\n" not in str(caught.value)


def test_normalise_drops_vendor_words_and_reads_gb_as_g() -> None:
    assert normalise("NVIDIA GeForce RTX 4090") == "4090"
    assert normalise("A100-80GB") == normalise("a100 80g") == "a10080g"
    assert normalise("rtx") == "rtx"  # a prefix alone is kept


def test_help_names_both_units_and_is_one_line() -> None:
    assert "24GB" in GPU_HELP and "24GiB" in GPU_HELP and "\n" not in GPU_HELP
