"""A built wheel, installed into a fresh venv outside the repo, holds the shipped recipes,
sweeps, launch configs and model specs: ``recipes list``, ``plan`` and a 2-step ``train`` run
from a shipped recipe's name, as a ``pip install`` user runs them.

No network: the wheel is built without build isolation from a copy of the repo's files (so
nothing is written into the repo), installed with ``--no-deps --no-index``, and the
dependencies come from this venv's site-packages through a ``.pth`` line. Python adds such a
path to ``sys.path`` without processing the ``.pth`` files in it (dist-ft's editable finder
among them), so the wheel's ``dist_ft`` is the one that imports; the test checks that it is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dist_ft.config.shipped import shipped_files
from tests.conftest import REPO, plain_env

pytestmark = pytest.mark.multiprocess  # builds, installs and trains: minutes, not seconds


def _run(argv: list[str | Path], cwd: Path, env: dict[str, str],
         timeout: int = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def _source_copy(dest: Path) -> Path:
    """The repo's files as git knows them (tracked, plus new ones not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        source = REPO / name
        if name and source.is_file():  # tracked but deleted in the work tree: skip
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def test_wheel_in_a_fresh_venv_runs_shipped_recipes_by_name(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.fail("git is needed to list the repo's files")
    env = {k: v for k, v in plain_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    work = tmp_path / "work"  # cwd outside the repo: no configs/ or launch/ beside it
    work.mkdir()

    src = _source_copy(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", tmp_path / "dist", src], work, env)
    wheel = next((tmp_path / "dist").glob("dist_ft-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], work, env)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     work, env).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_dist_ft_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    # pip comes from the dependency path; --ignore-installed: never touch this venv's dist-ft.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
          wheel], work, env)

    where = _run([python, "-c", "import dist_ft; print(dist_ft.__file__)"], work, env).stdout
    package = Path(where.strip()).parent
    assert package.is_relative_to(venv), f"dist_ft imported from {package}, not the wheel"
    assert (package / "models" / "specs.json.gz").is_file()
    dist_ft = venv / "bin" / "dist-ft"

    listing = json.loads(_run([dist_ft, "recipes", "list", "--json"], work, env).stdout)
    shipped = {"recipes": "recipe", "sweeps": "sweep", "launch_configs": "launch"}
    for section, kind in shipped.items():
        names = [row["name"] for row in listing[section]]
        assert names == [f.name for f in shipped_files((kind,))], section  # all of them
        for row in listing[section]:
            assert Path(row["path"]).is_relative_to(package / "_shipped"), row["path"]
            assert "error" not in row, row
    table = _run([dist_ft, "recipes", "list"], work, env).stdout
    assert "chestxray14_smoke" in table and "DeepSpeed ZeRO-2" in table

    plan = json.loads(_run([dist_ft, "plan", "chestxray14_smoke", "--json"], work, env).stdout)
    assert plan["model"] == "resnet18" and len(plan["stages"]) == 3

    data, out = work / "cxr14", work / "run"
    _run([dist_ft, "data", "synth", data, "--images", "40", "--size", "32"], work, env)
    trained = _run([dist_ft, "train", "chestxray14_smoke", "trainer.max_steps=2",
                    "trainer.backend=ddp", f"data.root={data}", "data.image_size=32",
                    "data.load_size=32", "data.batch_size=8", "data.val_fraction=0.3",
                    f"output_dir={out}"], work, env, timeout=400)
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["step"]) == ("finished", 2), trained.stderr[-2000:]
    assert (out / "final" / "model.safetensors").is_file()
