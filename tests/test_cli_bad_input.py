"""Every command answers bad input with a short error and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from xvr_node.cli import cli


def leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of every runnable command under ``group``, walking the command tree."""
    found = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += leaf_commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


def command_at(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


def bad_arguments(command: click.Command, garbage: Path) -> list[str]:
    """Garbage for every argument and required option: present, well-typed paths, bad content.

    A folder parameter gets the folder holding the garbage file, a file parameter the file,
    so that each command gets past click's own checks and meets the bad content itself.
    """
    args: list[str] = []
    for param in command.params:
        wants_folder = isinstance(param.type, click.Path) and not param.type.file_okay
        value = str(garbage.parent if wants_folder else garbage)
        if isinstance(param, click.Argument):
            args.append(value)
        elif isinstance(param, click.Option) and param.required and not param.is_flag:
            args += [param.opts[0], value]
    return args


COMMANDS = leaf_commands(cli)


def test_the_walk_finds_the_whole_tree() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {"import", "link", "register fixed", "db upgrade", "jobs retry", "serve"} <= names
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize("config_kind", ["bad config", "default config"])
@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_bad_input_gets_a_short_error_not_a_traceback(path, config_kind, tmp_path: Path) -> None:
    garbage = tmp_path / "in" / "garbage.dcm"
    garbage.parent.mkdir()
    garbage.write_text("this is not DICOM, JSON, YAML, NIfTI or a checkpoint\x00\x01")
    config = tmp_path / "bad-config.yaml"
    config.write_text("node: [unclosed\n")
    args = bad_arguments(command_at(path), garbage)
    if path == ("phantom",):  # any folder is a good output; a file in its place is not
        args = [str(garbage)]
    options = ["--config", str(config)] if config_kind == "bad config" else []
    if not args and not options:  # nothing to feed it: an option it lacks (it must not start)
        args = ["--no-such-option", str(garbage)]

    result = CliRunner().invoke(
        cli, [*options, *path, *args], env={"XVR_NODE__STORAGE__ROOT": str(tmp_path / "s")}
    )

    output = result.output
    assert result.exit_code != 0, (path, output)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), (path, repr(result.exception))
    assert "Traceback" not in output
    assert 0 < len(output.strip().splitlines()) <= 6, output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"pose": [[1, 0, 0, 0]]}, "no 'final_matrix' or 'matrix' key"),
        ({"matrix": [[1, 0], [0, 1]]}, "not (4, 4)"),
        ("[[1, 0, 0, 0]", "not readable JSON"),
        ({"matrix": [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}, "orthonormal"),
    ],
)
def test_init_matrix_that_is_not_a_matrix_is_one_line(tmp_path, content, expected) -> None:
    from xvr_node.cli.method import _start_matrix

    path = tmp_path / "start.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(click.ClickException) as raised:
        _start_matrix(path)
    message = raised.value.format_message()
    assert expected in message
    assert "must hold a 4x4 matrix" in message
    assert "\n" not in message


def test_init_matrix_accepts_matrix_as_well_as_final_matrix(tmp_path) -> None:
    from xvr_node.cli.method import _start_matrix

    identity = [[1.0, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    for key in ("matrix", "final_matrix"):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({key: identity}))
        assert _start_matrix(path)[0, 3] == 5.0


@pytest.mark.parametrize(
    "args", [["status"], ["jobs", "list"], ["export", "list"], ["link", "1.2.3", "--volume", "1"]]
)
def test_catalog_commands_on_a_catalog_without_schema_say_so_in_one_line(tmp_path, args) -> None:
    result = CliRunner().invoke(cli, args, env={"XVR_NODE__STORAGE__ROOT": str(tmp_path / "s")})
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert "run `xvr-node db upgrade`" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("path", [("db", "upgrade"), ("db", "current"), ("status",)])
def test_a_storage_root_that_cannot_hold_the_catalog_is_one_line(path, tmp_path: Path) -> None:
    occupied = tmp_path / "a-file"
    occupied.write_text("not a folder")
    result = CliRunner().invoke(
        cli, list(path), env={"XVR_NODE__STORAGE__ROOT": str(occupied / "store")}
    )
    assert result.exit_code == 3, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"catalog: cannot use {occupied / 'store'}: ")
    assert len(result.output.strip().splitlines()) == 1
