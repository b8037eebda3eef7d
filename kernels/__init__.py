"""lime_fast's attention kernels, installed as ``lime_fast.kernels``.

``reference`` holds the eager PyTorch implementations that tests, benchmarks and the CPU engine
share; each fast kernel lives in its own module beside it (kernel + launcher per file).
"""
