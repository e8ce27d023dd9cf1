"""Export trained weights to TorchScript or ONNX, checked against PyTorch; optional int8.

Every export is verified: the exported model runs on random batches of two sizes and must
match the PyTorch model within ``tolerance`` (max absolute difference of the logits), else
an error is raised and nothing is written. Files are written under a temporary name and
renamed when verified; an output that would replace or land inside an input is refused
before any work. ``quantize="dynamic"`` adds an int8 variant (weights
of Linear layers, activations quantized on the fly: a CPU-inference option) and reports its
size and, when the recipe's data is at hand, its AUROC change on the validation split.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_ft.config.schema import Recipe
from dist_ft.train.output_safety import atomic_output, check_outputs, data_inputs
from dist_ft.train.scoring import load_trained


class ExportError(RuntimeError):
    """The exported model does not match PyTorch, or the export itself failed."""


def _runner(fmt: str, path: Path) -> Any:
    """A callable ``np.ndarray -> np.ndarray`` running the exported file."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    module = torch.jit.load(str(path))
    return lambda x: module(torch.from_numpy(x)).detach().numpy()


def _write(fmt: str, model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # The ONNX exporter prints progress on stdout; keep stdout for --json.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.trace(model, example).save(str(path))
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (example,), str(path), dynamo=True,
                              dynamic_shapes={"x": {0: batch}},
                              input_names=["images"], output_names=["logits"],
                              external_data=False)


def _max_error(model: nn.Module, run: Any, size: int) -> float:
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        worst = max(worst, float(np.abs(run(x.numpy()) - expected).max()))
    return worst


def export_paths(weights: str | Path, fmt: str, out: str | Path | None = None,
                 quantize: str | None = None) -> list[Path]:
    """The files ``export_model`` writes: the export, then the int8 variant if any."""
    default = "model.torchscript.pt" if fmt == "torchscript" else "model.onnx"
    path = Path(out) if out else Path(weights).with_name(default)
    return [path] + ([path.with_name(f"{path.stem}.int8{path.suffix}")] if quantize else [])


def export_model(recipe: Recipe, weights: str | Path, fmt: str, out: str | Path | None = None,
                 quantize: str | None = None, tolerance: float = 1e-4,
                 protect: dict[str, Path] | None = None) -> dict[str, Any]:
    """Export ``weights`` (a state_dict file of ``recipe.model``) and verify it.

    Args:
        protect: more input files never to overwrite, by role (e.g. ``{"recipe": path}``);
            the weights and the recipe's data are always protected.

    Returns:
        A report: paths, sizes, max errors and (with ``quantize``) the int8 AUROC change.

    Raises:
        OutputPathError: an output would replace or land inside an input (before any work).
        WeightsError: the weights do not fit the recipe's model (any tensor).
        ExportError: the export deviates from PyTorch beyond ``tolerance``.
    """
    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"format must be torchscript or onnx, got {fmt!r}")
    weights = Path(weights)
    outputs = export_paths(weights, fmt, out, quantize)
    files, folders = data_inputs(recipe.data)
    check_outputs(outputs, {"weights": weights, **files, **(protect or {})}, folders, "--out")
    path = outputs[0]
    model = load_trained(recipe, weights)
    size = recipe.data.image_size
    # Batch 2: with a batch-1 example torch.export specialises the batch dimension of
    # ConvNeXt-style models (torchvision's and timm's) and the dynamic-batch ONNX export fails.
    example = torch.zeros(2, 3, size, size)
    # Written and verified under a temporary name: a failed export leaves no file behind and
    # the previous export (if any) in place.
    with atomic_output(path) as tmp:
        _write(fmt, model, example, tmp)
        error = _max_error(model, _runner(fmt, tmp), size)
        if not error <= tolerance:
            raise ExportError(f"{fmt} export differs from PyTorch by {error:.3g} > "
                              f"{tolerance:g}; nothing written to {path}")
    report: dict[str, Any] = {"format": fmt, "path": str(path), "bytes": path.stat().st_size,
                              "max_abs_error": error, "input_size": size}
    if quantize == "dynamic":
        report["int8"] = _quantized(recipe, model, fmt, path, outputs[1], example)
    return report


def _quantized(recipe: Recipe, model: nn.Module, fmt: str, path: Path, qpath: Path,
               example: torch.Tensor) -> dict[str, Any]:
    with atomic_output(qpath) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                import onnx
                from onnxruntime.quantization import QuantType, quantize_dynamic

                # The exporter's stored intermediate shapes trip onnxruntime's shape
                # inference during quantization ("Inferred shape and existing shape
                # differ"): drop them.
                graph_model = onnx.load(str(path))
                del graph_model.graph.value_info[:]
                stripped = tmp.with_name(tmp.name + ".src")
                onnx.save(graph_model, str(stripped))
                try:
                    quantize_dynamic(str(stripped), str(tmp), weight_type=QuantType.QInt8)
                finally:
                    stripped.unlink(missing_ok=True)
            else:
                qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear},
                                                                dtype=torch.qint8)
                torch.jit.trace(qmodel, example).save(str(tmp))
        run = _runner(fmt, tmp)
        report: dict[str, Any] = {"path": str(qpath), "bytes": tmp.stat().st_size,
                                  "max_abs_error": _max_error(model, run,
                                                              recipe.data.image_size)}
        report["auroc"] = _auroc_change(recipe, model, run)
    return report


def _auroc_change(recipe: Recipe, model: nn.Module, run: Any) -> dict[str, Any] | None:
    """Mean validation AUROC of PyTorch fp32 vs the int8 export (None without data)."""
    from torch.utils.data import DataLoader

    from dist_ft.data.datasets import build_dataset
    from dist_ft.data.transforms import BatchNormalize, BatchResize
    from dist_ft.train.metrics import classification_metrics

    try:
        dataset = build_dataset(recipe.data, "val")
    except (OSError, ValueError, RuntimeError):
        return None
    if not dataset.multilabel or len(dataset) == 0:
        return None
    from dist_ft.models.preprocessing import input_config

    prep = input_config(recipe.model, recipe.data)
    resize = BatchResize(recipe.data.image_size, prep.interpolation)
    normalize = BatchNormalize(prep.mean, prep.std)
    fp32, int8, targets = [], [], []
    with torch.no_grad():
        for images, target in DataLoader(dataset, batch_size=64):
            x = normalize(resize(images))
            fp32.append(torch.sigmoid(model(x)).numpy())
            int8.append(torch.sigmoid(torch.from_numpy(run(x.numpy()))).numpy())
            targets.append(target.numpy())
    t = np.concatenate(targets)
    a = classification_metrics(np.concatenate(fp32), t, True, dataset.classes)["auroc_mean"]
    b = classification_metrics(np.concatenate(int8), t, True, dataset.classes)["auroc_mean"]
    return {"fp32": a, "int8": b, "change": b - a, "images": len(t)}
