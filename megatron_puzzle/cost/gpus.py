"""Analytic GPU profiles: memory, bandwidth and dense tensor throughput from NVIDIA datasheets.

Every figure is the *dense* one (datasheets print sparse figures with an asterisk:
those are twice the dense ones and are not used). TFLOP/s per dtype are the
tensor-core figures, except "float32", which is the plain (non-tensor-core) FP32
rate that PyTorch uses unless TF32 is allowed. "fp8" is present only on chips with
FP8 tensor cores (Hopper, Ada). Memory is the marketed capacity in GB (1e9 bytes),
bandwidth in bytes/s.

A roofline at datasheet peaks is never reached; `Efficiency` holds the achievable
fractions as named parameters so a user can calibrate them against one measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TB = 1e12
TFLOPS = 1e12


class UnknownGPUError(ValueError):
    """A GPU profile name that is not in `GPUS`; the message lists the known ones."""


@dataclass(frozen=True)
class GPUProfile:
    name: str                      # key used in scenarios: "h100-sxm"
    full_name: str
    memory_gb: float               # marketed capacity, GB
    bandwidth: float               # bytes/s
    flops: dict[str, float] = field(default_factory=dict)  # dense FLOP/s per dtype
    source: str = ""               # the datasheet the figures come from

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    @property
    def supports_fp8(self) -> bool:
        return "fp8" in self.flops

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.flops:
            raise UnknownGPUError(
                f"{self.full_name} has no {dtype} tensor-core rate in its profile; supported: {sorted(self.flops)}"
            )
        return self.flops[dtype]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "full_name": self.full_name, "memory_gb": self.memory_gb,
            "bandwidth_bytes_per_s": self.bandwidth,
            "dense_tflops": {k: v / TFLOPS for k, v in self.flops.items()}, "source": self.source,
        }


@dataclass(frozen=True)
class Efficiency:
    """Achievable fractions of the datasheet peaks (documented defaults, calibrate per stack).

    compute: fraction of dense tensor-core FLOP/s that large GEMMs reach
        (cuBLAS / TensorRT-LLM GEMMs typically sustain 60-80% of peak on Hopper).
    memory: fraction of DRAM bandwidth that streaming weight and KV-cache reads reach
        (typically 75-90% on HBM).
    """

    compute: float = 0.7
    memory: float = 0.8

    def __post_init__(self):
        for name in ("compute", "memory"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"efficiency.{name} must be in (0, 1], got {v}")


def _tf(**rates: float) -> dict[str, float]:
    return {k: v * TFLOPS for k, v in rates.items()}


GPUS: dict[str, GPUProfile] = {
    p.name: p
    for p in (
        # NVIDIA H100 Tensor Core GPU datasheet, SXM column: 80 GB HBM3, 3.35 TB/s;
        # FP32 67 TF; TF32 989 TF*, BF16 1,979 TF*, FP16 1,979 TF*, FP8 3,958 TF* (*sparse, halved here).
        GPUProfile(
            "h100-sxm", "NVIDIA H100 SXM5 80GB", 80, 3.35 * TB,
            _tf(float32=67, tf32=494.5, bfloat16=989.5, float16=989.5, fp8=1979),
            "NVIDIA H100 Tensor Core GPU datasheet (SXM)",
        ),
        # Same datasheet, PCIe column: 80 GB HBM2e, 2 TB/s; FP32 51 TF; TF32 756 TF*,
        # BF16 1,513 TF*, FP16 1,513 TF*, FP8 3,026 TF*.
        GPUProfile(
            "h100-pcie", "NVIDIA H100 PCIe 80GB", 80, 2.0 * TB,
            _tf(float32=51, tf32=378, bfloat16=756.5, float16=756.5, fp8=1513),
            "NVIDIA H100 Tensor Core GPU datasheet (PCIe)",
        ),
        # NVIDIA H200 Tensor Core GPU datasheet, SXM column: 141 GB HBM3e, 4.8 TB/s;
        # FP32 67 TF; TF32 989 TF*, BF16 1,979 TF*, FP16 1,979 TF*, FP8 3,958 TF* (same compute as H100 SXM).
        GPUProfile(
            "h200", "NVIDIA H200 SXM 141GB", 141, 4.8 * TB,
            _tf(float32=67, tf32=494.5, bfloat16=989.5, float16=989.5, fp8=1979),
            "NVIDIA H200 Tensor Core GPU datasheet (SXM)",
        ),
        # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: 80 GB HBM2e, 2,039 GB/s;
        # FP32 19.5 TF; TF32 156 TF (312*), BF16 312 TF (624*), FP16 312 TF (624*). No FP8.
        GPUProfile(
            "a100-sxm", "NVIDIA A100 SXM4 80GB", 80, 2.039 * TB,
            _tf(float32=19.5, tf32=156, bfloat16=312, float16=312),
            "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)",
        ),
        # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s; FP32 91.6 TF; TF32 183 TF (366*),
        # BF16 362.05 TF (733*), FP16 362.05 TF (733*), FP8 733 TF (1,466*).
        GPUProfile(
            "l40s", "NVIDIA L40S 48GB", 48, 0.864 * TB,
            _tf(float32=91.6, tf32=183, bfloat16=362.05, float16=362.05, fp8=733),
            "NVIDIA L40S datasheet",
        ),
        # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090 column: 24 GB GDDR6X,
        # 1,008 GB/s; FP32 82.6 TF; tensor rates with FP32 accumulate (what inference
        # GEMMs use): TF32 82.6, BF16 165.2, FP16 165.2, FP8 330.3 TF (dense).
        GPUProfile(
            "rtx4090", "NVIDIA GeForce RTX 4090 24GB", 24, 1.008 * TB,
            _tf(float32=82.6, tf32=82.6, bfloat16=165.2, float16=165.2, fp8=330.3),
            "NVIDIA Ada GPU Architecture whitepaper (RTX 4090)",
        ),
    )
}

_ALIASES = {"h100": "h100-sxm", "h100-sxm5": "h100-sxm", "h200-sxm": "h200", "a100": "a100-sxm",
            "a100-80gb": "a100-sxm", "4090": "rtx4090", "rtx-4090": "rtx4090"}


def get_gpu(name: str) -> GPUProfile:
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise UnknownGPUError(
            f"unknown GPU {name!r}; known GPU profiles: {', '.join(GPUS)} "
            f"(or 'cpu' / 'cuda' to measure on this machine)"
        )
    return GPUS[key]
