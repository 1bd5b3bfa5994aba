"""The registry's parts that need no MLflow store."""

from __future__ import annotations

from medunet.tracking.registry import logged_model_id


def test_a_logged_models_id_is_taken_from_its_uri() -> None:
    assert logged_model_id("models:/m-0123abcd") == "m-0123abcd"
    assert logged_model_id("models:/blobs/1") is None
    assert logged_model_id("models:/blobs@champion") is None
    assert logged_model_id("runs:/0123/model") is None
