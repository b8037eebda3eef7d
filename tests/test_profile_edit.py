"""benchmarks/profile_edit.py on the CPU (the tiny model): the report a device call would write."""

from __future__ import annotations

import json

import profile_edit


def test_tiny_dry_run_writes_both_edits(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile_edit.main(["--tiny", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["edits"]) == ["automatic RoI", "user mask"]
    auto, masked = report["edits"]["automatic RoI"], report["edits"]["user mask"]
    # the automatic edit runs the localization pass and the segmentation; the masked one does not
    assert auto["stages_s"]["localize"] > 0 and auto["stages_s"]["segment"] > 0
    assert masked["stages_s"].get("localize", 0) == 0 and auto["unet_evals"] > masked["unet_evals"] > 0
    assert all(m["wall_s"] >= sum(m["stages_s"].values()) - 1e-4 for m in (auto, masked))  # (rounded to 10 us)
    assert "| automatic RoI |" in capsys.readouterr().out
