"""Where the network runs on each window: PyTorch, ONNX Runtime or OpenVINO.

Every backend is an ``Engine``: a callable from a float32 window ``(B, C, *S)`` to its logits
``(B, K, *S)``. Window planning, Gaussian blending and everything around them are the same for all;
only the forward pass moves. ONNX Runtime and OpenVINO run the graph ``medunet export`` writes
(``medunet.inference.export``), whose spatial sides must be multiples of the network's stride: their
engines pad each window with zeros at its far end, as the PyTorch network does itself, and crop the
logits back.

The runtimes are optional extras (``pip install medunet[onnx]``, ``medunet[openvino]``) and are
imported only when their backend is asked for.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from medunet.errors import MedunetError


class Backend(StrEnum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


# The Python module each runtime installs, and the extra that installs it.
_MODULES = {Backend.ONNXRUNTIME: ("onnxruntime", "onnx"), Backend.OPENVINO: ("openvino", "openvino")}


class BackendError(MedunetError):
    """A backend that is not installed or cannot run this model."""


def installed(backend: Backend) -> bool:
    if backend in (Backend.TORCH, Backend.AUTO):
        return True
    return importlib.util.find_spec(_MODULES[backend][0]) is not None


def require(backend: Backend) -> None:
    if not installed(backend):
        module, extra = _MODULES[backend]
        raise BackendError(f"--backend {backend}: {module} is not installed (pip install 'medunet[{extra}]')")


class Engine(Protocol):
    backend: Backend
    # whether windows may be planned with the memory per voxel of the PyTorch U-Net's slab-wise forward
    # (``NetworkDescription.activation_bytes_per_voxel``); else with the plain forward's, about twice as much
    lean_forward: bool

    @property
    def device(self) -> torch.device: ...

    def describe(self) -> str: ...

    def release(self) -> None:
        """Hand back buffers kept from the last window (before a scan is planned against the budget)."""

    def __call__(self, window: torch.Tensor) -> torch.Tensor: ...


class TorchEngine:
    """The PyTorch network itself (channels-last 3D windows on CPU and GPU alike)."""

    backend = Backend.TORCH

    def __init__(self, network: nn.Module, channels_last: bool) -> None:
        self.network = network
        self.lean_forward = True
        self.channels_last = channels_last

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def describe(self) -> str:
        return f"torch on {self.device}"

    def release(self) -> None:
        pass  # PyTorch's freed maps go back through the allocator (``runtime.release_free_memory``)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            window = window.contiguous(memory_format=torch.channels_last_3d)
        return self.network(window)


class WrappedEngine:
    """An engine around another, to observe its windows: all but the call is the wrapped engine's."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.backend, self.lean_forward = engine.backend, engine.lean_forward

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def describe(self) -> str:
        return self.engine.describe()

    def release(self) -> None:
        self.engine.release()

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        return self.engine(window)


class _GraphEngine:
    """A window padded to the graph's stride multiples, run, and its logits cropped back.

    Both runtimes plan their buffers over the whole graph and reuse them, so a window costs them no
    more memory than the slab-wise PyTorch forward it is planned for (``benchmarks/inference_speed.py``
    reports each backend's peak).
    """

    backend: Backend
    lean_forward = True

    def __init__(self, stride: Sequence[int]) -> None:
        self.stride = tuple(int(s) for s in stride)
        self._lock = threading.Lock()  # one inference request per engine, used by one thread at a time

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        size = window.shape[2:]
        pad: list[int] = []
        for s, m in zip(reversed(size), reversed(self.stride), strict=True):
            pad += [0, (m - s % m) % m]
        x = F.pad(window.float(), pad) if any(pad) else window.float()
        with self._lock:
            out = self._run(x.contiguous().cpu().numpy())
        logits = torch.from_numpy(out)
        if any(pad):
            logits = logits[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return logits.to(window.device)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def describe(self) -> str:
        return str(self.backend)

    def release(self) -> None:
        pass  # ONNX Runtime runs without its memory arena

    def _run(self, x: Any) -> Any:
        raise NotImplementedError


class OnnxRuntimeEngine(_GraphEngine):
    backend = Backend.ONNXRUNTIME

    def __init__(self, model: bytes | str, stride: Sequence[int], threads: int | None = None) -> None:
        require(Backend.ONNXRUNTIME)
        import onnxruntime as ort

        super().__init__(stride)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its warnings are not the user's problem
        # no memory arena: an arena keeps the largest window's buffers after the run, and the next scan's
        # windows would be planned against them as taken
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, x: Any) -> Any:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoEngine(_GraphEngine):
    """OpenVINO's CPU plugin. ``precision``: None for the plugin's fastest (bfloat16 on CPUs with
    bfloat16 instructions, else float32), or "f32" to keep PyTorch's logits up to rounding. In
    bfloat16 logits move by about 0.1 and masks by a few voxels in 100,000 (README, "Backends")."""

    backend = Backend.OPENVINO

    def __init__(
        self, model: Any, stride: Sequence[int], threads: int | None = None, precision: str | None = None
    ) -> None:
        require(Backend.OPENVINO)
        import openvino as ov

        super().__init__(stride)
        core = ov.Core()
        if isinstance(model, bytes):  # an ONNX graph in memory
            model = core.read_model(model=model, weights=b"")
        elif isinstance(model, str):  # an ONNX file or OpenVINO IR (.xml beside its .bin)
            model = core.read_model(model)
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        }
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # "bf16", "f32"

    def describe(self) -> str:
        return f"openvino ({self.precision})"

    def release(self) -> None:
        # the plugin keeps the last shape's intermediate buffers (250 MB after a BraTS window); planned as
        # taken, they would shrink the next scan's windows. Allocating them again costs about 0.1 s.
        with self._lock:
            release = getattr(self.compiled, "release_memory", None)
            if release is not None:
                release()

    def _run(self, x: Any) -> Any:
        self.request.infer({0: x})
        return self.request.get_output_tensor(0).data.copy()
