"""``medunet export``: a model as ONNX, OpenVINO IR or TorchScript, with what a scan needs inside it.

The exported graph takes a preprocessed window ``(B, C, *S)``, float32, batch and spatial sides
dynamic, each side a multiple of the network's stride (``metadata["stride"]``), and returns logits
``(B, K, *S)``. The preprocessing that makes a window (orientation, target spacing, normalization
and its constants), the label names and values, the window the model was trained on and the
training fingerprint travel in the file's metadata as one JSON object (``medunet`` key): ONNX
``metadata_props``, OpenVINO ``rt_info``, TorchScript ``extra_files``. ``medunet infer --model
model.onnx`` needs nothing else.

Before anything is written, the export is run on real scans beside PyTorch, window by window on the
same plan: the largest logit difference is reported and the masks must agree on at least
``MIN_AGREEMENT`` of the voxels, or nothing is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from medunet.config import InferConfig, NetworkConfig, PreprocessConfig, from_dict
from medunet.data.manifest import Case
from medunet.errors import InputError
from medunet.inference.backends import (
    Backend,
    BackendError,
    Engine,
    OnnxRuntimeEngine,
    OpenVinoEngine,
    TorchEngine,
    WrappedEngine,
    installed,
    require,
)
from medunet.inference.model import SegmentationModel, read_fingerprint
from medunet.io.export_metadata import EXPORT_FORMAT, METADATA_KEY, can_read_onnx, onnx_metadata_text, parse_metadata
from medunet.io.writers import atomic_path
from medunet.networks.topology import total_stride

MIN_AGREEMENT = 0.999  # share of voxels whose label must match PyTorch's on every check scan
ONNX_SUFFIX, OPENVINO_SUFFIX, TORCHSCRIPT_SUFFIX = ".onnx", ".xml", ".ts"


class ExportFormat(StrEnum):
    ONNX = "onnx"
    OPENVINO = "openvino"
    TORCHSCRIPT = "torchscript"


SUFFIXES = {ExportFormat.ONNX: ONNX_SUFFIX, ExportFormat.OPENVINO: OPENVINO_SUFFIX, ExportFormat.TORCHSCRIPT: ".ts"}


def is_exported(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (ONNX_SUFFIX, OPENVINO_SUFFIX)


def export_metadata(model: SegmentationModel) -> dict[str, Any]:
    """Everything inference needs besides the graph, as plain JSON data."""
    cfg = model.network_config
    return {
        "format": EXPORT_FORMAT,
        "input": "image (batch, channels, *spatial), float32, preprocessed as 'preprocess' says; "
        "each spatial side a multiple of 'stride'",
        "output": "logits (batch, classes, *spatial); labels are their argmax mapped through 'label_values'",
        "stride": list(total_stride(cfg)),
        "label_names": list(model.label_names),
        "label_values": list(model.label_values),
        "network": dataclasses.asdict(cfg),
        "preprocess": dataclasses.asdict(model.preprocess),
        "infer": dataclasses.asdict(model.infer),
        "fingerprint": model.fingerprint,
        "source": Path(model.source).name,
    }


def _torch_network(model: SegmentationModel) -> torch.nn.Module:
    if model.network is None:
        raise InputError(model.source, "is an exported graph already; export from the PyTorch model")
    return model.network


def to_onnx(model: SegmentationModel) -> bytes:
    """The network as an ONNX graph (opset 18, torch.export), metadata included."""
    require_export()
    network = _torch_network(model).cpu().eval()
    cfg = model.network_config
    stride = total_stride(cfg)
    patch = [m * max(2, math.ceil(p / m)) for p, m in zip(model.preprocess.patch_size, stride, strict=False)]
    example = torch.zeros(1, cfg.in_channels, *patch[: cfg.spatial_dims])
    dim = torch.export.Dim
    shapes = {0: dim("batch", min=1, max=4096)}
    for i, m in enumerate(stride):  # each side a multiple of the stride: the graph needs no padding
        shapes[2 + i] = m * dim(f"blocks{i}", min=1, max=8192 // m)
    # the plain forward (the slab-wise one calls oneDNN directly); the exporter's narration of each graph
    # rewrite is shown only with medunet's debug log (-v)
    with torch.enable_grad(), _exporter_quiet():
        program = torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes={"x": shapes},
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(export_metadata(model))
    data: bytes = proto.SerializeToString()
    return data


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    if logging.getLogger("medunet").isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def require_export() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendError(f"exporting needs {' and '.join(missing)} (pip install 'medunet[onnx]')")


def engine_for(
    model: SegmentationModel, backend: Backend, onnx_model: bytes | None = None, full_precision: bool = False
) -> Engine:
    """An engine running ``model``'s network on ``backend`` (its graph exported in memory if needed);
    ``full_precision`` keeps OpenVINO in float32 where it would use bfloat16."""
    if backend is Backend.TORCH:
        return TorchEngine(_torch_network(model), channels_last=model.preprocess.spatial_dims == 3)
    require(backend)
    graph = onnx_model if onnx_model is not None else to_onnx(model)
    stride = total_stride(model.network_config)
    if backend is Backend.ONNXRUNTIME:
        return OnnxRuntimeEngine(graph, stride)
    return OpenVinoEngine(graph, stride, precision="f32" if full_precision else None)


# --- reading an exported model -------------------------------------------------------------------


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``medunet`` metadata of an exported ONNX file or OpenVINO IR."""
    suffix = path.suffix.lower()
    try:
        if suffix == ONNX_SUFFIX:
            require_export_reader()
            text = onnx_metadata_text(path)
        else:
            require(Backend.OPENVINO)
            import openvino as ov

            ir = ov.Core().read_model(str(path))
            text = ir.get_rt_info([METADATA_KEY]).astype(str) if ir.has_rt_info([METADATA_KEY]) else None
    except BackendError:
        raise
    except Exception as exc:  # a damaged or foreign file: the runtimes raise their own types
        raise InputError(path, f"cannot be read as an exported model ({type(exc).__name__}: {exc})") from None
    return parse_metadata(text, path)


def require_export_reader() -> None:
    if not can_read_onnx():
        raise BackendError("reading an .onnx model needs onnx (pip install 'medunet[onnx]')")


def load_exported(path: Path, backend: Backend = Backend.AUTO, full_precision: bool = False) -> SegmentationModel:
    """A model from an exported ONNX file or OpenVINO IR, run by ``backend`` (auto: OpenVINO when it
    is installed, else ONNX Runtime for an ONNX file)."""
    meta = read_metadata(path)
    source = str(path)
    net = from_dict(NetworkConfig, meta["network"], where=f"{source}:network")
    pre = from_dict(PreprocessConfig, meta["preprocess"], where=f"{source}:preprocess")
    inf = from_dict(InferConfig, meta.get("infer", {}), where=f"{source}:infer")
    stride = [int(s) for s in meta["stride"]]
    is_ir = path.suffix.lower() == OPENVINO_SUFFIX
    if backend is Backend.AUTO:
        backend = Backend.OPENVINO if is_ir or installed(Backend.OPENVINO) else Backend.ONNXRUNTIME
    if backend is Backend.TORCH:
        raise InputError(path, "is an exported graph; --backend torch needs the PyTorch model (.pt or bundle)")
    if is_ir and backend is not Backend.OPENVINO:
        raise InputError(path, "is an OpenVINO model; run it with --backend openvino")
    engine: Engine = (
        OnnxRuntimeEngine(source, stride)
        if backend is Backend.ONNXRUNTIME
        else OpenVinoEngine(source, stride, precision="f32" if full_precision else None)
    )
    fingerprint = read_fingerprint(meta.get("fingerprint"), source)
    return SegmentationModel(None, net, pre, inf, source, fingerprint, engine)


# --- writing, after the check --------------------------------------------------------------------


@dataclass(frozen=True)
class ScanCheck:
    scan: str
    max_logit_difference: float
    agreement: float  # share of voxels with the same label as PyTorch's
    seconds_torch: float
    seconds_exported: float


@dataclass(frozen=True)
class ExportReport:
    output: Path
    format: ExportFormat
    checks: tuple[ScanCheck, ...]
    quantization: str | None = None  # the INT8 graph's Dice against the float graph's, when quantized

    def describe(self) -> str:
        lines = [f"{self.output} ({self.format}{', INT8' if self.quantization else ''})"]
        if self.quantization:
            lines.append(f"  {self.quantization}")
        for c in self.checks:
            lines.append(
                f"  {Path(c.scan).name}: largest logit difference {c.max_logit_difference:.2e}, "
                f"masks agree on {100 * c.agreement:.4f}% of voxels; "
                f"{c.seconds_torch:.2f} s PyTorch, {c.seconds_exported:.2f} s exported"
            )
        return "\n".join(lines)


class _Compared(WrappedEngine):
    """``engine``'s logits for each window, beside PyTorch's on the same window: the largest difference."""

    def __init__(self, engine: Engine, reference: Engine) -> None:
        super().__init__(engine)
        self.reference = reference
        self.max_difference = 0.0

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        out = self.engine(window)
        ref = self.reference(window).float()
        self.max_difference = max(self.max_difference, float((out.float() - ref).abs().max()))
        return out


def check_export(model: SegmentationModel, engine: Engine, scans: Sequence[Sequence[Path]]) -> list[ScanCheck]:
    """Segment each scan with PyTorch and with ``engine`` on the same windows; compare."""
    import time

    from medunet.inference.predictor import InferOptions, segment

    reference = TorchEngine(_torch_network(model), channels_last=model.preprocess.spatial_dims == 3)
    reference.lean_forward = engine.lean_forward  # both run the same windows
    checks = []
    for scan in scans:
        start = time.perf_counter()
        expected = segment(list(scan), replace(model, engine=reference), options=InferOptions())
        middle = time.perf_counter()
        compared = _Compared(engine, reference)
        got = segment(list(scan), replace(model, engine=compared), options=InferOptions())
        end = time.perf_counter()
        agreement = float((expected.labels == got.labels).float().mean())
        # the exported run also ran PyTorch on each window: count its time once
        checks.append(ScanCheck(str(scan[0]), compared.max_difference, agreement, middle - start, end - middle))
        del expected, got  # before the next scan is planned against the memory budget
    return checks


def export_model(
    model: SegmentationModel,
    fmt: ExportFormat,
    output: Path,
    check_on: Sequence[Sequence[Path]],
    int8_validation: Sequence[Case] | None = None,
) -> ExportReport:
    """Export ``model`` to ``output`` (a bundle folder: its ``models/model.onnx``), checked first on
    ``check_on`` (real scans, each a list of channel files or a DICOM folder).

    ``int8_validation``: quantize to INT8 (calibrated on ``check_on``) and write it only if its mean
    Dice on these labelled cases is within ``quantize.MAX_DICE_LOSS`` of the float graph's; its masks
    are then compared with PyTorch's and reported, not held to ``MIN_AGREEMENT``."""
    if not check_on:
        raise InputError(output, "an export is checked on real scans before it is written; give --check-on SCAN")
    if output.is_dir():
        if fmt is not ExportFormat.ONNX or not (output / "configs" / "inference.json").is_file():
            raise InputError(output, "is a folder; give a file name (a medunet bundle folder takes --format onnx)")
        output = output / "models" / "model.onnx"
    if fmt is ExportFormat.TORCHSCRIPT:
        return _export_torchscript(model, output, check_on)
    graph = to_onnx(model)
    quantized = None
    if int8_validation is not None:
        from medunet.inference.quantize import MAX_DICE_LOSS, compare_on_cases, quantize_int8

        int8 = quantize_int8(model, graph, check_on)
        quantized = compare_on_cases(model, graph, int8, int8_validation)
        if quantized.loss >= MAX_DICE_LOSS:
            raise InputError(
                output,
                f"not written: {quantized.describe()}; INT8 is offered only where it loses under {MAX_DICE_LOSS} Dice",
            )
        measured = {"cases": quantized.cases, "dice_float": quantized.dice_float, "dice_int8": quantized.dice_int8}
        graph = _with_metadata(int8, {**export_metadata(model), "quantization": {"int8": True, **measured}})
    if fmt is ExportFormat.ONNX:
        engine: Engine = (
            OnnxRuntimeEngine(graph, total_stride(model.network_config))
            if installed(Backend.ONNXRUNTIME)
            else engine_for(model, Backend.OPENVINO, graph)
        )
    else:
        engine = engine_for(model, Backend.OPENVINO, graph)
    checks = check_export(model, engine, check_on)
    if quantized is None:
        _checked(checks, output)
    if fmt is ExportFormat.ONNX:
        with atomic_path(output) as tmp:
            tmp.write_bytes(graph)
    else:
        _write_openvino(graph, model, output)
    return ExportReport(output, fmt, tuple(checks), quantized.describe() if quantized is not None else None)


def _with_metadata(graph: bytes, meta: dict[str, Any]) -> bytes:
    import onnx

    proto = onnx.load_from_string(graph)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    data: bytes = proto.SerializeToString()
    return data


def _checked(checks: list[ScanCheck], output: Path) -> list[ScanCheck]:
    for c in checks:
        if c.agreement < MIN_AGREEMENT:
            raise InputError(
                output,
                f"not written: on {c.scan} the exported model's mask agrees with PyTorch's on only "
                f"{100 * c.agreement:.3f}% of voxels (at least {100 * MIN_AGREEMENT:.1f}% needed)",
            )
    return checks


def _write_openvino(graph: bytes, model: SegmentationModel, output: Path) -> None:
    """OpenVINO IR: ``output`` (.xml) and its weights beside it (.bin), both written or neither."""
    import openvino as ov

    if output.suffix.lower() != OPENVINO_SUFFIX:
        raise InputError(output, "an OpenVINO model is written as NAME.xml (its weights go to NAME.bin)")
    ir = ov.Core().read_model(model=graph, weights=b"")
    ir.set_rt_info(json.dumps(export_metadata(model)), [METADATA_KEY])
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".medunet-export-") as tmp:
        xml = Path(tmp) / output.name
        ov.save_model(ir, str(xml), compress_to_fp16=False)
        xml.with_suffix(".bin").replace(output.with_suffix(".bin"))
        xml.replace(output)


def _export_torchscript(model: SegmentationModel, output: Path, check_on: Sequence[Sequence[Path]]) -> ExportReport:
    """TorchScript (for LibTorch and C++ hosts), metadata in ``extra_files['medunet.json']``."""
    network = _torch_network(model).cpu().eval()
    scripted = torch.jit.script(network)

    class Scripted:
        backend, lean_forward = Backend.TORCH, False

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        def describe(self) -> str:
            return "torchscript"

        def release(self) -> None:
            pass

        def __call__(self, window: torch.Tensor) -> torch.Tensor:
            return scripted(window.float())  # type: ignore[no-any-return]

    checks = _checked(check_export(model, Scripted(), check_on), output)
    with atomic_path(output) as tmp:
        torch.jit.save(scripted, str(tmp), _extra_files={"medunet.json": json.dumps(export_metadata(model))})
    return ExportReport(output, ExportFormat.TORCHSCRIPT, tuple(checks))


# --- choosing the backend ------------------------------------------------------------------------


def with_backend(
    model: SegmentationModel, backend: Backend, onnx_file: Path | None = None, full_precision: bool = False
) -> SegmentationModel:
    """``model`` with its windows run by ``backend``; ``onnx_file`` (a bundle's ``models/model.onnx``)
    is used instead of exporting the graph again.

    ``auto``: OpenVINO where it is installed, the model runs on the CPU and its graph is at hand
    (``onnx_file``), else PyTorch. On this project's CPUs OpenVINO ran the shipped model 1.2x faster
    than PyTorch in float32 and 2.2x faster in bfloat16 (``benchmarks/inference_speed.py --backends``);
    exporting a graph first costs more than that saves on a few scans, so without one PyTorch runs.
    """
    on_cpu = model.network is None or next(model.network.parameters()).device.type == "cpu"
    if backend is Backend.AUTO:
        fast = onnx_file is not None and on_cpu and installed(Backend.OPENVINO)
        backend = Backend.OPENVINO if fast else Backend.TORCH
    if backend is Backend.TORCH:
        return model
    require(backend)
    if not on_cpu:
        raise BackendError(f"--backend {backend} runs on the CPU; use --device cpu (or --backend torch on a GPU)")
    graph: bytes | None = None
    if onnx_file is not None:
        read_metadata(onnx_file)  # one of ours
        graph = onnx_file.read_bytes()
    return replace(model, engine=engine_for(model, backend, graph, full_precision))
