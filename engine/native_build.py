"""Building Tandem's C++ CPU ops on first use (``torch.utils.cpp_extension``).

Each op module is one source file compiled with the machine's compiler for this CPU
(``-march=native``) and cached by torch (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). ``load_extension`` returns None, with a logged warning,
where it cannot be built; callers then fall back to their torch reference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
import platform
import time

logger = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set extensions, from /proc/cpuinfo: x86 lists them under
    "flags", aarch64 under "Features" (empty where the file cannot be read)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction set: the ops are built with -march=native, so
    a torch extensions folder shared between machines must not hand one CPU's build to
    another."""
    flags = " ".join([platform.machine(), *sorted(cpu_flags())])
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.cache
def load_extension(name: str, source: pathlib.Path):
    """The compiled module ``name`` built from ``source``, or None where it cannot be."""
    from torch.utils import cpp_extension

    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=f"{name}_{_cpu_tag()}",
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no ninja, unsupported flags: all mean "fall back"
        logger.warning("native CPU op %s unavailable, using torch: %s", name, exc)
        return None
    logger.info("native CPU op %s ready in %.1f s", name, time.perf_counter() - start)
    return module
