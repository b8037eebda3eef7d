"""lime_fast's attention kernels: the modules of the repository's top-level ``kernels/`` folder.

``reference`` holds the eager PyTorch implementations that tests, benchmarks and the CPU engine
share; each fast kernel lives in its own module beside it (kernel + launcher per file).

The folder ``kernels/`` has no ``__init__.py`` on purpose: a regular package named ``kernels`` in the
repository root would shadow Hugging Face's ``kernels`` distribution (which transformers imports)
whenever the root is on ``sys.path``. A built wheel copies the modules in here (setup.py's
``build_py``); in a checkout (editable install, or ``PYTHONPATH=<checkout>``) this package's search
path reaches the folder instead.
"""

from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
_source = _here.parents[1] / "kernels"
if not (_here / "reference.py").is_file() and (_source / "reference.py").is_file():
    __path__.append(str(_source))  # noqa: F821 - a package's module search path
