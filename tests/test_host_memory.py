"""CPU runs keep freed memory in the process (utils/host_memory.py): checked by what the kernel sees."""

import subprocess
import sys

import pytest

from megatron_puzzle.utils import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# In a fresh interpreter: RSS after a 256 MiB tensor is allocated, filled and freed, minus RSS before.
_PROBE = """
import sys, torch
from megatron_puzzle.utils.host_memory import keep_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
if sys.argv[1] == "tuned":
    assert keep_freed_memory(force=True)
before = rss()
x = torch.ones(64 << 20)  # 256 MiB of float32
del x
print((rss() - before) >> 20)
"""


def _kept_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_freed_memory_stays_with_the_process_only_when_tuned():
    # glibc's default maps a 256 MiB tensor on its own and unmaps it when freed: RSS falls back
    assert _kept_mib("system") < 64
    # tuned, the tensor came from the heap and its pages stay for the next step's tensors
    assert _kept_mib("tuned") >= 200


def test_opt_out_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_OPT_OUT, "1")
    assert host_memory.keep_freed_memory(force=True) is False
