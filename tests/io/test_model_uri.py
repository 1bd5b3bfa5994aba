"""Registry URIs: the two forms medunet documents, and a clear error for anything else."""

from __future__ import annotations

import pytest

from medunet.errors import InputError
from medunet.io.model_uri import is_registry_uri, parse_registry_uri


def test_a_version_and_an_alias_are_read() -> None:
    assert parse_registry_uri("models:/blobs/2") == ("blobs", "2", None)
    assert parse_registry_uri("models:/blobs@champion") == ("blobs", "", "champion")
    assert is_registry_uri("models:/blobs/2") and not is_registry_uri("runs/best.pt")


@pytest.mark.parametrize("uri", ["models:/blobs", "models:/blobs@", "models:/blobs/latest", "models:/@champion"])
def test_other_forms_are_refused_in_one_line(uri: str) -> None:
    with pytest.raises(InputError, match=f"^{uri}: not a registered model's URI; expected models:/NAME/VERSION"):
        parse_registry_uri(uri)
