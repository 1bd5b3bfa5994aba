from __future__ import annotations

import pytest

from medunet.transforms.windows import fit_window


def test_window_shrinks_to_small_images_only() -> None:
    assert fit_window((96, 96, 32), (24, 28, 20)) == (24, 28, 20)
    assert fit_window((40, 56, 40), (512, 30, 41)) == (40, 30, 40)
    with pytest.raises(ValueError, match="dimensions"):
        fit_window((64, 64), (10, 10, 10))
