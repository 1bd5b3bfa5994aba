"""The model file: what a checkpoint holds, its format version, fold ensembles, the shipped bundle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from medunet.config import InferConfig, NetworkConfig, PreprocessConfig
from medunet.errors import InputError
from medunet.io.bundle_layout import WEIGHTS, read_bundle_model
from medunet.io.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_version,
    load_checkpoint,
    save_checkpoint,
)
from medunet.io.model_file import ModelFile, ensemble, read_model_file, read_run_model
from medunet.io.run_layout import BEST, fold_dir
from medunet.networks import create_network

SHIPPED = Path(__file__).resolve().parents[2] / "bundles" / "hippocampus_mri_3d"


def tiny_model(seed: int = 0) -> ModelFile:
    network = NetworkConfig(spatial_dims=2, out_channels=3, features=(4, 8))
    preprocess = PreprocessConfig(spatial_dims=2, label_names=("background", "one", "two"), patch_size=(16, 16))
    torch.manual_seed(seed)
    state = create_network(network).state_dict()
    return ModelFile(network, preprocess, InferConfig(), state, fingerprint='{"format": "x"}', source="tiny")


def test_a_model_file_round_trips_with_its_format_version(tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model().to_payload(), tmp_path / BEST)
    assert load_checkpoint(path)["format"] == CHECKPOINT_FORMAT
    back = read_model_file(path)
    original = tiny_model()
    assert (back.network, back.preprocess, back.infer, back.fingerprint) == (
        original.network,
        original.preprocess,
        original.infer,
        original.fingerprint,
    )
    assert back.source == str(path)
    net = back.load_into(create_network(back.network))
    assert not net.training
    for key, value in original.state_dict.items():
        torch.testing.assert_close(net.state_dict()[key], value.float())


def test_a_newer_format_is_refused_in_one_line_naming_the_file(tmp_path: Path) -> None:
    path = save_checkpoint({**tiny_model().to_payload(), "format": "medunet-checkpoint/2"}, tmp_path / "new.pt")
    with pytest.raises(InputError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: written in checkpoint format medunet-checkpoint/2, newer than")
    assert "upgrade medunet" in message and "\n" not in message
    with pytest.raises(InputError, match="medunet-checkpoint/2"):  # through the model reader too
        read_model_file(path)


def test_a_foreign_format_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint({**tiny_model().to_payload(), "format": "other-tool/1"}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"not a medunet checkpoint \(its format is 'other-tool/1'"):
        load_checkpoint(path)


def test_a_file_without_a_format_version_still_loads(tmp_path: Path) -> None:
    payload = tiny_model().to_payload()
    del payload["format"]
    path = save_checkpoint(payload, tmp_path / "old.pt")
    assert read_model_file(path).network == tiny_model().network


def test_a_payload_without_its_network_names_what_it_lacks(tmp_path: Path) -> None:
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "state_dict": {}}, tmp_path / "bare.pt")
    with pytest.raises(InputError, match=r"bare.pt: checkpoint lacks 'network'"):
        read_model_file(path)


def test_weights_that_do_not_fit_the_network_are_one_line() -> None:
    model = dataclasses.replace(tiny_model(), state_dict={"nope": torch.zeros(1)})
    with pytest.raises(InputError, match="tiny: weights do not fit the network"):
        model.load_into(create_network(model.network))


def test_the_folds_of_a_cross_validation_run_make_one_ensemble(tmp_path: Path) -> None:
    for k in range(2):
        fold_dir(tmp_path, k).mkdir()
        save_checkpoint(tiny_model(seed=k).to_payload(), fold_dir(tmp_path, k) / BEST)
    model = read_run_model(tmp_path)
    assert model.network.ensemble == 2 and model.source == str(tmp_path)
    assert set(model.state_dict) == {f"members.{i}.{k}" for i in range(2) for k in tiny_model().state_dict}
    model.load_into(create_network(model.network))

    other = dataclasses.replace(tiny_model(), preprocess=dataclasses.replace(tiny_model().preprocess, nonzero=True))
    with pytest.raises(InputError, match="its preprocess differs from tiny's; folds must share one recipe"):
        ensemble([tiny_model(), dataclasses.replace(other, source="fold_1")], "run")


def test_a_folder_without_checkpoints_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"holds neither best\.pt nor the fold_k/best\.pt"):
        read_run_model(tmp_path)


def test_the_shipped_bundle_loads() -> None:
    assert "format" not in load_checkpoint(SHIPPED / WEIGHTS)  # a bare state dict, as MONAI bundles keep it
    model = read_bundle_model(SHIPPED)
    net = model.load_into(create_network(model.network))
    assert model.preprocess.label_names[0] == "background" and model.fingerprint is not None
    with torch.no_grad():
        y = net(torch.zeros(1, model.network.in_channels, *model.preprocess.patch_size))
    assert y.shape[1] == model.network.out_channels


def test_training_writes_the_current_format(tiny_model: Path) -> None:
    assert checkpoint_version(load_checkpoint(tiny_model), tiny_model) == CHECKPOINT_VERSION
    model = read_run_model(tiny_model.parent)
    assert model.source == str(tiny_model) and model.network.ensemble == 1
