"""INT8 quantization of an exported graph, offered only where it keeps the model's Dice.

ONNX Runtime's static quantization (QDQ: int8 weights, uint8 activations) is calibrated on windows
of real scans, preprocessed as the model preprocesses them. The float and the INT8 graph then
segment labelled validation cases with the same windows (OpenVINO, which runs QDQ graphs with its
INT8 kernels, where installed; else ONNX Runtime); the INT8 graph is written only if its mean Dice
over the foreground classes is at most ``MAX_DICE_LOSS`` below the float graph's.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medunet.data.manifest import Case
from medunet.errors import InputError
from medunet.inference.backends import Backend, Engine, OnnxRuntimeEngine, OpenVinoEngine, installed
from medunet.inference.model import SegmentationModel
from medunet.networks.topology import total_stride

MAX_DICE_LOSS = 0.005  # mean foreground Dice the INT8 graph may lose against the float graph


@dataclass(frozen=True)
class QuantizationReport:
    cases: int
    dice_float: float
    dice_int8: float

    @property
    def loss(self) -> float:
        return self.dice_float - self.dice_int8

    def describe(self) -> str:
        return (
            f"INT8 on {self.cases} validation case(s): mean Dice {self.dice_int8:.4f} against "
            f"{self.dice_float:.4f} in float ({-self.loss:+.4f})"
        )


def quantize_int8(model: SegmentationModel, graph: bytes, calibrate_on: Sequence[Sequence[Path]]) -> bytes:
    """The QDQ INT8 graph of ``graph``, calibrated on the preprocessed ``calibrate_on`` scans."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from medunet.inference.predictor import load_scan

    stride = total_stride(model.network_config)

    class Windows(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.windows = self._windows()

        def _windows(self) -> Iterator[dict[str, np.ndarray]]:
            for scan in calibrate_on:
                x = load_scan(list(scan), model).prep.x.as_tensor().float()[None].numpy()
                pad = [(0, 0), (0, 0)] + [(0, (m - s % m) % m) for s, m in zip(x.shape[2:], stride, strict=False)]
                yield {"image": np.pad(x, pad)}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.windows, None)

    with tempfile.TemporaryDirectory(prefix="medunet-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(graph)
        # its advice to pre-process the graph goes to the root logger, as a warning to the user
        logging.disable(logging.WARNING)
        try:
            quantize_static(
            str(src), str(dst), Windows(), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )  # fmt: skip
        finally:
            logging.disable(logging.NOTSET)
        return dst.read_bytes()


def _engine(graph: bytes, model: SegmentationModel, int8: bool) -> Engine:
    """OpenVINO (float32 for the float graph, its INT8 kernels for the QDQ graph), else ONNX Runtime."""
    stride = total_stride(model.network_config)
    if installed(Backend.OPENVINO):
        return OpenVinoEngine(graph, stride, precision=None if int8 else "f32")
    return OnnxRuntimeEngine(graph, stride)


def compare_on_cases(
    model: SegmentationModel, float_graph: bytes, int8_graph: bytes, cases: Sequence[Case]
) -> QuantizationReport:
    """Mean foreground Dice of the float and the INT8 graph against the cases' labels."""
    from medunet.inference.predictor import segment
    from medunet.io import load_image

    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise InputError("--validate-on", "holds no labelled case to measure the INT8 graph's Dice on")
    scores: dict[str, list[float]] = {"float": [], "int8": []}
    values = model.label_values
    for name, graph in (("float", float_graph), ("int8", int8_graph)):
        runner = replace(model, engine=_engine(graph, model, int8=name == "int8"))
        for case in labelled:
            assert case.label is not None
            labels = segment(list(case.images), runner).labels.numpy()
            truth = load_image(case.label)[0].round().numpy()
            for c in range(1, len(values)):
                pred, ref = labels == c, truth == values[c]
                total = int(pred.sum()) + int(ref.sum())
                if total:
                    scores[name].append(2.0 * float((pred & ref).sum()) / total)
    return QuantizationReport(len(labelled), float(np.mean(scores["float"])), float(np.mean(scores["int8"])))
