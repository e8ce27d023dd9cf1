"""Where a run's scalars go: TensorBoard's ``tb/`` and, through Accelerate, MLflow and W&B.

``logging.trackers`` names them:

- ``tensorboard``: the run folder's ``tb/`` (what ``dist-ft aggregate`` reads), written by a
  ``SummaryWriter`` whose ``purge_step`` hides what an interrupted segment logged after the
  checkpoint a resume starts from.
- ``mlflow`` and ``wandb``: Accelerate's trackers (``Accelerator(log_with=...)``,
  ``init_trackers``, ``log``), on the main process only, offline unless told otherwise, for
  clusters without internet. MLflow writes a SQLite store, ``trackers/mlflow.db`` (MLflow 3
  refuses its ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set), unless
  ``MLFLOW_TRACKING_URI`` names another; W&B runs in offline mode unless ``WANDB_MODE`` is
  set, under ``trackers/wandb/`` unless ``WANDB_DIR`` is.

Every tracker gets the same scalars at the same steps (names MLflow refuses have their odd
characters replaced by ``_`` for MLflow and W&B alike) and the resolved recipe, flattened to
dotted keys, as hyperparameters. A resume continues the same tracker runs: W&B's run id is
the dist-ft run id (``resume="allow"``), MLflow's is kept in ``trackers/runs.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_ft import console
from dist_ft.config.errors import ConfigError
from dist_ft.logs.aggregate import flatten
from dist_ft.rundir import RunDir, read_json, write_json_atomic

log = logging.getLogger("dist_ft.train")

ACCELERATE_TRACKERS = ("mlflow", "wandb")  # the ones Accelerate runs (tensorboard is tb/)
PROJECT = "dist-ft"  # MLflow's experiment, W&B's project (MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT)
# What each tracker imports; the SQLite store adds SQLAlchemy and Alembic to mlflow-skinny.
_MODULES = {"mlflow": ("mlflow",), "wandb": ("wandb",)}
_SQLITE_MODULES = ("sqlalchemy", "alembic")
_MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED"}  # anything else: FAILED


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (blocked)
        return False


def check_trackers(names: Sequence[str]) -> None:
    """Refuse trackers whose packages are missing, before anything starts.

    Raises:
        ConfigError: naming ``logging.trackers``, the tracker and the extra to install.
    """
    problems = []
    for name in names:
        modules = _MODULES.get(name, ())
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            modules = (*modules, *_SQLITE_MODULES)
        missing = [m for m in modules if not _importable(m)]
        if missing:
            problems.append(f"logging.trackers: {name} needs {', '.join(missing)}, which "
                            f"cannot be imported here: pip install 'dist-ft[{name}]'")
    if problems:
        raise ConfigError(problems)


def accelerate_log_with(names: Sequence[str]) -> list[str] | None:
    """What ``Accelerator(log_with=...)`` gets: the trackers Accelerate runs, or None."""
    return [n for n in names if n in ACCELERATE_TRACKERS] or None


def hyperparameters(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe as flat ``section.key`` values (lists as JSON), as trackers take them."""
    return {k: v if v is None or isinstance(v, bool | int | float | str) else json.dumps(v)
            for k, v in flatten(recipe).items()}


def metric_key(tag: str) -> str:
    """``tag`` with the characters MLflow refuses in metric names replaced by ``_``."""
    return re.sub(r"[^\w./ -]", "_", tag)


class RunTrackers:
    """The main process's run-level scalars, to ``tb/`` and Accelerate's trackers.

    It takes the ``SummaryWriter`` calls :class:`~dist_ft.train.reporting.Reporter` makes
    (``add_scalar``, ``add_text``, ``flush``, ``close``); a step's scalars go to Accelerate's
    trackers together, at :meth:`commit` (or when a later step's arrive).

    Args:
        acc: the Accelerator, built with ``log_with=accelerate_log_with(names)``.
        run: the run folder.
        names: ``logging.trackers``.
    """

    def __init__(self, acc: Any, run: RunDir, names: Sequence[str]) -> None:
        self.acc, self.run, self.names = acc, run, list(names)
        self.folder = run.trackers  # mlflow.db, wandb/, runs.json
        self.tb: Any = None
        self.started = False  # Accelerate's trackers
        self.pending: dict[str, float] = {}
        self.pending_step: int | None = None
        self.hints: list[str] = []  # where each tracker's records are, and how to see them
        self._set_uri = False  # whether this run set MLflow's tracking URI (reset at close)
        self._mlflow_uri = ""

    # ------------------------------------------------------------------ start
    def start(self, run_id: str, recipe: dict[str, Any], purge_step: int | None) -> None:
        """Open ``tb/`` (hiding steps after ``purge_step``) and start Accelerate's trackers
        with the recipe as hyperparameters, continuing this run's tracker runs if any."""
        try:
            if "tensorboard" in self.names:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run.tb), purge_step=purge_step)
                self.hints.append(f"TensorBoard: tensorboard --logdir {self.run.tb}")
            if accelerate_log_with(self.names):
                self._start_accelerate(run_id, recipe)
        except BaseException:
            self.close()
            raise

    def _start_accelerate(self, run_id: str, recipe: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        saved = read_json(self.folder / "runs.json")
        saved = saved if isinstance(saved, dict) and saved.get("run_id") == run_id else {}
        name = self.run.root.name
        kwargs: dict[str, dict[str, Any]] = {}
        if "mlflow" in self.names:
            kwargs["mlflow"] = self._mlflow_kwargs(saved.get("mlflow") or {}, run_id, name)
        if "wandb" in self.names:
            # console off: W&B would otherwise wrap stdout/stderr (the progress bar, logs).
            wandb: dict[str, Any] = {"id": run_id, "resume": "allow", "name": name,
                                     "settings": {"console": "off", "silent": True}}
            if not os.environ.get("WANDB_MODE"):
                wandb["mode"] = "offline"
            if not os.environ.get("WANDB_DIR"):
                wandb["dir"] = str(self.folder)
            kwargs["wandb"] = wandb
        self.started = True  # from here on close() finishes what started
        self.acc.init_trackers(os.environ.get("WANDB_PROJECT") or PROJECT,
                               init_kwargs=kwargs)
        running = {t.name for t in self.acc.trackers}
        lost = [n for n in accelerate_log_with(self.names) or () if n not in running]
        if lost:  # Accelerate drops a tracker it finds unavailable, with a debug line only
            raise RuntimeError(f"logging.trackers: Accelerate did not start {', '.join(lost)} "
                               f"(installed: {sorted(running) or 'none'}); pip install "
                               f"'dist-ft[{lost[0]}]'")
        params = hyperparameters(recipe)
        record: dict[str, Any] = {"run_id": run_id}
        for tracker in self.acc.trackers:
            if tracker.name == "mlflow":
                record["mlflow"] = self._mlflow_params(tracker, params)
            else:
                tracker.store_init_configuration(params)
            if tracker.name == "wandb":
                wb = tracker.run
                folder = Path(wb.dir).parent  # .../offline-run-<time>-<id>/files
                record["wandb"] = {"run_id": wb.id, "dir": str(folder)}
                self.hints.append(f"W&B: wandb sync {folder}" if wb.offline else
                                  f"W&B: {wb.url}")
        write_json_atomic(self.folder / "runs.json", record)
        log.info("trackers: %s", "; ".join(self.hints))

    def _mlflow_kwargs(self, saved: dict[str, Any], run_id: str, name: str) -> dict[str, Any]:
        import mlflow

        if console.verbosity() < 1:  # unless -v
            # MLflow logs through its own stderr handler ("Creating initial MLflow database
            # tables..."): its chatter, like other libraries', stays off the console.
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        kwargs: dict[str, Any] = {"run_name": name, "tags": {"dist_ft.run_id": run_id}}
        if not uri:
            uri = f"sqlite:///{self.folder / 'mlflow.db'}"
            mlflow.set_tracking_uri(uri)  # also exported as MLFLOW_TRACKING_URI: reset at close
            self._set_uri = True
            kwargs["logging_dir"] = str(self.folder / "mlflow-artifacts")
        if saved.get("tracking_uri") == uri and saved.get("run_id"):
            kwargs["run_id"] = saved["run_id"]  # a resume: continue that run
        self._mlflow_uri = uri
        return kwargs

    def _mlflow_params(self, tracker: Any, params: dict[str, Any]) -> dict[str, Any]:
        """Log the hyperparameters MLflow does not hold yet: it refuses to change a logged
        one, so a resume with an accepted change keeps the first value (and says so)."""
        active = tracker.tracker
        logged = dict(active.data.params)
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
        if changed:
            log.info("MLflow keeps the first value of parameters changed on resume: %s",
                     ", ".join(changed))
        tracker.store_init_configuration({k: v for k, v in params.items() if k not in logged})
        run_id = active.info.run_id
        self.hints.append(f"MLflow: mlflow ui --backend-store-uri {self._mlflow_uri} "
                          f"(run {run_id})")
        return {"run_id": run_id, "tracking_uri": self._mlflow_uri}

    # ------------------------------------------------------------------ the writer calls
    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """One scalar at ``step``, to ``tb/`` now and to Accelerate's trackers at commit."""
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)
        if self.started:
            if self.pending_step is not None and step != self.pending_step:
                self.commit()
            self.pending[metric_key(tag)] = float(value)
            self.pending_step = step

    def add_text(self, tag: str, text: str, step: int) -> None:
        """Text for TensorBoard's text tab (the recipe, the plan, the run id)."""
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def commit(self) -> None:
        """Send the pending step's scalars to Accelerate's trackers in one call."""
        if self.pending and self.started:
            self.acc.log(self.pending, step=self.pending_step)
        self.pending, self.pending_step = {}, None

    def flush(self) -> None:
        """Commit and flush ``tb/``."""
        self.commit()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        """Finish every tracker, marked by the run's state in ``status.json`` (finished,
        stopped, else failed)."""
        tb, self.tb = self.tb, None
        try:
            if tb is not None:
                tb.close()
        finally:  # even if tb/ failed (a full disk): end the tracker runs
            self._end_trackers()

    def _end_trackers(self) -> None:
        if self.started:
            self.started = False
            state = (self.run.read_status() or {}).get("state")
            # Each tracker's own finish, not acc.end_training(): that also destroys the process
            # group, which the run's last collective calls still need.
            for tracker in self.acc.trackers:
                try:
                    if self.pending:
                        tracker.log(self.pending, step=self.pending_step)
                    self._finish(tracker, state)
                except Exception as exc:  # a tracker's failure never masks the run's outcome
                    log.warning("%s did not close cleanly: %s", tracker.name, exc)
            self.pending, self.pending_step = {}, None
            self.acc.trackers.clear()
        if self._set_uri:
            import mlflow

            mlflow.set_tracking_uri(None)  # and unset MLFLOW_TRACKING_URI again
            self._set_uri = False

    @staticmethod
    def _finish(tracker: Any, state: str | None) -> None:
        if tracker.name == "mlflow" and state != "finished":
            import mlflow

            mlflow.end_run(status=_MLFLOW_STATUS.get(state or "", "FAILED"))
        elif tracker.name == "wandb" and state not in ("finished", "stopped"):
            tracker.run.finish(exit_code=1)
        else:
            tracker.finish()
