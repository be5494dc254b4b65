"""Lowering a program's methods in two processes at once.

ExecuTorch's lowering (``to_edge_transform_and_lower``: decompositions, edge passes, partitioning, XNNPACK's
per-partition passes and serialisation) is single-threaded Python and handles each method on its own, so the
methods of one program can be lowered side by side. The traced methods reach a forked child as they are (copy on
write, nothing serialised); the child lowers its share and hands the edge programs back through ExecuTorch's own
edge-program serde (``executorch.exir.serde``: graphs, delegates with their processed bytes and named data,
weights), and the parent assembles every method into one ``EdgeProgramManager`` to write as usual. The written
program is byte-identical to a one-process lowering (tested).

Measured on the demo export (tiny-llava, layer 2, keep 0.12; 2 cores): vision_encoder 20.7 s and text_decoder +
token_embedding 19.8 s lowered apart, the serde round trip 1.7 s (benchmarks/export_time.py).

When it applies (``second_process_methods``): Linux (fork; macOS forks badly under its system frameworks), two or
more usable CPUs, weights of at most ``PARALLEL_MAX_WEIGHT_BYTES`` (the serde carries named data as base64 JSON,
and a full-size model needs its memory for one lowering), and a method that the serde can carry: exir's serde
cannot serialise control flow (the selection's ``scan`` stays in the parent).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from typing import Any, Callable

import torch

from .lowering import _held_bytes

PARALLEL_MAX_WEIGHT_BYTES = 256 << 20  # weights above this: one process (memory, serde cost)

RAISED_AS_THEMSELVES = {"ValueError": ValueError, "MemoryError": MemoryError}
LowerFn = Callable[[dict, dict], Any]  # (traced programs, constant methods) -> EdgeProgramManager


class LoweringProcessError(RuntimeError):
    """The second lowering process failed or ended without a result."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def has_control_flow(program: torch.export.ExportedProgram) -> bool:
    """Whether ``program`` calls a higher-order operator (scan, cond, while_loop, map): exir's serde cannot carry
    those."""
    return any(node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
               for node in program.graph_module.graph.nodes)


def _weight_bytes(programs: dict[str, torch.export.ExportedProgram]) -> int:
    """Bytes of every program's state dict and constants, each tensor once (methods share the decoder's)."""
    seen: dict[int, int] = {}
    for program in programs.values():
        for tensor in [*program.state_dict.values(), *program.constants.values()]:
            if isinstance(tensor, torch.Tensor):
                seen[id(tensor)] = _held_bytes(tensor)
    return sum(seen.values())


def second_process_methods(programs: dict[str, torch.export.ExportedProgram], jobs: int) -> list[str]:
    """The methods to lower in a second process, or [] to lower all in this one (see the module docstring for
    when). The second process gets every method without control flow, except that when all are movable the one with
    the most nodes stays here."""
    if jobs < 2 or sys.platform != "linux" or usable_cpus() < 2 or len(programs) < 2:
        return []
    if _weight_bytes(programs) > PARALLEL_MAX_WEIGHT_BYTES:
        return []
    movable = [name for name, program in programs.items() if not has_control_flow(program)]
    if len(movable) == len(programs):
        movable.remove(max(movable, key=lambda name: len(programs[name].graph_module.graph.nodes)))
    return movable


def _lower_and_send(programs: dict, lower: LowerFn, sender) -> None:  # noqa: ANN001 - a multiprocessing Connection
    """The child: lower ``programs`` and send ("ok", {method: serialised edge program}) or ("error", exception
    class name, message, traceback text). The parent stops it with SIGKILL; Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)  # the parent's thread pool does not survive fork; lowering computes little
    try:
        from executorch.exir.serde.serialize import serialize

        edge = lower(programs, {})
        message: tuple = ("ok", {name: serialize(edge.exported_program(name)) for name in edge.methods})
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent
        message = ("error", type(error).__name__, str(error), traceback.format_exc())
    sender.send(message)
    sender.close()


def _raise_child_error(names: list[str], kind: str, text: str, trace: str) -> None:
    """Raise the child's exception here: ValueError (a problem the options can fix: the CLI shows it as it would
    from this process) and MemoryError as themselves, anything else as LoweringProcessError with its traceback."""
    if kind in RAISED_AS_THEMSELVES:
        raise RAISED_AS_THEMSELVES[kind](text)
    raise LoweringProcessError(
        f"lowering {', '.join(names)} in a second process failed: {kind}: {text}\n{trace}"
        "(export with --jobs 1 to lower every method in one process)"
    )


def lower_in_two_processes(programs: dict[str, torch.export.ExportedProgram], second: list[str], lower: LowerFn,
                           constants: dict[str, Any]):
    """Lower the methods ``second`` in a forked child and the rest here, with ``lower(programs, constant_methods)``
    (each side a ``to_edge_transform_and_lower`` of its share; the constant methods go with this side), and return
    one ``EdgeProgramManager`` with every method in the order of ``programs``.

    Raises the child's exception (see ``_raise_child_error``), or LoweringProcessError when the child ends without a
    result (killed, out of memory). The child is killed if this side fails or is interrupted."""
    from executorch.exir import EdgeCompileConfig, EdgeProgramManager
    from executorch.exir.serde.serialize import deserialize

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    there = {name: programs[name] for name in second}
    here = {name: program for name, program in programs.items() if name not in there}
    child = context.Process(target=_lower_and_send, args=(there, lower, sender), name="lowering", daemon=True)
    child.start()
    sender.close()
    try:
        edge = lower(here, constants)
        try:
            message = receiver.recv()
        except EOFError:
            child.join(timeout=10)
            raise LoweringProcessError(
                f"the process lowering {', '.join(second)} ended without a result (exit code {child.exitcode}; "
                "-9 is a kill, often for memory): export with --jobs 1 to lower every method in one process"
            ) from None
        child.join(timeout=60)  # it exits once the message is read
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()
    if message[0] != "ok":
        _raise_child_error(second, *message[1:])
    lowered = {name: edge.exported_program(name) if name in here else deserialize(message[1][name])
               for name in programs}
    return EdgeProgramManager(lowered, constant_methods=constants,
                              compile_config=EdgeCompileConfig(_check_ir_validity=False))
