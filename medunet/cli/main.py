"""The ``medunet`` command: each command parses, builds a request, calls one library function.

Heavy imports (torch, MONAI) happen inside the commands, so ``medunet --help`` is instant.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train 2D/3D U-Nets on medical images and segment new scans.",
)

T = TypeVar("T")


class BackendChoice(StrEnum):  # medunet.inference.backends.Backend, kept here so --help imports no torch
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class ExportChoice(StrEnum):  # medunet.inference.export.ExportFormat
    ONNX = "onnx"
    OPENVINO = "openvino"
    TORCHSCRIPT = "torchscript"


class Postprocess(StrEnum):
    MODEL = "model"
    NONE = "none"
    LARGEST_COMPONENT = "largest-component"


Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Debug log, with the libraries' own warnings and messages.")
]


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    """Log medunet's messages to stderr. By default the libraries' warnings are silenced: each problem
    is medunet's one line; ``verbose`` shows them (and medunet's debug log) as well."""
    import warnings

    from rich.logging import RichHandler

    from medunet import runtime

    runtime.quiet_native_warnings(not verbose)

    handler: logging.Handler
    if sys.stderr.isatty():
        handler = RichHandler(show_path=False, show_time=False, console=_stderr())
    else:  # a log file or a pipe: one line per message, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter())
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler], force=True)
    if verbose:
        logging.getLogger("medunet").setLevel(logging.DEBUG)
        logging.captureWarnings(True)
        warnings.simplefilter("default")
        return
    # MONAI warns on every DICOM read about optional GPU codecs; MLflow and alembic narrate database set-up;
    # highdicom narrates each attribute module it copies (with instance UIDs)
    # nibabel narrates the header fields it mends (a zero voxel size read as 1); the ONNX exporter (torch.onnx,
    # onnxscript, onnx_ir) narrates each graph rewrite
    for noisy in (
        "monai",
        "matplotlib",
        "PIL",
        "mlflow",
        "alembic",
        "highdicom",
        "nibabel",
        "torch",
        "onnxscript",
        "onnx_ir",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class _PlainFormatter(logging.Formatter):
    """``message`` for information, ``medunet: warning: message`` for a warning or an error."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"medunet: {record.levelname.lower()}: {text}"
        return text


def _stderr():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def _run(fn: Callable[[], T]) -> T:
    """Run a command body; a user error becomes one line on stderr and exit code 1."""
    from medunet.config import ConfigError
    from medunet.errors import MedunetError, user_error_in

    try:
        return fn()
    except (MedunetError, ConfigError, ValueError) as exc:
        print(f"medunet: error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    except OSError as exc:  # e.g. an output folder that cannot be written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"medunet: error: {where}{exc.strerror or exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    except MemoryError as exc:
        print(
            f"medunet: error: out of memory ({exc or 'allocation failed'}); lower --max-memory or free memory",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (see medunet.runtime)
        from medunet.runtime import Terminated

        print("medunet: interrupted", file=sys.stderr)
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    except RuntimeError as exc:
        cause = user_error_in(exc)
        if cause is None:
            raise
        print(f"medunet: error: {cause}", file=sys.stderr)
        raise typer.Exit(1) from None


@app.command()
def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder for checkpoints and logs.")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Experiment YAML (see configs/, or a `medunet plan`).")
    ] = None,
    dataset: Annotated[
        Path | None,
        typer.Option(help="Plan this dataset (nnU-Net raw, Decathlon, images/+labels/, manifest CSV) and train it."),
    ] = None,
    time_budget: Annotated[
        str | None, typer.Option(help="With --dataset: minutes of training to plan for, e.g. 30m, 2h (default 30m).")
    ] = None,
    patient_regex: Annotated[
        str | None, typer.Option(help="With --dataset: a regex whose first group is the patient id of a case.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    folds: Annotated[
        int | None, typer.Option(help="Cross-validate: train all K patient-wise folds into OUTPUT/fold_k.")
    ] = None,
    fold: Annotated[int | None, typer.Option(help="Train only fold K of data.folds (or of --folds).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUTPUT/last.pt (with --folds: skip complete folds).")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: train.batch_size=4")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking server (default: $MLFLOW_TRACKING_URI or ./mlflow.db).")
    ] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="Do not log to MLflow.")] = False,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: the config's name).")] = None,
    register: Annotated[str | None, typer.Option(help="Register the best model under this name.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Verbose = False,
) -> None:
    """Train a network from a config; writes best.pt, last.pt, config.yaml and history.json, and logs
    the run (params, metrics, pictures, bundle, model) to MLflow. Under `torchrun` it trains with
    DistributedDataParallel; only rank 0 writes, logs and tracks."""
    from medunet.training.distributed import current_world

    world = current_world()
    _setup_logging(quiet or not world.is_main, verbose)

    def body() -> None:
        from medunet.config import load_config
        from medunet.training import TrainRequest
        from medunet.training.job import Tracking, TrainJob, config_overrides, run_job

        config_path = _training_config(config, dataset, output, time_budget, patient_regex, device, resume, quiet)
        cfg = load_config(config_path, config_overrides(set_ or [], epochs=epochs, fold=fold, folds=folds))
        tracking = Tracking(not no_tracking, tracking_uri, experiment, register)
        cross_validation = folds if fold is None else None
        job = TrainJob(TrainRequest(cfg, output, resume, device, not quiet), cross_validation, tracking)
        outcome = run_job(job, notify=print)
        if world.is_main:
            print(outcome.describe())

    _run(body)


def parse_minutes(text: str) -> float:
    """``"30m"``, ``"2h"``, ``"90s"``, ``"1h30m"`` or ``"45"`` (minutes) -> minutes."""
    import re

    parts = re.findall(r"([0-9]*\.?[0-9]+)\s*([hms]?)", text.strip().lower())
    if not parts or re.sub(r"[0-9.\shms]", "", text.lower()):
        raise ValueError(f"cannot read {text!r} as a time budget; write e.g. 30m, 2h or 1h30m")
    scale = {"h": 60.0, "m": 1.0, "s": 1 / 60, "": 1.0}
    minutes = sum(float(v) * scale[u] for v, u in parts)
    if minutes <= 0:
        raise ValueError(f"time budget {text!r} must be positive")
    return minutes


def _training_config(
    config: Path | None,
    dataset: Path | None,
    output: Path,
    budget: str | None,
    patient_regex: str | None,
    device: str,
    resume: bool,
    quiet: bool,
) -> Path:
    """The config to train: ``--config``, or the plan of ``--dataset``."""
    one_of = "give one of --config (a config or plan YAML) and --dataset (a dataset to plan)"
    if dataset is None:
        if config is None:
            raise ValueError(one_of)
        if budget or patient_regex:
            raise ValueError("--time-budget and --patient-regex plan a --dataset; edit the config instead")
        return config
    if config is not None:
        raise ValueError(one_of)
    return _plan_for_training(dataset, output, budget, patient_regex, device, resume, quiet)


def _plan_for_training(
    dataset: Path, output: Path, budget: str | None, patient_regex: str | None, device: str, resume: bool, quiet: bool
) -> Path:
    """``OUTPUT/plan.yaml`` for ``dataset``: planned now, or the existing one when resuming."""
    from medunet.planning import PlanRequest, plan_dataset
    from medunet.planning.plan import DEFAULT_BUDGET_MINUTES
    from medunet.training.distributed import current_world
    from medunet.training.loop import resolve_device

    path = output / "plan.yaml"
    if resume and path.is_file():
        return path
    if current_world().distributed:
        raise ValueError(
            "under torchrun, plan first (medunet plan DATASET -o plan.yaml), then train --config plan.yaml"
        )
    minutes = parse_minutes(budget) if budget else DEFAULT_BUDGET_MINUTES
    kind = resolve_device(device).type
    plan = plan_dataset(PlanRequest(dataset, path, patient_regex, minutes, kind, progress=not quiet))
    if not quiet:
        print(_plan_summary(plan))
    return path


def _plan_summary(plan) -> str:  # type: ignore[no-untyped-def]
    from medunet.config import to_dict

    raw = to_dict(plan.config)
    lines = [*plan.notes]
    for key, why in plan.reasons.items():
        section, _, name = key.partition(".")
        lines.append(f"{key} = {raw[section][name]}: {why}")
    if plan.config_path is not None:
        lines.append(f"plan: {plan.config_path}")
    return "\n".join(lines)


@app.command()
def plan(
    dataset: Annotated[
        Path, typer.Argument(help="Dataset: nnU-Net v2 raw, Decathlon, images/ + labels/ folders, or a manifest CSV.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The plan's YAML (manifest and fingerprint beside it).")
    ],
    time_budget: Annotated[str, typer.Option(help="Training time to plan for, e.g. 30m, 2h.")] = "30m",
    patient_regex: Annotated[
        str | None, typer.Option(help="A regex whose first group is the patient id of a case name.")
    ] = None,
    device: Annotated[str, typer.Option(help="Plan for cpu or cuda training (auto: cuda when present).")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Processes that read the cases (default: every core).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Verbose = False,
) -> None:
    """Check and fingerprint a dataset and write a training plan: a config whose every value says why it was chosen."""
    _setup_logging(quiet, verbose)

    def body() -> None:
        from medunet.planning import PlanRequest, plan_dataset
        from medunet.training.loop import resolve_device

        kind = resolve_device(device).type
        result = plan_dataset(
            PlanRequest(dataset, output, patient_regex, parse_minutes(time_budget), kind, workers, not quiet)
        )
        print(_plan_summary(result))

    _run(body)


@app.command()
def infer(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Scans: files, DICOM folders, folders of scans; channels of one scan joined by commas."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Mask file, or folder for several scans.")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Checkpoint (.pt), run folder or bundle (default: shipped model)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    series: Annotated[
        str | None,
        typer.Option(help="For a folder holding several DICOM series: its number in the listing, or its UID."),
    ] = None,
    accept_damaged_series: Annotated[
        bool,
        typer.Option(
            "--accept-damaged-series",
            help="Read a DICOM series with missing, unreadable or unevenly spaced slices instead of refusing it.",
        ),
    ] = False,
    probabilities: Annotated[bool, typer.Option(help="Also write <name>_probs.nii.gz.")] = False,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="Average over mirrored copies (axes the model was trained to flip), or not; default: as the "
            "model says (planned models decide it on their validation cases).",
        ),
    ] = None,
    postprocess: Annotated[
        Postprocess,
        typer.Option(
            help="largest-component: keep each label's largest connected component; model: as the model was "
            "validated (planned models choose it on their validation cases)."
        ),
    ] = Postprocess.MODEL,
    max_memory: Annotated[
        str | None, typer.Option(help="Peak memory to stay under, e.g. 4GB (default: a quarter of RAM, at most 2 GiB).")
    ] = None,
    roi: Annotated[str | None, typer.Option(help="Window size, e.g. 96,96,96 (default: largest that fits).")] = None,
    overlap: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.95,
            help="Least overlap of neighbouring windows, a fraction of a window; the plan may grow its windows "
            "to keep it (default: a third of the network's receptive field, a sixth for instance- or "
            "group-norm networks or where small windows would cover the image twice; 0.5 with --roi).",
        ),
    ] = None,
    stats: Annotated[Path | None, typer.Option(help="CSV of voxel count and volume (ml) per scan and label.")] = None,
    qc: Annotated[
        Path | None, typer.Option(help="QC picture: mask over scan in 3 planes (.png for one scan, else a folder).")
    ] = None,
    dicom_seg: Annotated[
        bool, typer.Option(help="Also write <name>.seg.dcm, a DICOM SEG referencing the input series.")
    ] = False,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", "--resume", help="Skip scans whose mask already exists.")
    ] = False,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow registry for models:/ URIs.")] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="K/N: segment only every N-th scan from the K-th (K from 0), for scheduler arrays; under torchrun "
            "each process takes its RANK/WORLD_SIZE share. --stats then merges the shards' rows."
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(help="Refuse a scan unlike the model's training data (else a warning and a flag in --stats)."),
    ] = False,
    backend: Annotated[
        BackendChoice,
        typer.Option(
            help="Where the network runs: torch, onnxruntime or openvino (optional extras); auto: OpenVINO on the "
            "CPU when it is installed and the model has its graph (an exported file, a bundle's models/model.onnx), "
            "else torch."
        ),
    ] = BackendChoice.AUTO,
    full_precision: Annotated[
        bool,
        typer.Option(
            help="Keep OpenVINO in float32 (by default it uses bfloat16 on CPUs that have it: about 2x faster, "
            "masks differing in a few voxels in 100,000)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Verbose = False,
) -> None:
    """Segment scans with a trained model; masks carry each input's geometry."""
    _setup_logging(quiet, verbose)

    def body() -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from medunet import runtime
        from medunet.inference import expand_inputs, load_model, plan_jobs, run_jobs
        from medunet.inference.batch import STATS_COLUMNS, Extras, check_outputs
        from medunet.inference.guard import TrainingRange, check_scan
        from medunet.inference.model import default_model_path
        from medunet.inference.predictor import InferOptions
        from medunet.inference.shards import launcher_shard, merge_parts, parse_shard, part_path
        from medunet.inference.tiling import parse_memory
        from medunet.training.loop import resolve_device

        part = parse_shard(shard) if shard else launcher_shard()
        launched = part is not None and shard is None  # by torchrun: one device or share of the cores each

        options = InferOptions(
            probabilities=probabilities,
            tta=tta,
            largest_component=None
            if postprocess is Postprocess.MODEL
            else postprocess is Postprocess.LARGEST_COMPONENT,
            overlap=overlap,
            roi=_parse_sizes(roi, "--roi") if roi else None,
            max_memory=parse_memory(max_memory) if max_memory else None,
        )
        if stats is not None and stats.is_dir():
            raise ValueError(f"--stats {stats}: is a folder; give the CSV file to write")
        ref = model or default_model_path()
        where = resolve_device(device)
        if launched:
            where = _launched_device(where)
        seg_model = load_model(
            ref, device=where, tracking_uri=tracking_uri, backend=str(backend), full_precision=full_precision
        )
        if model is None:
            print(f"using the default model {ref}", file=sys.stderr)
        runtime.settle_heap()
        logging.getLogger("medunet").debug("running the network on %s", seg_model.window_engine().describe())
        if tta and not seg_model.infer.tta_axes:
            raise ValueError(f"--tta: {ref} was trained without mirroring, so mirrored copies would only hurt it")
        guard = None
        if seg_model.fingerprint is not None:
            training = TrainingRange.from_fingerprint(seg_model.fingerprint)
            guard = lambda image: check_scan(image, training)  # noqa: E731
        elif strict:
            raise ValueError(f"--strict: {ref} carries no fingerprint of its training data to compare scans with")
        jobs = plan_jobs(expand_inputs(inputs), output, seg_model.preprocess.spatial_dims)
        extras = Extras(stats=stats, qc=qc, dicom_seg=dicom_seg)
        check_outputs(jobs, probabilities, extras, [Path(arg) for arg in inputs if Path(arg).is_dir()])
        if part is not None:
            jobs = part.select(jobs)
            if stats is not None:  # this shard's rows; merged with the others' below
                extras = Extras(stats=part_path(stats, part), qc=qc, dicom_seg=dicom_seg)
            if not quiet:
                print(f"shard {part}: {len(jobs)} scan(s)", file=sys.stderr)
        columns = [TextColumn("segmenting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=_stderr(), transient=True, disable=quiet or len(jobs) < 2) as bar:
            task = bar.add_task("segmenting", total=len(jobs))
            result = run_jobs(
                jobs,
                seg_model,
                series=series,
                skip_existing=skip_existing,
                on_done=lambda _job: bar.advance(task),
                options=options,
                extras=extras,
                accept_damaged=accept_damaged_series,
                guard=guard,
                strict=strict,
                on_error=lambda message: bar.console.print(
                    f"medunet: error: {message}", soft_wrap=True, markup=False, highlight=False
                ),
            )
        for path in result.written:
            print(f"wrote {path}")
        if result.skipped:
            print(f"skipped {len(result.skipped)} scan(s) whose mask exists")
        if stats is not None and result.stats_error is None and part is not None:
            merged = merge_parts(stats, part.count, STATS_COLUMNS)
            print(f"wrote {stats} ({merged.shards_done} of {merged.shards} shards so far)")
        elif stats is not None and result.stats_error is None:
            print(f"wrote {stats}")
        if result.failed or result.stats_error:
            if len(jobs) > 1 and result.failed:
                print(f"medunet: error: {len(result.failed)} of {len(jobs)} scans failed", file=sys.stderr)
            raise typer.Exit(1)

    _run(body)


def _launched_device(device):  # type: ignore[no-untyped-def]
    """Under torchrun: each process its own GPU (``LOCAL_RANK``), or an equal share of the CPU cores
    (where torchrun's default would give each process one thread)."""
    import torch

    local_rank, local_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cpu":
        from medunet.runtime import cores

        torch.set_num_threads(max(1, cores() // max(1, local_size)))
    return device


def _parse_sizes(text: str, option: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} {text!r}: write sizes like 96,96,96") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{option} {text!r}: sizes must be positive")
    return sizes


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of predicted masks.")],
    label: Annotated[Path, typer.Option("--label", help="Folder of reference labels (same file names).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="CSV per case and class.")],
    labels: Annotated[str | None, typer.Option(help="Label values to score, e.g. 1,2 (default: all present).")] = None,
) -> None:
    """Dice and HD95 per case and class; writes OUTPUT and OUTPUT_summary.csv."""
    _setup_logging(True)

    def body() -> None:
        from medunet.evaluation import evaluate_folders

        values = [int(v) for v in labels.split(",")] if labels else None
        summary = evaluate_folders(pred, label, output, values)
        for v, s in summary.items():
            print(
                f"label {v}: Dice {s['dice_mean']:.4f} ± {s['dice_std']:.4f} (min {s['dice_min']:.4f}), "
                f"HD95 {s['hd95_mean']:.2f} mm, pixel error {s['pixel_error']:.4f}, n={int(s['n'])}"
            )
        print(f"wrote {output}")

    _run(body)


bundle_app = typer.Typer(no_args_is_help=True, help="Build, verify and list MONAI bundles.")
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("build")
def bundle_build(
    run: Annotated[Path, typer.Option("--run", help="Training run folder (best.pt, config.yaml, history.json).")],
    name: Annotated[str, typer.Option("--name", help="Bundle name: the folder under --root.")],
    root: Annotated[Path, typer.Option(help="Where bundles live.")] = Path("bundles"),
    card: Annotated[Path | None, typer.Option(help="YAML with task, description, data source, licence...")] = None,
    version: Annotated[str, typer.Option(help="Bundle version.")] = "0.1.0",
    command: Annotated[str, typer.Option(help="The command that trained the run, for the model card.")] = "",
    full_precision: Annotated[bool, typer.Option(help="Keep float32 weights (default: float16).")] = False,
) -> None:
    """Make a MONAI bundle from a training run."""
    _setup_logging(True)

    def body() -> None:
        from medunet.bundle import build_bundle, load_card, verify_bundle

        dest = build_bundle(run, root / name, load_card(card), version, not full_precision, command)
        problems = verify_bundle(dest)
        if problems:
            raise ValueError(f"{dest}: built, but " + "; ".join(problems))
        print(f"wrote {dest}")

    _run(body)


@bundle_app.command("verify")
def bundle_verify(path: Annotated[Path, typer.Argument(help="Bundle folder.")]) -> None:
    """Check a bundle offline: files, metadata fields, network input/output, weights."""
    _setup_logging(True)

    def body() -> None:
        from medunet.bundle import verify_bundle

        problems = verify_bundle(path)
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        print(f"{path}: bundle verified")

    _run(body)


@bundle_app.command("list")
def bundle_list(root: Annotated[Path | None, typer.Option(help="Where bundles live.")] = None) -> None:
    """List the installed bundles."""
    from medunet.bundle import list_bundles
    from medunet.inference.model import bundles_root

    for info in list_bundles(root or bundles_root()):
        print(f"{info.name}\t{info.version}\t{info.task}\t{info.path}")


registry_app = typer.Typer(no_args_is_help=True, help="The MLflow model registry.")
app.add_typer(registry_app, name="registry")
TrackingUri = Annotated[
    str | None, typer.Option(help="MLflow tracking server (default: $MLFLOW_TRACKING_URI or ./mlflow.db).")
]


@registry_app.command("register")
def registry_register(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a medunet training run.")],
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    tracking_uri: TrackingUri = None,
) -> None:
    """Register a training run's model (a MONAI bundle with a pyfunc flavour) as a new version."""
    _setup_logging(True)

    def body() -> None:
        from medunet.tracking import register_run

        version = register_run(run_id, name, tracking_uri)
        print(f"registered {name} version {version}: models:/{name}/{version}")

    _run(body)


@registry_app.command("list")
def registry_list(tracking_uri: TrackingUri = None) -> None:
    """List registered models, their versions and aliases."""
    _setup_logging(True)

    def body() -> None:
        from medunet.tracking import list_versions

        for v in list_versions(tracking_uri):
            print(f"{v.name}\t{v.version}\t{','.join(v.aliases) or '-'}\trun {v.run_id}")

    _run(body)


@registry_app.command("promote")
def registry_promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to promote.")],
    alias: Annotated[str, typer.Option(help="Alias to point at the version.")] = "champion",
    tracking_uri: TrackingUri = None,
) -> None:
    """Point an alias (models:/NAME@ALIAS) at a version."""
    _setup_logging(True)

    def body() -> None:
        from medunet.tracking import promote

        promote(name, version, alias, tracking_uri)
        print(f"models:/{name}@{alias} -> version {version}")

    _run(body)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Checkpoint (.pt), run folder, bundle or models:/ URI.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="model.onnx, model.xml (OpenVINO; weights beside it as .bin), model.ts, or a "
            "medunet bundle folder (its models/model.onnx).",
        ),
    ],
    check_on: Annotated[
        list[str],
        typer.Option(
            help="A real scan to check the export on against PyTorch (repeat for more; channels joined by commas). "
            "Nothing is written unless the masks agree on 99.9% of voxels."
        ),
    ],
    fmt: Annotated[ExportChoice, typer.Option("--format", help="onnx, openvino or torchscript.")] = ExportChoice.ONNX,
    int8_validate_on: Annotated[
        Path | None,
        typer.Option(
            "--int8",
            help="Quantize to INT8 (onnx, openvino; calibrated on the --check-on scans) and write it only if its mean "
            "Dice on this labelled dataset (any layout `medunet plan` reads) is within 0.005 of the float model's.",
        ),
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow registry for models:/ URIs.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    verbose: Verbose = False,
) -> None:
    """Export a model for ONNX Runtime, OpenVINO or LibTorch, with its preprocessing in the file's metadata."""
    _setup_logging(quiet, verbose)

    def body() -> None:
        from medunet.inference import expand_inputs, load_model
        from medunet.inference.export import ExportFormat, export_model

        seg_model = load_model(model, tracking_uri=tracking_uri)
        validation = None
        if int8_validate_on is not None:
            from medunet.data.layouts import read_dataset

            if fmt is ExportChoice.TORCHSCRIPT:
                raise ValueError("--int8 quantizes an ONNX or OpenVINO export, not TorchScript")
            validation = read_dataset(int8_validate_on).cases
        report = export_model(seg_model, ExportFormat(str(fmt)), output, expand_inputs(check_on), validation)
        print(f"wrote {report.describe()}")

    _run(body)


@app.command()
def networks() -> None:
    """List the registered networks."""
    from medunet.networks import list_networks

    for name in list_networks():
        print(name)


def main() -> None:
    from medunet.runtime import configure_cli  # before any command imports torch: see medunet.runtime

    configure_cli()
    app()


if __name__ == "__main__":
    main()
