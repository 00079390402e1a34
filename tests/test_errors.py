"""The one-line wording of a failure (``flame_ext.errors``): a write failure named with its file, a value quoted
as a line can hold it."""

from __future__ import annotations


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
