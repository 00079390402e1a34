"""Untrusted files: reading a checkpoint never runs code from it.

Each malicious input here would create a marker file if its code ran. The commands must refuse it with one
clear line and the marker must not exist afterwards; a control then shows the payload is real (the marker
does appear when the same file is loaded the unsafe way, or with ``--trust-remote-code``), so the test can fail.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.reliability._rel import HERE, diff_snapshots, snapshot

PACKAGE = HERE.parents[1] / "flame_ext"
MARK = "FLAME_EXT_UNTRUSTED_CODE_RAN"


class _Payload:
    """Pickles as ``exec(<code that writes the marker>)``: what a malicious checkpoint file carries."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write({MARK!r})"

    def __reduce__(self):
        return (exec, (self.code,))


def _assert_refused(r, *names: str) -> str:
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-1000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and len(r.err_lines) == 1, r.stderr[-3000:]
    line = r.err_lines[0]
    assert any(n in line for n in names), f"the message does not name the input ({names}): {line}"
    return line


# ---------------------------------------------------------------- pickled weights


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_malicious_pickled_weights_are_refused(layout, forkserver, small_model, small_dcp, tmp_path, figures):
    marker = tmp_path / "marker"
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(small_model / "config.json", model / "config.json")
    evil = {"model.embed_tokens.weight": _Payload(marker)}
    if layout == "single":
        bad = model / "pytorch_model.bin"
        torch.save(evil, bad)
    else:  # a good shard first, then the poisoned one, named by an index as transformers writes them
        good = model / "pytorch_model-00001-of-00002.bin"
        bad = model / "pytorch_model-00002-of-00002.bin"
        torch.save({"model.norm.weight": torch.ones(64)}, good)
        torch.save(evil, bad)
        index = {"weight_map": {"model.norm.weight": good.name, "model.embed_tokens.weight": bad.name}}
        (model / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    out.mkdir()
    for argv in (
        ["convert", "--model", model, "--checkpoint", out / "step-0", "--no-reference"],
        ["diagnose", "--checkpoint", small_dcp, "--model", model],
    ):
        line = _assert_refused(forkserver.run(*argv), bad.name)
        assert "weights_only" in line or "refused" in line, line
        assert not marker.exists(), f"{argv[0]}: the pickle's code ran"
    assert list(out.iterdir()) == []
    torch.load(bad, weights_only=False)  # control: the unsafe load does run the payload
    assert marker.read_text() == MARK
    figures.setdefault("untrusted", []).append(f"pickled .bin ({layout}) refused")


def test_malicious_dcp_metadata_is_refused(forkserver, small_dcp, small_model, tmp_path, figures):
    """``.metadata`` is a pickle, and torch's reader unpickles it without restriction: flame-ext must not."""
    marker = tmp_path / "marker"
    ckpt = Path(shutil.copytree(small_dcp, tmp_path / "ckpt"))
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    commands = [
        ["to-hf", "--checkpoint", ckpt, "--config", small_model, "--out", tmp_path / "hf"],
        ["diagnose", "--checkpoint", ckpt, "--model", small_model],
    ]
    for argv in commands:
        line = _assert_refused(forkserver.run(*argv), str(ckpt))
        assert not marker.exists(), f"{argv[0]}: the .metadata pickle ran its code"
        assert "refused" in line or "corrupt" in line, line
    assert not (tmp_path / "hf").exists()
    pickle.loads((ckpt / ".metadata").read_bytes())  # control: an unrestricted unpickler runs it
    assert marker.read_text() == MARK
    figures.setdefault("untrusted", []).append("pickled .metadata refused")


def test_malicious_tensor_record_in_a_distcp_is_refused(forkserver, small_dcp, small_model, tmp_path, figures):
    """A data file whose tensor record is a code-running pickle: torch reads records with weights_only=True."""
    from torch.distributed.checkpoint import FileSystemReader

    marker = tmp_path / "marker"
    ckpt = Path(shutil.copytree(small_dcp, tmp_path / "ckpt"))
    md = FileSystemReader(str(ckpt)).read_metadata()  # our own file, written by the converter: safe to unpickle
    # A small tensor: its record's length must still cover the chunk's bytes, or the metadata check refuses first.
    index, info = next((i, s) for i, s in md.storage_data.items() if i.fqn.endswith("model.norm.weight"))
    poisoned = tmp_path / "record.pt"
    torch.save(_Payload(marker), poisoned)
    (ckpt / info.relative_path).write_bytes(poisoned.read_bytes())
    md.storage_data[index] = type(info)(info.relative_path, 0, poisoned.stat().st_size, info.transform_descriptors)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    r = forkserver.run("to-hf", "--checkpoint", ckpt, "--config", small_model, "--out", tmp_path / "hf")
    line = _assert_refused(r, str(ckpt))
    assert "refused" in line, line
    assert not marker.exists(), "the tensor record's pickle ran its code"
    assert not (tmp_path / "hf").exists()
    torch.load(poisoned, weights_only=False)  # control
    assert marker.read_text() == MARK
    figures.setdefault("untrusted", []).append("pickled .distcp record refused")


# ---------------------------------------------------------------- remote code


def _remote_code_model(small_model: Path, folder: Path, marker: Path, *, in_tokenizer: bool = False) -> Path:
    """A model folder whose config (or tokenizer config) maps the Auto classes to Python files beside it."""
    shutil.copytree(small_model, folder)
    payload = f"open({str(marker)!r}, 'w').write({MARK!r})\n"
    if in_tokenizer:
        (folder / "tokenization_evil.py").write_text(
            payload + "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
        )
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"auto_map": {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}})
        )
        return folder
    (folder / "configuration_evil.py").write_text(
        payload + "from transformers import Olmo2Config\n\nclass EvilConfig(Olmo2Config):\n    model_type = 'evil'\n"
    )
    (folder / "modeling_evil.py").write_text(payload + "from transformers import Olmo2ForCausalLM as EvilForCausalLM\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil",
        architectures=["EvilForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _remote_code_commands(model: Path, dcp: Path, out: Path) -> dict[str, tuple[list, str]]:
    return {
        "convert": (["convert", "--model", model, "--checkpoint", out / "step-0", "--no-reference"], "flame_ext.cli"),
        "to-hf": (["to-hf", "--checkpoint", dcp, "--config", model, "--out", out / "hf"], "flame_ext.cli"),
        "diagnose": (["diagnose", "--checkpoint", dcp, "--model", model], "flame_ext.cli"),
        "reference": (["reference", "--model", model, "--out", out / "ref.json"], "flame_ext.cli"),
        "drop-in convert": (["--model", model, "--checkpoint", out / "step-0"], "flame_ext.convert_hf_to_dcp"),
        "drop-in diagnose": (["--checkpoint", dcp, "--model", model], "flame_ext.diagnose_checkpoint"),
    }


def test_remote_code_never_runs_without_the_flag(forkserver, small_model, small_dcp, tmp_path, figures):
    marker = tmp_path / "marker"
    model = _remote_code_model(small_model, tmp_path / "evil-model", marker)
    out = tmp_path / "out"
    out.mkdir()
    commands = _remote_code_commands(model, small_dcp, out)
    before = snapshot(tmp_path)
    for name, (argv, module) in commands.items():
        r = forkserver.run(*argv, module=module)
        assert not marker.exists(), f"{name}: the model's own code ran without --trust-remote-code"
        assert r.returncode != 0, f"{name} went ahead with a model it cannot build without its code"
        if name != "reference":  # see test_reference_refuses_remote_code_in_one_line
            line = _assert_refused(r, str(model))
            assert "trust-remote-code" in line or "trust_remote_code" in line, f"{name}: {line}"
    assert not diff_snapshots(before, snapshot(tmp_path))
    # Control: with the flag, the same folder's code does run (whatever the command makes of it afterwards).
    forkserver.run(
        "convert", "--model", model, "--checkpoint", out / "trusted", "--no-reference", "--trust-remote-code"
    )
    assert marker.exists(), "control failed: the test model's code does not run even when trusted"
    figures.setdefault("untrusted", []).append(f"remote code never ran, {len(commands)} commands")


def test_reference_refuses_remote_code_in_one_line(forkserver, small_model, small_dcp, tmp_path):
    model = _remote_code_model(small_model, tmp_path / "evil-model", tmp_path / "marker")
    argv, module = _remote_code_commands(model, small_dcp, tmp_path)["reference"]
    line = _assert_refused(forkserver.run(*argv, module=module), str(model))
    assert "trust-remote-code" in line or "trust_remote_code" in line, line


def test_tokenizer_remote_code_never_runs_without_the_flag(forkserver, small_model, tmp_path, figures):
    """A tokenizer config mapping AutoTokenizer to a Python file: the conversion's reference step loads the
    tokenizer; without the flag the file is never imported (the tokenizer loads from its data files, or the
    run is refused in one line)."""
    marker = tmp_path / "marker"
    model = _remote_code_model(small_model, tmp_path / "evil-tok", marker, in_tokenizer=True)
    r = forkserver.run("convert", "--model", model, "--checkpoint", tmp_path / "step-0")
    assert not marker.exists(), "the tokenizer's own code ran without --trust-remote-code"
    if r.returncode != 0:
        line = _assert_refused(r, str(model))
        assert "trust-remote-code" in line or "trust_remote_code" in line or "tokenizer" in line, line
        assert not (tmp_path / "step-0").exists()
    forkserver.run("convert", "--model", model, "--checkpoint", tmp_path / "trusted", "--trust-remote-code")
    assert marker.exists(), "control failed: the tokenizer's code does not run even when trusted"
    figures.setdefault("untrusted", []).append("tokenizer remote code never ran")


# ---------------------------------------------------------------- the manifest is data


def _hostile_manifest(ckpt: Path, outside: Path, marker: Path) -> list[str]:
    """Fill the manifest's free-text fields with code and with paths that lead out of the checkpoint folder."""
    code = f"__import__('os').system('touch {marker}')"
    manifest = json.loads((ckpt / "flame_ext.json").read_text())
    manifest["source"].update(model=code, path=str(outside / "secret.txt"), revision="$(touch " + str(marker) + ")")
    manifest["tool_version"] = code
    # (A field the schema does not declare, say {"hook": {"on_load": code}}, is refused before anything reads the
    # rest: tests/io/test_manifest_schema.py. The hostile values here sit in declared fields, so they are read.)
    ids = [[(7 * i) % 250 for i in range(33)]]
    manifest["reference"] = {
        "token_ids": ids,
        "seq_len": 33,
        "loss_mean": 5.5,
        "loss_per_token": [[5.5] * 32],
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "text": str(outside / "secret.txt"),
        "transformers_version": code,
        "torch_version": "../outside/secret.txt",
    }
    (ckpt / "flame_ext.json").write_text(json.dumps(manifest))
    return [str(outside), "../outside", "outside/secret.txt"]


def _audit_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_manifest_is_read_as_data(forkserver, small_dcp, small_model, tmp_path, figures):
    """Code in a manifest is never run and paths in it are never opened, by diagnose or by the guard."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for flame-ext")
    marker = tmp_path / "marker"
    ckpt = Path(shutil.copytree(small_dcp, tmp_path / "ckpt"))
    _hostile_manifest(ckpt, outside, marker)
    runs = {
        "diagnose --loss": dict(argv=["diagnose", "--checkpoint", ckpt, "--model", small_model, "--loss", "--json"]),
        "guard": dict(argv=[ckpt, small_model], script=str(HERE / "guard_reads_manifest.py")),
    }
    for name, spec in runs.items():
        audit = tmp_path / f"audit-{name.split()[0]}.jsonl"
        r = forkserver.run(*spec["argv"], script=spec.get("script"), audit=audit, cwd=ckpt)
        assert r.returncode in (0, 1, 2) and "Traceback" not in r.stderr, f"{name}: {r.stderr[-3000:]}"
        events = _audit_events(audit)
        assert any(e["event"] == "open" and "flame_ext.json" in e["detail"] for e in events), (
            f"{name}: never read the manifest"
        )
        opened_outside = [
            e["detail"]
            for e in events
            if e["event"] == "open"
            and (str(outside) in e["detail"] or (ckpt / e["detail"]).resolve().is_relative_to(outside))
        ]
        assert not opened_outside, f"{name} opened a path named in the manifest: {opened_outside}"
        ran = [
            e
            for e in events
            if e["event"] in ("compile", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn")
            and str(marker) in e["detail"]
        ]
        assert not ran, f"{name} compiled or ran code from the manifest: {ran}"
        assert not marker.exists(), f"{name}: code from the manifest ran"
    figures.setdefault("untrusted", []).append("hostile manifest read as data (diagnose, guard)")


# ---------------------------------------------------------------- no unsafe loader in the package


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_package_has_no_unsafe_loader():
    """Every ``torch.load`` passes ``weights_only=True``; no ``pickle.load(s)``, ``eval``, ``exec`` or ``marshal``;
    an ``Unpickler`` subclass must restrict ``find_class``. A static net under the behavioural tests above."""
    problems = []
    for file in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(file.read_text(), str(file))
        for node, name in _calls(tree):
            where = f"{file.relative_to(PACKAGE.parent)}:{node.lineno}"
            if name.endswith("torch.load"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "eval", "exec", "marshal.loads", "dill.load", "dill.loads"):
                problems.append(f"{where}: {name}(...)")
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            if any(ast.unparse(b).endswith("Unpickler") for b in cls.bases):
                if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in cls.body):
                    problems.append(f"{file.name}: {cls.name} subclasses Unpickler without restricting find_class")
    assert not problems, "\n".join(problems)
