"""The method by hand (research CLI): register, animate, evaluate, dcm2nii."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xvr_node.cli.root import CliState, cli, load_volume


def _registrar(state: CliState, volume, scales: str | None, orientation: str | None, device: str):
    from xvr_node.xvr.register import RefineSettings, Registrar

    settings = state.settings()
    refine = RefineSettings.from_settings(settings.registration)
    if scales:
        refine = RefineSettings(
            **{**refine.__dict__, "scales": tuple(float(x) for x in scales.split(","))}
        )
    return Registrar(
        volume,
        refine,
        orientation or settings.training.orientation,
        device,
        labels=settings.registration.mask_labels,
    )


_register_options = [
    click.argument("xrays", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path)),
    click.option(
        "--volume",
        "volume_path",
        required=True,
        type=click.Path(exists=True, path_type=Path),
        help="CT as NIfTI, or a CT DICOM series folder.",
    ),
    click.option("--output", required=True, type=click.Path(path_type=Path, file_okay=False)),
    click.option("--scales", default=None, help="Detector downsampling, coarse to fine: 4,2"),
    click.option("--orientation", type=click.Choice(["AP", "PA"]), default=None),
    click.option("--device", default="cpu", show_default=True),
    click.option("--no-tracking", is_flag=True, help="Start every frame of a run afresh."),
]


def _with_register_options(function):
    for option in reversed(_register_options):
        function = option(function)
    return function


def _overlays(volume, written: list[Path]) -> None:
    from xvr_node.xvr.visualize import write_overlays

    for path in write_overlays(volume, written):
        click.echo(f"overlay: {path}")


def _register(
    volume,
    registrar,
    xrays,
    output,
    initializer: str,
    *,
    no_tracking: bool,
    overlay: bool,
    fixed=None,
    starts=None,
) -> list[Path]:
    """What every ``register`` command does once it has its start: run, report, overlay."""
    from xvr_node.xvr.run import register_files, xray_files

    try:
        written = register_files(
            volume,
            xray_files(xrays),
            output,
            registrar,
            initializer,
            fixed,
            track=not no_tracking,
            starts=starts,
            echo=click.echo,
        )
    except ValueError as error:  # e.g. no positioner angles, conventions refused
        raise click.ClickException(str(error)) from error
    if overlay:
        _overlays(volume, written)
    return written


_overlay_option = click.option(
    "--overlay", is_flag=True, help="Also write a PNG of DRR edges over each X-ray."
)


def _fixed_start_options(function):
    """The options of a user-given start: C-arm angles and offsets, or a matrix file."""
    for option in reversed(
        [
            click.option(
                "--primary", type=float, default=0.0, show_default=True, help="LAO+/RAO- deg"
            ),
            click.option(
                "--secondary", type=float, default=0.0, show_default=True, help="CRA+/CAU- deg"
            ),
            click.option(
                "--dsp",
                type=float,
                default=750.0,
                show_default=True,
                help="Source to isocentre, mm",
            ),
            click.option(
                "--offset",
                type=float,
                nargs=3,
                default=(0.0, 0.0, 0.0),
                help="Isocentre offset from the CT centre, LPS mm",
            ),
            click.option(
                "--init-matrix",
                type=click.Path(exists=True, path_type=Path),
                default=None,
                help="JSON 4x4 image-plane -> CT LPS (or an object's final_matrix or matrix).",
            ),
        ]
    ):
        function = option(function)
    return function


def _fixed_start(primary, secondary, dsp, offset, init_matrix):
    """The FixedStart the options describe (a matrix file wins over angles)."""
    from xvr_node.xvr.run import FixedStart

    matrix = None if init_matrix is None else _start_matrix(init_matrix)
    return FixedStart(primary, secondary, dsp, tuple(offset), 0.0, matrix)


@cli.group("register")
def register_group() -> None:
    """Register X-ray frames to a CT; one JSON result per frame."""


@register_group.command("dicom")
@_with_register_options
@_overlay_option
@click.pass_obj
def register_dicom(
    state: CliState,
    xrays,
    volume_path,
    output,
    scales,
    orientation,
    device,
    no_tracking,
    overlay,
) -> None:
    """Start from the C-arm's positioner angles and Distance Source to Patient."""
    volume = load_volume(volume_path)
    registrar = _registrar(state, volume, scales, orientation, device)
    _register(volume, registrar, xrays, output, "dicom", no_tracking=no_tracking, overlay=overlay)


@register_group.command("fixed")
@_with_register_options
@_fixed_start_options
@_overlay_option
@click.pass_obj
def register_fixed(
    state: CliState,
    xrays,
    volume_path,
    output,
    scales,
    orientation,
    device,
    no_tracking,
    primary,
    secondary,
    dsp,
    offset,
    init_matrix,
    overlay,
) -> None:
    """Start from a pose you give: angles and offsets, or a matrix."""
    fixed = _fixed_start(primary, secondary, dsp, offset, init_matrix)
    volume = load_volume(volume_path)
    registrar = _registrar(state, volume, scales, orientation, device)
    _register(
        volume,
        registrar,
        xrays,
        output,
        "fixed",
        no_tracking=no_tracking,
        overlay=overlay,
        fixed=fixed,
    )


def _read_json(path: Path):
    """A JSON file's content; unreadable or invalid JSON is a one-line error."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.ClickException(f"{path}: not readable JSON ({error})") from None


def _start_matrix(path: Path):
    """A 4x4 start matrix from JSON: a bare matrix, or an object's final_matrix or matrix."""
    import numpy as np

    from xvr_node.geometry import check_rigid

    wanted = (
        "must hold a 4x4 matrix: a JSON array of 4 rows of 4 numbers, or an object with "
        "'final_matrix' or 'matrix'"
    )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.ClickException(f"{path}: not readable JSON ({error}); it {wanted}") from None
    if isinstance(data, dict):
        key = next((k for k in ("final_matrix", "matrix") if k in data), None)
        if key is None:
            raise click.ClickException(
                f"{path}: no 'final_matrix' or 'matrix' key; the file {wanted}"
            )
        data = data[key]
    try:
        matrix = np.array(data, dtype=float)
        if matrix.shape != (4, 4):
            raise ValueError(f"shape {matrix.shape}, not (4, 4)")
        check_rigid(matrix)
    except (TypeError, ValueError) as error:
        raise click.ClickException(f"{path}: {error}; the file {wanted}") from None
    return matrix


def _model_initializer(checkpoint: Path | None, device: str):
    """The checkpoint's network as an initializer; its conventions refused cleanly."""
    if checkpoint is None:
        return None
    from xvr_node.xvr.initialize import ModelInitializer

    try:
        return ModelInitializer(checkpoint, device)
    except ValueError as error:
        raise click.ClickException(str(error)) from error


@register_group.command("model")
@_with_register_options
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trained pose regressor (train / finetune); its conventions are checked.",
)
@_overlay_option
@click.pass_obj
def register_model(
    state: CliState,
    xrays,
    volume_path,
    output,
    scales,
    orientation,
    device,
    no_tracking,
    checkpoint,
    overlay,
) -> None:
    """Start from the pose a trained network predicts from the X-ray itself."""
    model = _model_initializer(checkpoint, device)
    volume = load_volume(volume_path)
    registrar = _registrar(state, volume, scales, orientation or model.orientation, device)
    _register(
        volume,
        registrar,
        xrays,
        output,
        "model",
        no_tracking=no_tracking,
        overlay=overlay,
        starts=lambda frame: model.matrix_for(frame, volume),
    )


@register_group.command("multistart")
@_with_register_options
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also try this pose regressor's prediction.",
)
@_fixed_start_options
@_overlay_option
@click.pass_obj
def register_multistart(
    state: CliState,
    xrays,
    volume_path,
    output,
    scales,
    orientation,
    device,
    no_tracking,
    checkpoint,
    primary,
    secondary,
    dsp,
    offset,
    init_matrix,
    overlay,
) -> None:
    """Try every start there is (model, DICOM, fixed, and a local search around the model's
    and the positioner's), refine each briefly at the coarsest level, refine the best fully.

    The result's initializer reads "multistart:<chosen>", with every candidate's scores.
    """
    from xvr_node.xvr.initialize import available_starts
    from xvr_node.xvr.multistart import SearchSettings, choose_start

    fixed = _fixed_start(primary, secondary, dsp, offset, init_matrix)
    model = _model_initializer(checkpoint, device)
    volume = load_volume(volume_path)
    registrar = _registrar(state, volume, scales, orientation, device)
    search = SearchSettings(**state.settings().registration.multistart_search.model_dump())
    chosen: dict[tuple[str, int | None], tuple[str, dict]] = {}

    def starts(frame):
        candidates = available_starts(registrar, frame, fixed, model)
        choice = choose_start(registrar, frame, candidates, search)
        chosen[(frame.source, frame.frame_number)] = (choice.name, choice.summary())
        margin = "no rival" if choice.margin is None else f"margin {choice.margin:.4f}"
        click.echo(
            f"{frame.name}: {len(choice.candidates)} candidates -> {choice.name} "
            f"at {choice.similarity:.4f} ({margin})"
        )
        return choice.matrix

    written = _register(
        volume,
        registrar,
        xrays,
        output,
        "multistart",
        no_tracking=no_tracking,
        overlay=overlay,
        fixed=fixed,
        starts=starts,
    )
    for path in written:
        result = json.loads(path.read_text())
        key = (result["file"], result["frame_number"])
        if result["initializer"] == "multistart" and key in chosen:
            name, scores = chosen[key]
            result["initializer"] = f"multistart:{name}"
            result["multistart_scores"] = scores
            path.write_text(json.dumps(result, indent=1))


@cli.command("animate")
@click.argument("result", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--volume",
    "volume_path",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="The CT the result was registered to (NIfTI or DICOM folder).",
)
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--every", type=click.IntRange(min=1), default=5, show_default=True, help="Iterations/frame."
)
@click.option("--device", default="cpu", show_default=True)
@click.pass_obj
def animate_command(
    state: CliState, result: Path, volume_path: Path, output: Path, every: int, device: str
) -> None:
    """GIF of a registration: re-run from the result's start with its settings, keeping poses."""
    import numpy as np

    from xvr_node.xvr.register import RefineSettings, Registrar
    from xvr_node.xvr.visualize import animate, frame_of_result

    data = _read_json(result)
    if not isinstance(data, dict) or not all(key in data for key in ("file", "initial_matrix")):
        raise click.ClickException(
            f"{result}: not a registration result (needs 'file' and 'initial_matrix')"
        )
    if not Path(data["file"]).is_file():
        raise click.ClickException(f"{result}: its X-ray {data['file']} is not there")
    names = RefineSettings.__dataclass_fields__
    refine = RefineSettings(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in data.get("settings", {}).items()
            if key in names
        }
    )
    orientation = data.get("conventions", {}).get("orientation", "PA")
    volume = load_volume(volume_path)
    registrar = Registrar(
        volume, refine, orientation, device, labels=state.settings().registration.mask_labels
    )
    frame = frame_of_result(data)
    outcome = registrar.register(frame, np.array(data["initial_matrix"]), keep_poses=True)
    animate(frame, volume, outcome.poses, output, every)
    click.echo(
        f"{output}: {outcome.iterations} iterations, similarity {outcome.similarity:.4f} "
        f"(result: {data.get('similarity', float('nan')):.4f})"
    )


@cli.command("evaluate")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.argument("truth", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def evaluate_command(results: Path, truth: Path) -> None:
    """Metrics (mTRE, mPE, dgeo, success rates) of results against a phantom's truth.json."""
    from xvr_node.xvr.evaluate import evaluate

    try:
        table = evaluate(results, truth)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise click.ClickException(
            f"evaluate: {results} / {truth} are not a results file and a phantom truth.json "
            f"({type(error).__name__}: {error})"
        ) from None
    click.echo(table)


@cli.command("dcm2nii")
@click.argument("series", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
def dcm2nii_command(series: Path, output: Path) -> None:
    """A CT DICOM series folder to NIfTI, with the node's assembly checks."""
    from xvr_node.dicom.volume import (
        VolumeRefusedError,
        assemble_volume,
        read_series_files,
        write_volume_nifti,
    )

    files = sorted(p for p in series.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    try:
        assembled = assemble_volume(read_series_files(files))
    except VolumeRefusedError as refused:
        raise click.ClickException(refused.reason) from refused
    write_volume_nifti(assembled, output)
    shape = "x".join(map(str, assembled.volume.hu.shape))
    click.echo(f"{output}: {shape} voxels from {len(files)} files")
