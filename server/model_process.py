"""Run torch work of the ServerApp in a short-lived child process, so the ServerApp never imports torch.

Python cannot unload a module: once the ServerApp process imports torch (535 MiB resident for the
CUDA wheel's libraries alone, timm another 119 MiB), every byte of it stays for the whole run,
beside the Ray workers at the simulation's memory peak. :func:`call` runs one module-level
function in a fresh ``multiprocessing`` "spawn" process (never "fork": the ServerApp hosts Ray's
and Flower's threads) and returns its result: plain Python and numpy values only, pickled back
through a pipe. The child exits after the one call, and its memory with it.

Errors never hang the ServerApp and never raise anything but :class:`ModelProcessError`: the
child's own exception comes back as its type name and text; a child that runs past ``timeout``
is killed; a child that dies without an answer (killed, out of memory) is reported with its exit
code.
"""
from __future__ import annotations

import multiprocessing
import traceback
from typing import Any, Callable

#: seconds a killed child gets to go before it is killed hard
_TERMINATE_GRACE_S = 5.0


class ModelProcessError(RuntimeError):
    """The child failed: ``error_type`` is its exception's type name (or "Timeout"/"Died")."""

    def __init__(self, error_type: str, message: str, child_traceback: str = ""):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.child_traceback = child_traceback


def _child(connection, function: Callable, args: tuple, kwargs: dict) -> None:
    try:
        result = function(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001 — everything goes back to the parent as text
        connection.send(("error", type(err).__name__, str(err)[:4000], traceback.format_exc()[-8000:]))
    else:
        connection.send(("ok", result))
    finally:
        connection.close()


def call(function: Callable, *args: Any, timeout: float, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in a fresh spawned process; its result, or ModelProcessError.

    ``function`` must be a module-level function (the child imports it by name) and its
    arguments and result picklable.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, function, args, kwargs),
                              name=f"taft-model-{getattr(function, '__name__', 'call')}", daemon=True)
    process.start()
    sender.close()  # only the child writes: EOF on the receiver once the child is gone
    try:
        if not receiver.poll(timeout):
            process.terminate()
            raise ModelProcessError("Timeout", f"{function.__name__} ran past its timeout of {timeout:.0f} s "
                                               "(round-timeout); the child process was killed")
        try:
            answer = receiver.recv()
        except EOFError:
            process.join(_TERMINATE_GRACE_S)
            raise ModelProcessError("Died", f"{function.__name__}: the child process ended without an answer "
                                            f"(exit code {process.exitcode})") from None
    finally:
        receiver.close()
        _end(process)
    if answer[0] == "error":
        raise ModelProcessError(answer[1], answer[2], answer[3])
    return answer[1]


def _end(process) -> None:
    process.join(_TERMINATE_GRACE_S)
    if process.is_alive():
        process.terminate()
        process.join(_TERMINATE_GRACE_S)
    if process.is_alive():
        process.kill()
        process.join()
    process.close()


# ----------------------------------------------------------------------------- jobs (they run in the child)

def describe_model(spec_config: dict, run_config: dict, exact_head: bool) -> dict:
    """What the ServerApp needs of w0 (and of φ with the exact head): the base digest, the
    expected Δ shapes (name -> shape) and server.exact_head.describe_features' answer or None."""
    from tangent.spec import ModelSpec, build_model

    model, base_digest = build_model(ModelSpec.from_config(spec_config), cached=False)
    shapes = {name: tuple(int(n) for n in value.shape) for name, value in model.delta_state_dict().items()}
    features = None
    if exact_head:
        from server.exact_head import describe_features

        features = describe_features(spec_config, run_config)
    return {"base_digest": base_digest, "delta_shapes": shapes, "exact_head": features}
