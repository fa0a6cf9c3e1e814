"""Run torch work of the ServerApp in a short-lived child process, so the ServerApp never imports torch.

Python cannot unload a module: once the ServerApp process imports torch (535 MiB resident for the
CUDA wheel's libraries alone, timm another 119 MiB), every byte of it stays for the whole run,
beside the Ray workers at the simulation's memory peak. :func:`call` runs one module-level
function in a fresh Python process (never a fork: the ServerApp hosts Ray's and Flower's threads)
and returns its result: plain Python and numpy values only, pickled back. The child exits after
the one call, and its memory with it.

Errors never hang the ServerApp and never raise anything but :class:`ModelProcessError`: the
child's own exception comes back as its type name and text; a child that runs past ``timeout``
is killed; a child that dies without an answer (killed, out of memory) is reported with its exit
code.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

#: seconds a child gets to exit after its answer (or after it was told to stop) before it is killed
_TERMINATE_GRACE_S = 5.0


class ModelProcessError(RuntimeError):
    """The child failed: ``error_type`` is its exception's type name (or "Timeout"/"Died")."""

    def __init__(self, error_type: str, message: str, child_traceback: str = ""):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.child_traceback = child_traceback


def call(function: Callable, *args: Any, timeout: float, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in a fresh Python process; its result, or ModelProcessError.

    ``function`` must be a module-level function (the child imports it by name) and its
    arguments and result picklable. The child is ``python -m server.model_process``, not a
    ``multiprocessing`` child: those import the parent's ``__main__`` again (in a simulation the
    ``flwr-simulation`` script, hence Flower and Ray: hundreds of MiB for nothing). The call goes
    in on the child's stdin, the answer comes back in a file of a private temporary directory;
    the child's stdout and stderr are the parent's (its log lines land in the run's log).
    """
    request = pickle.dumps((function, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    name = getattr(function, "__name__", "call")
    directory = Path(tempfile.mkdtemp(prefix="taft-model-process-"))  # 0700
    answer_path = directory / "answer.pickle"
    # the child finds what this process finds (Flower puts the app's directory on sys.path)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        process = subprocess.Popen([sys.executable, "-m", "server.model_process", str(answer_path)],
                                   stdin=subprocess.PIPE, env=env)
        try:
            try:
                process.stdin.write(request)
                process.stdin.close()
            except BrokenPipeError:
                pass  # the child is gone already: its exit code says more
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _end(process)
            raise ModelProcessError("Timeout", f"{name} ran past its timeout of {timeout:.0f} s (round-timeout); "
                                               "the child process was killed") from None
        finally:
            _end(process)
        if not answer_path.exists():
            raise ModelProcessError("Died", f"{name}: the child process ended without an answer "
                                            f"(exit code {process.returncode})")
        with answer_path.open("rb") as handle:
            answer = pickle.load(handle)  # written by our own child, in our own private directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if answer[0] == "error":
        raise ModelProcessError(answer[1], answer[2], answer[3])
    return answer[1]


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(_TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _child(answer_path: str) -> None:
    """The child's side: one call read from stdin, its answer (or error) pickled to ``answer_path``."""
    try:
        function, args, kwargs = pickle.loads(sys.stdin.buffer.read())
        answer = ("ok", function(*args, **kwargs))
    except BaseException as err:  # noqa: BLE001 — everything goes back to the parent as text
        answer = ("error", type(err).__name__, str(err)[:4000], traceback.format_exc()[-8000:])
    temporary = f"{answer_path}.tmp"
    with open(temporary, "wb") as handle:
        pickle.dump(answer, handle, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(temporary, answer_path)  # complete or absent: a child killed mid-write leaves no answer


# ----------------------------------------------------------------------------- jobs (they run in the child)

def describe_model(spec_config: dict, run_config: dict, exact_head: bool) -> dict:
    """What the ServerApp needs of w0 (and of φ with the exact head): the base digest, the
    expected Δ shapes (name -> shape) and server.exact_head.describe_features' answer or None."""
    from tangent.protocol.spec import ModelSpec, build_model

    model, base_digest = build_model(ModelSpec.from_config(spec_config), cached=False)
    shapes = {name: tuple(int(n) for n in value.shape) for name, value in model.delta_state_dict().items()}
    features = None
    if exact_head:
        from server.exact_head import describe_features

        features = describe_features(spec_config, run_config)
    return {"base_digest": base_digest, "delta_shapes": shapes, "exact_head": features}


if __name__ == "__main__":
    _child(sys.argv[1])
