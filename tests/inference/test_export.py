"""Export (ONNX, OpenVINO IR, TorchScript) and the ONNX Runtime and OpenVINO backends, on real scans."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.errors import InputError
from medunet.inference import load_model
from medunet.inference.backends import Backend, BackendError, OnnxRuntimeEngine, OpenVinoEngine, require
from medunet.inference.export import ExportFormat, export_model, read_metadata, to_onnx
from medunet.inference.predictor import segment
from medunet.networks import create_network
from medunet.networks.topology import total_stride

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "hippocampus_mri_3d"


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_model(BUNDLE)


@pytest.fixture(scope="module")
def scans(data_dir: Path) -> list[list[Path]]:
    images = data_dir / "msd_hippocampus" / "images"
    return [[images / "hippocampus_004.nii.gz"], [images / "hippocampus_033.nii.gz"]]


@pytest.fixture(scope="module")
def graph(model) -> bytes:  # type: ignore[no-untyped-def]
    return to_onnx(model)


@pytest.mark.slow
def test_onnx_export_is_checked_on_real_scans_and_carries_what_a_scan_needs(model, scans, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "hippo.onnx"
    report = export_model(model, ExportFormat.ONNX, out, scans)
    assert out.is_file() and [c.scan for c in report.checks] == [str(s[0]) for s in scans]
    for check in report.checks:
        assert check.agreement >= 0.999
        assert 0 < check.max_logit_difference < 1e-2  # float rounding, not a different network
    meta = read_metadata(out)
    assert meta["label_names"] == list(model.label_names)
    assert meta["preprocess"]["normalization"] == str(model.preprocess.normalization)
    assert meta["stride"] == list(total_stride(model.network_config))
    assert meta["fingerprint"] == model.fingerprint

    # the file alone segments a scan, on either runtime, as PyTorch does
    expected = segment(scans[1][0], model).labels
    for backend in (Backend.ONNXRUNTIME, Backend.OPENVINO):
        exported = load_model(out, backend=backend)
        assert exported.network is None and exported.window_engine().backend is backend
        got = segment(scans[1][0], exported).labels
        assert float((got == expected).float().mean()) >= 0.999


@pytest.mark.slow
def test_the_graph_takes_windows_of_any_size(model, graph: bytes) -> None:  # type: ignore[no-untyped-def]
    stride = total_stride(model.network_config)
    window = torch.randn(2, 1, 45, 61, 47)  # no side a multiple of the stride (8)
    with torch.inference_mode():
        expected = model.network(window)
    for engine in (OnnxRuntimeEngine(graph, stride), OpenVinoEngine(graph, stride, precision="f32")):
        got = engine(window)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) < 1e-2  # float rounding on logits of about 5


@pytest.mark.slow
# TorchScript, which torch (2.13 here) deprecates, is one of the export formats medunet offers
@pytest.mark.filterwarnings("ignore:.torch.jit.(script|save|load). is deprecated:DeprecationWarning:torch.jit")
def test_openvino_ir_and_torchscript_exports(model, scans, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    xml = tmp_path / "ir" / "hippo.xml"
    export_model(model, ExportFormat.OPENVINO, xml, scans[:1])
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert read_metadata(xml)["label_values"] == list(model.label_values)
    ir_model = load_model(xml)  # auto: OpenVINO
    assert ir_model.window_engine().backend is Backend.OPENVINO
    with pytest.raises(InputError, match="run it with --backend openvino"):
        load_model(xml, backend=Backend.ONNXRUNTIME)

    ts = tmp_path / "hippo.ts"
    report = export_model(model, ExportFormat.TORCHSCRIPT, ts, scans[:1])
    assert report.checks[0].agreement >= 0.999
    extra = {"medunet.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["medunet.json"])["label_names"] == list(model.label_names)
    window = torch.randn(1, 1, 40, 56, 40)
    with torch.inference_mode():
        assert torch.allclose(scripted(window), model.network(window), atol=1e-4)


@pytest.mark.slow
def test_an_export_that_disagrees_with_pytorch_is_not_written(model, scans, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    other = create_network(model.network_config).eval()  # the same network, untrained weights
    monkeypatch.setattr("medunet.inference.export.to_onnx", lambda m: to_onnx(replace(model, network=other)))
    out = tmp_path / "wrong.onnx"
    with pytest.raises(InputError, match=r"not written: on .*hippocampus_004.* agrees with PyTorch's on only"):
        export_model(model, ExportFormat.ONNX, out, scans[:1])
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_carries_its_onnx_graph(model, scans, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    report = export_model(model, ExportFormat.ONNX, bundle, scans[:1])
    assert report.output == bundle / "models" / "model.onnx"
    onnx_model = load_model(bundle, backend=Backend.ONNXRUNTIME)  # the graph from the bundle, not re-exported
    assert onnx_model.window_engine().backend is Backend.ONNXRUNTIME


@pytest.mark.slow
def test_foreign_or_damaged_graphs_are_refused_in_one_line(graph: bytes, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load_from_string(graph)
    del proto.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(proto.SerializeToString())
    with pytest.raises(InputError, match="has no medunet metadata"):
        load_model(plain)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(graph[: len(graph) // 3])
    with pytest.raises(InputError, match="cannot be read as an exported model"):
        load_model(broken)


def test_a_missing_runtime_names_its_extra(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(BackendError, match=r"openvino is not installed \(pip install 'medunet\[openvino\]'\)"):
        require(Backend.OPENVINO)


@pytest.mark.slow
def test_cli_export_then_infer_with_each_backend(data_dir: Path, tmp_path: Path) -> None:
    scan = data_dir / "msd_hippocampus" / "images" / "hippocampus_004.nii.gz"
    medunet = [sys.executable, "-m", "medunet"]
    out = tmp_path / "hippo.onnx"
    proc = subprocess.run(
        [*medunet, "export", str(BUNDLE), "-o", str(out), "--check-on", str(scan)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "masks agree on 100" in proc.stdout
    assert all(": windows " in line for line in proc.stderr.splitlines()), proc.stderr  # the plans only
    masks = {}
    for backend in ("torch", "onnxruntime", "openvino"):
        mask = tmp_path / f"{backend}.nii.gz"
        ref = str(BUNDLE) if backend == "torch" else str(out)
        proc = subprocess.run(
            [*medunet, "infer", str(scan), "-o", str(mask), "--model", ref, "--backend", backend, "-q"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        masks[backend] = np.asarray(nib.load(mask).dataobj)
    for backend in ("onnxruntime", "openvino"):
        assert (masks[backend] == masks["torch"]).mean() >= 0.999
    proc = subprocess.run(
        [*medunet, "infer", str(scan), "-o", str(tmp_path / "x.nii.gz"), "--model", str(out), "--backend", "torch"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"medunet: error: {out}: is an exported graph")


def test_auto_runs_openvino_only_where_the_graph_is_at_hand(tmp_path: Path) -> None:
    import shutil

    shipped = load_model(BUNDLE, backend=Backend.AUTO)  # the default bundle ships models/model.onnx
    assert (BUNDLE / "models" / "model.onnx").is_file()
    assert shipped.window_engine().backend is Backend.OPENVINO
    assert load_model(BUNDLE).window_engine().backend is Backend.TORCH  # the Python API's default: PyTorch
    full = load_model(BUNDLE, backend=Backend.OPENVINO, full_precision=True)
    assert full.window_engine().describe() == "openvino (f32)"
    bare = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bare)
    (bare / "models" / "model.onnx").unlink()
    assert load_model(bare, backend=Backend.AUTO).window_engine().backend is Backend.TORCH  # no export on the fly


@pytest.mark.slow
def test_int8_is_written_only_where_it_keeps_the_dice(
    model, scans, data_dir: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from medunet.data.layouts import read_dataset

    val = tmp_path / "val"
    for sub in ("images", "labels"):
        (val / sub).mkdir(parents=True)
    for n in ("017", "023", "041"):  # validation patients of the shipped model (configs/split.json)
        for sub in ("images", "labels"):
            (val / sub / f"hippocampus_{n}.nii.gz").symlink_to(
                data_dir / "msd_hippocampus" / sub / f"hippocampus_{n}.nii.gz"
            )
    cases = read_dataset(val).cases
    out = tmp_path / "int8.onnx"
    report = export_model(model, ExportFormat.ONNX, out, scans, int8_validation=cases)
    assert report.quantization is not None and report.quantization.startswith("INT8 on 3 validation case(s)")
    quantization = read_metadata(out)["quantization"]
    assert quantization["int8"] and quantization["cases"] == 3
    assert quantization["dice_float"] - quantization["dice_int8"] < 0.005
    assert min(c.agreement for c in report.checks) > 0.99  # reported, not held to 99.9%

    monkeypatch.setattr("medunet.inference.quantize.MAX_DICE_LOSS", -1.0)  # no loss at all allowed: refused
    refused = tmp_path / "refused.onnx"
    with pytest.raises(InputError, match="not written: INT8 on 3 validation case"):
        export_model(model, ExportFormat.ONNX, refused, scans[:1], int8_validation=cases)
    assert not refused.exists()
