"""What the tests share: running the CLI as a user would (a subprocess, offline) and reading
its one-line errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).with_name("cli_hooks.py")
HOOK_ENV = ("TEST_CRASH_AFTER_LAYER", "TEST_PAUSE_BEFORE_LAYER")


def cli_command(args: list[str], crash_after: int | None = None, pause_before: int | None = None
                ) -> tuple[list[str], dict]:
    """argv and environment of a CLI run. crash_after / pause_before: run through
    tests/cli_hooks.py, which ends the process hard after layer k's checkpoint, or sleeps as
    layer k starts (for an interrupt to arrive)."""
    env = {k: v for k, v in os.environ.items() if k not in HOOK_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    script = ROOT / "vicuna_mi.py"
    if crash_after is not None or pause_before is not None:
        script = HOOKS
        if crash_after is not None:
            env["TEST_CRASH_AFTER_LAYER"] = str(crash_after)
        if pause_before is not None:
            env["TEST_PAUSE_BEFORE_LAYER"] = str(pause_before)
    return [sys.executable, str(script), *args], env


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600, crash_after: int | None = None
            ) -> subprocess.CompletedProcess:
    """vicuna_mi.py ARGS offline; env adds variables. crash_after=k: see cli_command."""
    argv, full_env = cli_command(args, crash_after)
    return subprocess.run(argv, cwd=ROOT, env={**full_env, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The run exited with `code`, printed no traceback, and its last stderr line is its only
    `error:` line; returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one closing `error:` line, got:\n{proc.stderr}"
    return errors[0]


def saved_tensors(folder: Path) -> dict:
    """Every tensor of a dense save: model.safetensors, or the shards its index lists."""
    from streaming import TensorFiles
    files = TensorFiles(folder)
    return files.read(files.where)


def saved_weights_file(folder: Path) -> Path:
    """The file that shows a dense save is there (its index where it is sharded)."""
    single = Path(folder) / "model.safetensors"
    return single if single.is_file() else Path(folder) / "model.safetensors.index.json"
