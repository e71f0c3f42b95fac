"""The phantom patient and ``xvr-node demo``."""

from __future__ import annotations

from pathlib import Path

import click

from xvr_node.cli.root import CliState, cli


@cli.command("phantom")
@click.argument("outdir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--frames", type=int, default=4, show_default=True, help="Single-frame X-rays.")
@click.option(
    "--size",
    default="128",
    show_default=True,
    help="Detector size in pixels: N (square) or COLSxROWS.",
)
@click.option(
    "--multiframe", type=int, default=0, show_default=True, help="Add one cine run of K frames."
)
@click.option(
    "--motion",
    type=click.Choice(["static", "dynamic"]),
    default="dynamic",
    show_default=True,
    help="Cine run with a still or a rotating C-arm.",
)
@click.option("--orientation", type=click.Choice(["AP", "PA"]), default="PA", show_default=True)
@click.option(
    "--modality", type=click.Choice(["XA", "RF", "both"]), default="XA", show_default=True
)
@click.option("--flip", is_flag=True, help="Store RAO views mirrored, as some C-arms do.")
@click.option("--bead", is_flag=True, help="Insert a dense bead into the CT before rendering.")
@click.option(
    "--ct-downsample",
    type=int,
    default=1,
    show_default=True,
    help="Keep every N-th CT voxel in-plane and between slices (fast tests).",
)
@click.option(
    "--realism",
    type=click.Choice(["full", "clean", "none"]),
    default="full",
    show_default=True,
    help="X-ray formation: full (independent projector, spectrum, scatter, table, devices, "
    "noise, vendor storage), clean (independent, mono-energetic, nothing else) or none (the "
    "registration renderer, as older phantoms).",
)
@click.option("--spectrum/--mono", default=None, help="Polyenergetic beam with water/bone HU.")
@click.option("--scatter/--no-scatter", default=None, help="Scatter (a broad low-pass).")
@click.option("--scatter-to-primary", type=float, default=None, help="Scatter/primary ratio.")
@click.option("--table/--no-table", default=None, help="Carbon-fibre table under the patient.")
@click.option("--blur/--no-blur", default=None, help="Detector blur.")
@click.option("--noise/--no-noise", default=None, help="Quantum noise.")
@click.option("--dose-ngy", type=float, default=None, help="Detector air kerma per frame.")
@click.option("--devices/--no-devices", default=None, help="Guidewire and ECG leads.")
@click.option(
    "--storage",
    type=click.Choice(["lin12", "log8", "log10", "mixed"]),
    default=None,
    help="Pixel storage (mixed: one per X-ray).",
)
@click.option(
    "--field",
    type=click.Choice(["rectangle", "circle", "open", "mixed"]),
    default=None,
    help="Collimated rectangle, image-intensifier circle, open detector, or one per X-ray.",
)
@click.option(
    "--field-header",
    type=click.Choice(["yes", "no", "mixed"]),
    default=None,
    help="Whether collimator / circular shutter attributes describe the field.",
)
@click.option(
    "--ct-crop", type=float, default=None, help="Fraction of CT slices written (X-rays see all)."
)
@click.option(
    "--ct-oblique",
    default="0,0",
    show_default=True,
    help="Tilt the CT series by AX,AY degrees about the patient's x and y axes.",
)
@click.option("--ct-prone", is_flag=True, help="Store the CT as a prone (HFP) scan.")
@click.option("--ct-descending", is_flag=True, help="Number CT instances from the other end.")
def phantom_command(outdir: Path, **options) -> None:
    """Build a test patient: CT series, XA/RF fluoroscopy and truth.json."""
    from xvr_node.phantom import PhantomSpec, Realism, build_phantom

    scatter = options.pop("scatter")
    blur = options.pop("blur")
    scatter_to_primary = options.pop("scatter_to_primary")
    try:
        realism = Realism.from_preset(
            options.pop("realism"),
            spectrum=options.pop("spectrum"),
            scatter_to_primary=0.0 if scatter is False else scatter_to_primary,
            table=options.pop("table"),
            detector_blur_mm=0.0 if blur is False else None,
            noise=options.pop("noise"),
            detector_dose_ngy=options.pop("dose_ngy"),
            devices=options.pop("devices"),
            storage=options.pop("storage"),
            field=options.pop("field"),
            field_in_header=options.pop("field_header"),
            ct_crop_fraction=options.pop("ct_crop"),
        )
        oblique = tuple(float(x) for x in options.pop("ct_oblique").split(","))
        spec = PhantomSpec.from_cli(realism=realism, ct_oblique_deg=oblique, **options)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    summary = build_phantom(outdir, spec, progress=lambda line: click.echo(line, err=True))
    click.echo(summary.describe())


@cli.command("demo")
@click.option(
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("demo-output"),
    show_default=True,
)
@click.option(
    "--train",
    is_flag=True,
    help="Train the patient's model here (20 minutes on CPU, 5 on a GPU) instead of "
    "adopting the one shipped with the demo.",
)
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=None,
    help="Train this many iterations of a small model instead (a quick look at the path).",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Leave the node and the PACS running after the table, until Ctrl-C.",
)
@click.pass_obj
def demo_command(
    state: CliState, output: Path, train: bool, iterations: int | None, keep_running: bool
) -> None:
    """The main job on embedded defaults: phantom → C-STORE → finetune → register → PACS."""
    from xvr_node.demo import run_demo

    state.settings()  # a broken configuration stops here, in one line per problem
    try:
        run_demo(
            output,
            config_path=state.config_path,
            echo=click.echo,
            train=train,
            iterations=iterations,
            keep_running=keep_running,
        )
    except (RuntimeError, TimeoutError) as error:
        raise click.ClickException(f"demo: {error}") from error
