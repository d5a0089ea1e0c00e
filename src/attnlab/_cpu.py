"""What this CPU can do, and the modes attnlab chooses from it.

torch reports its vector instruction set (``torch.backends.cpu.get_cpu_capability()``:
``AVX512``, ``AVX2``, ...; ``ATEN_CPU_CAPABILITY=avx2`` forces a lower one), oneDNN whether
it runs bfloat16 matrix products natively (``ONEDNN_MAX_CPU_ISA`` limits it), and the CPU
whether it has bfloat16 units (AVX512-BF16 or AMX). bfloat16 matrix products are native
where the units and oneDNN agree, whatever torch's own path; elsewhere they are emulated
and several times slower than float32 (0.17x of sentence-transformers was measured for
MiniLM on an AVX2-only EPYC). attnlab's bfloat16 modes also ask for torch's AVX512 path:
under ``ATEN_CPU_CAPABILITY=avx2`` on a CPU with the units, oneDNN still runs bfloat16
products natively (a 1024^2 product 2.1 against 15.1 ms in float32, MiniLM's bfloat16 mode
about 2x float32's texts/s, one thread, 2026-12-02), but float32 runs.

Example:
    >>> info = cpu_info()
    >>> info.capability in ("AVX512", "AVX2", "DEFAULT", "ZVECTOR", "VSX", "SVE256", "SVE")
    True
    >>> resolve_precision("float32", info)
    ('float32', 'float32 was asked for')
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

__all__ = [
    "PRECISIONS",
    "CpuInfo",
    "bf16_products",
    "cpu_info",
    "fuse_activation",
    "resolve_precision",
]

PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class CpuInfo:
    """The facts attnlab's choices depend on.

    Attributes:
        capability: torch's vector instruction set (``"AVX512"``, ``"AVX2"``, ...).
        bf16_units: the CPU has AVX512-BF16 or AMX bfloat16 units.
        onednn_bf16: oneDNN runs bfloat16 matrix products (not limited by
            ``ONEDNN_MAX_CPU_ISA``).
        threads: torch's intra-op threads.
        cpu_name: the processor's model name, where the OS says it.
        amx: the CPU has AMX tiles and oneDNN may use them (no ``ONEDNN_MAX_CPU_ISA``
            below them): torch's SDPA runs bfloat16 on them.
        onednn_fp16: oneDNN runs float16 matrix products (AVX512-FP16 or AMX-FP16); where
            it does not, torch's SDPA computes float16 slowly on the CPU.
        amx_fp16: the same for AMX float16 tiles (torch's SDPA may run float16 on them).
    """

    capability: str
    bf16_units: bool
    onednn_bf16: bool
    threads: int
    cpu_name: str = ""
    amx: bool = False
    onednn_fp16: bool = False
    amx_fp16: bool = False

    @property
    def native_bf16(self) -> bool:
        """attnlab's bfloat16 modes run here: bfloat16 matrix products on bfloat16 units
        (:func:`bf16_products`) under torch's AVX512 path."""
        return self.capability == "AVX512" and self.bf16_units and self.onednn_bf16


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This process's :class:`CpuInfo` (read once; the environment is read at start-up)."""
    cpu = torch.cpu
    units = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()) or bool(
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )
    onednn = torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    return CpuInfo(
        capability=torch.backends.cpu.get_cpu_capability(),
        bf16_units=units,
        onednn_bf16=onednn,
        threads=torch.get_num_threads(),
        cpu_name=_cpu_name(),
        amx=_amx("_is_amx_tile_supported", "AMX"),
        onednn_fp16=_onednn_fp16(),
        amx_fp16=_amx("_is_amx_fp16_supported", "AMX_FP16"),
    )


def _amx(check: str, isa: str) -> bool:
    """The CPU has these AMX tiles (``torch.cpu`` says) and oneDNN may use them: a
    ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) below them keeps SDPA off them.

    Example:
        >>> isinstance(_amx("_is_amx_tile_supported", "AMX"), bool)
        True
    """
    if not bool(getattr(torch.cpu, check, lambda: False)()):
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap not in _ONEDNN_ISAS:
        return True  # unset, ALL, DEFAULT, or a value oneDNN ignores (a typo, spaces)
    return isa in cap if isa == "AMX_FP16" else "AMX" in cap


_ONEDNN_ISAS = frozenset(
    [
        "SSE41",
        "AVX",
        "AVX2",
        "AVX2_VNNI",
        "AVX2_VNNI_2",
        "AVX512_CORE",
        "AVX512_CORE_VNNI",
        "AVX512_CORE_BF16",
        "AVX10_1_512",
        "AVX512_CORE_FP16",
        "AVX10_1_512_AMX",
        "AVX512_CORE_AMX",
        "AVX10_1_512_AMX_FP16",
        "AVX512_CORE_AMX_FP16",
    ]
)  # the values of ONEDNN_MAX_CPU_ISA that cap it below ALL


def _onednn_fp16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return torch.backends.mkldnn.is_available() and check is not None and bool(check())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.environ.get("PROCESSOR_IDENTIFIER", "")


def resolve_precision(precision: str, info: CpuInfo | None = None) -> tuple[str, str]:
    """The precision to run for ``precision`` on this CPU, and why.

    ``"float32"`` runs as asked. ``"bfloat16"`` runs where the CPU has native bfloat16
    matrix products; elsewhere it warns once and runs float32 (emulated bfloat16 is
    several times slower, and less exact). ``"auto"`` picks the fastest mode that is
    exact enough for embeddings: bfloat16 where native (min cosine 0.99994 to float32 on
    MiniLM), float32 elsewhere.

    Example:
        >>> avx2 = CpuInfo("AVX2", bf16_units=False, onednn_bf16=False, threads=2)
        >>> resolve_precision("auto", avx2)[0]
        'float32'
        >>> amx = CpuInfo("AVX512", bf16_units=True, onednn_bf16=True, threads=2)
        >>> resolve_precision("auto", amx)
        ('bfloat16', 'bfloat16 matrix units (AVX512 with AVX512-BF16/AMX, oneDNN bf16)')
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    info = cpu_info() if info is None else info
    if precision == "float32":
        return "float32", "float32 was asked for"
    if info.native_bf16:
        return "bfloat16", "bfloat16 matrix units (AVX512 with AVX512-BF16/AMX, oneDNN bf16)"
    why = _no_bf16_reason(info)
    if precision == "bfloat16":
        cost = (
            "float32 runs instead (exact)"
            if bf16_products(info)[0]
            else "bfloat16 would be emulated and several times slower, so float32 runs "
            "instead (exact, and faster here)"
        )
        _warn_once(f"precision='bfloat16' asked for, but {why}: {cost}")
    return "float32", why


def fuse_activation(info: CpuInfo | None = None) -> tuple[bool, str]:
    """Whether float32 linears at inference fold their GELU into oneDNN's matrix product,
    and why.

    On AVX-512 the fused product is the faster one. On AVX2, oneDNN's exact-GELU epilogue
    made MiniLM's 384 -> 1536 linear 20% slower than the plain product followed by torch's
    GELU (18.0 against 15.0 ms at 2400 rows, forced AVX2; 8.7 against 9.2 ms on AVX-512),
    so there the activation runs as its own pass. Both give the same function.

    Example:
        >>> fuse_activation(CpuInfo("AVX2", bf16_units=False, onednn_bf16=False, threads=2))[0]
        False
        >>> fuse_activation(CpuInfo("AVX512", bf16_units=False, onednn_bf16=False, threads=2))[0]
        True
    """
    info = cpu_info() if info is None else info
    if info.capability == "AVX512":
        return True, "AVX512: oneDNN's fused GELU epilogue is the faster path"
    return False, f"{info.capability}: a plain product then torch's GELU beats oneDNN's epilogue"


def bf16_products(info: CpuInfo | None = None) -> tuple[bool, str]:
    """Whether bfloat16 matrix products run natively here (else emulated), and why: the
    CPU's bfloat16 units and oneDNN decide, not torch's vector path (``capability``).

    Example:
        >>> bf16_products(CpuInfo("AVX2", bf16_units=True, onednn_bf16=True, threads=2))
        (True, "this CPU's AVX512-BF16/AMX units, through oneDNN")
        >>> bf16_products(CpuInfo("AVX2", bf16_units=False, onednn_bf16=False, threads=2))[1]
        'this CPU has no AVX512-BF16 or AMX bfloat16 units'
    """
    info = cpu_info() if info is None else info
    if not info.bf16_units:
        return False, "this CPU has no AVX512-BF16 or AMX bfloat16 units"
    if not info.onednn_bf16:
        return False, "oneDNN does not run bfloat16 here; ONEDNN_MAX_CPU_ISA may limit it"
    return True, "this CPU's AVX512-BF16/AMX units, through oneDNN"


def _no_bf16_reason(info: CpuInfo) -> str:
    """Why attnlab's bfloat16 modes do not run here (``info.native_bf16`` is False)."""
    native, why = bf16_products(info)
    if not native:
        path = "" if info.capability == "AVX512" else f"; torch runs its {info.capability} path"
        return why + path
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return (
        f"torch runs its {info.capability} path"
        + (f" (ATEN_CPU_CAPABILITY={forced})" if forced else "")
        + " and attnlab's bfloat16 modes run only on its AVX512 path, though this CPU's"
        + " bfloat16 units would still run oneDNN's bfloat16 matrix products natively"
    )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
