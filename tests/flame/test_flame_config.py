"""The guard options on flame's JobConfig: defaults, TOML, command line (both directions), bad values.

Each test runs against the stand-in of flame's argparse protocol (always) and against flame's real
``flame.config_manager.JobConfig`` (when FLAME_SRC names a checkout). torchtitan 0.1's own dataclass
JobConfig (``--experimental.custom_args_module``) and the torchtitan 0.3 config function in configs/ are
tested in the environment that has that torchtitan.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from flame_src_env import flame_checkout, flame_on_path  # noqa: F401 -- a fixture
from flame_style import FlameStyleJobConfig

from flame_ext.errors import FlameExtError
from flame_ext.flame.config import job_config_class

REPO = Path(__file__).resolve().parents[2]


def _real_flame_base() -> type:
    flame_on_path("flame's real JobConfig")
    from flame.config_manager import JobConfig

    return JobConfig


@pytest.fixture(params=["stand-in", "flame"])
def JobConfig(request) -> type:
    base = FlameStyleJobConfig if request.param == "stand-in" else _real_flame_base()
    return job_config_class(base)


def parse(cls: type, *argv: str):
    cfg = cls()
    cfg.parse_args(list(argv))
    return cfg


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_defaults(JobConfig):
    ck = parse(JobConfig).checkpoint
    assert (
        ck.validate_initial_load,
        ck.initial_load_max_loss_delta,
        ck.initial_load_reference,
        ck.initial_load_repair_buffers,
    ) == (False, 0.1, None, True)
    assert ck.initial_load_model_weights_only is True  # flame's own options are untouched


def test_toml_then_command_line(JobConfig, tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text("{}")
    path = toml(
        tmp_path,
        f"""
[checkpoint]
validate_initial_load = true
initial_load_max_loss_delta = 0.25
initial_load_reference = "{ref}"
initial_load_repair_buffers = false
""",
    )
    ck = parse(JobConfig, "--job.config_file", path).checkpoint
    assert (
        ck.validate_initial_load,
        ck.initial_load_max_loss_delta,
        ck.initial_load_reference,
        ck.initial_load_repair_buffers,
    ) == (True, 0.25, str(ref), False)
    cfg = parse(
        JobConfig,
        "--job.config_file",
        path,
        "--checkpoint.no_validate_initial_load",
        "--checkpoint.initial_load_max_loss_delta",
        "0.5",
        "--checkpoint.initial_load_repair_buffers",
    )
    ck = cfg.checkpoint
    assert (ck.validate_initial_load, ck.initial_load_max_loss_delta, ck.initial_load_repair_buffers) == (
        False,
        0.5,
        True,
    )
    assert cfg.to_dict()["checkpoint"]["validate_initial_load"] is False  # what print_args shows


def test_command_line_alone_and_last_switch_wins(JobConfig):
    ck = parse(
        JobConfig, "--checkpoint.validate_initial_load", "--checkpoint.no_initial_load_repair_buffers"
    ).checkpoint
    assert ck.validate_initial_load is True and ck.initial_load_repair_buffers is False
    ck = parse(JobConfig, "--checkpoint.validate_initial_load", "--checkpoint.no_validate_initial_load").checkpoint
    assert ck.validate_initial_load is False


def test_flames_own_negation_now_beats_the_toml(JobConfig, tmp_path):
    """The same fix applies to flame's own on/off pair: the command line overrides the TOML, as documented."""
    path = toml(tmp_path, "[checkpoint]\ninitial_load_model_weights_only = true\n")
    ck = parse(JobConfig, "--job.config_file", path, "--checkpoint.no_initial_load_model_weights_only").checkpoint
    assert ck.initial_load_model_weights_only is False


@pytest.mark.parametrize(
    "line, words",
    [
        ("initial_load_max_loss_delta = -0.5", "initial_load_max_loss_delta"),
        ('initial_load_max_loss_delta = "0.1"', "initial_load_max_loss_delta"),
        ("initial_load_max_loss_delta = nan", "initial_load_max_loss_delta"),
        ('validate_initial_load = "yes"', "validate_initial_load"),
        ("initial_load_repair_buffers = 1", "initial_load_repair_buffers"),
        # TOML reads a 400-digit integer exactly; float() of it overflows.
        (f"initial_load_max_loss_delta = {'9' * 400}", "initial_load_max_loss_delta = an integer of 400 digits"),
        # Path.expanduser raises RuntimeError for a user the machine does not know.
        ('initial_load_reference = "~nosuchuser/ref.json"', "initial_load_reference.*~nosuchuser is not a user"),
        ('initial_load_plot = "~nosuchuser/step0.png"', "initial_load_plot.*~nosuchuser is not a user"),
    ],
)
def test_bad_toml_values_fail_when_read(JobConfig, tmp_path, line, words):
    path = toml(tmp_path, f"[checkpoint]\n{line}\n")
    with pytest.raises(FlameExtError, match=words) as info:
        parse(JobConfig, "--job.config_file", path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d / "nope.toml", "nope.toml: no such file"),
        (lambda d: d, ": a folder, not a TOML file"),
        (lambda d: Path(toml(d, "[checkpoint\nvalidate_initial_load = true\n")), ": not valid TOML (Expected ']'"),
    ],
    ids=["missing", "folder", "malformed"],
)
def test_an_unreadable_config_file_is_one_line_with_no_traceback_logged(JobConfig, tmp_path, caplog, make, words):
    """flame logs two tracebacks (logger.exception) for a missing or malformed --job.config_file before its own
    error; the guarded JobConfig reads the file first and says why in one line, nothing logged."""
    path = str(make(tmp_path))
    with caplog.at_level("DEBUG"), pytest.raises(FlameExtError) as info:
        parse(JobConfig, "--job.config_file", path)
    assert str(info.value).startswith(f"--job.config_file {path}") and words in str(info.value)
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    assert caplog.records == []  # flame's two logged tracebacks never happen


def test_an_overflowing_threshold_on_the_command_line_is_refused(JobConfig):
    with pytest.raises(FlameExtError, match="initial_load_max_loss_delta = inf: must be a finite number"):
        parse(JobConfig, "--checkpoint.initial_load_max_loss_delta", "9" * 400)


def test_missing_reference_fails_only_when_the_guard_is_on(JobConfig, tmp_path):
    missing = str(tmp_path / "nope.json")
    assert parse(JobConfig, "--checkpoint.initial_load_reference", missing).checkpoint.initial_load_reference == missing
    with pytest.raises(FlameExtError, match="initial_load_reference.*no such file"):
        parse(JobConfig, "--checkpoint.validate_initial_load", "--checkpoint.initial_load_reference", missing)


def test_without_flame_the_message_says_how_to_get_it(tmp_path):
    code = "from flame_ext.flame.config import JobConfig"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""},
        timeout=60,
    )
    assert proc.returncode != 0
    assert "flame is not importable" in proc.stderr and "PYTHONPATH" in proc.stderr


# ------------------------------------------------------------------- the hosts' own config systems


def test_titan01_custom_args_module(tmp_path):
    """torchtitan 0.1's own JobConfig (what flame's pin ships) takes the guard fields from TOML and CLI."""
    from importlib.metadata import version

    if not version("torchtitan").startswith("0.1"):
        pytest.skip(f"torchtitan 0.1's dataclass JobConfig; installed torchtitan {version('torchtitan')}")
    from torchtitan.config_manager import ConfigManager

    path = toml(
        tmp_path,
        '[experimental]\ncustom_args_module = "flame_ext.titan.v01"\n'
        "[checkpoint]\nvalidate_initial_load = true\ninitial_load_max_loss_delta = 0.3\n",
    )
    base = ["--job.config_file", path, "--model.tokenizer_path", str(tmp_path)]
    ck = ConfigManager().parse_args(base).checkpoint
    assert (ck.validate_initial_load, ck.initial_load_max_loss_delta, ck.initial_load_repair_buffers) == (
        True,
        0.3,
        True,
    )
    ck = (
        ConfigManager()
        .parse_args(base + ["--checkpoint.no-validate-initial-load", "--checkpoint.no-initial-load-repair-buffers"])
        .checkpoint
    )
    assert (ck.validate_initial_load, ck.initial_load_repair_buffers) == (False, False)


def test_titan03_config_function():
    """configs/titan03_llama3_8b_cpt.py through torchtitan 0.3's own ConfigManager, with CLI overrides."""
    from importlib.metadata import version

    if not version("torchtitan").startswith("0.3"):
        pytest.skip(f"torchtitan 0.3 config function; installed torchtitan {version('torchtitan')}")
    from torchtitan.config.manager import ConfigManager

    from flame_ext.titan import ValidatingCheckpointManager

    sys.path.insert(0, str(REPO / "configs"))
    try:
        cfg = ConfigManager().parse_args(
            [
                "--module",
                "titan03_llama3_8b_cpt",
                "--config",
                "llama3_8b_cpt",
                "--checkpoint.initial_load_max_loss_delta",
                "0.2",
            ]
        )
        off = ConfigManager().parse_args(
            ["--module", "titan03_llama3_8b_cpt", "--config", "llama3_8b_cpt", "--checkpoint.no-validate-initial-load"]
        )
    finally:
        sys.path.remove(str(REPO / "configs"))
    ck = cfg.checkpoint
    assert isinstance(ck, ValidatingCheckpointManager.Config)
    assert (ck.enable, ck.initial_load_in_hf, ck.validate_initial_load, ck.initial_load_max_loss_delta) == (
        True,
        True,
        True,
        0.2,
    )
    assert off.checkpoint.validate_initial_load is False


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--checkpoint.initial_load_max_loss_delta", "9" * 400, "initial_load_max_loss_delta = inf"),
        ("--checkpoint.initial_load_reference", "~nosuchuser/ref.json", "~nosuchuser is not a user"),
    ],
)
def test_titan03_config_refuses_values_it_cannot_use(flag, value, words, capsys):
    """torchtitan 0.3's ConfigManager (tyro) reports the guard's one-line error as its own and exits 2."""
    from importlib.metadata import version

    if not version("torchtitan").startswith("0.3"):
        pytest.skip(f"torchtitan 0.3 config function; installed torchtitan {version('torchtitan')}")
    from torchtitan.config.manager import ConfigManager

    from flame_ext.errors import GuardConfigError
    from flame_ext.titan import ValidatingCheckpointManager

    with pytest.raises(GuardConfigError, match="initial_load_max_loss_delta = an integer of 401 digits"):
        ValidatingCheckpointManager.Config(initial_load_max_loss_delta=10**400)
    sys.path.insert(0, str(REPO / "configs"))
    try:
        with pytest.raises(SystemExit) as info:
            ConfigManager().parse_args(["--module", "titan03_llama3_8b_cpt", "--config", "llama3_8b_cpt", flag, value])
    finally:
        sys.path.remove(str(REPO / "configs"))
    assert info.value.code == 2
    shown = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert words in shown and "Traceback" not in shown


# ------------------------------------------------------------------- configs/


FLAME_TOMLS = sorted((REPO / "configs").glob("*.toml"))
# flame's train.py reads these but its parser does not define them: a TOML must set them (fla.toml does).
READ_BUT_UNDEFINED = {("training", "pin_memory"), ("training", "persistent_workers")}


@pytest.mark.parametrize("path", FLAME_TOMLS, ids=lambda p: p.name)
def test_config_turns_the_guard_on_with_valid_values(path):
    import tomllib

    from flame_ext.flame.config import check_guard_values

    section = tomllib.loads(path.read_text())["checkpoint"]
    values = check_guard_values(section)
    assert values["validate_initial_load"] is True and section["enable_checkpoint"] is True
    assert {"pin_memory", "persistent_workers"} <= set(tomllib.loads(path.read_text())["training"])


@pytest.mark.parametrize("path", FLAME_TOMLS, ids=lambda p: p.name)
def test_config_uses_only_options_flame_knows(path):
    """flame merges unknown TOML keys silently; a typo would be ignored, so every key must be a real option."""
    import tomllib

    cfg = parse(job_config_class(_real_flame_base()), "--job.config_file", str(path))
    known = {tuple(a.dest.split(".", 1)) for a in cfg.parser._actions if "." in a.dest}
    used = {(s, k) for s, values in tomllib.loads(path.read_text()).items() for k in values}
    assert used - known - READ_BUT_UNDEFINED == set()
    assert cfg.checkpoint.validate_initial_load is True


# ------------------------------------------------------------------- python -m flame_ext.flame.train


def test_launcher_without_flame_says_what_to_do(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flame_ext.flame.train", "--job.config_file", "x.toml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "flame is not importable" in proc.stderr


def test_install_twice_extends_once(flame_checkout):
    """install() swaps flame's names once; a second call (or a second import) changes nothing."""
    import flame.config_manager as flame_config
    import torchtitan.components.checkpoint as titan_checkpoint
    import torchtitan.components.metrics as titan_metrics

    from flame_ext.flame.train import install
    from flame_ext.titan import ValidatingCheckpointManager

    def names() -> tuple:
        return flame_config.JobConfig, titan_checkpoint.CheckpointManager, titan_metrics.build_metrics_processor

    originals = names()
    try:
        install()
        first = names()
        install()
        assert names() == first
        assert issubclass(first[1], ValidatingCheckpointManager)
        assert first[2].__wrapped__ is originals[2]  # torchtitan's own builder, wrapped once
        job_config = first[0]
        assert job_config.__mro__.count(job_config.__mro__[1]) == 1
        assert parse(job_config, "--checkpoint.validate_initial_load").checkpoint.validate_initial_load is True
    finally:
        flame_config.JobConfig, titan_checkpoint.CheckpointManager, titan_metrics.build_metrics_processor = originals
