"""Config parity at a native conversion (``convert --layout torchtitan:<module>``): a torchtitan config that
disagrees with the HF config on a rope theta (torchtitan #3772) or a head count is refused before anything is
written, one line per field naming both values; ``--allow-config-mismatch FIELD`` lets a deliberate change
through. The HF folders come from the test registry (tests/support/titan_native.py), written with their own config."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from support.cli import run_cli
from support.titan_hosts import titan_generation

from flame_ext.convert.hf_to_dcp import ConvertOptions, convert_hf_to_dcp
from flame_ext.errors import InputError

pytestmark = pytest.mark.skipif(titan_generation() != "0.3", reason="torchtitan 0.3 API (state-dict adapters)")
LAYOUT = "torchtitan:support.titan_native"
TESTS = Path(__file__).parents[1]
# A fresh interpreter finds the test registry (torchtitan imports --module support.titan_native) on its path too.
REGISTRY_ON_PATH = {"PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    from support import titan_native

    return titan_native.write_hf_folder("llama3_tiny", tmp_path_factory.mktemp("native-config") / "hf")


def edited(hf: Path, out: Path, **fields) -> Path:
    """A copy of ``hf`` whose config.json states ``fields`` (rope theta also inside a transformers-5 rope dict)."""
    shutil.copytree(hf, out)
    config = json.loads((out / "config.json").read_text())
    config.update(fields)
    for rope in ("rope_parameters", "rope_scaling"):
        if "rope_theta" in fields and isinstance(config.get(rope), dict) and "rope_theta" in config[rope]:
            config[rope]["rope_theta"] = fields["rope_theta"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def convert(hf: Path, out: Path, **kw) -> None:
    convert_hf_to_dcp(
        ConvertOptions(
            model=str(hf), checkpoint=str(out), layout=LAYOUT, titan_config="llama3_tiny", progress=False,
            reference=False, **kw,
        )
    )  # fmt: skip


def test_a_rope_theta_mismatch_is_refused_naming_both_values(llama, tmp_path):
    hf = edited(llama, tmp_path / "hf", rope_theta=1000000.0)
    with pytest.raises(InputError) as info:
        convert(hf, tmp_path / "out")
    (line,) = str(info.value).splitlines()
    assert line.startswith(
        "config mismatch: rope_theta: torchtitan:support.titan_native --titan-config llama3_tiny has 500000"
    )
    assert "1000000.0" in line and "--allow-config-mismatch rope_theta" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
def test_a_heads_mismatch_is_refused_one_line_per_field(llama, tmp_path):
    hf = edited(llama, tmp_path / "hf", num_attention_heads=8, num_key_value_heads=8, head_dim=32)
    proc = run_cli("convert", "--model", str(hf), "--checkpoint", str(tmp_path / "out"), "--layout", LAYOUT,
                   "--titan-config", "llama3_tiny", "--no-reference", env=REGISTRY_ON_PATH)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "config mismatch" in line]
    fields = {re.search(r"config mismatch: (\w+):", line).group(1) for line in lines}
    assert fields == {"num_attention_heads", "num_key_value_heads", "head_dim"}
    assert any("has 16, the HF config" in line and "has 8;" in line for line in lines)
    assert not (tmp_path / "out").exists()


def test_an_allowed_mismatch_converts(llama, tmp_path):
    hf = edited(llama, tmp_path / "hf", rope_theta=1000000.0)
    convert(hf, tmp_path / "out", allow_config_mismatch=("rope_theta",))
    assert (tmp_path / "out" / ".metadata").is_file()


@pytest.mark.slow  # commands in fresh processes (5-15 CPU-s); make test-fast leaves it out
def test_an_unknown_field_to_allow_is_one_line(llama, tmp_path):
    proc = run_cli("convert", "--model", str(llama), "--checkpoint", str(tmp_path / "out"), "--layout", LAYOUT,
                   "--titan-config", "llama3_tiny", "--allow-config-mismatch", "rope_thetta",
                   env=REGISTRY_ON_PATH)  # fmt: skip
    assert proc.returncode == 2 and "--allow-config-mismatch rope_thetta: not a field" in proc.stderr
