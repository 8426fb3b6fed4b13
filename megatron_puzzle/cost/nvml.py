"""NVML for the GPU torch computes on: the right handle, telemetry, and the energy counter.

NVML numbers devices its own way: it ignores CUDA_VISIBLE_DEVICES and its order need not be
CUDA's, so `nvmlDeviceGetHandleByIndex(torch_index)` watches another card under
CUDA_VISIBLE_DEVICES or on any local rank but 0. The handle is found by the device's UUID (torch's
`get_device_properties(i).uuid`, NVML's `nvmlDeviceGetUUID`), else by its PCI bus id.

Energy: `nvmlDeviceGetTotalEnergyConsumption` counts millijoules since the driver loaded (Volta and
newer); the difference across a timed job is that job's energy. The power reading
(`nvmlDeviceGetPowerUsage`) is a 1-second average on Hopper and cannot be attributed to a job of
milliseconds, so it is only reported as telemetry. pynvml (package nvidia-ml-py) is imported here
only, and only on the GPU path.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import threading
from typing import Any

import torch

log = logging.getLogger(__name__)


class NvmlUnavailable(RuntimeError):
    """NVML cannot watch this device; the message says why and what to do."""


def load_nvml():
    """The pynvml module, initialised."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable(
            "NVML telemetry needs nvidia-ml-py (`pip install nvidia-ml-py`); install it, measure with "
            "telemetry off (--no-telemetry), or use --source analytic with a GPU profile"
        ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise NvmlUnavailable(
            f"NVML is not usable here ({e}); check the NVIDIA driver, measure with --no-telemetry, "
            "or use --source analytic with a GPU profile"
        ) from None
    return pynvml


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def normalize_uuid(uuid: Any) -> str:
    """32 lowercase hex digits of a GPU UUID, from NVML's 'GPU-8c3a...-...' or torch's uuid object."""
    raw = getattr(uuid, "bytes", None)  # torch's _CUuuid: the 16 raw bytes
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 16:
        return bytes(raw).hex()
    text = _text(uuid).strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return re.sub(r"[^0-9a-f]", "", text)


def cuda_index(device: torch.device | int | str | None) -> int:
    """The torch (CUDA runtime) index of a device: 'cuda' alone means the current device."""
    if isinstance(device, int):
        return device
    device = torch.device("cuda" if device is None else device)
    return torch.cuda.current_device() if device.index is None else device.index


def device_handle(nvml, device: torch.device | int | str | None = None) -> tuple[Any, str]:
    """(NVML handle, how it was matched: 'uuid' or 'pci') of the CUDA device torch uses as `device`."""
    props = torch.cuda.get_device_properties(cuda_index(device))
    want = normalize_uuid(getattr(props, "uuid", ""))
    bus = tuple(getattr(props, f, None) for f in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    by_pci = None
    for i in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            if want and normalize_uuid(nvml.nvmlDeviceGetUUID(handle)) == want:
                return handle, "uuid"
            if None not in bus and by_pci is None:
                pci = nvml.nvmlDeviceGetPciInfo(handle)
                if (pci.domain, pci.bus, pci.device) == bus:
                    by_pci = handle
        except nvml.NVMLError as e:  # a card NVML cannot read (lost, no permission) is not ours
            log.debug("NVML device %d skipped: %s", i, e)
    if by_pci is not None:  # e.g. a MIG instance: its UUID is not a whole card's
        return by_pci, "pci"
    raise NvmlUnavailable(
        f"NVML sees no device with the UUID or PCI bus id of CUDA device {cuda_index(device)} "
        f"({props.name}); check that NVML and CUDA see the same driver, or measure with --no-telemetry"
    )


class NvmlMonitor:
    """One GPU's NVML: samples SM clock, power and memory in a background thread while inside `with`,
    and reads its energy counter (`energy_mj`) at any time."""

    def __init__(self, device: torch.device | int | str | None = None, interval_s: float = 0.05):
        self.nvml = load_nvml()
        n = self.nvml
        try:
            self.handle, self.matched_by = device_handle(n, device)
            self.name = _text(n.nvmlDeviceGetName(self.handle))
            self.uuid = _text(n.nvmlDeviceGetUUID(self.handle))
            self.memory_total = n.nvmlDeviceGetMemoryInfo(self.handle).total
        except n.NVMLError as e:
            raise NvmlUnavailable(f"NVML cannot read the GPU in use ({e}); measure with --no-telemetry") from None
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, int]] = []  # (sm clock MHz, power W, memory used bytes)
        self.has_energy = self.energy_mj() is not None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def energy_mj(self) -> int | None:
        """Millijoules since the driver loaded, or None where the card has no energy counter."""
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except self.nvml.NVMLError:
            return None

    def _sample(self):
        n = self.nvml
        while not self._stop.is_set():
            try:
                clock = n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)
                power = n.nvmlDeviceGetPowerUsage(self.handle) / 1e3
                used = n.nvmlDeviceGetMemoryInfo(self.handle).used
                self.samples.append((clock, power, used))
            except n.NVMLError:  # one failed read must not stop the measurement
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "uuid": self.uuid, "matched_by": self.matched_by,
                               "memory_total_bytes": self.memory_total, "energy_counter": self.has_energy,
                               "samples": len(self.samples)}
        if self.samples:
            clocks, powers, used = zip(*self.samples)
            out.update({
                "sm_clock_mhz_median": statistics.median(clocks), "sm_clock_mhz_min": min(clocks),
                "power_w_mean": statistics.fmean(powers), "power_w_max": max(powers),
                "memory_used_bytes_max": max(used),
            })
        return out
