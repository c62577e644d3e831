"""GPU utilisation and memory through NVML (nvidia-ml-py), or None where there is no GPU.

Absent means absent: without a driver or device every reading is None, never 0, so a
dashboard shows "no data" instead of an idle GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuReading:
    """One GPU's state."""

    index: int
    name: str
    util_percent: float
    memory_used_bytes: float
    memory_total_bytes: float


class Nvml:
    """Lazy NVML handle; `read()` returns None when NVML or a GPU is absent."""

    def __init__(self) -> None:
        self._lib: Any = None
        self._tried = False

    def _init(self) -> Any:
        if self._tried:
            return self._lib
        self._tried = True
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() < 1:
                pynvml.nvmlShutdown()
                return None
            self._lib = pynvml
        except Exception:  # no library, no driver, no device: all mean "absent"
            self._lib = None
        return self._lib

    @property
    def present(self) -> bool:
        """True when NVML answered and at least one GPU exists."""
        return self._init() is not None

    def read(self) -> list[GpuReading] | None:
        """Every GPU's utilisation and memory, or None when absent or NVML fails."""
        lib = self._init()
        if lib is None:
            return None
        try:
            out = []
            for i in range(lib.nvmlDeviceGetCount()):
                handle = lib.nvmlDeviceGetHandleByIndex(i)
                util = lib.nvmlDeviceGetUtilizationRates(handle)
                mem = lib.nvmlDeviceGetMemoryInfo(handle)
                name = lib.nvmlDeviceGetName(handle)
                out.append(
                    GpuReading(
                        index=i,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        util_percent=float(util.gpu),
                        memory_used_bytes=float(mem.used),
                        memory_total_bytes=float(mem.total),
                    )
                )
            return out
        except Exception:
            return None

    def close(self) -> None:
        """Shut NVML down if it was started."""
        if self._lib is not None:
            try:
                self._lib.nvmlShutdown()
            except Exception:
                pass
            self._lib = None
        self._tried = False
