"""A fresh clone's `make demo`, then every command it prints, run exactly as printed (issue
11: after `make demo` the printed `icefarm` and `grpcurl` were not on PATH, and the release
hint lacked `--control`). The clone gets its own virtual environment from the package index,
as a newcomer's would."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 600


def clone(tmp_path: Path) -> Path:
    """The committed tree, as `git clone` gives it (uncommitted edits are not in it)."""
    target = tmp_path / "icefarm"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPOSITORY), str(target)], check=True
    )
    return target


def printed_commands(output: str, after: str) -> list[str]:
    """The indented command lines the demo printed after the line containing `after`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    commands = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        commands.append(line.strip())
    return commands


def test_make_demo_in_a_fresh_clone_and_every_command_it_prints(tmp_path: Path) -> None:
    tree = clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFARM_", "VIRTUAL_ENV"))}
    done = subprocess.run(
        ["make", "demo"], cwd=tree, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"✓ (\d+)/\1 results match", done.stdout), done.stdout
    (keep,) = printed_commands(done.stdout, "To keep the farm up")
    assert keep == ".venv/bin/icefarm demo --keep-running"
    # As printed, without a shell in between (so Ctrl-C reaches the demo itself).
    demo = subprocess.Popen(
        shlex.split(keep), cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, "".join(seen)
            seen.append(line)
            if "Ctrl-C stops them" in line:
                break
        commands = printed_commands("".join(seen), "Try, in another terminal")
        assert len(commands) >= 8
        for command in commands:
            if " watch" in command:
                watch = subprocess.Popen(
                    command, shell=True, cwd=tree, stdout=subprocess.PIPE, text=True, env=env,
                    start_new_session=True,
                )  # fmt: skip
                try:
                    # A live feed: it keeps running (and shows events) until stopped.
                    with pytest.raises(subprocess.TimeoutExpired):
                        watch.wait(timeout=3)
                finally:
                    os.killpg(watch.pid, signal.SIGINT)
                    watch.wait(timeout=30)
                continue
            ran = subprocess.run(
                command, shell=True, cwd=tree, capture_output=True, text=True, timeout=60, env=env
            )
            assert ran.returncode == 0, (command, ran.stdout, ran.stderr)
            if "reserve 2" in command:
                hint = ran.stdout.strip().splitlines()[-1]
                assert hint.startswith("release with: .venv/bin/icefarm release ")
                assert "--control 127.0.0.1:" in hint and "--client-id me" in hint
    finally:
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C in its terminal
        rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, rest
    assert "stopped the worker and the control" in rest
