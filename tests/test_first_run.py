"""The README's first command, as on a user's machine: a copy of the checkout in a folder of its
own, no assets folder anywhere, ``STRUCTPRUNE_ASSETS`` unset. Corpora must come from the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_checkout(dest: Path) -> None:
    """What a clone of the current state holds: tracked and new (not ignored) files."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def test_readme_first_command_runs_with_nothing_beside_the_clone(tmp_path, smollm2_path):
    clone = tmp_path / "clone"
    _copy_checkout(clone)
    work = tmp_path / "work"  # the user's folder: no shared/assets beside it or above it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "STRUCTPRUNE_ASSETS"}
    env["PYTHONPATH"] = str(clone / "src")
    probe = subprocess.run([sys.executable, "-c", "import structprune, structprune.data.corpora as c; "
                            "print(structprune.__file__); print(c.find_assets_dir())"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert probe[0].startswith(str(clone)) and probe[1] == "None", probe
    # The README's command with the CPU defaults made small (the code path is the same).
    cmd = [sys.executable, "-m", "structprune.cli", "prune", "smollm2-135m", "--sparsity", "0.3",
           "--output", "runs/smollm2-30", "--nsamples", "2", "--seqlen", "128", "--eval-limit", "1",
           "--eval-seqlen", "256", "-q"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = work / "runs" / "smollm2-30"
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "structprune" and abs(report["sparsity_achieved"] - 0.3) < 0.02
    ppl = report["ppl"]["wikitext2"]
    assert ppl["nwindows"] == 1 and 1 < ppl["dense"] < ppl["pruned"] < 1e4
    assert report["calibration"]["source"] == "c4"
    assert "saved to" in proc.stdout
