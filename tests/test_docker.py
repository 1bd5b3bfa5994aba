"""No Docker engine runs here: check what can be checked of the images' recipes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_files_and_pins_torch(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{dockerfile.name} copies {src}, which does not exist"
    setup = (REPO / "scripts" / "setup.sh").read_text()
    pin = re.search(r"TORCH_SPEC:-(torch==[\d.]+)", setup)
    assert pin and f"pip install {pin.group(1)}" in text, "the image must install the same torch as setup.sh"
    assert "RUN pip install ." in text  # the package with its own pinned requirements
    assert 'ENTRYPOINT ["medunet"]' in text
    assert "MEDUNET_BUNDLES=/opt/medunet/bundles" in text and "COPY bundles ./bundles" in text
