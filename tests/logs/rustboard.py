"""The default ``tensorboard`` reader, offline: its Rust data server over gRPC, and event
records built by hand with tensorboard's own protos (for cases no writer produces)."""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

Points = list[tuple[int, float]]  # (step, value) as the server returns them


class RustBoard:
    """One ``tensorboard_data_server`` over a logdir, loaded exactly once (``--reload once``).

    Blocks until the load cycle has finished, so every query sees all the data. All points
    are kept (``--samples-per-plugin scalars=all``); ``checksum`` adds ``--checksum``.
    """

    def __init__(self, logdir: Path, checksum: bool = False, timeout: float = 60.0) -> None:
        import grpc
        import tensorboard_data_server
        from tensorboard.data.proto import data_provider_pb2_grpc

        binary = tensorboard_data_server.server_binary()
        if binary is None:
            raise FileNotFoundError("tensorboard-data-server has no binary for this platform")
        self._tmp = tempfile.TemporaryDirectory(prefix="rustboard_")
        port_file = Path(self._tmp.name) / "port"
        args = [binary, "--logdir", str(logdir), "--reload", "once", "--port", "0",
                "--port-file", str(port_file), "--die-after-stdin", "--verbose",
                "--samples-per-plugin", "scalars=all"]
        if checksum:
            args.append("--checksum")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ, RUST_LOG="info"))
        self.log: list[str] = []
        loaded = threading.Event()

        def pump() -> None:  # drain stderr so the server never blocks on a full pipe
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line.rstrip())
                if "Finished load cycle" in line:
                    loaded.set()

        threading.Thread(target=pump, daemon=True).start()
        if not loaded.wait(timeout):
            self.close()
            raise RuntimeError("the data server did not finish loading:\n" + "\n".join(self.log))
        port = int(port_file.read_text())
        self.channel = grpc.insecure_channel(f"localhost:{port}")
        self.stub = data_provider_pb2_grpc.TensorBoardDataProviderStub(self.channel)

    def scalars(self) -> dict[str, dict[str, Points]]:
        """Every point of the scalars dashboard: {run: {tag: [(step, value), ...]}}."""
        from tensorboard.data.proto import data_provider_pb2 as dp

        request = dp.ReadScalarsRequest(
            experiment_id="", plugin_filter=dp.PluginFilter(plugin_name="scalars"),
            run_tag_filter=dp.RunTagFilter(), downsample=dp.Downsample(num_points=2**62))
        out: dict[str, dict[str, Points]] = {}
        for run in self.stub.ReadScalars(request).runs:
            for tag in run.tags:
                out.setdefault(run.run_name, {})[tag.tag_name] = list(
                    zip(tag.data.step, tag.data.value, strict=True))
        return out

    def close(self) -> None:
        """Stop the server (it exits when its stdin closes)."""
        try:
            if getattr(self, "channel", None) is not None:
                self.channel.close()
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(10)
        except (subprocess.TimeoutExpired, OSError, AssertionError):
            self.proc.kill()
        self._tmp.cleanup()


# ---- hand-built records -----------------------------------------------------------------
def record(data: bytes, bad_length_crc: bool = False, bad_data_crc: bool = False) -> bytes:
    """One TFRecord around ``data``, optionally with a wrong checksum."""
    import google_crc32c

    def masked_crc32c(chunk: bytes) -> int:  # TFRecord's masking of the CRC32C
        crc = google_crc32c.value(chunk)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header) ^ int(bad_length_crc)) + data
            + struct.pack("<I", masked_crc32c(data) ^ int(bad_data_crc)))


def file_version(wall: float = 1.0, step: int = 0) -> bytes:
    """The ``file_version`` event every writer starts a file with."""
    from tensorboard.compat.proto.event_pb2 import Event

    return Event(wall_time=wall, step=step, file_version="brain.Event:2").SerializeToString()


def session_start(step: int, wall: float = 1.0) -> bytes:
    """A ``SessionLog.START`` event (what ``SummaryWriter(purge_step=step)`` writes)."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    return Event(wall_time=wall, step=step,
                 session_log=SessionLog(status=SessionLog.START)).SerializeToString()


def scalar(tag: str, step: int, value: float, wall: float | None = None) -> bytes:
    """A ``simple_value`` event, as torch and tensorboardX write it."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    wall = float(step) + 1000.0 if wall is None else wall
    return Event(wall_time=wall, step=step, summary=Summary(
        value=[Summary.Value(tag=tag, simple_value=value)])).SerializeToString()


def tensor(tag: str, step: int, dtype: int, value: Any, plugin: str | None = "scalars",
           shape: tuple[int, ...] = ()) -> bytes:
    """A tensor event (``tf.summary`` v2 style), ``plugin=None`` for no metadata."""
    from tensorboard.compat.proto import types_pb2
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    proto = TensorProto(dtype=dtype, tensor_shape=TensorShapeProto(
        dim=[TensorShapeProto.Dim(size=n) for n in shape]))
    listed = {types_pb2.DT_INT32: proto.int_val, types_pb2.DT_INT64: proto.int64_val,
              types_pb2.DT_DOUBLE: proto.double_val}.get(dtype, proto.float_val)
    listed.extend(value if isinstance(value, list) else [value])
    item = Summary.Value(tag=tag, tensor=proto)
    if plugin is not None:
        item.metadata.CopyFrom(SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name=plugin)))
    return Event(wall_time=float(step) + 1000.0, step=step,
                 summary=Summary(value=[item])).SerializeToString()


def multi(step: int, values: dict[str, float]) -> bytes:
    """One event holding several scalars (as dist-ft's own writer makes them)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Event(wall_time=float(step) + 1000.0, step=step, summary=Summary(
        value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])
    ).SerializeToString()


def write_file(path: Path, records: list[bytes]) -> Path:
    """Write ``records`` (already framed) as one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(records))
    return path
