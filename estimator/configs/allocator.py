"""torch's caching-allocator settings, as a job's environment gives them (``PYTORCH_ALLOC_CONF``, or its older
name ``PYTORCH_CUDA_ALLOC_CONF``): ``key:value`` options separated by commas (c10/core/AllocatorConfig.cpp
``parseArgs``). The estimate models one of them, ``expandable_segments`` (``TrainingSetup.expandable_segments``);
the others change how the cache splits and frees blocks and are not modelled. Pure: strings in, strings out.
"""

from __future__ import annotations

from collections.abc import Mapping

CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""The variables torch reads its allocator settings from, the one it reads first first."""
EXPANDABLE = "expandable_segments"
MODELLED = (EXPANDABLE,)
"""Options the estimate models; any other changes the reserve in ways it does not follow."""


def conf_text(env: Mapping[str, str]) -> str:
    """The settings torch would read from ``env`` ('' when neither variable is set)."""
    for name in CONF_VARIABLES:
        if env.get(name):
            return env[name]
    return ""


def options(text: str) -> dict[str, str]:
    """``{"key": "value"}`` of a settings string; ValueError (one line: which option, how to write it) for an
    entry without a colon."""
    out: dict[str, str] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        key, sep, value = entry.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"allocator setting {entry!r} in {text!r} is not key:value: write it as "
                             "expandable_segments:True")
        out[key.strip()] = value.strip()
    return out


def expandable(text: str) -> bool:
    """Whether the settings turn expandable segments on (torch takes ``True`` only; absent: off)."""
    return options(text).get(EXPANDABLE) == "True"


def unmodelled(text: str) -> list[str]:
    """The options set that the estimate does not model (``max_split_size_mb``, ``roundup_power2_divisions``...)."""
    return [key for key in options(text) if key not in MODELLED]


def unmodelled_note(text: str) -> str | None:
    """``allocator settings 'max_split_size_mb:64': max_split_size_mb not modelled``, or None when every option set
    is modelled: the one wording ``watch``'s notes and ``validate``'s warning start from."""
    keys = unmodelled(text)
    return f"allocator settings {text!r}: {', '.join(keys)} not modelled" if keys else None


def with_expandable(text: str, on: bool) -> str:
    """The settings with ``expandable_segments`` set to ``on``, every other option kept as it was."""
    kept = {key: value for key, value in options(text).items() if key != EXPANDABLE}
    return ",".join([f"{EXPANDABLE}:{on}", *(f"{key}:{value}" for key, value in kept.items())])
