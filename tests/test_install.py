"""What scripts/install.sh promises a fresh checkout: nothing in the repository root shadows an installed
package, the README's Python example runs from the root, and the lock pins every package exactly."""

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"lime-fast", "lime_fast"}


def _root_names() -> dict[str, bool]:
    """Top-level import names the repository root offers when it is on sys.path: name -> regular (a
    module file or a folder with __init__.py; False for a folder that could only be a namespace portion)."""
    out = {}
    for p in ROOT.iterdir():
        if p.name.startswith("."):
            continue
        if p.suffix == ".py":
            out[p.stem] = True
        elif p.is_dir() and p.name.isidentifier():
            out[p.name] = (p / "__init__.py").is_file()
    return out


def test_no_regular_package_in_the_root_has_an_installed_distributions_name():
    dists = md.packages_distributions()
    clashes = {name: dists[name] for name, regular in _root_names().items()
               if regular and name in dists and not set(dists[name]) <= OURS}
    assert not clashes, f"importable from the repository root under an installed distribution's name: {clashes}"


def test_installed_packages_win_over_the_roots_namespace_folders():
    """A folder without __init__.py (kernels/, tests/, ...) is a namespace portion: any installed regular
    package of that name is found first, whichever sys.path entry comes first. Checked in a subprocess
    started in the root, for every such name an installed distribution provides (Hugging Face's
    ``kernels``, which transformers >= 5.25 imports, against our kernels/ folder)."""
    dists = md.packages_distributions()
    names = [n for n, regular in _root_names().items() if not regular and n in dists and not set(dists[n]) <= OURS]
    code = "import importlib.util, sys\nfor n in sys.argv[1:]:\n    print(n, importlib.util.find_spec(n).origin)\n"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        name, origin = line.split(" ", 1)
        # (not "outside the root": a virtual environment made inside the checkout is common)
        assert origin != "None" and not Path(origin).resolve().is_relative_to(ROOT / name), f"{name} resolves to {origin}"


def test_the_readme_python_example_runs_from_a_checkouts_root(tmp_path):
    """The README's first Python block, as a user runs it: `python -c` in a checkout's root (which puts the
    root first on sys.path), the installed transformers and diffusers imported from there."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)[1]
    checkout = tmp_path / "checkout"
    for name in ("lime_fast", "kernels"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("\nimport sys, transformers, diffusers\nprint('lime_fast', lime_fast.__file__)\n"
             "print('transformers', transformers.__version__)\nprint('kernels', getattr(sys.modules.get('kernels'), '__file__', None))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)} | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code + probe], cwd=checkout, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (checkout / "edited.png").is_file() and (checkout / "roi_overlay.png").is_file()
    seen = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("lime_fast ", "kernels ")))
    assert Path(seen["lime_fast"]).resolve().is_relative_to(checkout)  # the checkout's own lime_fast
    if seen["kernels"] != "None":  # transformers imported Hugging Face's kernels: not our folder
        assert not Path(seen["kernels"]).resolve().is_relative_to(checkout)


def test_the_lock_pins_every_package_exactly():
    lock = (ROOT / "requirements" / "lock.txt").read_text().splitlines()
    reqs = [line for line in lock if line and not line.startswith((" ", "#", "-"))]
    assert reqs and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!]+", r) for r in reqs), [r for r in reqs if "==" not in r]
    names = {r.split("==")[0].lower().replace("_", "-") for r in reqs}
    assert {"torch", "diffusers", "transformers", "pytest", "fastapi", "ray", "pyarrow"} <= names
    assert next(r for r in reqs if r.startswith("torch==")).endswith("+cpu")  # never the multi-GB CUDA build
