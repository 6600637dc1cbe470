"""The README's commands, as a newcomer runs them (issue 29 rows 16-17): the test command
installs Chromium as root without sudo, and with sudo otherwise; the tour's quick first try
runs as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _install_step() -> str:
    """The browser step of the README's second command: everything before its first `&& pip`."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    (test_command,) = [line for line in block.splitlines() if "pytest" in line and not line.startswith("#")]
    return test_command.split(" && pip ")[0]


def _fake(bin_dir: Path, name: str, body: str) -> None:
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize("uid, has_sudo", [(0, False), (0, True), (1000, True)])
def test_the_test_command_installs_chromium_as_root_without_sudo(tmp_path, uid, has_sudo):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    _fake(bin_dir, "id", f"echo {uid}")
    _fake(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    if has_sudo:
        _fake(bin_dir, "sudo", f'echo "sudo" >> {log}; "$@"')
    env = {**os.environ, "PATH": str(bin_dir)}  # no chromium, and sudo only where faked
    r = subprocess.run(["/bin/bash", "-c", _install_step()], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert [c for c in calls if c.startswith("apt-get")] == ["apt-get update", "apt-get install -y chromium"]
    assert calls.count("sudo") == (0 if uid == 0 else 2)


def _quick_try() -> list[list[str]]:
    """The commands of the tour's quick first try, split as a shell would (comments dropped)."""
    text = README.read_text()
    block = text[text.index("**A quick first try"):]
    block = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_tours_quick_first_try_runs_as_written(tmp_path):
    """Issue 29 row 17: the tour's first try on a captioned folder, with `cdm text` and a router
    bounded by --router-steps, runs as written (here with fewer steps)."""
    from PIL import Image
    from typer.testing import CliRunner

    from cdm.app.cli import app

    pictures = tmp_path / "my-pictures"
    pictures.mkdir()
    rng = np.random.RandomState(0)
    for i in range(8):
        Image.fromarray(rng.randint(0, 256, (24, 24, 3)).astype(np.uint8)).save(pictures / f"{i}.png")
        (pictures / f"{i}.txt").write_text(f"a {'red' if i % 2 else 'blue'} picture number {i}")
    where = {"try": str(tmp_path / "try"), "./my-pictures": str(pictures), "first": str(tmp_path / "first"),
             "200": "3", "100": "2"}  # steps: denoisers 3, router 2
    commands = _quick_try()
    assert [c[:2] for c in commands] == [["cdm", "init"], ["cdm", "ingest"], ["cdm", "text"], ["cdm", "train"],
                                         ["cdm", "sample"]]
    assert "--router-steps" in commands[3]
    for c in commands:
        args = [where.get(a, a) for a in c[1:]]
        if args[0] == "train":
            args.append("--json")
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (c, r.output)
        if args[0] == "train":
            steps = {row["name"]: row["steps"] for row in json.loads(r.stdout)}
            assert steps == {"mine-0": 3, "mine-1": 3, "router": 2}
    assert (tmp_path / "first" / "grid.png").is_file()
