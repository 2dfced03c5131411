"""scripts/bench_train.py --profile on CPU (--smoke): extra profiled steps after the timing, a markdown and a
JSON per run whose per-step figures add up; and the kernel-name categories on names the H100 produces."""
from __future__ import annotations

import json

import pytest

from orca.bench import PROFILE_CATEGORIES, profile_category, short_kernel_name, summarize_profile

from tests.conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_train_profile_smoke(tmp_path, monkeypatch):
    script = load_script("bench_train.py", "bench_train_profile")
    calls = {"steps": 0, "at_profile": []}
    timed_step, profile = script.train_step, script.profile_steps

    def counting_step(*a, **k):  # every step the script itself runs (warm-up and timed)
        calls["steps"] += 1
        return timed_step(*a, **k)

    def recording_profile(cfg, x, y, steps, device, trace=None):
        calls["at_profile"].append(calls["steps"])
        return profile(cfg, x, y, steps, device, trace=trace)

    monkeypatch.setattr(script, "train_step", counting_step)
    monkeypatch.setattr(script, "profile_steps", recording_profile)
    md = script.main(["--smoke", "--methods", "full", "lora", "--profile", "2", "--out", str(tmp_path),
                      "--profile-trace", str(tmp_path / "traces")])
    assert md == tmp_path / "train_smoke.md"
    # profiled steps are extra: run after every timed block (2 configs x (1 warm-up + 2 timed)), none timed after
    assert calls["at_profile"] == [6, 6] and calls["steps"] == 6
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["train_smoke_full_b4.json",
                                                                      "train_smoke_lora_b4.json"]

    out = json.loads((tmp_path / "train_smoke_profile.json").read_text())
    assert out["profile_steps"] == 2 and out["timing"] == "cpu_self" and "--profile" in out["command"]
    assert [(r["config"], r["batch"]) for r in out["results"]] == [("full", 4), ("lora", 4)]
    for r in out["results"]:
        s = r["summary"]
        assert s["kernels_per_step"] > 0 and s["device_ms"] > 0 and s["cpu_ms"] > 0 and s["timed_ms"] > 0
        assert s["device_ms"] == pytest.approx(s["cpu_ms"])  # on CPU the "device" time is self CPU time
        assert 0 < len(s["top"]) <= 25 and all(t["share"] > 0 and t["calls_per_step"] > 0 for t in s["top"])
        assert sum(t["share"] for t in s["top"]) <= 1 + 1e-9
        assert [t["ms_per_step"] for t in s["top"]] == sorted((t["ms_per_step"] for t in s["top"]), reverse=True)
        assert set(s["categories_ms"]) == set(PROFILE_CATEGORIES)
        assert sum(s["categories_ms"].values()) == pytest.approx(s["device_ms"])
        assert s["gemm_ms"] > 0 and s["gemm_ms"] + s["non_gemm_ms"] == pytest.approx(s["device_ms"])
        assert r["key_averages"] and all(k["count"] > 0 for k in r["key_averages"])
    # the LoRA step runs the frozen base through FusedLoRALinear: fewer ops than full fine-tuning
    full, lora = (r["summary"] for r in out["results"])
    assert lora["kernels_per_step"] < full["kernels_per_step"]

    text = (tmp_path / "train_smoke_profile.md").read_text()
    assert "No CUDA here" in text and "by kernel name and are approximate" in text
    assert "| 4 | full |" in text and "| 4 | lora |" in text and "## lora, batch 4" in text
    assert text.count("| 1 | `") == 2  # one top table per configuration


def test_profile_categories_of_gpu_kernel_names():
    cases = {
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN": "GEMM",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas": "GEMM",
        "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)": "GEMM",
        "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>": "GEMM",
        "triton_tem_fused_addmm_3": "GEMM",
        "aten::mm": "GEMM",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>::Params)":
            "attention",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false>>": "attention",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>": "optimizer",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const>": "copy/cast",
        "Memcpy DtoD (Device -> Device)": "copy/cast",
        "triton_poi_fused__to_copy_0": "copy/cast",
        "triton_poi_fused__to_copy_clone_view_12": "copy/cast",
        "aten::_to_copy": "copy/cast",
        "aten::to": "copy/cast",
        "triton_poi_fused__to_copy_add_mul_3": "elementwise/reduction",
        "triton_red_fused_native_layer_norm_5": "elementwise/reduction",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise/reduction",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float>>>":
            "elementwise/reduction",
        "Memset (Device)": "other",
    }
    assert {n: profile_category(n) for n in cases} == cases
    long = "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<" + "x" * 200
    assert short_kernel_name(long).startswith("multi_tensor_apply_kernel<") and len(short_kernel_name(long)) == 80


def test_summarize_profile_counts_device_events_once():
    """Kernel rows make the device time; a record_function's GPU-side span ("annotation") and the CPU
    ops' own device totals (their kernels again) must not count it twice."""
    row = lambda name, kind, count, self_cpu=0.0, dev=0.0: {  # noqa: E731
        "name": name, "count": count, "device_type": kind, "self_cpu_us": self_cpu, "cpu_us": self_cpu,
        "self_device_us": dev, "device_us": dev}
    prof = {"steps": 2, "wall_ms_per_step": 5.0, "key_averages": [
        row("aten::mm", "CPU", 4, self_cpu=200.0, dev=3000.0),
        row("cudaLaunchKernel", "CPU", 10, self_cpu=100.0),
        row("Optimizer.step#AdamW.step", "annotation", 2, dev=1500.0),
        row("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "device", 4, dev=3000.0),
        row("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float>>", "device", 2, dev=1000.0),
        row("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "device", 4, dev=1000.0)]}
    s = summarize_profile(prof)
    assert s["timing"] == "device"
    assert s["device_ms"] == pytest.approx(2.5) and s["cpu_ms"] == pytest.approx(0.15)
    assert s["kernels_per_step"] == 5 and s["launch_calls_per_step"] == 5
    assert s["gemm_ms"] == pytest.approx(1.5) and s["non_gemm_ms"] == pytest.approx(1.0)
    assert s["categories_ms"]["optimizer"] == pytest.approx(0.5)
    assert [t["share"] for t in s["top"]] == pytest.approx([0.6, 0.2, 0.2])
