"""Tracing and lowering a program's methods in two processes at once.

ExecuTorch's lowering (``to_edge_transform_and_lower``: decompositions, edge passes, partitioning, XNNPACK's
per-partition passes and serialisation) is single-threaded Python and handles each method on its own, and so does
``torch.export``: the methods of one program can be traced and lowered side by side. A forked child gets the
methods' modules as they are (copy on write, nothing serialised), traces and lowers its share and hands the edge
programs back through ExecuTorch's own edge-program serde (``executorch.exir.serde``: graphs, delegates with their
processed bytes and named data, weights); the parent assembles every method into one ``EdgeProgramManager`` to
write as usual. The written program is byte-identical to a one-process export (tested).

Measured on the demo export (tiny-llava, layer 2, keep 0.12; this 2-core VM): vision_encoder 17.7 s and
text_decoder + token_embedding 18.4 s lowered side by side (20.7 s and 19.8 s one after the other, alone on the
machine: two processes on its two cores each run slower), the serde round trip 1.7 s; README.md "Export time".

When it applies (``second_process_methods``): Linux (fork; macOS forks badly under its system frameworks), two or
more usable CPUs, weights of at most ``PARALLEL_MAX_WEIGHT_BYTES`` (the serde carries named data as base64 JSON,
and a full-size model needs the machine's memory for one lowering), and a method without control flow for the
child: exir's serde cannot serialise a higher-order op (the selection's ``scan`` stays in the parent, which its
``MethodPlan`` says). The child's private memory was 0.22 GiB on the demo export.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Any, Callable

import torch

from .lowering import _held_bytes
from .memory import _libc

PARALLEL_MAX_WEIGHT_BYTES = 256 << 20  # weights above this: one process (memory, serde cost)

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal this process gets when its parent dies
CHILD_POLL_SECONDS = 1.0  # how often a parent waiting for the child's message checks that it is still alive
RAISED_AS_THEMSELVES = {"ValueError": ValueError, "MemoryError": MemoryError}
MakeEdge = Callable[[list, dict, Callable[[str], None]], Any]  # (methods, constant methods, progress) -> edge


class LoweringProcessError(RuntimeError):
    """The second lowering process failed or ended without a result."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def has_control_flow(program: torch.export.ExportedProgram) -> bool:
    """Whether ``program`` (traced or lowered) calls a higher-order operator other than a delegate call (scan,
    cond, while_loop, map): exir's serde cannot carry those."""
    return any(node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
               and node.target.name() != "executorch_call_delegate" for node in program.graph_module.graph.nodes)


def _weight_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers, each tensor once (methods share the model's)."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in module.state_dict(keep_vars=True).values():
            if isinstance(tensor, torch.Tensor):
                seen[id(tensor)] = _held_bytes(tensor)
    return sum(seen.values())


def second_process_methods(plans: list, jobs: int) -> list[str]:
    """The methods (``MethodPlan``s: ``name``, ``module``, ``control_flow``) to trace and lower in a second process,
    or [] to do all in this one (see the module docstring for when). The second process gets every method without
    control flow, except that when all are movable the first stays here."""
    if jobs < 2 or sys.platform != "linux" or usable_cpus() < 2 or len(plans) < 2:
        return []
    if _weight_bytes([plan.module for plan in plans]) > PARALLEL_MAX_WEIGHT_BYTES:
        return []
    movable = [plan.name for plan in plans if not plan.control_flow]
    return movable[1:] if len(movable) == len(plans) else movable


def _die_with_parent(parent: int) -> None:
    """This (forked) process gets SIGKILL when the thread that forked it ends, e.g. its process killed with SIGKILL
    (Linux's PR_SET_PDEATHSIG; nothing elsewhere); ends at once if ``parent`` (a pid) is already gone."""
    libc = _libc()  # None off Linux
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _make_and_send(names: list[str], make: MakeEdge, sender, parent: int) -> None:  # noqa: ANN001 - a Connection
    """The child: trace and lower the methods ``names`` and send ("ok", {method: serialised edge program}) or
    ("error", exception class name, message, traceback text). The parent (pid ``parent``) stops it with SIGKILL,
    and the kernel does if the parent dies; Ctrl-C is the parent's to handle."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)  # the parent's thread pool does not survive fork; lowering computes little
    try:
        from executorch.exir.serde.serialize import serialize

        edge = make(names, {}, lambda stage: None)
        carried = {}
        for name in edge.methods:
            program = edge.exported_program(name)
            if has_control_flow(program):
                raise RuntimeError(f"method {name} holds control flow, which exir's serde cannot carry back: its "
                                   "MethodPlan must say control_flow=True")
            carried[name] = serialize(program)
        message: tuple = ("ok", carried)
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


def _receive(receiver, child, second: list[str]) -> tuple:  # noqa: ANN001 - a Connection and a Process
    """The child's message, once it comes; LoweringProcessError as soon as the child has ended without one (killed,
    out of memory). Polls the child's exit (waitpid) every ``CHILD_POLL_SECONDS`` as well as the pipe: neither the
    pipe nor the process sentinel reports an end while another process still holds their write ends (one forked
    from the child, or by another thread of this process while the child was being started)."""
    while not receiver.poll(CHILD_POLL_SECONDS) and child.is_alive():
        pass
    if receiver.poll():  # a message comes before the child exits: it waits in send until it is read
        try:
            return receiver.recv()
        except (EOFError, OSError):  # closed, or closed part way through the message
            pass
    child.join(timeout=10)
    raise LoweringProcessError(
        f"the process lowering {', '.join(second)} ended without a result (exit code {child.exitcode}; "
        "-9 is a kill, often for memory): export with --jobs 1 to lower every method in one process"
    )


def _deserialize(artifact: Any) -> torch.export.ExportedProgram:
    """exir serde's ``deserialize``, without its warning that a dynamic dimension's symbol (``s79``) "did not appear
    in the graph": the symbol is made again from the program's range constraints (the written program is the same,
    tested), so the warning only worries a user."""
    from executorch.exir.serde.serialize import deserialize

    logger = logging.getLogger("executorch.exir.serde.export_serialize")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return deserialize(artifact)
    finally:
        logger.setLevel(level)


def lower_in_two_processes(names: list[str], second: list[str], make: MakeEdge, constants: dict[str, Any],
                           progress: Callable[[str], None]):
    """Trace and lower the methods ``second`` in a forked child and the rest of ``names`` here, each side with
    ``make(methods, constant_methods, progress)`` (a trace and a ``to_edge_transform_and_lower`` of its share; the
    constant methods and ``progress`` go with this side), and return one ``EdgeProgramManager`` with every method,
    in the order of ``names``.

    Raises the child's exception (see ``_raise_child_error``), or LoweringProcessError when the child ends without a
    result (killed, out of memory). The child is killed if this side fails or is interrupted."""
    from executorch.exir import EdgeCompileConfig, EdgeProgramManager

    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    here = [name for name in names if name not in second]
    child = context.Process(target=_make_and_send, args=(list(second), make, sender, os.getpid()), name="lowering",
                            daemon=True)
    child.start()
    sender.close()
    try:
        edge = make(here, constants, progress)
        message = _receive(receiver, child, second)
        child.join(timeout=60)  # it exits once the message is read
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join()
    if message[0] != "ok":
        _raise_child_error(second, *message[1:])
    lowered = {name: edge.exported_program(name) if name in here else _deserialize(message[1][name])
               for name in names}
    return EdgeProgramManager(lowered, constant_methods=constants,
                              compile_config=EdgeCompileConfig(_check_ir_validity=False))
