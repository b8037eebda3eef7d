"""The examples of the README and of the pages under docs/ run as written, offline, on a fresh machine.

Every fenced ``python`` block runs (the README's first, then each page's, in order, in one namespace, in
a temporary folder), and every
``lime-fast`` command line of a ``bash`` block runs through ``lime_fast.cli.main``. A block preceded by
``<!-- readme-test: offline -->`` uses a hub model in the text: the test swaps it for the shipped
``shapes-ip2p`` (the README says so next to it); ``<!-- readme-test: skip REASON -->`` marks a block
that cannot run here (a GPU, a Ray cluster, a running server), with its reason in the README source.
The folder holds ``photo.jpg`` and ``sky.png`` (a shapes picture and a mask), which the examples name.
"""

import re
import shlex
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
HUB_MODELS = ("timbrooks/instruct-pix2pix", "./my-magicbrush-checkpoint")
# Small settings so the examples run in seconds on this CPU; a block's own settings come after (and win).
FAST = ["--steps", "3", "--capture-step", "0"]


def blocks() -> list[tuple[str, str, str, str]]:
    """(language, marker, code, "page:line") of every fenced block of the README and the docs pages."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\s*\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", text, re.S):
            where = f"{page.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
            out.append((m["lang"], (m["marker"] or "").strip(), m["code"], where))
    return out


def _offline(code: str) -> str:
    for hub in HUB_MODELS:
        code = code.replace(hub, "shapes-ip2p")
    return code.replace('device="cuda"', 'device="cpu"').replace("torch.float16", "torch.float32")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    from lime_fast.testing.shapes import make_sample

    sample = make_sample(5_000_003, 64)
    sample.source.save(tmp_path / "photo.jpg", quality=95)
    sky = np.zeros((64, 64), np.uint8)
    sky[:24] = 255
    PIL.Image.fromarray(sky).save(tmp_path / "sky.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_examples():
    kinds = [lang for lang, _, _, _ in blocks()]
    assert kinds.count("python") >= 2 and kinds.count("bash") >= 2


def test_python_examples_run_offline(folder):
    import lime_fast

    namespace: dict = {}
    ran = 0
    for lang, marker, code, line in blocks():
        if lang != "python" or marker.startswith("skip"):
            continue
        if marker == "offline":
            code = _offline(code)
        try:
            exec(compile(code, line, "exec"), namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"{line}: {type(e).__name__}: {e}") from e
        ran += 1
    assert ran >= 2
    lime_fast._ENGINES.clear()


def test_command_lines_run_offline(folder, capsys):
    from lime_fast.cli import main

    ran = 0
    for lang, marker, code, line in blocks():
        if lang != "bash" or marker.startswith("skip"):
            continue
        commands = [part.strip() for row in code.splitlines() for part in row.split(" #", 1)[0].split("&&")]
        for cmd in commands:
            if cmd.startswith("python -c "):  # a step that makes an input, as written
                import subprocess
                import sys

                subprocess.run([sys.executable, *shlex.split(cmd)[1:]], check=True, cwd=folder, timeout=120)
                continue
            if not cmd.startswith("lime-fast "):
                continue  # the quickstart's install step, comments
            if marker == "offline":
                cmd = _offline(cmd)
            argv = shlex.split(cmd)[1:]
            if argv[0] in ("edit", "batch"):  # fast settings first: the command's own flags come later and win
                argv = argv[:1] + FAST + argv[1:]
            rc = main(argv + ["--quiet"])
            assert rc == 0, f"{line}: `{cmd}` exited {rc}: {capsys.readouterr().err}"
            ran += 1
    assert ran >= 2
