"""Where a run is: the counters a checkpoint saves and a resume restores."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Progress:
    """Counters that a checkpoint saves and a resume restores.

    The data position is kept as images consumed in the current epoch by all ranks together
    (``samples_in_epoch``), so a resume maps it onto any number of processes or batch size.
    """

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    samples_in_epoch: int = 0  # images all ranks consumed in the current epoch
    stage: int = 0
    stage_start: dict[str, int] = field(default_factory=lambda: {"0": 0})
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss
    nonfinite_in_row: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for ``trainer_state.json``."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (keys this version does not know are ignored)."""
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)
        self.stage_start = {str(k): int(v) for k, v in self.stage_start.items()}
