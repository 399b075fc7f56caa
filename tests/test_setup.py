"""`make test` sets up what the browser tests need, or stops at once saying what to run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ensure_chromium.sh"


def test_chromium_present_passes_silently():
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, CHROMIUM="/bin/sh"))        # an executable that exists
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root to run the script as a user without sudo")
def test_missing_chromium_without_permission_stops_with_the_command_to_run(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "CHROMIUM": str(tmp_path / "no-chromium")}
    p = subprocess.run([shutil.which("runuser"), "-u", "nobody", "--", "bash", str(SCRIPT)], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0                           # one line
    assert "Chromium is missing" in p.stderr and "apt-get install -y chromium" in p.stderr
