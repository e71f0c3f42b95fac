"""The typed configuration: defaults, config.yaml, environment overrides, errors, the CLI check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from xvr_node.catalog.embedded import embedded_url
from xvr_node.cli import cli
from xvr_node.config import ConfigError, Settings, TrainingSettings, check_config, load_settings

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL_CONFIG = REPO / "config.yaml"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ or {})
    return caught.value.problems


# --- defaults and the shipped config.yaml --------------------------------------------------


def test_defaults_load_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, environ={})
    assert settings.node.port == 11112
    assert settings.registration.scales is None  # levels_px decide per image
    assert settings.registration.levels_px == [32, 64, 128]
    # Built-in relative paths are anchored at the working directory.
    assert settings.storage.root == tmp_path / "var" / "xvr-node"
    assert settings.database_url == embedded_url(tmp_path / "var" / "xvr-node")
    assert f"host={tmp_path}/var/xvr-node/postgres&" in settings.database_url


def test_without_path_the_working_directory_config_yaml_is_used(tmp_path, monkeypatch):
    write(tmp_path, "node:\n  port: 4242\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, environ={}).node.port == 4242


def test_top_level_config_yaml_holds_exactly_the_defaults():
    raw = yaml.safe_load(TOP_LEVEL_CONFIG.read_text(encoding="utf-8"))
    # Same keys and values as the model's defaults, written out (so neither can drift) ...
    assert raw == Settings().model_dump(mode="json")
    # ... and validating it changes nothing.
    assert Settings.model_validate(raw) == Settings()
    assert load_settings(TOP_LEVEL_CONFIG, environ={}).storage.root == REPO / "var" / "xvr-node"


def _leaf_lines(text: str) -> list[tuple[int, str]]:
    """(line number, key) of every `key: value` line that is not a comment or a section."""
    lines = text.splitlines()
    leaves = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):\s*(\S.*)?$", line)
        if match and match[3] is not None and not match[3].startswith("#"):
            leaves.append((number, match[2]))
    return leaves


def test_every_leaf_key_in_config_yaml_has_a_comment():
    lines = TOP_LEVEL_CONFIG.read_text(encoding="utf-8").splitlines()
    uncommented = [
        key
        for number, key in _leaf_lines("\n".join(lines))
        if "#" not in lines[number] and not lines[number - 1].strip().startswith("#")
    ]
    assert uncommented == []


def test_every_model_leaf_appears_in_config_yaml():
    def leaves(data: dict, prefix: str = "") -> set[str]:
        keys = set()
        for key, value in data.items():
            if isinstance(value, dict):
                keys |= leaves(value, f"{prefix}{key}.")
            else:
                keys.add(prefix + key)
        return keys

    raw = yaml.safe_load(TOP_LEVEL_CONFIG.read_text(encoding="utf-8"))
    assert leaves(raw) == leaves(Settings().model_dump(mode="json"))


# --- paths ---------------------------------------------------------------------------------


def test_relative_paths_in_a_file_resolve_against_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    path = write(folder, "storage:\n  root: data\nlogging:\n  file: logs/node.log\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(path, environ={"XVR_NODE__TRAINING__BASE_MODEL": "base.pt"})
    assert settings.storage.root == folder / "data"
    assert settings.logging.file == folder / "logs" / "node.log"
    # From the environment: the working directory.
    assert settings.training.base_model == tmp_path / "base.pt"
    assert settings.database_url == embedded_url(folder / "data")


def test_ensure_storage_root_creates_the_folder(tmp_path):
    path = write(tmp_path, "storage:\n  root: a/b/store\n")
    settings = load_settings(path, environ={})
    assert settings.ensure_storage_root() == tmp_path / "a" / "b" / "store"
    assert (tmp_path / "a" / "b" / "store").is_dir()


def test_a_sqlite_catalog_url_is_refused_with_the_way_forward():
    with pytest.raises(ConfigError) as refused:
        load_settings(None, environ={"XVR_NODE__DATABASE__URL": "sqlite:///catalog.sqlite3"})
    [problem] = refused.value.problems
    assert problem.startswith("database.url")
    assert "no longer supported" in problem and "leave database.url unset" in problem


def test_database_url_password_is_redacted():
    environ = {"XVR_NODE__DATABASE__URL": "postgresql+psycopg://xvr:s3cret@db.local/xvr"}
    settings = load_settings(None, environ=environ)
    assert settings.database_url == "postgresql+psycopg://xvr:s3cret@db.local/xvr"
    assert settings.database_url_redacted == "postgresql+psycopg://xvr:***@db.local/xvr"


# --- environment overrides -----------------------------------------------------------------


def test_environment_overrides_nested_keys_with_types(tmp_path):
    path = write(tmp_path, "node:\n  port: 4242\n")
    environ = {
        "XVR_NODE__NODE__PORT": "11113",
        "XVR_NODE__NODE__TLS__REQUIRE_CLIENT_CERTIFICATE": "true",
        "XVR_NODE__REGISTRATION__SCALES": "[24, 12]",
        "XVR_NODE__SCHEDULER__OVERNIGHT_WINDOW__START": "21:30",
        "XVR_NODE__NODE__AE_TITLE": "NO",
        "XVR_NODE__LOGGING__LEVEL": "debug",
        "XVR_NODE__DESTINATIONS": "[{name: pacs, ae_title: ORTHANC, host: pacs, port: 4242}]",
        "XVR_NODE_CONFIG": "/not/an/override",
    }
    settings = load_settings(path, environ=environ)
    assert settings.node.port == 11113
    assert settings.node.tls.require_client_certificate is True
    assert settings.registration.scales == [24.0, 12.0]
    assert settings.scheduler.overnight_window.start == "21:30"
    assert settings.node.ae_title == "NO"  # text keys keep the raw string, not YAML's false
    assert settings.logging.level == "DEBUG"
    assert settings.destinations[0].port == 4242


def test_unknown_environment_key_is_named():
    problems = problems_of(None, {"XVR_NODE__NODE__PORTT": "11113"})
    assert problems == [
        "node.portt: unknown key (did you mean 'port'?) (set by XVR_NODE__NODE__PORTT)"
    ]


def test_bad_environment_value_names_the_variable():
    problems = problems_of(None, {"XVR_NODE__NODE__PORT": "70000"})
    assert problems == ["node.port: 70000 is out of range 1–65535 (set by XVR_NODE__NODE__PORT)"]


# --- errors --------------------------------------------------------------------------------


def test_only_the_multiframe_mode_that_exists_is_accepted():
    """max, mean and first were once listed and never built: a site asking for one is told."""
    (problem,) = problems_of(None, {"XVR_NODE__REGISTRATION__MULTIFRAME": "mean"})
    assert problem.startswith("registration.multiframe: ") and "track" in problem


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    problems = problems_of(write(tmp_path, "node:\n  portt: 11112\nstorag: {}\n"))
    assert "node.portt: unknown key (did you mean 'port'?)" in problems
    assert "storag: unknown key (did you mean 'storage'?)" in problems


def test_wrong_type_is_named(tmp_path):
    path = write(
        tmp_path, "scheduler:\n  stable_series_seconds: soon\nworker:\n  concurrency: two\n"
    )
    assert problems_of(path) == [
        "scheduler.stable_series_seconds: expected a number, got 'soon'",
        "worker.concurrency: expected a whole number, got 'two'",
    ]


def test_port_out_of_range(tmp_path):
    path = write(
        tmp_path,
        "node:\n  port: 70000\ndestinations:\n  - {name: p, ae_title: P, host: h, port: 0}\n",
    )
    assert problems_of(path) == [
        "node.port: 70000 is out of range 1–65535",
        "destinations[0].port: 0 is out of range 1–65535",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"25:00"', 'expected a time "HH:MM" between 00:00 and 23:59'),
        ('"8pm"', 'expected a time "HH:MM" between 00:00 and 23:59'),
        ("21:00", 'expected a time "HH:MM" in quotes, got the number 1260'),
    ],
)
def test_invalid_window_time(tmp_path, value, expected):
    path = write(tmp_path, f"scheduler:\n  overnight_window:\n    start: {value}\n")
    (problem,) = problems_of(path)
    assert problem.startswith("scheduler.overnight_window.start: " + expected)


def test_several_problems_are_reported_together(tmp_path):
    text = (
        "node:\n  ae_title: THIS-TITLE-IS-TOO-LONG\n  allowed_callers:\n"
        "    - {ae_title: CARM1, address: 10.0.0.0/33}\n"
        "scheduler:\n  timezone: Mars/Olympus\n"
        "worker:\n  device: gpu\n  lease_seconds: 10\n"
        "registration:\n  scales: [6, 12]\n  initializers: [model, guess]\n"
        "logging:\n  format: xml\n"
        "database:\n  url: mysql://x@y/z\n"
    )
    problems = problems_of(write(tmp_path, text))
    expected_keys = [
        "node.ae_title",
        "node.allowed_callers[0].address",
        "database.url",
        "scheduler.timezone",
        "worker.device",
        "worker.heartbeat_seconds",
        "registration.scales",
        "registration.initializers[1]",
        "logging.format",
    ]
    assert [problem.split(":")[0] for problem in problems] == expected_keys


def test_tls_enabled_needs_certificate_and_key(tmp_path):
    path = write(tmp_path, "node:\n  tls:\n    enabled: true\n")
    assert problems_of(path) == [
        "node.tls.certificate: required when node.tls.enabled is true",
        "node.tls.private_key: required when node.tls.enabled is true",
    ]


def test_missing_explicit_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert problems_of(missing) == [f"{missing}: file not found"]


def test_invalid_yaml_and_duplicate_keys(tmp_path):
    (problem,) = problems_of(write(tmp_path, "node: [unclosed\n"))
    assert problem.startswith(f"{tmp_path / 'config.yaml'}: invalid YAML")
    (problem,) = problems_of(write(tmp_path, "node:\n  port: 1\n  port: 2\n"))
    assert "key 'port' appears twice" in problem


# --- check_config: the filesystem ----------------------------------------------------------


def test_check_config_accepts_a_good_file(tmp_path):
    assert check_config(write(tmp_path, "storage:\n  root: store\n"), environ={}) == []


def test_storage_root_under_a_file_cannot_be_created(tmp_path):
    # Works as root too, where folder permissions are not enforced.
    (tmp_path / "afile").write_text("x")
    path = write(tmp_path, "storage:\n  root: afile/store\n")
    (problem,) = check_config(path, environ={})
    assert problem.startswith("storage.root: cannot create")
    assert str(tmp_path / "afile") in problem


def test_tls_files_must_exist(tmp_path):
    text = (
        "node:\n  tls:\n    enabled: true\n    certificate: node.pem\n"
        "    private_key: node.key\n    ca_certificates: [ca.pem]\n"
    )
    assert check_config(
        write(tmp_path, text), environ={"XVR_NODE__STORAGE__ROOT": str(tmp_path)}
    ) == [
        f"node.tls.certificate: file not found: {tmp_path / 'node.pem'}",
        f"node.tls.private_key: file not found: {tmp_path / 'node.key'}",
        f"node.tls.ca_certificates[0]: file not found: {tmp_path / 'ca.pem'}",
    ]


def test_check_config_returns_load_problems_instead_of_raising(tmp_path):
    assert check_config(write(tmp_path, "node:\n  port: 0\n"), environ={}) == [
        "node.port: 0 is out of range 1–65535"
    ]


# --- the CLI -------------------------------------------------------------------------------


def test_cli_config_check_names_the_bad_key(tmp_path):
    path = write(tmp_path, "node:\n  portt: 11112\n")
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"], env={})
    assert result.exit_code == 2
    assert "config: node.portt: unknown key (did you mean 'port'?)" in result.output


def test_cli_config_check_ok(tmp_path):
    path = write(tmp_path, "storage:\n  root: store\n")
    result = CliRunner().invoke(cli, ["--config", str(path), "config", "check"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "config: OK"


def test_cli_config_show_prints_effective_settings(tmp_path):
    path = write(tmp_path, "node:\n  port: 4242\n")
    result = CliRunner().invoke(
        cli, ["--config", str(path), "config", "show"], env={"XVR_NODE__WORKER__DEVICE": "cpu"}
    )
    assert result.exit_code == 0, result.output
    assert '"port": 4242' in result.output
    assert '"device": "cpu"' in result.output


# --- systemd units -------------------------------------------------------------------------

UNITS = {
    "xvr-node.service": "serve",
    "xvr-node-worker@.service": "worker --name %i",
}
CONFIG_IN_ETC = "/etc/xvr-node/config.yaml"


def read_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file as {section: {key: [values]}}; systemd allows repeated keys."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / name).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize(("name", "command"), UNITS.items())
def test_systemd_unit_runs_the_node_as_its_own_user(name, command):
    unit = read_unit(name)
    service = unit["Service"]
    (exec_start,) = service["ExecStart"]
    assert exec_start.endswith(f"xvr-node --config {CONFIG_IN_ETC} {command}")
    assert service["Environment"] == [f"XVR_NODE_CONFIG={CONFIG_IN_ETC}"]
    assert service["User"] == ["xvr-node"]
    assert service["Restart"] == ["on-failure"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == ["/var/lib/xvr-node"]
    assert "PrivateDevices" not in service  # GPU workers need /dev/nvidia*
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_passes_systemd_analyze(name, tmp_path):
    import shutil
    import subprocess

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / name.replace("@.", "@gpu0.")
    unit.write_text((REPO / "systemd" / name).read_text(encoding="utf-8"), encoding="utf-8")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # The executable lives on the target machine only; anything about the file itself fails.
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if re.search(r"Unknown (key|section)|Failed to parse|Invalid|[Mm]issing '='", line)
    ]
    assert complaints == []


def test_an_empty_mapping_in_the_environment_empties_the_files_mapping(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("training:\n  profiles:\n    cpu:\n      batch_size: 3\n")
    kept = load_settings(config, environ={"XVR_NODE__TRAINING__PROFILES__CPU__LR": "0.1"})
    assert (kept.training.profiles["cpu"].batch_size, kept.training.profiles["cpu"].lr) == (3, 0.1)
    emptied = load_settings(config, environ={"XVR_NODE__TRAINING__PROFILES": "{}"})
    assert emptied.training.profiles == {}
    assert emptied.training.for_device("cpu") == emptied.training


def test_a_profile_given_in_part_keeps_the_built_in_values_of_the_other_keys(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "training:\n  profiles:\n    cpu:\n      lr: 0.01\n      backbone: null\n"
        "    mps:\n      batch_size: 8\n"
    )
    profiles = load_settings(config, environ={}).training.profiles
    built_in = TrainingSettings().profiles
    assert profiles["cpu"].lr == 0.01
    assert profiles["cpu"].backbone is None  # null: the training value, as written
    assert profiles["cpu"].detector_size_px == built_in["cpu"].detector_size_px == 64
    assert profiles["cpu"].pose_ranges == built_in["cpu"].pose_ranges
    assert profiles["cuda"] == built_in["cuda"]  # not named: as built in
    assert profiles["mps"].batch_size == 8 and profiles["mps"].lr is None  # a new device
