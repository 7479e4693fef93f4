"""``zeroest models``: the model presets."""

from __future__ import annotations

from zeroest.cli.common import out


def models() -> None:
    """List the model presets."""
    from zeroest.estimator.catalog.models import list_presets

    for name in list_presets():
        out.print(name)
