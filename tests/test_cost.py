"""Costs of subblock variants: analytic roofline, memory model, measurement harness, costs.json, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_puzzle.arch import AttentionVariant, BlockConfig, FFNVariant, ModelConfig
from megatron_puzzle.arch.search_space import default_search_space
from megatron_puzzle.cost import (
    PRESETS, Cost, CostsError, CostTable, Efficiency, Scenario, ScenarioError, UnknownGPUError, get_gpu,
    load_costs, load_scenario,
)
from megatron_puzzle.cost.analytic import AnalyticCostModel
from megatron_puzzle.cost.gpus import GPUS
from megatron_puzzle.cost.measure import (
    Job, MeasuredCostModel, MeasureError, check_local_device, job_energy_j, time_interleaved, time_job,
)
from megatron_puzzle.cost.nvml import NvmlMonitor, NvmlUnavailable
from megatron_puzzle.cost.memory import kv_cache_bytes, non_block_params, subblock_params


def tiny_cfg(tied: bool = True, **kw) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, num_layers=3, num_attention_heads=4, num_kv_heads=2,
                intermediate_size=160, tie_word_embeddings=tied)
    base.update(kw)
    return ModelConfig(**base)


# ---------------------------------------------------------------------- scenario


def test_presets_load_and_include_paper_shapes():
    assert load_scenario("cpu-b8") == Scenario("cpu-b8", 8, 128, 128, "float32", "float32", "cpu")
    fp8 = [s for s in PRESETS.values() if s.weight_dtype == "fp8"]
    assert fp8 and any(s.prefill_len == 128 and s.decode_len == 1024 for s in PRESETS.values())


def test_scenario_file_yaml_and_json(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("batch_size: 4\nprefill_len: 32\ndecode_len: 16\nweight_dtype: bf16\nkv_dtype: fp8\ndevice: H100-SXM\n")
    s = load_scenario(str(y))
    assert (s.name, s.weight_dtype, s.kv_dtype, s.device) == ("mine", "bfloat16", "fp8", "h100-sxm")
    j = tmp_path / "s.json"
    j.write_text(json.dumps(s.to_dict()))
    assert load_scenario(str(j)) == s


@pytest.mark.parametrize("field", ["batch_size", "prefill_len", "decode_len"])
@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_scenario_rejects_non_positive_sizes(field, bad):
    d = {"batch_size": 2, "prefill_len": 8, "decode_len": 8, field: bad}
    with pytest.raises(ScenarioError, match=field):
        Scenario.from_dict(d)


def test_scenario_rejects_bad_dtypes_and_devices(tmp_path):
    with pytest.raises(ScenarioError, match="unknown dtype 'int3'.*float32"):
        Scenario("x", 1, 1, 1, weight_dtype="int3")
    with pytest.raises(ScenarioError, match="no FP8 tensor cores"):
        Scenario("x", 1, 1, 1, weight_dtype="fp8", device="a100-sxm")
    with pytest.raises(UnknownGPUError, match="h100-sxm.*l40s"):
        Scenario("x", 1, 1, 1, device="b300")
    with pytest.raises(ScenarioError, match="unknown fields.*batch"):
        Scenario.from_dict({"batch": 2, "batch_size": 2, "prefill_len": 1, "decode_len": 1})
    with pytest.raises(ScenarioError, match="neither a preset nor an existing file.*cpu-b8"):
        load_scenario(str(tmp_path / "missing.yaml"))


def test_unknown_gpu_lists_known_profiles():
    with pytest.raises(UnknownGPUError) as e:
        get_gpu("v100")
    for name in GPUS:
        assert name in str(e.value)
    assert get_gpu("H100") is GPUS["h100-sxm"]


def test_gpu_profiles_are_dense_datasheet_figures():
    h100 = get_gpu("h100-sxm")
    # Datasheet: BF16 1,979 TFLOP/s and FP8 3,958 TFLOP/s *with sparsity*; dense is half.
    assert h100.flops["bfloat16"] == pytest.approx(1979e12 / 2)
    assert h100.flops["fp8"] == pytest.approx(2 * h100.flops["bfloat16"])
    assert h100.bandwidth == pytest.approx(3.35e12)
    assert not get_gpu("a100-sxm").supports_fp8
    assert all(p.supports_fp8 for n, p in GPUS.items() if n != "a100-sxm")


# ---------------------------------------------------------------------- memory model


def _decilm():
    pytest.importorskip("transformers")
    from megatron_puzzle.cost.decilm_runtime import decilm_config
    from megatron_puzzle.convert.hf_modeling.modeling_decilm import DeciLMForCausalLM, decilm_layer_modules

    return decilm_config, DeciLMForCausalLM, decilm_layer_modules


def test_param_counts_match_real_modules():
    decilm_config, DeciLMForCausalLM, decilm_layer_modules = _decilm()
    cfg = tiny_cfg()
    for name in default_search_space(cfg, round_to=32)[0]:
        v = AttentionVariant.from_name(name) if name.startswith("attn") else FFNVariant.from_name(name)
        block = BlockConfig(v, FFNVariant("no_op")) if name.startswith("attn") else BlockConfig(AttentionVariant("no_op"), v)
        layer, _ = decilm_layer_modules(decilm_config(cfg, [block]), 0)
        assert subblock_params(cfg, name) == sum(p.numel() for p in layer.parameters()), name
    for tied in (True, False):
        c = tiny_cfg(tied)
        model = DeciLMForCausalLM(decilm_config(c, []))
        assert non_block_params(c) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_bytes_match_allocated_cache(dtype):
    decilm_config, DeciLMForCausalLM, _ = _decilm()
    cfg = tiny_cfg(num_layers=4)
    blocks = [BlockConfig(AttentionVariant("full", 2), FFNVariant("full", 96)),
              BlockConfig(AttentionVariant("linear"), FFNVariant("no_op")),
              BlockConfig(AttentionVariant("full", 1), FFNVariant("linear")),
              BlockConfig(AttentionVariant("no_op"), FFNVariant("full", 160))]
    s = Scenario("t", batch_size=3, prefill_len=5, decode_len=4, weight_dtype=dtype, kv_dtype=dtype)
    model = DeciLMForCausalLM(decilm_config(cfg, blocks)).to(getattr(torch, dtype)).eval()
    ids = torch.randint(0, cfg.vocab_size, (s.batch_size, s.prefill_len))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(s.decode_len):  # generate: the cache ends at prefill + decode tokens
            ids = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=ids, cache=cache, use_cache=True)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers if getattr(layer, "is_initialized", True)
                    for t in (layer.keys, layer.values) if t is not None)
    predicted = sum(kv_cache_bytes(cfg, b.attention, s) for b in blocks)
    assert allocated == predicted > 0


# ---------------------------------------------------------------------- analytic roofline


def test_analytic_decode_ffn_is_memory_bound_hand_computed():
    # hidden 64, FFN 160, bf16 on H100 SXM, batch 2, one decode step.
    cfg = tiny_cfg()
    s = Scenario("t", 2, 8, 4, "bfloat16", "bfloat16", "h100-sxm")
    m = AnalyticCostModel(cfg, s, efficiency=Efficiency(compute=0.5, memory=0.8))
    c = m.variant_cost("ffn_160")
    params = 3 * 64 * 160 + 64                 # gate, up, down + norm = 30784
    weight_bytes = params * 2                  # bf16 = 61568
    act_bytes = 2 * 2 * 64 * 2                 # 2 tokens, read + write, 64 wide, 2 bytes = 512
    assert c.params == params and c.weight_bytes == weight_bytes and c.kv_cache_bytes == 0
    mem_s = (weight_bytes + act_bytes) / (3.35e12 * 0.8)
    flop_s = 2 * 2 * (3 * 64 * 160) / (989.5e12 * 0.5)
    assert mem_s > flop_s
    assert c.decode_time_s == pytest.approx(mem_s, rel=1e-12)


def test_analytic_prefill_attention_compute_bound_hand_computed():
    # A 70B-like layer: hidden 8192, 64 heads of 128, 8 KV heads; FP8 on H100 SXM, batch 64 x 1024.
    cfg = ModelConfig(vocab_size=128256, hidden_size=8192, num_layers=1, num_attention_heads=64,
                      num_kv_heads=8, intermediate_size=28672)
    s = Scenario("t", 64, 1024, 1024, "fp8", "fp8", "h100-sxm")
    c = AnalyticCostModel(cfg, s, efficiency=Efficiency(compute=0.7, memory=0.8)).variant_cost("attn_kv8")
    tokens = 64 * 1024
    matmul_weights = 8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192  # q, k, v, o
    gemm = 2 * tokens * matmul_weights
    scores = 2 * 64 * 8192 * 1024 * 1025      # QK^T + PV, causal: 2 x 2 x B x H x d x L(L+1)/2
    expected = (gemm + scores) / 1979e12 / 0.7  # FP8 dense peak, attention in FP8 too
    assert c.prefill_time_s == pytest.approx(expected, rel=1e-12)
    # KV cache: 2 (K, V) x 64 x 2048 tokens x 8 heads x 128 x 1 byte
    assert c.kv_cache_bytes == 2 * 64 * 2048 * 8 * 128


def test_analytic_decode_attention_reads_mean_cache():
    cfg = tiny_cfg()
    s = Scenario("t", 4, 100, 50, "bfloat16", "bfloat16", "h200")
    eff = Efficiency(compute=1.0, memory=1.0)
    c = AnalyticCostModel(cfg, s, efficiency=eff).variant_cost("attn_kv2")
    weights = (64 * 64 * 2 + 2 * 64 * 32 + 64) * 2  # q, o 64x64; k, v 64x32; norm; bf16
    acts = 2 * 4 * 64 * 2
    kv_read = 4 * 125 * 2 * 2 * 16 * 2              # batch x mean context (100 + 50/2) x K,V x heads x dim x bytes
    assert c.decode_time_s == pytest.approx((weights + acts + kv_read) / 4.8e12, rel=1e-12)
    no_op = AnalyticCostModel(cfg, s).variant_cost("attn_no_op")
    assert no_op == Cost()


def test_analytic_needs_a_gpu_profile_and_fp8_support():
    with pytest.raises(ValueError, match="GPU profile"):
        AnalyticCostModel(tiny_cfg(), load_scenario("cpu-b8"))
    s = Scenario("t", 1, 8, 8, "fp8", "fp8", "h100-sxm")
    with pytest.raises(ValueError, match="FP8"):
        AnalyticCostModel(tiny_cfg(), s, gpu="a100-sxm")


# ---------------------------------------------------------------------- costs.json


def _table(cfg, space, source="analytic"):
    s = Scenario("t", 2, 8, 4, "bfloat16", "bfloat16", "h100-sxm")
    m = AnalyticCostModel(cfg, s)
    layers = [{n: m.variant_cost(n) for n in names} for names in space]
    return CostTable(s, source, m.device_info(), m.non_block_cost(), layers)


def test_costs_json_round_trip_and_layout(tmp_path):
    cfg = tiny_cfg()
    space = default_search_space(cfg, round_to=32)
    table = _table(cfg, space)
    path = tmp_path / "measure" / "costs.json"
    table.save(path)
    raw = json.loads(path.read_text())
    assert list(raw) == ["scenario", "source", "device", "non_block", "layers"]
    assert set(raw["layers"][0]["attn_kv2"]) == {"params", "weight_bytes", "kv_cache_bytes", "prefill_time_s", "decode_time_s"}
    back = load_costs(path, space)
    assert back.to_dict() == table.to_dict()
    chosen = [["attn_kv2", "ffn_160"], ["attn_linear", "ffn_no_op"], ["attn_no_op", "ffn_linear"]]
    total = back.total(chosen)
    assert total.params == non_block_params(cfg) + sum(subblock_params(cfg, n) for layer in chosen for n in layer)


def test_user_costs_file_checked_against_space(tmp_path):
    cfg = tiny_cfg()
    space = default_search_space(cfg, round_to=32)
    table = _table(cfg, [names[:-1] for names in space])  # ffn_no_op missing everywhere
    path = tmp_path / "mine.json"
    table.save(path)
    with pytest.raises(CostsError, match="layer 0: ffn_no_op"):
        load_costs(path, {"layers": space}, as_user_file=True)
    assert load_costs(path, [names[:-1] for names in space], as_user_file=True).source == "file"
    raw = json.loads(path.read_text())
    raw["layers"][1]["attn_kv2"]["decode_time_s"] = -1
    path.write_text(json.dumps(raw))
    with pytest.raises(CostsError, match=r"layers\[1\].attn_kv2.decode_time_s"):
        load_costs(path)


# ---------------------------------------------------------------------- measurement harness


class StandInRuntime:
    """A small stand-in runtime: linear layers of the variant's size; counts the jobs it builds."""

    def __init__(self, hidden=32, tokens=16):
        self.hidden, self.tokens, self.built = hidden, tokens, []

    def subblock_job(self, variant, phase):
        self.built.append((variant, phase))
        lin = torch.nn.Linear(self.hidden, self.hidden)
        x = torch.randn(self.tokens if phase == "prefill" else 1, self.hidden)
        return Job(run=lambda state: lin(state), setup=lambda: x.clone())

    def non_block_job(self, phase):
        return self.subblock_job("<non_block>", phase)


def test_time_job_and_interleaved_positive_medians():
    lin = torch.nn.Linear(16, 16)
    job = Job(run=lambda x: lin(x), setup=lambda: torch.randn(4, 16))
    samples = time_job(job, "cpu", warmup=1, repeats=3)
    assert len(samples) == 3 and all(t > 0 for t in samples)
    t = time_interleaved({"a": job, "b": job}, "cpu", warmup=1, rounds=3, min_sample_s=1e-3,
                         flush=lambda: None)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())
    assert all(v > 0 for v in time_job(job, "cpu", warmup=0, repeats=2, clock="process"))
    with pytest.raises(ValueError, match="clock"):
        time_job(job, "cpu", clock="sundial")


def test_measured_cost_model_times_each_variant_once():
    cfg = tiny_cfg()
    rt = StandInRuntime()
    m = MeasuredCostModel(cfg, Scenario("t", 2, 16, 8), rt, warmup=1, repeats=2, threads=1, flush_cache=False)
    space = default_search_space(cfg, round_to=32)
    m.measure([n for layer in space for n in layer])
    costs = [{n: m.variant_cost(n) for n in layer} for layer in space]
    nb = m.non_block_cost()
    timed = [n for n in space[0] if "no_op" not in n]
    assert sorted(rt.built) == sorted([(n, p) for n in timed + ["<non_block>"] for p in ("prefill", "decode")])
    for n in timed:
        assert costs[0][n].prefill_time_s > 0 and costs[0][n].decode_time_s > 0
        assert costs[2][n] == costs[0][n]
    assert costs[0]["ffn_no_op"].prefill_time_s == 0 and nb.decode_time_s > 0
    info = m.device_info()
    assert info["type"] == "cpu" and info["threads"] == 1


def test_measured_with_decilm_runtime_small():
    _decilm()
    from megatron_puzzle.cost.decilm_runtime import DeciLMRuntime

    cfg = tiny_cfg()
    s = Scenario("t", 2, 8, 4)
    rt = DeciLMRuntime(cfg, s, "cpu", max_stack=4)
    assert rt.stack_size("ffn_96") == 4  # tiny weights: as many copies as allowed
    assert rt.subblock_job("attn_kv1", "decode").units == 4
    big = DeciLMRuntime(ModelConfig(vocab_size=8, hidden_size=4096, num_layers=1, num_attention_heads=32,
                                    num_kv_heads=8, intermediate_size=14336), s)
    assert big.stack_size("ffn_14336") == 1  # 700 MB of weights already exceed any cache
    m = MeasuredCostModel(cfg, s, rt, warmup=1, repeats=2, threads=1, min_sample_s=0.0)
    for n in ("attn_kv1", "attn_linear", "ffn_96", "ffn_linear"):
        c = m.variant_cost(n)
        assert c.prefill_time_s > 0 and c.decode_time_s > 0
    assert m.non_block_cost().prefill_time_s > 0


def test_missing_cuda_nvml_and_fp8_say_so(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(MeasureError, match="no CUDA device.*--source analytic"):
            check_local_device(Scenario("t", 1, 1, 1, "bfloat16", "bfloat16", "cuda"))
    with pytest.raises(MeasureError, match="FP8.*analytic"):
        check_local_device(Scenario("t", 1, 1, 1, "fp8", "fp8", "cpu"))
    with pytest.raises(MeasureError, match="GPU profile 'h100-sxm'.*analytic"):
        check_local_device(Scenario("t", 1, 1, 1, "bfloat16", "bfloat16", "h100-sxm"))
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # as if nvidia-ml-py were absent
    with pytest.raises(NvmlUnavailable, match="nvidia-ml-py.*analytic"):
        NvmlMonitor()


# ---------------------------------------------------------------------- search space and CLI


def test_default_search_space_of_smollm_shape():
    cfg = ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_attention_heads=9, num_kv_heads=3,
                      intermediate_size=1536, tie_word_embeddings=True)
    space = default_search_space(cfg)
    assert len(space) == 30 and all(layer == space[0] for layer in space)
    assert space[0][:4] == ["attn_kv3", "attn_kv1", "attn_linear", "attn_no_op"]
    sizes = [int(n[4:]) for n in space[0] if n[4:].isdigit()]
    assert sizes[0] == 1536 and all(s % 64 == 0 for s in sizes) and sizes == sorted(set(sizes), reverse=True)
    assert space[0][-2:] == ["ffn_linear", "ffn_no_op"]


def _run_dir(tmp_path, cfg):
    cfg.save(tmp_path / "parent" / "model_config.json")
    return tmp_path


def measure_cmd(argv):
    """Run `megatron-puzzle measure ARGV` through this stage's own parser (other stages not imported)."""
    import argparse

    from megatron_puzzle.cost.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["measure", *argv])
    return args.func(args)


def test_cli_measure_analytic_and_errors(tmp_path):
    from megatron_puzzle.cli import UserError

    cfg = tiny_cfg()
    run = _run_dir(tmp_path, cfg)
    assert measure_cmd(["--run-dir", str(run), "--scenario", "h100-fp8-128-1024"]) == 0
    table = load_costs(run / "measure" / "costs.json", default_search_space(cfg))
    assert table.source == "analytic" and table.device["name"] == "h100-sxm"
    assert (run / "measure" / "done").exists()
    # a user-given file becomes the costs, source "file"
    user = tmp_path / "user.json"
    table.save(user)
    assert measure_cmd(["--run-dir", str(run), "--scenario", "h100-fp8-128-1024", "--source", str(user)]) == 0
    assert load_costs(run / "measure" / "costs.json").source == "file"
    with pytest.raises(UserError, match="is for scenario"):
        measure_cmd(["--run-dir", str(run), "--scenario", "h100-bf16-128-1024", "--source", str(user)])
    with pytest.raises(UserError, match="known GPU profiles: h100-sxm"):
        measure_cmd(["--run-dir", str(run), "--scenario", "cpu-b8", "--source", "analytic", "--gpu", "x9"])
    with pytest.raises(UserError, match="model_config.json"):
        measure_cmd(["--run-dir", str(tmp_path / "nowhere"), "--scenario", "cpu-b8"])


def test_cli_measure_on_cpu_with_library_space(tmp_path):
    _decilm()
    cfg = tiny_cfg(num_layers=2)
    run = _run_dir(tmp_path, cfg)
    space = [["attn_kv2", "attn_no_op", "ffn_160"], ["attn_linear", "ffn_64", "ffn_no_op"]]
    (run / "library").mkdir()
    (run / "library" / "space.json").write_text(json.dumps({"layers": space}))
    scen = tmp_path / "s.yaml"
    scen.write_text("name: tiny\nbatch_size: 2\nprefill_len: 8\ndecode_len: 4\n")
    assert measure_cmd(["--run-dir", str(run), "--scenario", str(scen), "--repeats", "2",
                        "--warmup", "1", "--threads", "1", "--clock", "process"]) == 0
    table = load_costs(run / "measure" / "costs.json", space)
    assert table.source == "measured" and [sorted(layer) for layer in table.layers] == [sorted(x) for x in space]
    assert table.device["clock"] == "process" and table.device["threads"] == 1
    assert table.layers[0]["attn_kv2"].prefill_time_s > 0 and math.isfinite(table.non_block.decode_time_s)


def test_cli_registered():
    from megatron_puzzle import cli

    assert "megatron_puzzle.cost.cli" in cli.COMMAND_MODULES


# ---------------------------------------------------------------------- NVML (a fake pynvml) and energy


class FakeNvml:
    """Stands in for pynvml: cards in NVML's own order, each with a UUID, a PCI address and an energy counter."""

    NVML_CLOCK_SM = 1

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, cards):
        self.cards = cards  # dicts: uuid, pci (domain, bus, device), energy (mJ or None), name
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.cards[i]

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"]

    def nvmlDeviceGetPciInfo(self, h):
        d, b, dev = h["pci"]
        return type("Pci", (), {"domain": d, "bus": b, "device": dev, "busId": f"{d:08X}:{b:02X}:{dev:02X}.0"})()

    def nvmlDeviceGetName(self, h):
        return h["name"].encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Mem", (), {"total": 80 * 2**30, "used": 2**30})()

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1980

    def nvmlDeviceGetPowerUsage(self, h):
        return 350_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h["energy"] is None:
            raise self.NVMLError_NotSupported("Not Supported")
        return h["energy"]


def _uuid(n: int) -> str:
    return f"{n:08x}-1111-2222-3333-{n:012x}"


class FakeProps:
    def __init__(self, uuid, pci, name="NVIDIA H100 80GB HBM3"):
        self.uuid, self.name = uuid, name
        self.pci_domain_id, self.pci_bus_id, self.pci_device_id = pci


def _fake_gpus(monkeypatch, visible, cards, current=0):
    """torch sees the cards `visible` (NVML indices, as CUDA_VISIBLE_DEVICES picks them); NVML sees all."""
    import sys

    fake = FakeNvml(cards)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    props = [FakeProps(_TorchUuid(cards[i]["uuid"]), cards[i]["pci"]) for i in visible]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i if isinstance(i, int) else 0])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    return fake


class _TorchUuid:
    """Like torch's _CUuuid: the 16 raw bytes, and a str without NVML's 'GPU-' prefix."""

    def __init__(self, nvml_uuid: str):
        self.text = nvml_uuid.removeprefix("GPU-")
        self.bytes = bytes.fromhex(self.text.replace("-", ""))

    def __str__(self):
        return self.text


def _cards(n=4):
    return [{"uuid": f"GPU-{_uuid(100 + i)}", "pci": (0, 0x18 + 0x10 * i, 0), "energy": 1000 * i, "name": f"card{i}"}
            for i in range(n)]


@pytest.mark.parametrize("visible, cuda_index", [([2, 3], 1), ([3, 0, 1], 0), ([0, 1, 2, 3], 2)])
def test_nvml_handle_follows_cuda_visible_devices_and_local_rank(monkeypatch, visible, cuda_index):
    """CUDA device i is NVML card visible[i], whatever CUDA_VISIBLE_DEVICES and the local rank make i."""
    from megatron_puzzle.cost.nvml import device_handle

    cards = _cards()
    fake = _fake_gpus(monkeypatch, visible, cards)
    for dev in (torch.device("cuda", cuda_index), cuda_index, f"cuda:{cuda_index}"):
        handle, how = device_handle(fake, dev)
        assert handle is cards[visible[cuda_index]] and how == "uuid"
    # 'cuda' without an index: the current device (set per local rank by init_distributed)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: cuda_index)
    assert device_handle(fake, torch.device("cuda"))[0] is cards[visible[cuda_index]]


def test_nvml_handle_by_pci_when_the_uuid_is_not_a_cards_and_error_when_neither(monkeypatch):
    from megatron_puzzle.cost.nvml import device_handle

    cards = _cards()
    fake = _fake_gpus(monkeypatch, [1, 2], cards)
    import megatron_puzzle.cost.nvml as nvml_mod

    props = [FakeProps("MIG-" + _uuid(999), cards[2]["pci"])]  # a MIG instance of card 2
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[0])
    assert nvml_mod.device_handle(fake, 0) == (cards[2], "pci")
    props[0] = FakeProps("GPU-" + _uuid(999), (0, 0xFF, 0))
    with pytest.raises(NvmlUnavailable, match="no device with the UUID or PCI bus id of CUDA device 0"):
        device_handle(fake, 0)


def test_nvml_monitor_reads_the_card_in_use(monkeypatch):
    cards = _cards()
    cards[0]["energy"] = None  # a card without an energy counter
    _fake_gpus(monkeypatch, [3, 0], cards)
    mon = NvmlMonitor(torch.device("cuda", 0), interval_s=0.001)
    assert mon.name == "card3" and mon.matched_by == "uuid" and mon.has_energy and mon.energy_mj() == 3000
    with mon:
        import time as _t

        _t.sleep(0.02)
    s = mon.summary()
    assert s["samples"] >= 1 and s["power_w_max"] == 350.0 and s["uuid"] == cards[3]["uuid"]
    assert not NvmlMonitor(1).has_energy  # card 0: Not Supported -> no energy figures, no error


def test_job_energy_is_the_counter_difference_per_run_and_unit():
    """A fake energy counter that advances 7 mJ per run and 2 mJ per setup: back-to-back runs include
    the (light) setups; a job with a heavy setup gets no figure."""
    counter = {"mj": 10_000}

    def run(_):
        counter["mj"] += 7

    def setup():
        counter["mj"] += 2

    job = Job(run=run, setup=setup, units=3)
    e = job_energy_j(job, "cpu", lambda: counter["mj"], run_s=0.01, window_s=0.5)
    assert e == pytest.approx(9e-3 / 3)  # 50 runs: (7 + 2) mJ each, per unit
    assert job_energy_j(Job(run=run, setup=setup, light_setup=False), "cpu", lambda: counter["mj"], 0.01) is None
    assert job_energy_j(job, "cpu", lambda: None, 0.01) is None  # no counter


def test_measured_costs_carry_energy_per_variant_and_model():
    """Energy attribution through MeasuredCostModel with a fake counter that charges each variant's job a
    known energy per unit: costs, joules per token per variant, and the model's sum."""
    from megatron_puzzle.cost.decilm_runtime import DeciLMRuntime

    cfg = tiny_cfg(num_layers=2)
    s = Scenario("t", 2, 16, 8)
    counter = {"mj": 0.0}
    charge = {("attn_kv1", "prefill"): 40.0, ("attn_kv1", "decode"): 4.0, ("ffn_96", "prefill"): 30.0,
              ("ffn_96", "decode"): 3.0, ("<non_block>", "prefill"): 20.0, ("<non_block>", "decode"): 2.0}

    class Charged:
        def __init__(self, rt):
            self.rt = rt

        def _wrap(self, job, key):
            def run(state):
                counter["mj"] += charge[key] * job.units
                return job.run(state)
            return Job(run=run, setup=job.setup, units=job.units, light_setup=True)

        def subblock_job(self, v, phase):
            return self._wrap(self.rt.subblock_job(v, phase), (v, phase))

        def non_block_job(self, phase):
            return self._wrap(self.rt.non_block_job(phase), ("<non_block>", phase))

    rt = Charged(DeciLMRuntime(cfg, s, max_stack=2))
    m = MeasuredCostModel(cfg, s, rt, warmup=1, repeats=1, threads=1, min_sample_s=0.0, flush_cache=False)
    m.read_energy, m.energy_window_s = (lambda: counter["mj"]), 0.001
    costs = {n: m.variant_cost(n) for n in ("attn_kv1", "ffn_96", "attn_no_op")}
    assert costs["attn_kv1"].prefill_energy_j == pytest.approx(0.040)
    assert costs["ffn_96"].decode_energy_j == pytest.approx(0.003)
    assert (costs["attn_no_op"].prefill_energy_j, costs["attn_no_op"].decode_energy_j) == (0.0, 0.0)
    table = CostTable(s, "measured", m.device_info(), m.non_block_cost(),
                      [dict(costs), dict(costs)])
    per = table.energy_per_token()
    assert per["variants"]["attn_kv1"]["decode_j_per_token"] == pytest.approx(0.004 / 2)
    assert per["variants"]["ffn_96"]["prefill_j_per_token"] == pytest.approx(0.030 / (2 * 16))
    model = table.model_energy_per_token([["attn_kv1", "ffn_96"], ["attn_no_op", "ffn_96"]])
    decode = (0.002 + 0.004 + 2 * 0.003) / 2
    prefill = (0.020 + 0.040 + 2 * 0.030)
    assert model["decode_j_per_token"] == pytest.approx(decode)
    assert model["request_j_per_token"] == pytest.approx((prefill + 8 * decode * 2) / (2 * 8))
    table.parent = [["attn_kv1", "ffn_96"], ["attn_kv1", "ffn_96"]]
    assert table.to_dict()["energy_per_token"]["parent_model"] == table.model_energy_per_token(table.parent)
    back = CostTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert back.parent == table.parent
    assert back.layers[0]["attn_kv1"] == costs["attn_kv1"] and back.non_block == table.non_block
    old = dict(table.to_dict()["layers"][0]["ffn_96"])
    for f in ("prefill_energy_j", "decode_energy_j"):
        old.pop(f)
    assert Cost.from_dict(old, "x").prefill_energy_j is None  # costs files without energy still load


def test_static_kv_cache_decode_step_equals_the_dynamic_cache_one():
    """The CUDA-graph path's cache: one decode step through a fixed-storage cache gives the output of
    transformers' DynamicCache holding the same past (eager, so it runs here)."""
    from transformers.cache_utils import DynamicCache

    from megatron_puzzle.convert.hf_modeling.modeling_decilm import DeciLMRotaryEmbedding, decilm_layer_modules
    from megatron_puzzle.cost.decilm_runtime import StaticKVCache, decilm_config

    cfg = tiny_cfg()
    config = decilm_config(cfg, [BlockConfig(AttentionVariant("full", 2), FFNVariant("no_op"))])
    torch.manual_seed(0)
    layer = decilm_layer_modules(config, 0)[0].eval()
    past, b = 5, 3
    static = StaticKVCache({0: 2}, b, past, cfg.head_dim, torch.float32, torch.device("cpu"))
    dynamic = DynamicCache()
    dynamic.update(static.k[0][:, :, :past].clone(), static.v[0][:, :, :past].clone(), 0)
    x = torch.randn(b, 1, cfg.hidden_size)
    pos = DeciLMRotaryEmbedding(config)(torch.full((b, 1), past), torch.float32)
    with torch.no_grad():
        ref = layer.attention_subblock(x, pos, None, dynamic)
        out = layer.attention_subblock(x, pos, None, static)
        again = layer.attention_subblock(x, pos, None, static)  # a replay writes the same slot again
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(again, ref)
    assert static.get_seq_length(0) == past and static.k[0].shape[2] == past + 1


def test_cpu_measurement_records_its_timing_paths_and_fp8_recipe_is_checked():
    cfg = tiny_cfg(num_layers=1)
    m = MeasuredCostModel(cfg, Scenario("t", 2, 8, 4), warmup=0, repeats=1, threads=1, min_sample_s=0.0)
    m.variant_cost("ffn_96")
    info = m.device_info()
    assert info["timing_paths"] == {"prefill": "eager", "decode": "eager"} and "energy" not in info
    s = Scenario("f", 8, 8, 8, "fp8", "fp8", "h100-sxm", fp8_recipe="Current")
    assert s.fp8_recipe == "current" and s.to_dict()["fp8_recipe"] == "current"
    assert "fp8_recipe" not in Scenario("b", 8, 8, 8).to_dict()
    with pytest.raises(ScenarioError, match="fp8_recipe must be one of"):
        Scenario("f", 8, 8, 8, "fp8", "fp8", "h100-sxm", fp8_recipe="mxfp8")


def test_fp8_on_a_gpu_needs_fp8_tensor_cores_transformer_engine_and_a_batch_of_8(monkeypatch):
    """What `measure` says on a GPU without FP8, or without Transformer Engine (a CPU stands in for the GPU)."""
    import sys

    from megatron_puzzle.cost.decilm_runtime import DeciLMRuntime

    s = Scenario("f", 8, 16, 8, "fp8", "fp8", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(MeasureError, match="A100.*no FP8 tensor cores.*--source analytic"):
        check_local_device(s)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # not installed
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(MeasureError, match="Transformer Engine.*Dockerfile"):
        check_local_device(s)
    with pytest.raises(MeasureError, match="multiple of 8"):
        DeciLMRuntime(tiny_cfg(), Scenario("f", 4, 16, 8, "fp8", "fp8", "cuda"), "cpu")
