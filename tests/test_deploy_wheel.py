"""`canestra deploy aws` from a plain `pip install` of the wheel: the deployment kit ships as
package data, so the dry run works outside a source checkout and reads the installed kit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT_FILES = ("canestra-emr.yaml", "bootstrap.sh", "emr_step.py", "prices.json", "parliament-suppressions.yaml")


def _fresh_venv_with_wheel(venv: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel's canestra; its dependencies come from the main venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The main venv's pip installs into the new one (no download: --no-deps, no index).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # A path line (not a site dir): the main venv's editable-install .pth inside it is not run,
    # so `import canestra` finds the wheel's copy first and never the source checkout.
    (site / "zz_main_venv_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return site


def test_wheel_ships_the_kit_and_dry_run_works_outside_the_checkout(canestra_wheel, tmp_path):
    with zipfile.ZipFile(canestra_wheel) as zf:
        names = set(zf.namelist())
    assert {f"canestra/deploy/aws_kit/{f}" for f in KIT_FILES} <= names

    site = _fresh_venv_with_wheel(tmp_path / "venv", canestra_wheel)
    kit = site / "canestra" / "deploy" / "aws_kit"
    # Mark the installed price table, so the output proves which kit the command read.
    prices = json.loads((kit / "prices.json").read_text())
    prices["label"] = "INSTALLED-KIT " + prices["label"]
    (kit / "prices.json").write_text(json.dumps(prices))

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CANESTRA_DEPLOY_DIR", "VIRTUAL_ENV") and not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true")
    probe = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "python"), "-c",
         "import canestra, canestra.deploy.aws as a; print(canestra.__file__); print(a.kit_dir())"],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module_file, kit_found = probe.stdout.split()
    assert Path(module_file).is_relative_to(site) and not Path(module_file).is_relative_to(ROOT / "src")
    assert Path(kit_found) == kit

    proc = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "canestra"), "deploy", "aws", "--dry-run", "--region", "eu-west-3",
         "--bucket", "canestra-demo-bucket"],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "plan: CloudFormation stack 'canestra' in eu-west-3" in proc.stdout
    assert "INSTALLED-KIT" in proc.stdout  # the cost estimate came from the installed kit
    assert "dry run: nothing created" in proc.stdout
    assert "s3://canestra-demo-bucket/artifacts/emr_step.py" in proc.stdout
