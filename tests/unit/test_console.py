"""A quiet console through Ray: the progress bar's refresh interval, Ray Data's per-dataset lines, --verbose."""

from __future__ import annotations

import io
import logging
import types

import pytest

from orpo_ray import console
from orpo_ray.cli import parse_args


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_verbose(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
    before = executor.level
    yield
    executor.setLevel(before)


def test_progress_bar_is_live_on_a_terminal_and_sparse_through_a_pipe(monkeypatch):
    assert console.progress_interval(_Tty()) == pytest.approx(0.1)
    assert console.progress_interval(io.StringIO()) == console.PROGRESS_INTERVAL_S >= 5
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.progress_interval(io.StringIO()) == pytest.approx(0.1)


def test_ray_data_per_dataset_lines_are_off_unless_verbose(monkeypatch):
    ctx = types.SimpleNamespace(enable_progress_bars=True)
    executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
    console.quiet_ray_data(ctx)
    assert ctx.enable_progress_bars is False
    assert not executor.isEnabledFor(logging.INFO) and executor.isEnabledFor(logging.WARNING)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    console.quiet_ray_data(ctx)
    assert executor.level == logging.NOTSET and ctx.enable_progress_bars is False  # Ray Data's own level (INFO)


def test_verbose_flag_on_every_config_command():
    assert parse_args(["tune", "c.yaml", "a=1", "--verbose"]).verbose
    assert parse_args(["train", "c.yaml", "--local", "--verbose"]).verbose
    assert not parse_args(["eval", "c.yaml"]).verbose
