"""benchmarks/device_check.py's step runner, on the CPU: what a device call's log keeps of each step."""

from __future__ import annotations

import device_check


def _script(tmp_path, body: str):
    path = tmp_path / "step_script.py"
    path.write_text(body)
    return [str(path)]


def test_a_stalled_step_leaves_its_stacks(tmp_path):
    """A step past its limit is stopped with SIGABRT, and the log shows where each thread was."""
    args = _script(tmp_path, "import time\nprint('phase 1 done', flush=True)\n\ndef waiting_in_phase_2():\n"
                             "    time.sleep(120)\n\nwaiting_in_phase_2()\n")
    status, seconds, out = device_check.run_step(args, limit=3)
    assert status == "TIMEOUT after 3 s" and seconds < 60
    assert "phase 1 done" in out and "waiting_in_phase_2" in out and "SIGABRT at the 3 s limit" in out


def test_finished_and_failed_steps(tmp_path):
    status, _, out = device_check.run_step(_script(tmp_path, "import sys\nprint('row', flush=True)\n"
                                                             "print('warn', file=sys.stderr)\n"), limit=60)
    assert status == "ok" and "row" in out and "warn" in out
    status, _, out = device_check.run_step(_script(tmp_path, "raise SystemExit(3)\n"), limit=60)
    assert status == "FAILED (exit 3)"
