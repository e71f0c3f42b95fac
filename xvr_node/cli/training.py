"""Training by hand: train, finetune, restart a checkpoint, adopt a model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from xvr_node.cli.root import CliState, cli, load_volume, open_catalog

_budget_option = click.option(
    "--budget-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop training after this long (the run re-plans its iterations to fit).",
)


def _budget_s(minutes: float | None) -> float | None:
    return None if minutes is None else minutes * 60.0


def _training_options(function):
    for option in reversed(
        [
            click.option(
                "--volume",
                "volume_paths",
                multiple=True,
                required=True,
                type=click.Path(exists=True, path_type=Path),
                help="CT as NIfTI or DICOM folder; repeat for several (pretraining).",
            ),
            click.option(
                "--output", required=True, type=click.Path(path_type=Path, file_okay=False)
            ),
            click.option(
                "--iterations",
                type=int,
                default=None,
                help="Default: training.iterations (de novo) or finetune_iterations.",
            ),
            click.option(
                "--device",
                default="auto",
                show_default=True,
                help="cpu, cuda, cuda:N or auto; its training.profiles entry applies.",
            ),
            click.option("--seed", type=int, default=0, show_default=True),
            _budget_option,
        ]
    ):
        function = option(function)
    return function


@cli.command("train")
@_training_options
@click.pass_obj
def train_command(
    state: CliState, volume_paths, output, iterations, device, seed, budget_minutes
) -> None:
    """Train a pose regressor de novo on one or several CTs (training.* settings).

    Several CTs make a base model that per-patient finetunes start from.
    """
    from xvr_node.xvr.train import train

    device = _training_device(device)
    settings = state.settings().training.for_device(device)
    volumes = [load_volume(p) for p in volume_paths]
    checkpoint = _with_progress_bar(
        output,
        lambda progress: train(
            volumes,
            settings,
            output,
            iterations=iterations,
            device=device,
            seed=seed,
            progress=progress,
            budget_s=_budget_s(budget_minutes),
        ),
    )
    click.echo(f"checkpoint: {checkpoint}")


def _training_device(device: str) -> str:
    from xvr_node.jobs.worker import resolve_device

    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException(f"--device {device}: no CUDA device is visible")
    return resolved


def _with_progress_bar(output: Path, run) -> Path:
    """Run ``run(progress)`` under a progress bar (iterations, ETA, loss, validation); then
    say why training stopped."""
    from xvr_node.xvr.train import stop_record

    def describe(update) -> str:
        if update is None:
            return ""
        text = f"loss {update.loss:.3f} dgeo {update.dgeo_mm:.0f} mm"
        if update.validation_mm is not None:
            text += f" validation {update.validation_mm:.0f} mm"
        return text

    with click.progressbar(
        length=1, label="training", show_eta=True, item_show_func=describe, file=sys.stderr
    ) as bar:

        def progress(update) -> bool:
            bar.length = update.total
            bar.update(update.iteration - bar.pos, current_item=update)
            return True

        try:
            checkpoint = run(progress)
        except ValueError as error:  # e.g. a base checkpoint that is none, or other conventions
            raise click.ClickException(str(error)) from None
    stopped = stop_record(output) or {}
    if stopped:
        click.echo(
            f"stopped: {stopped['reason']} at iteration {stopped['iteration']} of "
            f"{stopped['total']} after {stopped['seconds']:.0f} s"
            + (
                ""
                if stopped.get("validation_mm") is None
                else f", held-out pose error {stopped['validation_mm']:.1f} mm"
            )
        )
    return checkpoint


@cli.command("finetune")
@_training_options
@click.option(
    "--base",
    "base_checkpoint",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.pass_obj
def finetune_command(
    state: CliState,
    volume_paths,
    output,
    iterations,
    device,
    seed,
    budget_minutes,
    base_checkpoint,
) -> None:
    """Finetune a base model on this patient's CT (conventions must match)."""
    from xvr_node.xvr.train import finetune

    device = _training_device(device)
    settings = state.settings().training.for_device(device, finetune=True)
    volumes = [load_volume(p) for p in volume_paths]
    checkpoint = _with_progress_bar(
        output,
        lambda progress: finetune(
            volumes,
            settings,
            output,
            base_checkpoint,
            iterations=iterations,
            device=device,
            seed=seed,
            progress=progress,
            budget_s=_budget_s(budget_minutes),
        ),
    )
    click.echo(f"checkpoint: {checkpoint}")


@cli.command("restart")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--iterations", type=int, default=None, help="New total (default: unchanged).")
@click.option("--device", default="auto", show_default=True)
@_budget_option
def restart_command(checkpoint: Path, output: Path, iterations, device, budget_minutes) -> None:
    """Resume training exactly where a checkpoint stopped."""
    from xvr_node.xvr.train import restart

    device = _training_device(device)
    resumed = _with_progress_bar(
        output,
        lambda progress: restart(
            checkpoint,
            output,
            iterations=iterations,
            device=device,
            progress=progress,
            budget_s=_budget_s(budget_minutes),
        ),
    )
    click.echo(f"checkpoint: {resumed}")


@cli.command("adopt")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--volume", "volume_id", type=int, required=True, help="The CT volume it was trained for."
)
@click.option("--note", default=None, help="Where it comes from (default: the file's name).")
@click.option("--device", default=None, help="Device of the check (default: worker.device).")
@click.pass_obj
def adopt_command(
    state: CliState, checkpoint: Path, volume_id: int, note: str | None, device: str | None
) -> None:
    """Take a model trained elsewhere (a GPU machine) into service for a CT.

    It is stored as the patient's next model and checked on held-out X-rays like a finetuned
    one; it starts registrations only if it passes, and the CT's queued finetune is cancelled.
    """
    from xvr_node.catalog.models import Volume, utcnow
    from xvr_node.dicom.storage import FileStore
    from xvr_node.jobs.pipeline import Pipeline
    from xvr_node.jobs.worker import resolve_device
    from xvr_node.status import describe_model

    with open_catalog(state) as (settings, session):
        volume = session.get(Volume, volume_id)
        if volume is None:
            raise click.ClickException(f"adopt: no volume {volume_id} (see `xvr-node status`)")
        store = FileStore(settings.storage_root, settings.storage.min_free_bytes)
        pipeline = Pipeline(settings, store, resolve_device(device or settings.worker.device))
        click.echo(f"checking {checkpoint.name} on held-out X-rays of volume {volume_id} ...")
        try:
            model = pipeline.adopt_model(
                session, volume, checkpoint, utcnow(), note=note or f"adopted: {checkpoint.name}"
            )
        except ValueError as error:
            raise click.ClickException(f"adopt: {error}") from None
        line = describe_model(
            {"state": model.state, "validation": model.validation, "validated": model.validated}
        )
        click.echo(f"model {model.id} v{model.version} ({model.path}): {line}")
