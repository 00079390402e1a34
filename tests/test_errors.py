"""How a failed guard ends a process: ``python -m flame_ext.flame.train`` (through ``run_guarded``) and flame's
patched ``train.py`` (the error uncaught, as flame leaves it) both exit 1 and print the report once, without a
traceback."""

from __future__ import annotations

import subprocess
import sys

from flame_ext.errors import InitialLoadValidationError, run_guarded
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
        "from flame_ext.errors import InitialLoadValidationError, report_without_traceback\n"
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
    other.write_text("from flame_ext.errors import report_without_traceback\nreport_without_traceback()\n1 / 0\n")
    p = subprocess.run([sys.executable, str(other)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "ZeroDivisionError" in p.stderr  # others untouched


def test_a_write_failure_behind_torchs_zip_writer_is_named_with_its_file(tmp_path):
    """Under a file size limit torch's zip writer reports ``RuntimeError: ... unexpected pos`` (the ``EFBIG`` only in
    its context, and no file name anywhere); ``naming_file`` gives the one line a rank reports: file and reason."""
    import errno
    import os
    import resource

    import torch

    from flame_ext.errors import exit_code_of, failure_reason, naming_file

    path = tmp_path / "__1_0.distcp"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with open(path, "wb") as f:
            try:
                torch.save(torch.zeros(8192), f)
            except RuntimeError as exc:
                bare = exc  # the control: what torch raises says nothing of the cause
            f.seek(0)
            try:
                with naming_file(path):
                    torch.save(torch.zeros(8192), f)
            except OSError as exc:
                named = exc
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "File too large" not in str(bare) and str(path) not in str(bare)
    assert named.errno == errno.EFBIG and named.filename == str(path)
    assert failure_reason(named) == f"{path}: {os.strerror(errno.EFBIG)}" and exit_code_of(named) == 1


def test_short_value_quotes_what_fits_on_a_line():
    from flame_ext.errors import short_value

    assert short_value(10**400) == "an integer of 401 digits"  # float() of it overflows; str() of it is 401 chars
    assert short_value(1 << 20000).startswith("an integer of about 6020 digits")  # past Python's int-to-text limit
    assert short_value("x" * 500) == '"' + "x" * 56 + "..."
    assert (short_value([1] * 131_073), short_value({"a": 1})) == ("a list of 131,073 items", "an object of 1 field")
    assert [short_value(v) for v in ("foo", 0.5, None, True)] == ['"foo"', "0.5", "null", "true"]
