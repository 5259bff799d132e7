"""The ``wmss`` command's error handling: what the user got wrong is one line and exit 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wmss_ray.cli.main import run_command
from wmss_ray.data.rejects import CorpusError

REPO = Path(__file__).resolve().parents[2]


def _args(func, verbose=False):
    return argparse.Namespace(func=func, verbose=verbose)


def _raise(err):
    def func(_args):
        raise err
    return func


class _RayTaskError(Exception):  # what Ray raises around a task's exception: the cause in .cause
    def __init__(self, cause):
        super().__init__("RayTaskError: long traceback text")
        self.cause = cause


def test_a_user_error_is_one_line_and_exit_2(capsys):
    assert run_command(_args(_raise(CorpusError("data.train: corpus /x does not exist")))) == 2
    err = capsys.readouterr().err
    assert err == "wmss: data.train: corpus /x does not exist\n"


def test_a_user_error_inside_a_ray_task_is_unwrapped(capsys):
    assert run_command(_args(_raise(_RayTaskError(CorpusError("corpus not found: /x"))))) == 2
    assert capsys.readouterr().err == "wmss: corpus not found: /x\n"


def test_verbose_adds_the_traceback(capsys):
    assert run_command(_args(_raise(CorpusError("corpus not found: /x")), verbose=True)) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("wmss: corpus not found: /x\n")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command(_args(_raise(ZeroDivisionError("bug"))))


def test_wmss_run_with_a_missing_corpus_prints_no_traceback(tmp_path):
    """The whole command in a subprocess, as a user runs it: the corpus is checked before Ray
    starts, and the message names the key and the path."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text("{}")
    cfg = tmp_path / "c.yaml"
    missing = tmp_path / "nope.jsonl"
    cfg.write_text(f"run: {{storage: {tmp_path / 'runs'}}}\nmodels: {{demo: false, base: {model}}}\n"
                   f"data: {{train: {missing}, validation_fraction: 0.1}}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "wmss_ray.cli.main", "run", str(cfg)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"wmss: data.train: corpus {missing} does not exist; point data.train at a .jsonl(.gz) or "
        ".parquet file, a folder of them, or an HF save_to_disk directory")
    # a model directory without its tokenizer: the same, naming the key
    (model / "tokenizer_config.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "wmss_ray.cli.main", "run", str(cfg)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"models.base: {model} has no tokenizer" in proc.stderr
