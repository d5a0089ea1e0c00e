"""attnlab's compiled CPU tile kernel (``csrc/blocked.cpp``), built at first use and cached.

:func:`kernel` compiles the kernel with :func:`torch.utils.cpp_extension.load` the first
time it is asked for (25-65 s on a 2-core machine: 23 s of the compiler's CPU time, more
as other work shares the cores; the build is cached under ``~/.cache/torch_extensions``,
or ``$TORCH_EXTENSIONS_DIR``, so later processes load it in well under a second; a build
killed part way is redone by the next process, which does not wait on the lock file it
left). It returns ``None`` when the kernel cannot be had: no C++ compiler, a failed
build, or ``ATTNLAB_NO_KERNEL=1`` in the environment. The blocked engine then runs
torch's own fused kernel per block instead (exact as well, but slower).

The kernel keeps up to two freed large forward outputs (4 MiB and more) for the next call
of their size, at most ``ATTNLAB_KERNEL_POOL_MB`` (default 256; ``0`` turns the pool off),
read when the kernel loads. They stay resident between calls, so a memory-bound model may
turn the pool off; a bad value is a ``ValueError`` naming the variable.

Example:
    >>> ops = kernel()                    # None where nothing can be compiled
    >>> ops is None or hasattr(ops, "forward")
    True
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from attnlab._io import atomic_write_text
from attnlab._validate import env_mib

__all__ = ["build_settings", "kernel", "kernel_error", "ops", "pool_limit_mib"]

_SOURCE = Path(__file__).with_name("csrc") / "blocked.cpp"
_VERSION = 8  # bump when the kernel's interface changes
_POOL_ENV = "ATTNLAB_KERNEL_POOL_MB"
_FLAGS = {  # vector width of torch's at::vec, matched to what this CPU runs
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma", "-mavx2"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],  # f16c: at::vec's float16 conversions
}
_lock = threading.Lock()
_state: dict[str, Any] = {}


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _FLAGS else "DEFAULT"


def build_settings() -> tuple[str, list[str]]:
    """The kernel's build name and compiler flags for this process's instruction set
    (torch's capability, so ``ATEN_CPU_CAPABILITY=avx2`` builds and loads the AVX2 kernel).

    Example:
        >>> name, flags = build_settings()
        >>> name.startswith("attnlab_blocked_v") and "-O3" in flags
        True
    """
    cap = _capability()
    # -fopenmp: at::parallel_for is inline OpenMP; without it the kernel runs on one thread
    flags = ["-O3", "-fopenmp", *_FLAGS.get(cap, []), f"-DCPU_CAPABILITY={cap}"]
    if cap != "DEFAULT":
        flags.append(f"-DCPU_CAPABILITY_{cap}")
    return f"attnlab_blocked_v{_VERSION}_{_fingerprint(tuple(flags))}_{cap.lower()}", flags


@functools.cache
def _fingerprint(flags: tuple[str, ...]) -> str:
    """What the build depends on: the source's bytes, the flags, and the torch install it
    compiles against. In the build's name, so that two checkouts or environments each
    keep their own build instead of rebuilding in turn (ninja's file names the source's
    path and torch's headers; a shared name made each switch a 20-50 s rebuild)."""
    digest = hashlib.sha256(_SOURCE.read_bytes())
    for part in (*flags, torch.__version__, str(Path(torch.__file__).parent)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:12]


def _build() -> Any:
    from torch.utils.cpp_extension import _get_build_directory, load

    _find_ninja()  # before the "compiling" line: without ninja no build starts
    name, flags = build_settings()
    folder = Path(_get_build_directory(name, verbose=False))
    source = folder / _SOURCE.name  # a copy: the same path from every checkout
    if not source.exists():
        atomic_write_text(source, _SOURCE.read_text(encoding="utf-8"))
    built = folder / f"{name}.so"
    with _build_lock(folder, built):
        if not built.exists():  # (asked holding the lock: another's build has finished)
            _say("compiling the blocked engine's CPU kernel (once, 25-65 s; cached in "
                 "torch's extensions folder)")  # fmt: skip
        load(
            name=name,
            sources=[str(source)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    return torch.ops.attnlab_blocked


@contextlib.contextmanager
def _build_lock(folder: Path, built: Path) -> Iterator[None]:
    """Hold an OS lock on ``<folder>.lock`` beside the build folder while torch builds or
    loads, and remove a ``lock`` file torch left in the folder: torch guards its build with
    that file alone, so a build killed mid-compile left it and every later process waited
    on it forever, silently. The OS lock is let go when its holder dies, and any attnlab
    process still building holds it, so a ``lock`` file found while holding it is stale.
    A process that finds the lock held while ``built`` (the library) is not there yet
    says it waits for another's build (it said it was compiling, and waited a minute);
    one held while the library is there is another's load (well under a second): no line.
    Where there is no ``fcntl`` (Windows) only torch's own file guards the build."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder.with_name(folder.name + ".lock"), "a") as held:  # "a": never truncated
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not built.exists():
                _say("waiting for another process's build of the blocked engine's CPU "
                     f"kernel (it holds {held.name})")  # fmt: skip
            fcntl.flock(held, fcntl.LOCK_EX)  # waits while another process builds
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def _say(line: str) -> None:
    """One line on stderr, at once: what a build that takes a while is doing."""
    print(f"attnlab: {line}", file=sys.stderr, flush=True)


def _find_ninja() -> None:
    """ninja on ``PATH`` for torch's build, or a RuntimeError saying how to get it. pip's
    ``ninja`` package (a dependency) puts it in the environment's ``bin``, which is not on
    ``PATH`` when a venv's python runs unactivated: that folder is added to ``PATH``."""
    from torch.utils.cpp_extension import is_ninja_available

    if is_ninja_available():
        return
    try:
        import ninja  # type: ignore[import-not-found,unused-ignore]

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass
    if not is_ninja_available():
        raise RuntimeError("building it needs ninja, found neither on PATH nor as the "
                           "ninja package: pip install ninja")  # fmt: skip


def kernel() -> Any | None:
    """The compiled kernel's ops (``forward``, ``forward_weights``, ``backward``, ...), or
    ``None`` if unavailable."""
    if os.environ.get("ATTNLAB_NO_KERNEL", "") not in ("", "0"):
        return None
    if "ops" in _state:  # loaded (or failed) already: no lock
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            pool = pool_limit_mib()  # a bad value fails here, before any build
            try:
                _state["ops"] = _build()
                _state["ops"].output_pool(pool << 20)
                _state["pool_mib"] = pool
            except Exception as exc:  # no compiler, failed build: fall back, say why once
                _state["ops"], _state["error"] = None, f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    "attnlab could not build its CPU kernel; the blocked engine falls back "
                    f"to torch's per-block kernel ({_state['error'][:300]})",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _state["ops"]


def kernel_error() -> str | None:
    """Why :func:`kernel` returned ``None`` (after it was asked), else ``None``."""
    return _state.get("error")


def ops() -> Any:
    """The compiled kernel's ops; ``RuntimeError`` if unavailable (callers have checked
    :func:`kernel`)."""
    built = kernel()
    if built is None:  # pragma: no cover - callers check kernel() first
        raise RuntimeError(f"attnlab's CPU kernel is unavailable: {kernel_error()}")
    return built


def pool_limit_mib() -> int:
    """The output pool's limit in MiB: the one in force once the kernel has loaded, else
    what ``ATTNLAB_KERNEL_POOL_MB`` asks (default 256; 0: off).

    Example:
        >>> pool_limit_mib() >= 0
        True
    """
    if "pool_mib" in _state:
        return int(_state["pool_mib"])
    return env_mib(_POOL_ENV, 256)
