"""benchmarks/attention_shares.py: token roles by position, and shares that are a distribution."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import attention_shares


def test_role_of_every_position():
    from lime_fast.clip_bpe import clip_tokenizer

    idx = attention_shares.role_index(clip_tokenizer(), "make the circle blue")
    roles = [attention_shares.ROLES[i] for i in idx]
    assert roles[:6] == ["BOS", "other kept", "stop", "content", "content", "EOS"]
    assert len(roles) == 77 and set(roles[6:]) == {"padding"}


def test_shares_of_a_smoke_model_sum_to_one(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_shapes.py"), "--out", str(out), "--smoke",
                           "--vae-steps", "1", "--unet-steps", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = attention_shares.shares(out, n=4, timesteps=(500,), batch=4)
    assert list(s) == list(attention_shares.ROLES)
    assert all(0.0 <= v <= 1.0 for v in s.values()) and sum(s.values()) == pytest.approx(1.0, abs=1e-5)
    assert s["padding"] > 0.1  # an untrained text encoder's 71 padding positions get a large share
