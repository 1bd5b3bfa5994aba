from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medunet.io import atomic_path, write_array


def test_nifti_keeps_affine(tmp_path: Path) -> None:
    affine = np.array([[-0.9, 0.1, 0, 10.5], [0, 0.8, 0.2, -20], [0.05, 0, 2.5, 30], [0, 0, 0, 1]])
    arr = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    out = write_array(arr, affine, tmp_path / "m.nii.gz")
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    assert img.get_data_dtype() == np.uint8
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_png_round_trip(tmp_path: Path) -> None:
    from medunet.io import load_image

    arr = (np.random.default_rng(0).random((20, 30)) > 0.5).astype(np.uint8) * 255
    out = write_array(arr, np.eye(3), tmp_path / "m.png")
    np.testing.assert_array_equal(load_image(out, spatial_dims=2)[0].numpy(), arr)
