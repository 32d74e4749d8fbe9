"""The planner against measured peaks of a real training step (tiny model, CPU)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import measured_peak

import mozgach_mlx as mz
from mozgach_mlx import lora, trainer
from mozgach_mlx.errors import ConfigError

LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
            "tie_word_embeddings": False}


def _measured_peak(L: int) -> tuple[int, object]:
    model, _ = mz.load("tiny", quantize=4)
    lora.apply(model, lora.LoRAConfig(dropout=0.0))
    model.grad_checkpoint, model.mlp_chunk = True, 1024
    cfg = trainer.TrainConfig()
    x = mx.random.randint(0, 250, (1, L))
    m = mx.ones((1, L))
    vg = nn.value_and_grad(model, lambda a, b, c: trainer.default_loss(model, a, b, c, cfg))
    return measured_peak(lambda: vg(x, x, m), warm_up=True), model


def test_estimate_tracks_measured_peak_and_its_growth():
    (p1, model), (p2, _) = _measured_peak(1024), _measured_peak(3072)
    e1 = mz.plan(model, 1024, mlp_chunk=1024, backend="cpu", strategy="none").total_bytes
    e2 = mz.plan(model, 3072, mlp_chunk=1024, backend="cpu", strategy="none").total_bytes
    assert 0.65 < e1 / p1 < 1.5, (e1, p1)
    assert 0.65 < e2 / p2 < 1.5, (e2, p2)
    # growth 1K -> 3K on tiny: 0.58 after the recalibration on 2K-64K (benchmarks/calibration.jsonl, +-10%)
    assert 0.5 < (e2 - e1) / (p2 - p1) < 1.6, (e2 - e1, p2 - p1)


def test_components_follow_the_formulas():
    p = mz.plan(LLAMA_8B, 100_000, quantize=4, backend="metal", mlp_chunk=4096, loss_chunk=512, strategy="none")
    d, n = 4096, 32
    assert p.components["checkpoints"] == n * 100_000 * d * 2  # one bf16 (L, d) block input per layer
    lora_params = n * 16 * ((d + d) + (d + 1024) + (d + 1024) + (d + d))
    assert p.components["adapter"] == lora_params * 4 * 5
    # 4-bit weights: half a byte per linear weight plus a bf16 scale and bias per 64
    linear = n * (d * d * 2 + d * 1024 * 2 + 3 * d * 14336)
    assert p.components["weights"] == int(linear * (0.5 + 4 / 64) + 2 * 128256 * d * 2 + n * 2 * d * 2)
    assert p.components["loss"] == int(mz.plan.__globals__["LOSS_WIDTHS"] * 512 * 128256 * 4)


def test_memory_is_linear_in_context_and_budget_solves_it():
    a = mz.plan(LLAMA_8B, 50_000, backend="metal", strategy="none").total_bytes
    b = mz.plan(LLAMA_8B, 100_000, backend="metal", strategy="none").total_bytes
    c = mz.plan(LLAMA_8B, 150_000, backend="metal", strategy="none").total_bytes
    assert c - b == pytest.approx(b - a, rel=1e-6)
    p = mz.plan(LLAMA_8B, 100_000, memory_gb=48, backend="metal", strategy="none")
    at_max = mz.plan(LLAMA_8B, p.max_context, backend="metal", strategy="none").total_bytes
    assert at_max == pytest.approx(48 * 2**30, rel=1e-3)
    assert p.fits == (p.total_bytes <= 48 * 2**30)
    assert any("rope_scaling" in n for n in p.notes)  # 100K > 8192 positions without scaling


@pytest.mark.parametrize("kw,match", [({"context": 0}, "context"), ({"quantize": 3}, "quantize"),
                                      ({"lora_targets": ("qq_proj",)}, "unknown LoRA target")])
def test_bad_arguments(kw, match):
    args = {"context": 1000, **kw}
    with pytest.raises(ConfigError, match=match):
        mz.plan(LLAMA_8B, **args)


def test_attention_flops_count_only_the_blocks_a_mask_computes():
    """The step's FLOPs: 8 N per token for the frozen linears and the head, plus 18 D per
    layer, head and (query, key) pair the blockwise attention computes for the mask."""
    L, d, n, H, D = 32768, 4096, 32, 32, 128
    linear = 8.0 * (n * (d * d * 2 + d * 1024 * 2 + 3 * d * 14336) + 128256 * d) * L

    def attention_flops(**kw):
        return mz.plan(LLAMA_8B, L, backend="metal", **kw, strategy="none").flops_per_step - linear

    causal = attention_flops()
    assert causal == pytest.approx(18.0 * n * D * mz.attention.computed_pairs(L, heads=H))
    assert causal == pytest.approx(9.0 * n * H * D * L * L, rel=0.02)  # ~ L^2 / 2 pairs
    docs = attention_flops(attention={"document_length": 1024})
    assert docs == pytest.approx(18.0 * n * D * mz.attention.computed_pairs(
        L, heads=H, segment_ids=np.arange(L) // 1024))
    assert causal / docs > 20
    s2 = attention_flops(attention={"s2_group": 0.25})
    assert s2 == pytest.approx(attention_flops(attention={"s2_group": 8192}))
    assert 4.0 < causal / s2 < 4.5
    p = mz.plan(LLAMA_8B, L, backend="metal", attention={"window": 4096}, strategy="none")
    assert any("of the causal attention" in note for note in p.notes)
    with pytest.raises(ConfigError, match="unknown attention key"):
        mz.plan(LLAMA_8B, L, attention={"documents": 32})
    with pytest.raises(ConfigError, match="document_length"):
        mz.plan(LLAMA_8B, L, attention={"document_length": 0})


def test_a_contrastive_step_adds_a_forward_backward_and_a_base_forward_per_other_domain_row():
    """TrainConfig.contrast: B more rows through the plain step (6 N per token for the block
    linears, 8 N for the head, 14 D per pair) and the base's forward (2 N, 4 D per pair)."""
    L, d, n, H, D = 4096, 4096, 32, 32, 128
    blocks, head = n * (d * d * 2 + d * 1024 * 2 + 3 * d * 14336), 128256 * d
    pairs = mz.attention.computed_pairs(L, heads=H)
    plain = (6.0 * blocks + 8.0 * head) * L + 14.0 * n * D * pairs
    forward = 2.0 * (blocks + head) * L + 4.0 * n * D * pairs
    one = mz.plan(LLAMA_8B, L, backend="metal", batch_size=1, strategy="plain")
    both = mz.plan(LLAMA_8B, L, backend="metal", batch_size=1, strategy="plain", contrast=True)
    assert one.flops_per_step == pytest.approx(plain)
    assert both.flops_per_step == pytest.approx(2 * plain + forward)
    assert both.total_bytes == one.total_bytes  # the rows run one at a time
    assert any(n.startswith("contrast: 1 other-domain rows") and "2.3" in n for n in both.notes)
    cfg = mz.TrainConfig(max_seq_length=L, batch_size=1, contrast=1.0, memory_strategy="plain")
    assert trainer.memory_plan(LLAMA_8B, cfg).flops_per_step == pytest.approx(both.flops_per_step)
    with pytest.raises(ConfigError, match="contrast and context_parallel"):
        mz.plan(LLAMA_8B, L, contrast=True, ranks=2, context_parallel=True)
