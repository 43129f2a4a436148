"""Native CPU kernels, compiled at first use for the machine they run on.

``small_gemm()`` returns the compiled small-M GEMM module (``small_gemm.cpp``), or None where it
cannot be built (no C++ compiler, no AVX2/FMA, a non-x86 CPU); callers then use ``F.linear``.
The build is cached under ``$DRAFTOPD_CACHE_DIR/kernels`` (default ``~/.cache/draftopd``), keyed by
the source and the CPU's instruction sets, so a home directory shared by different machines
never loads a build made for another CPU. The first build takes about a minute.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("small_gemm.cpp")
_ISA_FLAGS = ("avx2", "fma", "avx512f")
DISABLE_ENV = "DRAFTOPD_NATIVE_KERNELS"  # "0" turns the native kernels off


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_kernels_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Serialise ``load`` across processes with a lock the OS drops when its holder dies.

    torch's own build lock is a file (``lock``) that ``load`` waits on by polling; a process
    killed while holding it (a background job stopped mid-start, say) leaves it behind, and
    every later process then waits forever. Every draftopd process takes this lock first, so
    whoever holds it knows no other process is inside ``load``: a ``lock`` file found then is
    stale and is removed."""
    with (build_dir / "build.flock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def small_gemm(target: str = "native") -> ModuleType | None:
    """The compiled kernel module, or None (logged once) where it cannot be used here.

    ``target="avx2"`` builds the AVX2 + FMA variant even on an AVX-512 CPU (the tests run both
    code paths on one machine); "native" takes the best the CPU has."""
    if not native_kernels_enabled():
        return None
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags:
        logger.info("small-M GEMM kernel unavailable: needs an x86-64 CPU with AVX2 and FMA")
        return None
    if target not in ("native", "avx2"):
        raise ValueError(f"kernel target {target!r} not supported; choose 'native' or 'avx2'")
    from draftopd.models.target import default_cache_dir  # torch is loaded by then

    cflags = ["-O3", "-march=native", "-fopenmp"]
    if target == "avx2":
        flags = flags - {"avx512f"}
        cflags.append("-mno-avx512f")
    isa = ",".join(f for f in _ISA_FLAGS if f in flags)
    key = hashlib.sha256(_SOURCE.read_bytes() + isa.encode()).hexdigest()[:12]
    build_dir = default_cache_dir() / "kernels" / f"small_gemm_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import load

        with _build_lock(build_dir):
            module = load(
                name=f"draftopd_small_gemm_{key}",
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    except (OSError, RuntimeError, ImportError) as err:  # no compiler or ninja, or a failed build
        logger.warning("small-M GEMM kernel could not be built (%s); using F.linear", err)
        return None
    logger.info(
        "small-M GEMM kernel ready (%s, panel width %d)", module.isa(), module.panel_width()
    )
    return module


__all__ = ["DISABLE_ENV", "native_kernels_enabled", "small_gemm"]
