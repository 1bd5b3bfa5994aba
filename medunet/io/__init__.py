"""Reading and writing images and checkpoints; geometry is always preserved."""

from medunet.io.checkpoint import load_checkpoint, save_checkpoint
from medunet.io.readers import list_dicom_series, load_image
from medunet.io.writers import atomic_path, write_array

__all__ = [
    "atomic_path",
    "list_dicom_series",
    "load_checkpoint",
    "load_image",
    "save_checkpoint",
    "write_array",
]
