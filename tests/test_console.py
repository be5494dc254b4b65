"""runtime/console.py: what every CLI prints besides its own output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter (torch not imported yet, as in a CLI): quiet_libraries, then a warning on the logger torch's
# pytree registrations use (torchao's `register_constant` notices come through it when it is imported).
PROBE = """
import logging, sys
from runtime.console import quiet_libraries
quiet_libraries(verbose=sys.argv[1] == "verbose")
import torch
logging.getLogger("torch.utils._pytree").warning("probe: register_constant is deprecated")
logging.getLogger("torch.export").warning("probe: torch.export notice")
"""


def _stderr(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_torch_log_warnings_quiet_unless_verbose():
    """Importing torch resets its loggers to WARNING; quiet_libraries must still hold after that import."""
    assert "probe" not in _stderr("quiet")
    verbose = _stderr("verbose")
    assert "probe: register_constant" in verbose and "probe: torch.export notice" in verbose


def _parsers():
    from export.cli import build_parser as export_parser
    from pruner_core.viz import build_parser as viz_parser
    from runtime.bench import build_parser as bench_parser
    from runtime.cli import build_parser as run_parser
    from runtime.evaluate import build_parser as eval_parser

    return {"pruner-export": export_parser(), "pruner-run": run_parser(), "pruner-bench": bench_parser(),
            "pruner-eval": eval_parser(), "pruner-viz": viz_parser()}


def test_every_option_has_help_and_shows_its_default():
    parsers = _parsers()
    bare = [f"{name} {action.option_strings[-1]}" for name, parser in parsers.items() for action in parser._actions
            if action.option_strings and not (action.help or "").strip()]
    assert not bare, f"options without help text: {bare}"
    shown = {name: " ".join(parser.format_help().split()) for name, parser in parsers.items()}
    assert "(default: vlm_pruner,dart,divprune,fastv,visionzip,random)" in shown["pruner-viz"]  # not a tuple
    assert "(default: fp32)" in shown["pruner-viz"]
    assert "sampling seed (with --temperature > 0) (default: 0)" in shown["pruner-run"]  # 0 is a default too
    assert "(default: executorch,onnx)" in shown["pruner-bench"] and "(default: 5)" in shown["pruner-bench"]
    assert "(default: 8)" in shown["pruner-eval"] and "tiny-qwen2-vl" in shown["pruner-eval"]
    export = shown["pruner-export"]
    assert "(default: executorch)" in export and "(default: vlm_pruner)" in export
    assert "(LLaVA-1.5, Qwen2-VL, Qwen2.5-VL) to ExecuTorch and/or ONNX" in export and "448 = 448x448" in export and "672x672" in export


def test_generated_text_on_a_terminal_cannot_drive_it():
    """Control characters in a model's answer are shown escaped on a terminal (newlines and tabs kept), and passed
    through unchanged to a pipe or file."""
    import io

    from runtime.cli import token_printer
    from runtime.console import escape_controls

    answer = "a\x1b[2Jb\rc\bd\x07\x9b\u202ee\nf\tg é 👨\u200d👩\u200d👧"
    assert escape_controls(answer) == "a\\x1b[2Jb\\rc\\x08d\\x07\\x9b\\u202ee\nf\tg é 👨\u200d👩\u200d👧"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        show = token_printer(stream)
        for piece in (answer[:3], answer[3:]):
            show(piece)
    assert terminal.getvalue() == escape_controls(answer) and pipe.getvalue() == answer


def test_device_notes_say_what_runs_where():
    from runtime.devices import resolve_executorch_backend, resolve_onnx_providers

    assert resolve_onnx_providers("cpu").note == "running on the CPU (CPUExecutionProvider), as device cpu asks"
    xnnpack = resolve_executorch_backend(["XnnpackBackend"], "cpu", registered={"XnnpackBackend": True})
    assert xnnpack.note == "running on the CPU through XnnpackBackend (device cpu)"


# A fresh interpreter writes, straight to file descriptor 2 as C++ libraries do, two native notices, a native error
# and a streamed answer in pieces without a newline, inside native_notices_filtered; then one notice after it.
NATIVE_PROBE = """
import os, sys
from runtime.console import native_notices_filtered
with native_notices_filtered(verbose=sys.argv[1] == "verbose"):
    os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\\n")
    os.write(2, b"[OpenvinoBackend.cpp:98] OpenVINO: runtime loaded successfully from 'x.so'\\n")
    os.write(2, b"[method.cpp:12] Error: something real\\n")
    for piece in ("one", " [two]", " three"):
        sys.stderr.write(piece)
        sys.stderr.flush()
    os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file")
os.write(2, b"\\n[cpuinfo_utils.cpp:99] after the block\\n")
"""


def _native_stderr(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", NATIVE_PROBE, mode], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr.decode()


def test_native_notices_are_dropped_and_everything_else_kept_in_order():
    shown = _native_stderr("quiet")
    assert "Reading file" not in shown and "runtime loaded" not in shown and "Failed to open midr" not in shown
    assert shown.index("[method.cpp:12] Error: something real\n") < shown.index("one [two] three")
    assert "[cpuinfo_utils.cpp:99] after the block" in shown  # only inside the block
    verbose = _native_stderr("verbose")
    assert "Reading file" in verbose and "runtime loaded" in verbose and "one [two] three" in verbose


ENTRY_PROBE = """
import atexit, gc, sys, tempfile
from runtime.console import run_program
folder = tempfile.TemporaryDirectory()  # cleaned by its finalizer at exit, frozen or not
print(folder.name)
def main():
    print("frozen while main runs:", gc.get_freeze_count())
    return 3
code = run_program(main)
print("frozen after:", gc.get_freeze_count() > 0, "collector on:", gc.isenabled())
sys.exit(code)
"""


def test_console_entry_points_skip_the_exit_collection_and_keep_the_exit_code():
    """Every console script goes through run_program (pyproject.toml names each module's console_main): main()'s
    exit code, then the objects frozen so the interpreter's final collections do not scan them; finalizers still
    run at exit (a TemporaryDirectory is removed)."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and all(target.endswith(":console_main") for target in scripts.values()), scripts
    for target in scripts.values():
        module = (ROOT / target.split(":")[0].replace(".", "/")).with_suffix(".py").read_text()
        assert "def console_main() -> int:\n" in module and "return run_program(main)" in module, target
    done = subprocess.run([sys.executable, "-c", ENTRY_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    folder, during, after = done.stdout.splitlines()
    assert during == "frozen while main runs: 0"
    assert after == "frozen after: True collector on: True"
    assert not Path(folder).exists()


PIPE_PROBE = """
import sys
from runtime.console import run_program
def main():
    print("first", flush=True)
    sys.stdin.readline()  # the reader has closed its end by now
    for _ in range(1000):
        print("more output than the closed pipe takes")
    return 0
sys.exit(run_program(main))
"""


def test_a_reader_that_stops_early_ends_the_command_without_a_traceback():
    """`pruner-run ... | head -1`: the output's reader closes the pipe while the command still prints; the command
    ends with 141 (128 + SIGPIPE, as a shell reports it) and says nothing (it was a BrokenPipeError traceback, and
    then Python's "Exception ignored" when the interpreter flushed stdout at exit)."""
    child = subprocess.Popen([sys.executable, "-c", PIPE_PROBE], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "first\n"
    child.stdout.close()  # head -1 has its line and exits
    _, err = child.communicate("go on\n", timeout=120)
    assert child.returncode == 141, err
    assert err == ""


def test_ctrl_c_ends_a_command_with_one_line():
    """Ctrl-C in a command whose main does not answer it (pruner-run, pruner-bench, pruner-viz, pruner-demo): one
    line naming the command and 130 (128 + SIGINT), as pruner-export and pruner-eval say it; no traceback."""
    probe = ("import sys\nfrom runtime.console import run_program\nsys.argv[0] = '/venv/bin/pruner-run'\n"
             "def main():\n    raise KeyboardInterrupt\nsys.exit(run_program(main))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr, done.stdout) == (130, "pruner-run: interrupted\n", "")


TERM_PROBE = """
import os, signal, sys, time
from runtime.console import run_program
sys.argv[0] = '/venv/bin/pruner-bench'
def main():
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # kill, timeout, a container stopping
        time.sleep(60)
        return 0
    finally:
        print("cleaned up")  # e.g. an export's staging folder removed
code = run_program(main)
print("handler restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
sys.exit(code)
"""


def test_sigterm_unwinds_a_command_through_its_clean_up():
    """SIGTERM in any console script (pruner-bench exports in-process, into --work-dir): the command unwinds
    through its ``finally`` blocks (Python's default would end the process at once, leaving an export's hidden
    .partial folder), then one line and 143 (128 + SIGTERM); the handler before it is restored."""
    done = subprocess.run([sys.executable, "-c", TERM_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (143, "pruner-bench: terminated\n")
    assert done.stdout == "cleaned up\nhandler restored: True\n"
