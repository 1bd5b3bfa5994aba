"""Dataset layouts a user brings, read into one list of ``Case``s.

Detected on their own, in this order:

- **nnU-Net v2 raw**: ``dataset.json`` with ``channel_names``, ``labels`` and ``file_ending``;
  ``imagesTr/<case>_0000<ending>`` (one file per channel) and ``labelsTr/<case><ending>``.
- **Medical Segmentation Decathlon**: ``dataset.json`` with ``modality``, ``labels`` and a
  ``training`` list of ``{"image", "label"}`` pairs (a 4D image holds its channels on its last axis).
- **Two folders** ``images/`` and ``labels/`` whose file names match.
- **A CSV manifest** (see ``medunet.data.manifest``), given as the file itself.

Patients: ``patient_regex`` (its first group is the patient id) groups cases; without it each case
is its own patient unless every case name ends in a frame or time-point suffix that several cases
share a stem for (``patient001_frame01``/``patient001_frame12``), which is read as several scans of
one patient and reported (``Dataset.grouping``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medunet.data.manifest import Case, read_manifest
from medunet.errors import InputError
from medunet.io.readers import SUPPORTED, has_suffix

IMAGE_SUFFIXES = tuple(s for s in SUPPORTED if s != ".dcm")

# A case name that ends in one of these names one scan of several of a patient: frame, time point,
# visit, session, phase, echo, ED/ES, pre/post, baseline/follow-up.
_SCAN_SUFFIX = re.compile(
    r"^(?P<stem>.+?)[_\-.](?:frame|tp|timepoint|visit|ses|session|scan|phase|echo|fu)[_\-]?\d+$"
    r"|^(?P<stem2>.+?)[_\-.](?:ed|es|pre|post|baseline|followup|fu)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset read from one of the layouts above.

    ``labels`` maps class names to the values in the label files, background first; ``channels``
    names the image channels (``"CT"`` marks a CT channel, as in nnU-Net's ``dataset.json``).
    """

    root: Path
    layout: str
    cases: tuple[Case, ...]
    channels: tuple[str, ...]
    labels: dict[str, int]
    grouping: str  # how patients were found, in words
    declared_labels: bool = True  # label values come from a dataset.json (else from the data)
    channels_in_file: bool = False  # MSD: one 4D file per case holds every channel
    problems: tuple[str, ...] = ()  # found while reading the layout (stray files); the dataset check lists them

    @property
    def patients(self) -> int:
        return len({c.patient_id for c in self.cases})


def detect_layout(path: Path) -> str:
    """``nnunet``, ``msd``, ``folders`` or ``manifest``; an ``InputError`` says what was expected."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return "manifest"
    if not path.is_dir():
        raise InputError(path, "no such dataset folder or manifest CSV")
    meta = path / "dataset.json"
    if meta.is_file():
        raw = _read_json(meta)
        if "channel_names" in raw and (path / "imagesTr").is_dir():
            return "nnunet"
        if "training" in raw and "modality" in raw:
            return "msd"
        raise InputError(
            meta, "is neither nnU-Net v2 (channel_names, imagesTr/) nor Decathlon (modality, training list)"
        )
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "folders"
    raise InputError(
        path,
        "not a dataset: expected dataset.json with imagesTr/ (nnU-Net v2) or a training list (Decathlon), "
        "folders images/ and labels/, or a manifest CSV",
    )


def read_dataset(path: str | Path, patient_regex: str | None = None) -> Dataset:
    """Read the dataset at ``path`` in whichever layout it has (see the module docstring)."""
    root = Path(path).resolve()
    layout = detect_layout(root)
    reader = {"nnunet": _nnunet, "msd": _msd, "folders": _folders, "manifest": _manifest}[layout]
    dataset = reader(root)
    if not dataset.cases:
        raise InputError(root, "dataset holds no labelled cases")
    if layout == "manifest" and patient_regex is None:
        return dataset  # the manifest's patient_id column
    return group_patients(dataset, patient_regex)


def group_patients(dataset: Dataset, patient_regex: str | None) -> Dataset:
    """Patient ids from ``patient_regex``, or from shared stems of scan suffixes (see the module docstring)."""
    names = [c.case_id for c in dataset.cases]
    if patient_regex is not None:
        try:
            pattern = re.compile(patient_regex)
        except re.error as exc:
            raise ValueError(f"--patient-regex {patient_regex!r} is not a regular expression ({exc})") from None
        if pattern.groups < 1:
            raise ValueError(f"--patient-regex {patient_regex!r} needs a group: the patient id, e.g. '(patient\\d+)_'")
        ids = []
        for name in names:
            m = pattern.search(name)
            if m is None or not m.group(1):
                raise ValueError(f"--patient-regex {patient_regex!r} finds no patient id in case {name!r}")
            ids.append(m.group(1))
        how = f"by --patient-regex {patient_regex!r}"
    else:
        stems = shared_scan_stems(names)
        if stems is None:
            ids, how = names, "each case is its own patient"
        else:
            ids = stems
            how = (
                f"case names look like several scans of one patient ({names[0]!r} -> {stems[0]!r}): "
                "grouped by their common stem; pass --patient-regex '(.*)' to treat each case as its own patient"
            )
    cases = tuple(replace(c, patient_id=p) for c, p in zip(dataset.cases, ids, strict=True))
    return replace(dataset, cases=cases, grouping=f"{len(set(ids))} patients, {how}")


def shared_scan_stems(names: list[str]) -> list[str] | None:
    """Each name's stem when every name ends in a scan suffix (``_frame01``, ``_ES``, ``_tp2``...) and
    most stems are shared by several names; otherwise ``None`` (each case its own patient)."""
    stems = []
    for name in names:
        m = _SCAN_SUFFIX.match(name)
        if m is None:
            return None
        stems.append(m.group("stem") or m.group("stem2"))
    counts = Counter(stems)
    shared = sum(n for n in counts.values() if n > 1)
    if len(counts) == len(names) or shared < 0.5 * len(names):
        return None
    return stems


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot be read as JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(path, "expected a JSON object")
    return raw


def _declared_labels(meta: Path, raw: Any) -> dict[str, int]:
    """``{"background": 0, "RV": 1}`` (nnU-Net) or ``{"0": "background", "1": "RV"}`` (Decathlon)."""
    if not isinstance(raw, dict) or not raw:
        raise InputError(meta, "'labels' must be a non-empty mapping")
    labels: dict[str, int] = {}
    for key, value in raw.items():
        if isinstance(value, list | tuple):
            raise InputError(meta, f"label {key!r} is a region (a list of values); regions are not supported")
        name, number = (str(key), value) if not str(key).lstrip("-").isdigit() else (str(value), key)
        try:
            labels[name] = int(number)
        except (TypeError, ValueError):
            raise InputError(meta, f"label {key!r}: {number!r} is not an integer value") from None
    ordered = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    if next(iter(ordered.values())) != 0:
        raise InputError(meta, "labels need a background of value 0")
    return ordered


def _strip(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.lower().endswith(ending.lower()) else None


def _nnunet(root: Path) -> Dataset:
    meta = root / "dataset.json"
    raw = _read_json(meta)
    ending = str(raw.get("file_ending", ".nii.gz"))
    channel_map = raw.get("channel_names") or {}
    if not isinstance(channel_map, dict) or not channel_map:
        raise InputError(meta, "'channel_names' must map channel numbers to names")
    channels = tuple(str(channel_map[k]) for k in sorted(channel_map, key=lambda k: int(k)))
    labels = _declared_labels(meta, raw.get("labels"))
    images, labels_dir = root / "imagesTr", root / "labelsTr"
    by_case: dict[str, dict[int, Path]] = {}
    problems = []
    for f in sorted(images.iterdir()):
        base = _strip(f.name, ending)
        if base is None:
            continue  # not an image of this dataset's file ending (notes, hidden files)
        m = re.fullmatch(r"(.+)_(\d{4})", base)
        if m is None:
            problems.append(f"{f}: not named <case>_<4-digit channel>{ending}")
        elif int(m.group(2)) >= len(channels):
            problems.append(f"{f}: channel {int(m.group(2))} is not in dataset.json's channel_names ({len(channels)})")
        else:
            by_case.setdefault(m.group(1), {})[int(m.group(2))] = f
    if labels_dir.is_dir():
        for f in sorted(labels_dir.iterdir()):
            name = _strip(f.name, ending)
            if name is not None and name not in by_case:
                problems.append(f"{f}: label without an image (no {name}_0000{ending} in imagesTr)")
    cases = []
    for name, files in sorted(by_case.items()):
        label = labels_dir / f"{name}{ending}"
        # a missing channel is reported by the dataset check with the rest; keep the ones present
        paths = tuple(files.get(i, images / f"{name}_{i:04d}{ending}") for i in range(len(channels)))
        cases.append(Case(name, paths, label, name))
    return Dataset(root, "nnU-Net v2 raw", tuple(cases), channels, labels, "", problems=tuple(problems))


def _msd(root: Path) -> Dataset:
    meta = root / "dataset.json"
    raw = _read_json(meta)
    modality = raw.get("modality") or {}
    channels = tuple(str(modality[k]) for k in sorted(modality, key=lambda k: int(k)))
    labels = _declared_labels(meta, raw.get("labels"))
    cases = []
    for i, entry in enumerate(raw.get("training") or []):
        if not isinstance(entry, dict) or "image" not in entry:
            raise InputError(meta, f"training entry {i} lacks 'image'")
        image = (root / str(entry["image"])).resolve()
        label = (root / str(entry["label"])).resolve() if entry.get("label") else None
        name = _case_name(image)
        cases.append(Case(name, (image,), label, name))
    return Dataset(root, "Medical Segmentation Decathlon", tuple(cases), channels, labels, "", channels_in_file=True)


def _folders(root: Path) -> Dataset:
    images, labels = root / "images", root / "labels"
    label_files = {_case_name(f): f for f in labels.iterdir() if has_suffix(f, IMAGE_SUFFIXES) or f.is_dir()}
    cases = []
    for f in sorted(images.iterdir()):
        if not (has_suffix(f, IMAGE_SUFFIXES) or f.is_dir()):
            continue
        name = _case_name(f)
        cases.append(Case(name, (f,), label_files.get(name, labels / f.name), name))
    names = {c.case_id for c in cases}
    strays = [f for n, f in sorted(label_files.items()) if n not in names]
    problems = tuple(f"{f}: label without an image in {images}" for f in strays)
    return Dataset(
        root, "images/ + labels/ folders", tuple(cases), ("image",), {}, "", declared_labels=False, problems=problems
    )


def _manifest(path: Path) -> Dataset:
    cases = read_manifest(path)
    n = len(cases[0].images)
    channels = tuple(f"channel{i}" for i in range(n)) if n > 1 else ("image",)
    grouping = f"{len({c.patient_id for c in cases})} patients, from the manifest's patient_id column"
    return Dataset(path, "manifest CSV", tuple(cases), channels, {}, grouping, declared_labels=False)


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
