"""GPU presets (``data/gpus.yaml``) and the one parser of ``--gpu``: a preset name or a size with its unit.

``parse_gpu("4090")``, ``parse_gpu("RTX 4090")`` and ``parse_gpu("24GB")`` each give a ``Gpu``; anything else
is a ``ValueError`` of one line that says what to type instead:

* a bare number (``24``, ``24.5``, a model number that is no preset) asks for ``24GB`` or ``24GiB``;
* ``80G`` (or ``M``, ``T``) is refused: ``G`` means GiB to some tools and GB to others, and the two differ by 7%;
* a name that stands for cards of different memory (``a100``) lists the choices: guessing the larger card
  would under-predict the risk of running out of memory;
* an unknown name lists the nearest presets.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from zeroest.estimator.catalog.files import data_path, load_yaml
from zeroest.estimator.units import GB, MB, TB, GiB, MiB, TiB, parse_bytes

SIZE_UNITS = {"gb": GB, "gib": GiB, "mb": MB, "mib": MiB, "tb": TB, "tib": TiB}
"""Units ``--gpu`` takes for a size (case-insensitive)."""
_AMBIGUOUS_UNITS = {"g", "m", "t", "k", ""}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_VENDOR_PREFIXES = ("nvidia", "geforce", "tesla", "amd", "instinct", "radeon", "rtx")


@dataclass(frozen=True, kw_only=True)
class Gpu:
    """A GPU's name and the memory a process can at most hold on it (the driver's total)."""

    name: str
    """Device name as nvidia-smi / rocm-smi prints it (calibration files are looked up by it)."""
    memory_bytes: int
    """Total device memory as the driver reports it (nvidia-smi's MiB total x 2**20)."""
    label: str = ""
    """What people call the card, marketed size first (``24 GB RTX 4090``); ``name`` when empty."""
    preset: str | None = None
    """The key in data/gpus.yaml; None for a GPU given by size."""
    source: str = ""
    """Where ``memory_bytes`` comes from (nvidia-smi, rocm-smi, product page, or the size typed)."""

    def __post_init__(self) -> None:
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ValueError(f"GPU {self.name!r}: memory_bytes must be a positive integer, got {self.memory_bytes!r}")

    @property
    def display(self) -> str:
        """``label`` or, when there is none, ``name``."""
        return self.label or self.name


@dataclass(frozen=True, kw_only=True)
class GpuCatalog:
    """data/gpus.yaml, checked: presets by key, every spelling (normalised) to its key, ambiguous names."""

    presets: dict[str, Gpu]
    spellings: dict[str, str]
    """``normalise(key or alias)`` -> preset key."""
    ambiguous: dict[str, tuple[str, ...]]
    """``normalise(name)`` -> the preset keys it could mean."""


def normalise(text: str) -> str:
    """The form names are matched in: lower case, letters and digits only, leading vendor words (nvidia, geforce,
    tesla, amd, instinct, radeon, rtx) dropped, ``gb`` after a digit read as ``g``: ``"RTX 4090" -> "4090"``,
    ``"a100-80gb" -> "a10080g"``."""
    compact = re.sub(r"[^a-z0-9]", "", text.lower())
    stripped = True
    while stripped:
        stripped = False
        for prefix in _VENDOR_PREFIXES:
            if compact.startswith(prefix) and len(compact) > len(prefix):
                compact, stripped = compact[len(prefix):], True
    return re.sub(r"(?<=[0-9])gb", "g", compact)


def _preset(key: str, entry: object, where: Path) -> tuple[Gpu, list[str]]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: preset {key!r} must be a mapping of name, label, memory_mib, source, aliases")
    missing = [k for k in ("name", "label", "memory_mib", "source") if k not in entry]
    if missing:
        raise ValueError(f"{where}: preset {key!r} lacks {', '.join(missing)}; fix the file")
    mib, aliases = entry["memory_mib"], entry.get("aliases") or []
    if isinstance(mib, bool) or not isinstance(mib, int) or mib <= 0:
        raise ValueError(f"{where}: preset {key!r} has memory_mib {mib!r}: use a positive whole number of MiB")
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"{where}: preset {key!r}: aliases must be a list of quoted strings")
    gpu = Gpu(name=str(entry["name"]), memory_bytes=mib * MiB, label=str(entry["label"]), preset=key,
              source=str(entry["source"]))
    return gpu, [key, *aliases]


def _string_keys(mapping: dict, where: Path, section: str) -> None:
    for key in mapping:
        if not isinstance(key, str):
            raise ValueError(f'{where}: {section} key {key!r} is a YAML {type(key).__name__}: quote it ("{key}")')


def load_gpu_catalog(path: Path | None = None) -> GpuCatalog:
    """Read and check a GPU table (``data/gpus.yaml`` by default); any mistake is a ValueError naming the file."""
    where = path or data_path("gpus.yaml")
    raw = load_yaml(where, "GPU presets")
    table, ambiguous_raw = raw.get("presets"), raw.get("ambiguous") or {}
    if not isinstance(table, dict) or not isinstance(ambiguous_raw, dict):
        raise ValueError(f"{where}: expected mappings 'presets' (and optionally 'ambiguous'); fix the file")
    _string_keys(table, where, "presets")
    _string_keys(ambiguous_raw, where, "ambiguous")
    presets, spellings = {}, {}
    for key, entry in table.items():
        presets[key], names = _preset(key, entry, where)
        for name in names:
            norm = normalise(name)
            if spellings.setdefault(norm, key) != key:
                raise ValueError(f"{where}: {name!r} of {key!r} reads as {spellings[norm]!r} too; rename one")
    ambiguous = {}
    for name, choices in ambiguous_raw.items():
        if not isinstance(choices, list) or not choices or any(c not in presets for c in choices):
            raise ValueError(f"{where}: ambiguous {name!r} must list preset keys, got {choices!r}")
        if normalise(name) in spellings:
            raise ValueError(f"{where}: {name!r} is both a preset spelling and ambiguous; fix the file")
        ambiguous[normalise(name)] = tuple(choices)
    return GpuCatalog(presets=presets, spellings=spellings, ambiguous=ambiguous)


@functools.cache
def _catalog() -> GpuCatalog:
    return load_gpu_catalog()


def gpu_presets() -> dict[str, Gpu]:
    """The presets of data/gpus.yaml by key (string keys, one entry per card: aliases are not repeated)."""
    return dict(_catalog().presets)


def _size(text: str, number: str, unit: str) -> Gpu:
    if unit.lower() not in SIZE_UNITS:
        raise ValueError(f"cannot read GPU size {text!r}: use a unit of GB, GiB, MB, MiB, TB or TiB, e.g. 24GB")
    size = parse_bytes(f"{number}{unit}")
    canon = {"gb": "GB", "gib": "GiB", "mb": "MB", "mib": "MiB", "tb": "TB", "tib": "TiB"}[unit.lower()]
    name = f"{float(number):g} {canon} GPU"
    return Gpu(name=name, memory_bytes=size, label=name, preset=None, source=f"--gpu {text.strip()}")


def _near(key: str, catalog: GpuCatalog) -> list[str]:
    """Up to three preset keys nearest ``key``: those within 0.15 of the best similarity (difflib's ratio, at
    least 0.6), less any that a better-scoring key extends (so that a near miss of ``l40s`` never lists ``l4``,
    the card of half its memory)."""
    import difflib  # for suggestions only: kept off start-up
    scores: dict[str, float] = {}
    for spelling, preset in catalog.spellings.items():
        ratio = difflib.SequenceMatcher(None, key, spelling).ratio()
        scores[preset] = max(scores.get(preset, 0.0), ratio)
    for spelling, choices in catalog.ambiguous.items():
        ratio = difflib.SequenceMatcher(None, key, spelling).ratio()
        for preset in choices:
            scores[preset] = max(scores.get(preset, 0.0), ratio)
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    if not ranked or ranked[0][1] < 0.6:
        return []
    floor = max(0.6, ranked[0][1] - 0.15)
    kept: list[str] = []
    for preset, score in ranked:
        if score < floor or len(kept) == 3:
            break
        if not any(normalise(better).startswith(normalise(preset)) for better in kept):
            kept.append(preset)
    return kept


def parse_gpu(text: str) -> Gpu:
    """A ``Gpu`` from what a user typed after ``--gpu``: a preset name or alias in any case and spacing
    (``4090``, ``RTX 4090``, ``a100-80gb``) or a size with its unit (``24GB``, ``24 GiB``, ``80.5GB``).

    Raises ValueError (one line, with what to type instead) for a bare number, a bare ``G``/``M``/``T`` unit, a
    name of several cards (``a100``), and an unknown name (with the nearest presets).
    """
    catalog = _catalog()
    key = normalise(text)
    if key in catalog.spellings:
        return catalog.presets[catalog.spellings[key]]
    if key in catalog.ambiguous:
        choices = catalog.ambiguous[key]
        sizes = ", ".join(f"{c} ({catalog.presets[c].label})" for c in choices)
        raise ValueError(f"GPU {text!r} names cards of different memory: pass one of {sizes} "
                         "(zeroest does not guess the larger one)")
    match = _SIZE.match(text)
    if match:
        number, unit = match.groups()
        if unit.lower() in _AMBIGUOUS_UNITS:
            raise ValueError(_unitless(text, number, unit, _near(key, catalog)))
        return _size(text, number, unit)
    near = _near(key, catalog)
    hint = f"did you mean {', '.join(near)}? " if near else f"presets: {', '.join(catalog.presets)}; "
    raise ValueError(f"unknown GPU {text!r}: {hint}or give a size with its unit, e.g. 24GB or 24GiB")


def _unitless(text: str, number: str, unit: str, near: list[str]) -> str:
    """The one-line error for ``24``, ``24.5`` or ``80G``."""
    value = f"{float(number):g}"
    what = "a bare number" if not unit else f"ambiguous (is {unit} GB or GiB?)"
    presets = f"; or a preset: {', '.join(near)}" if near and not unit else ""
    return (f"GPU size {text.strip()!r} is {what}: write {value}GB (10**9 bytes, the vendors' unit) or "
            f"{value}GiB (2**30 bytes){presets}")
