"""The step-0 guard: check the first load of a training run before step 1 can hide what went wrong.

``options`` declares the settings and derives the hosts' forms of them, ``initial_load`` runs the checks
(from ``flame_ext.checks``) around a host's load: ``state`` reads what the load asks for and filled,
``reference`` what it is checked against, ``parity``, ``values`` and ``step0_loss`` are the checks before
and after the load (``probe`` runs the forward pass), ``metrics`` hands the figures to the host's logger,
``ranks`` makes every rank take the same verdict. Later loads: ``save_record`` records what each save wrote,
``resume`` checks a resume against it (and the buffers on every load). Hosts (``flame_ext.titan``,
``flame_ext.flame``) decide when a load is the initial one or a resume. Hosts import from here.
"""

from flame_ext.errors import GuardConfigError, InitialLoadValidationError, ResumeValidationError
from flame_ext.guard.initial_load import InitialLoadGuard
from flame_ext.guard.metrics import record_figures, record_metrics
from flame_ext.guard.options import GuardConfig, GuardOption, guard_options, host_config
from flame_ext.guard.probe import IGNORE_INDEX, LossProbe, Range, hf_loss_probe, rows_of
from flame_ext.guard.resume import LoadCapture, read_record_ahead, verify_resume
from flame_ext.guard.save_record import StepRecord, record_save, step_of
from flame_ext.guard.state import RequestedLoad, meta_copy, model_state, split_request, tied_keys

__all__ = [
    "GuardConfig",
    "GuardOption",
    "guard_options",
    "host_config",
    "GuardConfigError",
    "InitialLoadValidationError",
    "ResumeValidationError",
    "InitialLoadGuard",
    "RequestedLoad",
    "split_request",
    "meta_copy",
    "model_state",
    "hf_loss_probe",
    "LossProbe",
    "Range",
    "rows_of",
    "IGNORE_INDEX",
    "tied_keys",
    "record_metrics",
    "record_figures",
    "LoadCapture",
    "verify_resume",
    "read_record_ahead",
    "StepRecord",
    "record_save",
    "step_of",
]
