"""What needs a CUDA device: bench/gpu.sh runs these on the GPU; without one they are skipped.

The other tests run on CPU. These repeat, on the GPU, the ones whose kernels differ
there (fused attention, bf16 autocast, Adafactor's scratch memory) against the same
oracles, and check the attention kernel that the 13B memory plan (bench/memory_plan.py)
assumes: scaled_dot_product_attention with T5's additive position bias must run the
memory-efficient kernel, not the math kernel that keeps every attention probability.
"""

from types import SimpleNamespace

import pytest
import torch

import evaluate
import model
import promot
from helpers import load_oracle, make_checkpoint, random_batch
from support import fsdp, t5x_loss
from support.adafactor import Adafactor

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.sh)"
)
CUDA = torch.device("cuda")


def models(path, **config):
    make_checkpoint(path, kind="t5v1_1", **config)
    return model.load_pretrained(str(path), device=CUDA), load_oracle(str(path)).to(CUDA)


def test_logits_and_gradients_on_the_gpu_equal_transformers(tmp_path):
    ours, theirs = models(tmp_path, dropout_rate=0.0)
    ids, mask, dec = (t.to(CUDA) for t in random_batch(96))
    labels = torch.cat([dec[:, 1:], torch.ones_like(dec[:, :1])], 1)
    ours.train(), theirs.train()
    theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    logits = ours(ids, mask, model.shift_right(labels))
    total, count = t5x_loss.cross_entropy(logits, labels)
    (total / count).backward()
    with torch.no_grad():
        expected = theirs(
            input_ids=ids, attention_mask=mask, decoder_input_ids=model.shift_right(labels)
        ).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    grads = {
        model.hf_to_ours(n): p.grad for n, p in theirs.named_parameters() if p.grad is not None
    }
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_beam_search_on_the_gpu_equals_transformers(tmp_path):
    ours, theirs = models(tmp_path, vocab_size=96)
    with torch.no_grad():  # EOS = two tokens' logits summed: beams end at different lengths
        for net in (ours, theirs):
            net.lm_head.weight[1] = net.lm_head.weight[5] + net.lm_head.weight[6]
    ids, mask = (t.to(CUDA) for t in random_batch(96, batch=6, src_len=12)[:2])
    for num_beams in (1, 4):
        kwargs = dict(num_beams=num_beams, max_new_tokens=20, length_penalty=1.0)
        out = evaluate.generate(ours.eval(), ids, mask, length_rule="transformers", **kwargs)
        expected = theirs.eval().generate(
            input_ids=ids, attention_mask=mask, do_sample=False, early_stopping=False, **kwargs
        )[:, 1:]
        assert torch.equal(out, expected), num_beams


def test_adafactor_on_the_gpu_takes_the_cpu_steps_and_frees_its_scratch():
    torch.manual_seed(0)
    shapes = [(300, 140), (9,), (150, 3, 200), (5, 7)]
    start = [torch.randn(s) for s in shapes]
    cpu = [torch.nn.Parameter(t.clone()) for t in start]
    gpu = [torch.nn.Parameter(t.clone().to(CUDA)) for t in start]
    opts = Adafactor(cpu, lr=0.05, beta1=0.9), Adafactor(gpu, lr=0.05, beta1=0.9)
    for _ in range(3):
        for a, b in zip(cpu, gpu):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.to(CUDA)
        for opt in opts:
            opt.step()
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-7)
    assert (
        opts[1]._scratch_buffers == {}
    )  # the caching allocator lends that memory to the next forward


def test_bf16_training_step_tracks_the_fp32_step(tmp_path):
    ours, _ = models(tmp_path, dropout_rate=0.0)
    ids, mask, dec = (t.to(CUDA) for t in random_batch(96))
    batch = dict(input_ids=ids, attention_mask=mask, labels=dec, tasks=["x"] * len(ids))
    losses = []
    for dtype in ("float32", "bfloat16"):
        cfg = SimpleNamespace(prompt_length=5, dtype=dtype, label_smoothing=0.1, z_loss=1e-4)
        opt = Adafactor(list(ours.parameters()), lr=0.0)
        losses.append(promot.train_step(ours, [batch], {}, opt, cfg, fsdp.Dist(device=CUDA))[0])
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


def attention_kernels(t5, ids, mask, prompt):
    """Names of the aten attention ops one bf16 forward + backward of `t5` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = t5(ids, mask, model.shift_right(ids), prompt=prompt)
        t5x_loss.cross_entropy(logits, ids)[0].backward()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_attention_with_position_bias_runs_the_memory_efficient_kernel_in_bf16(tmp_path):
    """Training shapes as the 13B plan has them: bias with a gradient (the trained position
    table), dropout on, a length that is no multiple of 8 (input + prompt)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t5, _ = models(tmp_path, d_model=256, d_kv=64, num_heads=4, d_ff=512, dropout_rate=0.1)
    t5.train()
    ids = torch.randint(2, 96, (4, 61), device=CUDA)
    mask, prompt = torch.ones_like(ids), torch.randn(20, 256, device=CUDA)
    with sdpa_kernel(
        [SDPBackend.EFFICIENT_ATTENTION]
    ):  # raises if that kernel cannot take these inputs
        attention_kernels(t5, ids, mask, prompt)
    used = attention_kernels(t5, ids, mask, prompt)  # and torch picks it by itself
    print("attention kernels:", sorted(used))
    assert "aten::_scaled_dot_product_efficient_attention" in used
    assert "aten::_scaled_dot_product_efficient_attention_backward" in used
    assert not any("math" in name for name in used)
