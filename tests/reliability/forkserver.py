"""A fork server for the reliability tests: pay the torch + transformers import once, then fork a child per run.

Every reliability case is a whole command run (``python -m flame_ext.cli ...``, a drop-in module, or a helper
script such as one rank of a two-rank job) whose exit code, stdout and stderr are checked, and many cases kill
the run part-way. A fresh interpreter costs 3-4 s of imports on the CI machine before the command does anything,
which would put the ~150 runs of this suite far over its time budget and would make the kill points mostly land
in ``import torch``. So this server imports the
heavy modules once and forks; each child then behaves like ``python -m MODULE ARGS``: its own process id, its
own stdout/stderr files, its own environment and resource limits, and the exit status the interpreter would give
(``SystemExit`` code, 1 and a traceback for an uncaught exception, death by SIGINT for an uncaught
``KeyboardInterrupt``). A few cases still run as ordinary subprocesses to show the two agree.

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.
  {"op": "spawn", "module": M | "script": PATH, "argv": [...], "stdout": F, "stderr": F, "cwd": D,
   "env": {...}, "fsize": BYTES | null, "audit": F | null}              -> {"pid": N}
  {"op": "wait", "pid": N, "timeout": S}                                  -> {"pid": N, "returncode": RC}
  RC follows ``subprocess``: the exit code, or minus the signal number that ended the child.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import signal
import sys
import time
import traceback

PRELOAD = (
    "torch",
    "safetensors.torch",
    "torch.distributed.checkpoint",
    "transformers",
    "flame_ext.cli",
    "flame_ext.convert",
    "flame_ext.io.hf",
    "flame_ext.io.dcp",
    "flame_ext.io.dcp_save",
    "flame_ext.io.manifest",
    "flame_ext.model.reference_loss",
    "flame_ext.commands.reference",
    "flame_ext.convert_hf_to_dcp",
    "flame_ext.convert_dcp_to_hf",
)
# Imported when present: other parts of the project, and the installed torchtitan (for the guard's ranks).
OPTIONAL = (
    "flame_ext.commands.diagnose",
    "flame_ext.diagnose_checkpoint",
    "flame_ext.checks.keys",
    "flame_ext.checks.nonpersistent_buffers",
    "flame_ext.guard",
    "torchtitan.components.optimizer",
    "torchtitan.components.lr_scheduler",
    "torchtitan.components.ft",
    "torchtitan.config_manager",
)


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
        except Exception:  # absent or broken: the child will import it (and fail) as a real run would
            pass
    # transformers resolves model classes lazily; load the ones the tests build.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Olmo2ForCausalLM  # noqa: F401

    try:
        pass
    except Exception:
        pass


def _audit_to(path: str) -> None:
    """Record every file opened and every code compiled/executed in this child (Python audit hooks)."""
    log = open(path, "w", buffering=1)  # noqa: SIM115 - lives until the child exits
    busy = False

    def hook(event: str, args: tuple) -> None:
        nonlocal busy
        if busy or event not in (
            "open",
            "compile",
            "exec",
            "os.system",
            "subprocess.Popen",
            "os.exec",
            "os.posix_spawn",
        ):
            return
        busy = True
        try:
            if event == "open":
                detail = str(args[0])
            elif event == "compile":
                src = args[0]
                detail = (src.decode(errors="replace") if isinstance(src, bytes) else str(src))[:500] + f" @ {args[1]}"
            else:
                detail = repr(args)[:500]
            log.write(json.dumps({"event": event, "detail": detail}) + "\n")
        finally:
            busy = False

    sys.addaudithook(hook)


def _child(cmd: dict) -> None:
    """Become the command: redirect output, apply environment and limits, run it, exit like the interpreter."""
    code = 1
    try:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(cmd[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(cmd.get("cwd") or os.getcwd())
        os.environ.update(cmd.get("env") or {})
        if cmd.get("fsize") is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["fsize"], cmd["fsize"]))
        if cmd.get("audit"):
            _audit_to(cmd["audit"])
        if cmd.get("script"):
            sys.argv = [cmd["script"], *cmd["argv"]]
            runpy.run_path(cmd["script"], run_name="__main__")
        else:
            sys.argv = [cmd["module"], *cmd["argv"]]
            sys.modules.pop(cmd["module"], None)  # `python -m M` runs M fresh as __main__, not the preloaded copy
            runpy.run_module(cmd["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the interpreter re-raises SIGINT on itself
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return -9
        time.sleep(0.005)


def main() -> None:
    preload()
    reply = sys.stdout
    reply.write(json.dumps({"ready": os.getpid()}) + "\n")
    reply.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "spawn":
            _flush()
            pid = os.fork()
            if pid == 0:
                _child(cmd)
            reply.write(json.dumps({"pid": pid}) + "\n")
        elif cmd["op"] == "wait":
            reply.write(
                json.dumps({"pid": cmd["pid"], "returncode": _wait(cmd["pid"], cmd.get("timeout", 120))}) + "\n"
            )
        reply.flush()


if __name__ == "__main__":
    main()
