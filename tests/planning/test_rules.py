"""Each planning rule on its own, with the cases that decide it."""

from __future__ import annotations

from dataclasses import replace

from medunet.planning import rules


def test_target_spacing_is_the_median_and_keeps_thick_slices() -> None:
    iso = [[1.0, 1.0, 1.0], [1.2, 1.0, 1.0], [0.8, 1.0, 1.0]]
    target, why = rules.target_spacing(iso)
    assert target == (1.0, 1.0, 1.0) and "median" in why
    thick = [[0.7, 0.7, 5.0], [0.8, 0.8, 10.0], [0.75, 0.75, 6.0]]
    target, why = rules.target_spacing(thick)
    assert target == (0.75, 0.75, 0.0)  # the thick axis keeps each case's slices
    assert "invent or throw away slices" in why


def test_target_spacing_resamples_nothing_when_every_case_is_on_the_grid() -> None:
    target, why = rules.target_spacing([[1.5625, 1.5625, 10.0]] * 5)
    assert target is None and "nothing is resampled" in why


def test_2d_for_few_thick_slices_3d_otherwise() -> None:
    assert rules.choose_2d(3, [1.56, 1.56, 10.0], [216, 256, 9])[0] is True
    assert rules.choose_2d(3, [0.8, 0.8, 5.0], [512, 512, 120])[0] is False  # many slices: anisotropic 3D
    assert rules.choose_2d(3, [1.0, 1.0, 1.0], [35, 50, 36])[0] is False
    assert rules.choose_2d(2, [1.0, 1.0], [512, 512])[0] is True
    # a thick axis that is not the last one (the 2D view slices the last axis): 3D
    assert rules.choose_2d(3, [10.0, 1.0, 1.0], [9, 200, 200])[0] is False


def test_strides_pool_an_axis_only_near_the_finest_spacing_and_above_the_minimum_size() -> None:
    strides, kernels = rules.strides_and_kernels([1.0, 1.0, 1.0], [40, 56, 40])
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2)]  # 40 -> 20 -> 10: a third pooling would leave 5
    assert kernels == [(3, 3, 3)] * 3
    strides, kernels = rules.strides_and_kernels([0.8, 0.8, 3.0], [160, 160, 48])
    assert strides[1] == (2, 2, 1)  # 3 mm is over 2x 0.8 mm: in-plane first
    assert kernels[0] == (3, 3, 1) and kernels[1] == (3, 3, 3)  # 1.6 vs 3.0: within 2x, kernel 3 again
    assert strides[2] == (2, 2, 2)
    assert all(s[2] == 1 for s in strides[1:2])
    # every axis keeps at least 8 voxels after pooling
    strides, _ = rules.strides_and_kernels([1.0, 1.0], [144, 128])
    size = [144, 128]
    for level in strides[1:]:
        size = [s // f for s, f in zip(size, level, strict=True)]
    assert min(size) >= rules.MIN_POOLED_SIZE and len(strides) <= rules.MAX_LEVELS


def test_shrink_patch_shortens_the_longest_side_in_mm_first() -> None:
    patch, steps = rules.shrink_patch([216, 256], [1.0, 1.0], lambda p: True, (16, 16))
    assert patch == (224, 256) and steps == 0
    patch, steps = rules.shrink_patch([216, 256], [1.0, 1.0], lambda p: p[0] * p[1] <= 150 * 150, (16, 16))
    assert patch[0] * patch[1] <= 150 * 150 and abs(patch[0] - patch[1]) <= 16 and steps > 0
    # a coarse axis counts by its length in mm
    patch, _ = rules.shrink_patch([200, 200, 30], [1.0, 1.0, 10.0], lambda p: p[2] <= 24, (8, 8, 2))
    assert patch == (200, 200, 24)


def test_mirroring_is_kept_off_an_axis_where_one_class_lies_on_one_side() -> None:
    # class 1 always 20 mm left of class 2 along axis 0; along axis 1 their order varies
    cases = [{"1": [10.0, 10.0 + d, 5.0], "2": [30.0, 10.0 - d, 5.0]} for d in (-3, 2, -1, 4, 1, -2, 3, -4)]
    axes, why = rules.mirror_axes(cases, {"background": 0, "head": 1, "tail": 2}, [0, 1, 2])
    assert axes == (1, 2)
    assert "head lies below tail along axis 0" in why
    axes, why = rules.mirror_axes([{"1": [1.0, 2.0, 3.0]}] * 5, {"background": 0, "organ": 1}, [0, 1, 2])
    assert axes == (0, 1, 2) and "every axis is mirrored" in why
    # six cases are too few to call a side: everything is mirrored
    assert rules.mirror_axes(cases[:6], {"background": 0, "head": 1, "tail": 2}, [0, 1, 2])[0] == (0, 1, 2)


def test_normalization_ct_against_mr() -> None:
    assert rules.normalization_for(["CT"], 1.0)[:2] == ("ct", False)
    assert rules.normalization_for(["T2"], 0.9)[:2] == ("zscore", False)
    norm, nonzero, why = rules.normalization_for(["FLAIR", "T1c"], 0.2)
    assert (norm, nonzero) == ("zscore", True) and "non-zero region" in why


def test_epochs_fill_the_budget_after_fixed_costs() -> None:
    epochs, why = rules.epochs_for(1800, 60, 120)
    assert epochs == 28 and "28 epochs" in why
    assert rules.epochs_for(60, 600, 0)[0] == 1


def test_spatial_augmentation_fits_the_geometry_and_the_dataset_size() -> None:
    import math

    # thick slices, by a 2D network or a 3D one with a thick axis: in-plane only, elastic
    for image_dims, dims, thick in ((3, 2, []), (3, 3, [2])):
        aug, why = rules.spatial_augmentation(image_dims, dims, thick, (0, 1), 500)
        assert (aug.rotate_range, aug.elastic_prob) == (0.5, 0.2) and "in-plane" in why
        assert aug.rotate_in_plane == bool(thick)
    # native 2D sections mirrored along both axes: any angle; few of them: elastic half the time
    aug, why = rules.spatial_augmentation(2, 2, [], (0, 1), 25)
    assert aug.rotate_range == math.pi and aug.elastic_prob == 0.5
    assert "any angle" in why and "25 training images are few" in why
    # a side kept along one axis (a chest X-ray's heart): 15 degrees; many images: no elastic
    aug, why = rules.spatial_augmentation(2, 2, [], (1,), 400)
    assert aug.rotate_range == 0.26 and aug.elastic_prob == 0.0 and "elastic" not in why
    # near-isotropic volumes: 15 degrees about every axis, no elastic deformation (however few)
    aug, why = rules.spatial_augmentation(3, 3, [], (0, 1, 2), 20)
    assert (aug.rotate_range, aug.rotate_in_plane, aug.elastic_prob) == (0.26, False, 0.0)


def test_loader_workers_feed_the_device_without_taking_the_cores_a_step_needs() -> None:
    assert rules.loader_workers("cpu", 1)[0] == 0  # nothing to overlap with
    assert rules.loader_workers("cpu", 2)[0] == rules.loader_workers("cpu", 64)[0] == 1
    workers, why = rules.loader_workers("cuda", 16)
    assert workers == 8 and "GPU" in why
    assert rules.loader_workers("cuda", 4)[0] == 3
    assert rules.loader_workers("cuda", 1)[0] == 0


def test_cases_are_kept_in_memory_while_they_fit_half_of_it() -> None:
    gib = 1024**3
    rate, why = rules.cache_rate(3 * gib, 20 * gib)
    assert rate == 1.0 and "every case" in why
    rate, why = rules.cache_rate(40 * gib, 20 * gib)  # a CT dataset on a small machine: a quarter fits
    assert rate == 0.25 and "25% of them" in why and "read again" in why
    assert rules.cache_rate(30 * gib, 20 * gib)[0] == 0.33  # rounded down, never over the share


def test_postprocessing_is_decided_for_the_foreground_then_each_class() -> None:
    """As measured on a cardiac run's 32 validation volumes: the foreground step raised the mean
    (0.8770 -> 0.8795), then MYO's own step raised MYO's Dice, RV's was flat and LV's cost 0.015."""
    from medunet.planning.postprocess import decide

    names = ("RV", "MYO", "LV")
    raw, fg = (0.8608, 0.8597, 0.9104), (0.8627, 0.8637, 0.9121)
    each, fg_each = (0.8626, 0.8649, 0.8974), (0.8626, 0.8649, 0.8974)
    choice = decide(names, raw, fg, each, fg_each, 32)
    assert (choice.foreground, choice.classes, choice.largest_component) == (True, (2,), True)
    assert round(choice.dice_with, 4) == round((0.8627 + 0.8649 + 0.9121) / 3, 4)
    assert "MYO kept (0.8637 -> 0.8649)" in choice.describe() and "LV not kept" in choice.describe()
    # without the foreground step each class is judged against its unfiltered Dice
    choice = decide(names, raw, raw, each, fg_each, 32)
    assert (choice.foreground, choice.classes) == (False, (1, 2))
    # nothing that helps, or nothing to judge on: no filter
    assert not decide(names, raw, raw, raw, raw, 32).largest_component
    assert not decide(names, raw, fg, each, fg_each, 0).largest_component


def test_mirrored_averaging_is_kept_where_it_raises_the_mean_dice() -> None:
    """Decided before the filter: kept where the mean Dice over the classes rises by 0.001, whatever
    one class does; the line names both figures, and leaves out a filter the config had set."""
    from medunet.planning.postprocess import decide, keeps_mirroring

    plain = (0.8454, 0.8615, 0.9099)
    assert keeps_mirroring(plain, (0.8502, 0.8650, 0.9090))  # LV lost 0.0009, the mean gained 0.0025
    assert not keeps_mirroring(plain, (0.8460, 0.8617, 0.9104))  # +0.0004: not worth a second pass
    assert not keeps_mirroring(plain, (0.8400, 0.8615, 0.9099))
    names = ("RV", "MYO", "LV")
    choice = replace(decide(names, plain, plain, plain, plain, 32), tta=True, tta_dice=(0.8723, 0.8747))
    said = choice.describe()
    assert said.startswith("mirrored test-time averaging kept (0.8723 -> 0.8747, mean Dice on 32 volumes); ")
    assert "largest-component post-processing not kept" in said
    alone = replace(choice, tta=False, tta_dice=None, filter_decided=False)
    assert alone.describe() == "mirrored test-time averaging not kept (trained without mirroring)"
