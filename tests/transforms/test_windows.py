from __future__ import annotations

import pytest

from medunet.transforms.windows import fit_window


def test_window_shrinks_to_small_images_but_not_below_the_patch() -> None:
    assert fit_window((96, 96, 32), (24, 28, 20), (16, 16, 16)) == (24, 28, 20)
    assert fit_window((40, 56, 40), (36, 52, 38), (40, 56, 40)) == (40, 56, 40)  # padded as in training
    assert fit_window((128, 128, 64), (512, 30, 41), (48, 48, 48)) == (128, 48, 48)
    with pytest.raises(ValueError, match="dimensions"):
        fit_window((64, 64), (10, 10, 10), (8, 8))
