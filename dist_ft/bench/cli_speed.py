"""``dist-ft bench cli``: wall time of the commands that need no model, run as a user runs them.

Each command is a fresh ``python -m dist_ft ...`` process (the commands and their arguments:
:data:`dist_ft.bench.suites.CLI_COMMANDS`), next to two baselines measured in the same
rounds: ``python -c pass`` (the interpreter alone) and ``python -c "import torch"`` (what a
command that loads torch would pay on top). Every command runs once untimed (a warm run: disk
cache, ``.pyc`` files), once more untimed under ``python -X importtime`` (which modules it
loads, torch among them; the probe slows imports down, so it never runs in a timed run), then
``repeats`` timed rounds that alternate the commands. Reported: median and min-max seconds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dist_ft.bench.suites import CLI_COMMANDS, CLI_TARGET_S

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding dist_ft/
# The project's own copy of the real ChestX-ray14 metadata (112,120 rows), when run from a
# checkout; elsewhere a synthetic twin of the same size is written.
FIXTURE_CXR14 = PACKAGE_ROOT / "tests" / "fixtures" / "chestxray14"
CXR14_ROWS = 112_120
TIMEOUT_S = 300


def parse_importtime(stderr: str) -> dict[str, Any]:
    """Summarize ``python -X importtime`` output: whether torch was imported, how many modules,
    and the import time of each top-level package (the sum of its modules' self times, so the
    shares add up; stdlib modules are one entry, ``(stdlib)``)."""
    names: list[str] = []
    self_us: dict[str, int] = defaultdict(int)
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line[len("import time:"):].split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue  # the header line
        name = fields[2].strip()
        names.append(name)
        root = name.split(".")[0]
        self_us["(stdlib)" if root in stdlib or root.startswith("_") else root] += int(fields[0])
    packages = sorted(self_us.items(), key=lambda kv: -kv[1])
    return {"imports_torch": "torch" in names, "modules": len(names),
            "import_s": {k: v / 1e6 for k, v in packages}}


def _configs_dir() -> Path:
    """``configs/`` of the working folder, else of the checkout this package runs from."""
    for folder in (Path.cwd() / "configs", PACKAGE_ROOT / "configs"):
        if (folder / "chestxray14_densenet121.yaml").is_file():
            return folder.resolve()
    raise FileNotFoundError("bench cli: no configs/chestxray14_densenet121.yaml here or in "
                            f"{PACKAGE_ROOT}; run it from the dist-ft checkout")


def _cxr14_dir(data: Path | None, scratch: Path) -> tuple[Path, str]:
    """The metadata folder ``data stats`` reads, and where it came from."""
    if data is not None:
        return data.resolve(), "given"
    if any(FIXTURE_CXR14.glob("Data_Entry_2017*.csv*")):
        return FIXTURE_CXR14, "real metadata (tests/fixtures)"
    from dist_ft.data.synth import _csv_text, plan_rows

    folder = scratch / "cxr14"
    folder.mkdir()
    # Metadata only, at the real row count: `data stats` reads no image.
    (folder / "Data_Entry_2017.csv").write_text(_csv_text(plan_rows(CXR14_ROWS, 0), 1024, "2017"),
                                                newline="")
    return folder, f"synthetic metadata ({CXR14_ROWS:,} rows)"


def _event_runs(scratch: Path) -> Path:
    """A tiny tree of event files for ``aggregate``: 2 runs x 3 tags x 50 steps."""
    from dist_ft.bench.aggregate import make_event_files

    folder = scratch / "runs"
    make_event_files(folder, runs=2, tags=3, steps=50)
    return folder


def display(argv: list[str]) -> str:
    """The command line as a user types it, paths shortened to their file names."""
    words = ["dist-ft", *argv[2:]] if argv[:2] == ["-m", "dist_ft"] else ["python", *argv]
    short = [Path(w).name if "/" in w and not w.startswith("-") else w for w in words]
    return " ".join(f'"{w}"' if " " in w else w for w in short)


def _run(argv: list[str], env: dict[str, str], cwd: Path, importtime: bool = False
         ) -> tuple[float, str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return elapsed, proc.stderr


def bench_cli(commands: list[str] | None = None, repeats: int = 5,
              data: Path | None = None) -> dict[str, Any]:
    """Time ``commands`` (names of :data:`CLI_COMMANDS`, default all) ``repeats`` times each,
    alternating, after one warm run and one ``-X importtime`` run of each."""
    names = list(commands or CLI_COMMANDS)
    unknown = [n for n in names if n not in CLI_COMMANDS]
    if unknown:
        raise ValueError(f"bench cli: unknown command(s) {unknown}; choose from "
                         f"{list(CLI_COMMANDS)}")
    if repeats < 1:
        raise ValueError("bench cli: --repeats must be >= 1")
    env = dict(os.environ)
    # The dist_ft measured is this one, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT),
                                                    env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="dist_ft_bench_cli_") as tmp:
        scratch = Path(tmp)
        work = scratch / "cwd"  # the commands' working folder: what they write lands here
        work.mkdir()
        fill = {"tmp": str(scratch), "configs": "", "cxr14": "", "runs": ""}
        data_source = None
        templates = [" ".join(CLI_COMMANDS[n]) for n in names]
        if any("{configs}" in t for t in templates):
            fill["configs"] = str(_configs_dir())
        if any("{cxr14}" in t for t in templates):
            cxr14, data_source = _cxr14_dir(data, scratch)
            fill["cxr14"] = str(cxr14)
        if any("{runs}" in t for t in templates):
            fill["runs"] = str(_event_runs(scratch))
        argvs = {n: [w.format(**fill) for w in CLI_COMMANDS[n]] for n in names}

        probes = {}
        for n in names:
            _run(argvs[n], env, work)  # warm: page cache, __pycache__
            probes[n] = parse_importtime(_run(argvs[n], env, work, importtime=True)[1])
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(repeats):
            for n in names:
                times[n].append(_run(argvs[n], env, work)[0])

    rows = {}
    for n in names:
        t = times[n]
        rows[n] = {"command": display(argvs[n]),
                   "seconds": {"median": statistics.median(t), "min": min(t), "max": max(t),
                               "runs": t},
                   **probes[n]}
    result: dict[str, Any] = {
        "repeats": repeats, "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "data": fill["cxr14"] or None, "data_source": data_source, "commands": rows,
    }
    if "python" in rows and "import-torch" in rows:
        result["torch_import_s"] = (rows["import-torch"]["seconds"]["median"]
                                    - rows["python"]["seconds"]["median"])
    if "plan" in rows:
        plan_s = rows["plan"]["seconds"]["median"]
        result["target"] = {"command": "plan", "seconds": CLI_TARGET_S,
                            "median": plan_s, "met": plan_s < CLI_TARGET_S}
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    lines = [f"wall seconds of a fresh process, median (min-max) of {result['repeats']} "
             f"alternating runs after a warm run; Python {result['python']}, "
             f"{result['cpus']} CPUs", "",
             "| command | seconds | imports torch | modules | heaviest imports (s, importtime) |",
             "|---|---:|:---:|---:|---|"]
    for row in result["commands"].values():
        s = row["seconds"]
        heavy = ", ".join(f"{k} {v:.2f}" for k, v in list(row["import_s"].items())[:3])
        lines.append(f"| `{row['command']}` | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"
                     f" | {'yes' if row['imports_torch'] else 'no'} | {row['modules']} "
                     f"| {heavy} |")
    notes = []
    if "torch_import_s" in result:
        notes.append(f"importing torch costs {result['torch_import_s']:.2f} s here "
                     "(`import torch` minus `pass`)")
    if "target" in result:
        t = result["target"]
        notes.append(f"`plan`: {t['median']:.2f} s, target < {t['seconds']} s: "
                     f"{'met' if t['met'] else 'MISSED'}")
    if result.get("data_source"):
        notes.append(f"`data stats` read {result['data_source']}")
    if "aggregate" in result["commands"]:
        notes.append("`aggregate runs`: 2 runs x 3 tags x 50 steps, its CSV, TensorBoard "
                     "copy and 3 plots")
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))
