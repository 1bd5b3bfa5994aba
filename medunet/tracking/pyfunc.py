"""The MLflow pyfunc flavour of a medunet model, for ``mlflow models serve``.

Request (``POST /invocations``, JSON)::

    {"dataframe_records": [{"image": "<base64 of a .nii.gz file>"}]}

Response::

    {"predictions": [{"mask": "<base64 of the mask .nii.gz, same geometry>",
                      "shape": "[X, Y, Z]", "voxels": "{\\"1\\": 1523, \\"2\\": 1410}"}]}
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc


class MedunetPyfunc(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """Loads the medunet bundle logged as the ``bundle`` artifact; segments base64 NIfTI scans."""

    def load_context(self, context: Any) -> None:
        from medunet.inference import load_model

        self.model = load_model(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # MLflow reads hints
        import numpy as np
        import pandas as pd

        from medunet.inference import segment, write_segmentation

        rows = []
        for record in model_input.to_dict(orient="records"):
            with tempfile.TemporaryDirectory() as tmp:
                scan = Path(tmp) / "scan.nii.gz"
                scan.write_bytes(base64.b64decode(record["image"]))
                seg = segment(scan, self.model)
                out = write_segmentation(seg, self.model, Path(tmp) / "mask.nii.gz")
                values, counts = np.unique(seg.labels.numpy(), return_counts=True)
                rows.append(
                    {
                        "mask": base64.b64encode(out.read_bytes()).decode(),
                        "shape": json.dumps(list(seg.labels.shape)),
                        "voxels": json.dumps({str(int(v)): int(c) for v, c in zip(values, counts, strict=True) if v}),
                    }
                )
        return pd.DataFrame(rows)
