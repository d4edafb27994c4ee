"""How a command ends: its JSON document (printed and --report) and the process's exit.

The console command skips the interpreter's teardown (matclust.cli.run); these tests check,
in real subprocesses, that nothing a normal exit does is lost: the exit code, everything
printed, the atexit handlers, and threads still running.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from matclust.cli import json_text


def test_json_text_is_the_document_with_each_listed_object_on_a_line():
    stats = [{"id": i, "size": i + 1, "bound": 0.1 / (i + 1), "stored": "raw", "x": None}
             for i in range(50)]
    doc = {"K": 50, "params": {"eps": 0.1, "inputs": [{"input": "a.h5", "K": 50}], "n": [1, 2]},
           "cluster_stats": stats, "empty": [], "none": {}, 3: True, "tail": [1.5, "s"]}
    text = json_text(doc)
    assert json.loads(text) == json.loads(json.dumps(doc))  # the same document (3 -> "3")
    lines = text.splitlines()
    for stat in stats:  # one line each, as json writes the object without indenting
        assert f"    {json.dumps(stat)}," in lines or f"    {json.dumps(stat)}" in lines
    # Nothing else changes: without a list of objects, exactly json's indented text.
    plain = {k: v for k, v in doc.items() if k not in ("cluster_stats", "params")}
    assert json_text(plain) == json.dumps(plain, indent=2)
    for bad in ({"cluster_stats": [{"error": math.nan}]}, {"eps": math.inf}):
        with pytest.raises(ValueError):
            json_text(bad)


def _run_command(body: str) -> subprocess.CompletedProcess:
    """A Python process that ends through matclust.cli.run (as ``python -m matclust``)."""
    code = "import sys\nfrom matclust.cli import run\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_the_command_ends_with_its_code_its_output_and_its_atexit_handlers(tmp_path):
    marker = tmp_path / "atexit"
    proc = _run_command(f"""
        import atexit
        atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))
        sys.argv = ["matclust", "inspect", {str(tmp_path / "missing.h5")!r}, "--json"]
        print("x" * 200000, end="")  # more than a pipe holds, still buffered at the end
        run()
        """)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "x" * 200000
    assert proc.stderr.startswith("error: ") and "missing.h5" in proc.stderr
    assert marker.read_text() == "ran"
    proc = _run_command("""
        sys.argv = ["matclust", "--version"]
        run()
        """)
    assert proc.returncode == 0 and "version" in proc.stdout, proc


def test_a_thread_still_running_ends_before_the_process(tmp_path):
    done = tmp_path / "done"
    proc = _run_command(f"""
        import threading, time
        def late():
            time.sleep(0.5)
            open({str(done)!r}, "w").write("done")
        threading.Thread(target=late).start()
        sys.argv = ["matclust", "--version"]
        run()
        """)
    assert proc.returncode == 0, proc.stderr
    assert done.read_text() == "done"  # the normal exit waited for it


def test_a_profiled_command_leaves_its_profile(tmp_path):
    # cProfile writes its file after the command returns: the fast exit must not skip that
    # (docs/benchmarks.md profiles commands this way).
    out = tmp_path / "command.prof"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "matclust",
                           "--version"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    import pstats

    assert pstats.Stats(str(out)).total_calls > 0
