"""What a command costs before its work: help, usage errors and package imports load none of the heavy
libraries, and a command run as its own process exits with its code and all its output but without the
interpreter's teardown (figures: bench/bench_startup.py, docs/benchmarks.md "Start-up")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "torch.distributed.checkpoint", "transformers", "safetensors", "matplotlib", "jsonschema")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120
    )


def _heavy_after(code: str) -> tuple[list[str], str]:
    """The heavy modules loaded after ``code`` runs in a fresh interpreter, and what it printed."""
    probe = _python(
        textwrap.dedent(code) + f"\nimport sys\nprint('LOADED', *[m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert probe.returncode == 0, probe.stderr
    out = probe.stdout.splitlines()
    return out[-1].split()[1:], "\n".join(out[:-1])


@pytest.mark.parametrize(
    "argv, exit_code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["convert", "--help"], 0),
        (["diagnose", "--help"], 0),
        (["convert"], 2),  # --checkpoint missing
        (["diagnose", "--checkpoint", "c", "--threshold", "abc"], 2),
        (["to-hf", "--checkpoint", "c"], 2),
        (["frobnicate"], 2),
    ],
)
def test_help_and_usage_errors_load_no_heavy_library(argv, exit_code):
    loaded, printed = _heavy_after(
        f"""
        from flame_ext.cli import main
        try:
            code = main({argv!r})
        except SystemExit as exc:  # --help, --version
            code = exc.code
        print('CODE', code)
        """
    )
    assert f"CODE {exit_code}" in printed
    assert loaded == []


def _bad_inputs(tmp_path) -> list[tuple[str, list[str], str]]:
    """(module, argv, what the one line names): inputs that are wrong before any work starts."""
    nope, ckpt = str(tmp_path / "nope"), str(tmp_path)
    return [
        ("flame_ext.cli", ["convert", "--model", nope, "--checkpoint", str(tmp_path / "out")], "nope: no such folder"),
        ("flame_ext.cli", ["to-hf", "--checkpoint", ckpt, "--config", nope, "--out", str(tmp_path / "o")], "nope"),
        ("flame_ext.cli", ["to-hf", "--checkpoint", nope, "--config", ckpt, "--out", str(tmp_path / "o")], "nope"),
        ("flame_ext.cli", ["diagnose", "--checkpoint", nope], "nope: no such folder"),
        ("flame_ext.cli", ["diagnose", "--checkpoint", ckpt, "--model", nope], "nope: no such folder"),
        ("flame_ext.cli", ["reference", "--model", nope, "--out", str(tmp_path / "r.json")], "nope"),
        ("flame_ext.convert_hf_to_dcp", ["--model", nope, "--checkpoint", str(tmp_path / "out")], "nope"),
        ("flame_ext.diagnose_checkpoint", ["--checkpoint", ckpt, "--model", nope], "nope"),
        ("flame_ext.convert_dcp_to_hf", ["--path", ckpt, "--step", "0", "--config", nope], "nope"),
        ("flame_ext.convert_dcp_to_hf", ["--path", ckpt, "--step", "7", "--config", ckpt], "step-7: no such folder"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_a_missing_input_is_refused_before_torch_is_imported(case, tmp_path):
    """A mistyped path is one line, exit 2, and torch/transformers were never imported to say so (they take
    seconds to import; the command's own checks run first)."""
    (tmp_path / "checkpoint" / "step-0").mkdir(parents=True)
    module, argv, named = _bad_inputs(tmp_path)[case]
    loaded, printed = _heavy_after(
        f"""
        import contextlib, io, sys
        from {module} import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main({argv!r})
        print('CODE', code)
        print('ERR', err.getvalue().strip())
        """
    )
    lines = printed.splitlines()
    assert lines[0] == "CODE 2"
    assert lines[1].startswith("ERR ") and named in lines[1] and len(lines) == 2, printed
    assert loaded == []


def test_a_flame_checkout_check_loads_no_heavy_library(tmp_path):
    loaded, printed = _heavy_after(
        f"""
        from flame_ext.cli import main
        print('CODE', main(['patch', 'check', {str(tmp_path)!r}]))
        """
    )
    assert "CODE 2" in printed  # not a flame checkout
    assert loaded == []


@pytest.mark.parametrize("package", ["flame_ext.convert", "flame_ext.titan", "flame_ext.flame", "flame_ext.cli"])
def test_importing_a_package_loads_no_heavy_library(package):
    loaded, _ = _heavy_after(f"import {package}")
    assert loaded == []


def test_the_public_conversion_names_still_import():
    loaded, printed = _heavy_after(
        "from flame_ext.convert import ConvertOptions, ToHFOptions, convert_dcp_to_hf, convert_hf_to_dcp\n"
        "print(ConvertOptions.__module__, ToHFOptions.__module__, convert_dcp_to_hf.__name__)"
    )
    assert printed == "flame_ext.command_options flame_ext.command_options convert_dcp_to_hf"
    assert "torch" in loaded


def test_a_command_process_keeps_its_code_output_threads_and_handlers_but_skips_teardown():
    done = _python(
        """
        import atexit, sys, threading, time
        from flame_ext.cli import exit_without_teardown

        class Teardown:
            def __del__(self):
                print("teardown ran", flush=True)

        def command():
            global kept
            kept = Teardown()  # collected only when the interpreter tears its modules down
            atexit.register(print, "handler ran")  # as torch and logging register theirs when imported
            threading.Thread(target=lambda: (time.sleep(0.2), print("thread done"))).start()
            sys.stdout.write("x" * 1_000_000 + "\\n")  # a pipe: block-buffered, flushed by the exit
            print("to stderr", file=sys.stderr)
            return 3

        exit_without_teardown(command)
        """
    )
    assert done.returncode == 3
    lines = done.stdout.splitlines()
    assert lines[0] == "x" * 1_000_000
    assert lines[1:] == ["thread done", "handler ran"]
    assert done.stderr == "to stderr\n"


def test_a_command_that_raises_ends_the_usual_way():
    done = _python(
        """
        from flame_ext.cli import exit_without_teardown
        def command():
            raise RuntimeError("boom")
        exit_without_teardown(command)
        """
    )
    assert done.returncode == 1
    assert "RuntimeError: boom" in done.stderr


# At the first open of a file of the command's data (written by convert and to-hf, read by diagnose --values):
# how many full collections ran before it, whether the collector is on, whether the start-up's objects are frozen.
_FIRST_DATA = """
import gc, sys
full = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and full.append(1))
seen, suffix, under = [], sys.argv[1], sys.argv[2]
def hook(event, args):
    if event == "open" and not seen and str(args[0]).endswith(suffix) and under in str(args[0]):
        seen.append(1)
        print("FIRST_DATA", len(full), gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr, flush=True)
sys.addaudithook(hook)
sys.argv[:3] = ["flame-ext"]
from flame_ext.cli import console_main
console_main()
"""


@pytest.mark.parametrize("command", ["convert", "to-hf", "diagnose --values"])
def test_a_command_starts_without_full_collections_and_handles_data_with_the_collector_on(
    command, tiny_model, tiny_dcp, tmp_path
):
    """Without the pause the start-up made 6 full collections, each walking every object its imports had made
    (0.6-0.8 CPU-s in all); the tensor data is then handled with the collector on, the start-up frozen."""
    argv = {
        "convert": [".distcp", str(tmp_path), "convert", "--model", str(tiny_model), "--checkpoint",
                    str(tmp_path / "out"), "--no-reference"],
        "to-hf": [".safetensors", str(tmp_path), "to-hf", "--checkpoint", str(tiny_dcp), "--config", str(tiny_model),
                  "--out", str(tmp_path / "hf")],
        "diagnose --values": [".distcp", str(tiny_dcp), "diagnose", "--checkpoint", str(tiny_dcp), "--values"],
    }[command]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_DATA, *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    first = [line.split()[1:] for line in done.stderr.splitlines() if line.startswith("FIRST_DATA")]
    assert first == [["0", "True", "True"]], done.stderr
