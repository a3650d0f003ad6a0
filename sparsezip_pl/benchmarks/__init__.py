"""Benchmarks: one file each (``mme.py``, ``pope.py``), registered by name (see :mod:`.base`).

    from sparsezip_pl.benchmarks import MME, POPE, get_benchmark
    dataset = MME("/data/MME_Benchmark_release_version").load()
    get_benchmark("pope").parse("No, there is not.")   # -> "no"

No Lightning here: the data modules in :mod:`sparsezip_pl.lit.datamodules` serve these.
"""

from sparsezip_pl.benchmarks.base import Benchmark, benchmark_names, get_benchmark, register_benchmark
from sparsezip_pl.benchmarks.mme import MME, MMEScore
from sparsezip_pl.benchmarks.pope import POPE, POPEScore

__all__ = ["MME", "POPE", "Benchmark", "MMEScore", "POPEScore", "benchmark_names", "get_benchmark",
           "register_benchmark"]
