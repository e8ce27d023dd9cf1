"""The record of evaluations: one JSON line per ``dist-ft eval``, appended, never rewritten.

This module owns the record file's format (``RunDir.evaluations``): :func:`append_evaluation`
adds one entry in a single append-mode write (never interleaved), :func:`read_evaluations`
reads the entries back (skipping a line a crash cut), :func:`sha256_file` fingerprints the
weights an entry names, and :func:`earlier_test_uses` turns the entries into the report's
warning that the test split was evaluated before. It loads no torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_ft.jsonio import read_jsonl


def sha256_file(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def read_evaluations(path: str | Path) -> list[dict[str, Any]]:
    """The entries of an evaluation record (one JSON object a line; damaged lines skipped)."""
    return read_jsonl(path)


def append_evaluation(path: str | Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one JSON line (one ``write`` in append mode: never interleaved)."""
    from dist_ft.jsonio import dumps

    line = dumps(entry, indent=None) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def earlier_test_uses(entries: Sequence[dict[str, Any]]) -> str | None:
    """A sentence on earlier evaluations of the test split (None if there were none)."""
    earlier = [e for e in entries if e.get("split") == "test"]
    if not earlier:
        return None
    times = ", ".join(f"{e.get('time', '?')} ({e.get('weights', '?')})" for e in earlier[-5:])
    more = " (last 5 shown)" if len(earlier) > 5 else ""
    plural = "time" if len(earlier) == 1 else "times"
    return f"test split evaluated {len(earlier)} {plural} before{more}: {times}"
