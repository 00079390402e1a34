"""How a failed guard ends a process: ``python -m flame_ext.flame.train`` (through ``run_guarded``) and flame's
patched ``train.py`` (the error uncaught, as flame leaves it) both exit 1 and print the report once, without a
traceback."""

from __future__ import annotations

import gc
import subprocess
import sys

from flame_ext.errors import InitialLoadValidationError
from flame_ext.process import collector_paused, resume_collector, run_guarded
from flame_ext.report import Problem, Report

REPORT = Report(problems=[Problem("loss_gap", "error", None, "step-0 loss 4.1 vs HF reference 1.8", "diagnose it")])


def _fail(_args) -> int:
    raise InitialLoadValidationError("initial load of step-0 failed validation:\n" + REPORT.render_text(), REPORT)


def test_run_guarded_exits_1_with_the_report(capsys):
    assert run_guarded(_fail, None, debug=False, prog="flame_ext.flame.train") == 1
    err = capsys.readouterr().err
    assert err.startswith("flame_ext.flame.train: InitialLoadValidationError: initial load of step-0 failed")
    assert err.count("verdict: FAILED (1 error, 0 warnings)") == 1 and "Traceback" not in err


def test_an_uncaught_guard_error_prints_the_report_without_a_traceback(tmp_path):
    """As in flame's patched train.py: the error passes through torch elastic's ``@record`` and torchtitan
    (0.3 wraps it in ``CheckpointException``), then reaches the interpreter."""
    script = tmp_path / "train.py"
    script.write_text(
        "from flame_ext.errors import InitialLoadValidationError\n"
        "from flame_ext.process import report_without_traceback\n"
        "from flame_ext.report import Problem, Report\n"
        "report = Report(problems=[Problem('loss_gap', 'error', None, 'gap', 'hint')])\n"
        "report_without_traceback()\n"
        "try:\n"
        "    raise InitialLoadValidationError('initial load failed validation:\\n' + report.render_text(), report)\n"
        "except InitialLoadValidationError as exc:\n"
        "    raise BaseException('CheckpointException: load failed') from exc\n"
    )
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and p.stderr.count("verdict: FAILED") == 1, p.stderr
    assert p.stderr.startswith("flame_ext.guard.InitialLoadValidationError: initial load failed validation")
    other = tmp_path / "other.py"
    other.write_text("from flame_ext.process import report_without_traceback\nreport_without_traceback()\n1 / 0\n")
    p = subprocess.run([sys.executable, str(other)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "ZeroDivisionError" in p.stderr  # others untouched


def test_the_collector_is_paused_for_a_block_and_on_again_after_it_with_nothing_frozen():
    """In a caller's process (a test, ``cli.main``): paused, then on again, and every object stays collectable."""
    frozen = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        resume_collector()  # where a command's plan is made
        assert gc.isenabled()
        resume_collector()  # a second resume does nothing
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_a_collector_the_caller_switched_off_stays_off():
    gc.disable()
    try:
        with collector_paused():
            resume_collector()
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_command_that_is_its_process_freezes_what_its_start_up_made():
    code = (
        "import gc\n"
        "from flame_ext.process import collector_paused, command_is_the_process, resume_collector\n"
        "command_is_the_process()\n"
        "with collector_paused():\n"
        "    made = [[i] for i in range(1000)]\n"
        "    resume_collector()\n"
        "    print(gc.isenabled(), gc.get_freeze_count() >= 1000)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
