"""The on-disk cache of traced profiles: where it writes, that it is read back, and that a bad file is ignored.

Expectations: the directory rules of ``trace.cache.cache_dir`` (``$ZEROEST_CACHE_DIR``, an absolute
``$XDG_CACHE_HOME``, ``~/.cache``), and that a corrupt file gives one warning and the profile a fresh trace
gives, field for field.
"""

from __future__ import annotations

import json
import logging

import pytest
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.trace import cache, tracer

LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
CORRUPT = {
    "truncated JSON": '{"version": 3, "b0": 2, "plain": {"regions"',
    "not an object": "[1, 2, 3]",
    "no modes": json.dumps({"version": cache.CACHE_VERSION, "b0": 2, "s0": 64}),
    "bad monomial": json.dumps({"version": cache.CACHE_VERSION,
                                "plain": {"regions": {"embed": {"__poly__": {"x": 1}}}}}),
    "not UTF-8": b"\xff\xfe\x00garbage",
}
"""What a cache file can hold after a crash, a disk error or a hand edit."""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test writes into its own cache directory, with nothing remembered in memory."""
    monkeypatch.setenv("ZEROEST_CACHE_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(tracer, "_MEMO", {})


def _trace_or_skip():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return shape_from_config(LLAMA, "llama-tiny")


def test_traced_profile_is_cached_on_disk(tmp_path, monkeypatch):
    shape = _trace_or_skip()
    first = tracer.traced_profile(shape, 2, 16, config=LLAMA)
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1
    monkeypatch.setattr(tracer, "_MEMO", {})
    monkeypatch.setattr(tracer, "trace_polys", lambda *a, **k: pytest.fail("traced again, cache not read"))
    assert tracer.traced_profile(shape, 2, 16, config=LLAMA) == first
    other = tracer.traced_profile(shape, 8, 100, config=LLAMA)
    assert other.layer_saved_bytes > first.layer_saved_bytes


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    assert cache.cache_dir() == tmp_path / "profiles"
    monkeypatch.delenv("ZEROEST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "zeroest" / "profiles"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid per the XDG spec: would land in the cwd
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "zeroest" / "profiles"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "zeroest" / "profiles"


def test_trace_writes_only_into_the_user_cache(tmp_path, monkeypatch):
    """With no cache variables set, a trace run from a working directory writes only under ~/.cache."""
    shape = _trace_or_skip()
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("ZEROEST_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    tracer.traced_profile(shape, 2, 16, config=LLAMA)
    assert list(work.iterdir()) == []
    written = [p.relative_to(home).as_posix() for p in home.rglob("*") if p.is_file()]
    assert len(written) == 1 and written[0].startswith(".cache/zeroest/profiles/")


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_file_is_ignored_with_one_warning(tmp_path, caplog, content):
    path = tmp_path / "profiles" / "k.json"
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING):
        assert cache.load("k") is None
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "corrupt" in warnings[0]


def test_missing_or_stale_file_is_skipped_quietly(tmp_path, caplog):
    path = tmp_path / "profiles" / "old.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"version": cache.CACHE_VERSION - 1, "plain": {}}))
    with caplog.at_level(logging.WARNING):
        assert cache.load("old") is None
        assert cache.load("absent") is None
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_corrupt_file_is_traced_again_and_replaced(tmp_path, monkeypatch, caplog):
    shape = _trace_or_skip()
    first = tracer.traced_profile(shape, 2, 16, config=LLAMA)
    (path,) = (tmp_path / "profiles").glob("*.json")
    path.write_text(CORRUPT["truncated JSON"])
    monkeypatch.setattr(tracer, "_MEMO", {})
    with caplog.at_level(logging.WARNING):
        assert tracer.traced_profile(shape, 2, 16, config=LLAMA) == first
    assert len([r for r in caplog.records if "corrupt" in r.message]) == 1
    assert cache.load(path.stem) is not None  # the fresh trace overwrote the bad file
