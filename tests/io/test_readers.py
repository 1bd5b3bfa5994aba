"""Reading real scans of every supported format, with their geometry."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medunet.errors import InputError
from medunet.io import list_dicom_series, load_image


def test_dicom_series_jpeg2000_matches_reference_nifti(data_dir: Path) -> None:
    series = data_dir / "totalseg_examples" / "example_ct_dicom"
    img = load_image(series, spatial_dims=3)
    ref = load_image(data_dir / "totalseg_examples" / "derived" / "example_ct_dicom.nii.gz", spatial_dims=3)
    assert img.shape == (1, 512, 512, 20)
    np.testing.assert_allclose(img.pixdim, [0.9765625, 0.9765625, 2.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(img.affine), np.asarray(ref.affine), atol=1e-3)
    np.testing.assert_array_equal(img.numpy(), ref.numpy())  # JPEG 2000 lossless decodes to the same HU
    assert float(img.min()) == -1024.0


def test_dicom_slices_ordered_by_position_not_name(data_dir: Path, tmp_path: Path) -> None:
    src = sorted((data_dir / "totalseg_examples" / "example_ct_dicom").iterdir())
    names = [f"{i:03d}.dcm" for i in range(len(src))]
    random.Random(0).shuffle(names)
    for f, name in zip(src, names, strict=True):
        shutil.copy(f, tmp_path / name)
    shuffled = load_image(tmp_path, spatial_dims=3)
    original = load_image(src[0].parent, spatial_dims=3)
    np.testing.assert_array_equal(shuffled.numpy(), original.numpy())


def test_folder_with_two_series_needs_a_choice(data_dir: Path, tmp_path: Path) -> None:
    src = sorted((data_dir / "totalseg_examples" / "example_ct_dicom").iterdir())[:4]
    new_uid = pydicom.uid.generate_uid()
    for i, f in enumerate(src):
        shutil.copy(f, tmp_path / f"a{i}.dcm")
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = new_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(tmp_path / f"b{i}.dcm")
    found = list_dicom_series(tmp_path)
    assert found == {"1: no SeriesInstanceUID (CT, 4 files)": 4, f"2: {new_uid} (CT, 4 files)": 4}
    with pytest.raises(InputError, match="2 DICOM series; pick one with --series NUMBER: 1: no SeriesInstanceUID"):
        load_image(tmp_path, spatial_dims=3)
    by_uid = load_image(tmp_path, spatial_dims=3, series=new_uid)
    assert by_uid.shape == (1, 512, 512, 4)
    np.testing.assert_array_equal(load_image(tmp_path, spatial_dims=3, series="2").numpy(), by_uid.numpy())
    with pytest.raises(InputError, match=r"no DICOM series 1\.2\.3; choose by number: 1: "):
        load_image(tmp_path, spatial_dims=3, series="1.2.3")


@pytest.mark.parametrize(
    ("name", "shape", "spacing"),
    [
        ("brain1_image.nrrd", (256, 256, 25), (0.78125, 0.78125, 6.5)),
        ("breast1_image.nrrd", (45, 120, 21), (0.664, 0.664, 2.1)),
        ("prostate_phantom_subvolume.nrrd", (82, 67, 13), (0.5, 0.5, 3.0)),
    ],
)
def test_nrrd_cases_keep_spacing(data_dir: Path, name: str, shape: tuple, spacing: tuple) -> None:
    path = data_dir / "pyradiomics_cases" / name
    img = load_image(path, spatial_dims=3)
    assert img.shape[1:] == shape
    np.testing.assert_allclose(img.pixdim, spacing, atol=2e-3)
    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(img.pixdim, itk.GetSpacing(), atol=1e-6)


def test_brats_two_channels(data_dir: Path) -> None:
    case = data_dir / "brats2015_deepmedic" / "test" / "brats_2013_pat0001_1"
    img = load_image([case / "Flair_subtrMeanDivStd.nii.gz", case / "T1c_subtrMeanDivStd.nii.gz"], spatial_dims=3)
    assert img.shape == (2, 240, 240, 155)
    np.testing.assert_allclose(img.pixdim, (1, 1, 1))


def test_png_is_2d(data_dir: Path) -> None:
    img = load_image(data_dir / "isbi2012_membrane" / "train" / "image" / "0.png", spatial_dims=2)
    assert img.shape == (1, 512, 512)


def test_4d_image_refused(tmp_path: Path) -> None:
    path = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(path))
    with pytest.raises(InputError, match=r"dwi\.nii\.gz: expected a 3D image, got 4D"):
        load_image(path, spatial_dims=3)


def test_unreadable_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"broken\.nii\.gz: cannot be read"):
        load_image(bad, spatial_dims=3)
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.nii.gz")
    with pytest.raises(InputError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("x")
        load_image(tmp_path / "x.txt")


def test_headers_match_loaded_geometry(data_dir: Path) -> None:
    from medunet.io.headers import check_pair, read_header

    for rel in ("pyradiomics_cases/brain1_image.nrrd", "msd_hippocampus/images/hippocampus_004.nii.gz"):
        header = read_header(data_dir / rel)
        img = load_image(data_dir / rel, spatial_dims=3)
        assert header.shape == tuple(img.shape[1:])
        np.testing.assert_allclose(header.affine, np.asarray(img.affine), atol=1e-4)
    check_pair(data_dir / "pyradiomics_cases/brain1_image.nrrd", data_dir / "pyradiomics_cases/brain1_label.nrrd")
    with pytest.raises(InputError, match="label shape"):
        check_pair(data_dir / "pyradiomics_cases/brain1_image.nrrd", data_dir / "pyradiomics_cases/brain2_label.nrrd")


def test_header_check_of_a_4d_image_holding_channels(data_dir: Path, tmp_path: Path) -> None:
    import nibabel as nib

    from medunet.io.headers import check_pair

    src = data_dir / "msd_hippocampus"
    nii = nib.load(str(src / "images/hippocampus_004.nii.gz"))
    data = np.asarray(nii.dataobj, dtype=np.float32)
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), nii.affine), str(four))
    check_pair(four, src / "labels/hippocampus_004.nii.gz", channels_in_file=2)
    with pytest.raises(InputError, match="label shape"):  # read as one channel, the extra axis is a mismatch
        check_pair(four, src / "labels/hippocampus_004.nii.gz")
    with pytest.raises(InputError, match="label shape"):
        check_pair(four, src / "labels/hippocampus_017.nii.gz", channels_in_file=2)


@pytest.mark.parametrize(
    "relpath",
    [
        "msd_hippocampus/images/hippocampus_004.nii.gz",
        "totalseg_examples/example_ct.nii.gz",
        "brats2015_deepmedic/test/brats_2013_pat0001_1/OTMultiClass.nii.gz",
    ],
)
def test_slab_reader_equals_monai_reader(data_dir: Path, relpath: str) -> None:
    from monai.data.image_reader import NibabelReader
    from monai.transforms import LoadImage

    from medunet.io.readers import SlabNibabelReader

    path = str(data_dir / relpath)
    reference = LoadImage(reader=NibabelReader(), image_only=True)(path)
    reader = SlabNibabelReader()
    reader.slab_bytes = 5000  # many slabs, a few slices each
    ours = LoadImage(reader=reader, image_only=True)(path)
    assert ours.dtype == reference.dtype and ours.shape == reference.shape and ours.is_contiguous()
    assert np.array_equal(ours.numpy(), reference.numpy())
    for key, value in reference.meta.items():
        assert np.array_equal(np.asarray(ours.meta[key]), np.asarray(value), equal_nan=value is not None and
                              np.asarray(value).dtype.kind == "f"), key  # fmt: skip


def test_scaled_uncompressed_nifti_read_in_slabs(tmp_path: Path) -> None:
    from medunet.io.readers import SlabNibabelReader

    raw = np.random.default_rng(0).integers(-1000, 3000, size=(20, 16, 12), dtype=np.int16)
    img = nib.Nifti1Image(raw, np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.set_slope_inter(0.5, -10.0)
    nib.save(img, tmp_path / "scaled.nii")
    SlabNibabelReader.slab_bytes, saved = 700, SlabNibabelReader.slab_bytes  # two slices per slab
    try:
        loaded = load_image(tmp_path / "scaled.nii", spatial_dims=3)
    finally:
        SlabNibabelReader.slab_bytes = saved
    assert np.allclose(loaded[0].numpy(), raw * 0.5 - 10.0)


def test_loading_a_large_nifti_holds_one_copy(tmp_path: Path) -> None:
    """MONAI's own reader holds nibabel's Fortran-ordered array and its C-ordered copy at once."""
    import subprocess
    import sys

    shape = (256, 256, 400)  # 105 MB of float32
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), tmp_path / "big.nii")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "small.nii")
    probe = (
        "import sys\n"
        "from medunet.io import load_image\n"
        "from medunet.io.readers import SlabNibabelReader\n"
        "SlabNibabelReader.slab_bytes = 8 * 2**20  # small beside the image, as for a real large scan\n"
        "def hwm():\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "load_image(sys.argv[2], spatial_dims=3)  # imports and first-use allocations\n"
        "before = hwm()\n"
        "x = load_image(sys.argv[1], spatial_dims=3)\n"
        "print(hwm() - before, x.numel() * 4)\n"
    )
    args = [sys.executable, "-c", probe, str(tmp_path / "big.nii"), str(tmp_path / "small.nii")]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    growth, image_bytes = (int(v) for v in out.stdout.split())
    assert growth < 1.3 * image_bytes, (growth, image_bytes)


class Payload:
    """A class a checkpoint could smuggle in: unpickling it would import and build it."""


def test_a_checkpoint_holding_objects_is_refused_naming_them(tmp_path: Path) -> None:
    import torch

    from medunet.io.checkpoint import load_checkpoint

    path = tmp_path / "model.pt"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(InputError, match=r"refused: it holds Python objects that would run code when loaded "
                       r"\(tests\.io\.test_readers\.Payload\); medunet loads weights only"):  # fmt: skip
        load_checkpoint(path)
