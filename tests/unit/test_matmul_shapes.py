"""Matmul rows padded where a new matmul shape costs a kernel build (forward/matmul_shapes.py): the rule, the
packed layout's padded rows, and the lm-head's padded chunks."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from orpo_ray.embedded_tokenizer import build_byte_tokenizer
from orpo_ray.config import ModelSection, TinyModelSection
from orpo_ray.forward.chunked_lm_head import chunked_target_logps
from orpo_ray.forward.layouts import matmul_rows
from orpo_ray.forward.matmul_shapes import ROW_MULTIPLE, padded_rows, round_up, row_multiple
from orpo_ray.forward.packing import collate_packed
from orpo_ray.modeling import build_tiny_model

TOK = build_byte_tokenizer()


def test_rows_are_padded_only_for_cpu_matmuls_in_bf16_or_fp16():
    assert row_multiple("cpu", torch.bfloat16) == row_multiple("cpu", torch.float16) == ROW_MULTIPLE == 256
    assert row_multiple("cpu", torch.float32) == row_multiple("cpu", torch.float64) == 1
    assert row_multiple("cuda", torch.bfloat16) == row_multiple(torch.device("cuda", 1), torch.float16) == 1
    assert [round_up(n, 256) for n in (1, 255, 256, 257)] == [256, 256, 256, 512]


def test_padded_rows_add_at_most_an_eighth_and_use_the_full_multiple_from_eight_multiples_up():
    assert [padded_rows(n, 256) for n in (2048, 2049, 2267, 4000)] == [2048, 2304, 2304, 4096]
    assert [padded_rows(n, 256) for n in (1158, 1487, 1544, 150, 7, 1)] == [1280, 1536, 1664, 160, 7, 1]
    assert padded_rows(1158, 1) == 1158 and padded_rows(0, 256) == 0
    for n in range(1, 5000):
        p = padded_rows(n, 256)
        assert n <= p <= n + max(n // 8, 1) and (p % 256 == 0 or n < 2048)


def test_the_loop_pads_for_the_dtype_its_matmuls_run_in():
    model = build_tiny_model(ModelSection(tiny=TinyModelSection(hidden_size=16, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=32)), TOK)
    assert matmul_rows(model, "bf16", "cpu") == 256  # bf16 autocast
    assert matmul_rows(model, "fp32", "cpu") == 1
    assert matmul_rows(model.to(torch.bfloat16), "fp32", "cpu") == 256  # a model loaded in bf16 runs bf16 matmuls


# Row lengths chosen so that every layout below gets pad positions (a segment of 21 tokens: rows of 22, ...).
ROWS = [{"prompt_ids": [1, 5, 9, 4], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2]},
        {"prompt_ids": [1, 3], "chosen_ids": [10, 11, 12, 17, 2], "rejected_ids": [13, 2]},
        {"prompt_ids": [1] + [4] * 15, "chosen_ids": [14, 15, 2], "rejected_ids": [16, 2]}]


@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("pack_length", ["all", "longest", None])
def test_packed_rows_padded_to_a_multiple_keep_every_token_and_target(pack_length, prefix_sharing):
    plain = collate_packed(ROWS, 0, prefix_sharing, pack_length)
    padded = collate_packed(ROWS, 0, prefix_sharing, pack_length, pad_to_multiple_of=16)
    width, wide = plain["packed_input_ids"].shape[1], padded["packed_input_ids"].shape[1]
    assert wide == padded_rows(width, 16) > width  # these rows are no multiple of their step
    for key in ("packed_input_ids", "packed_position_ids", "packed_segment", "packed_branch"):
        torch.testing.assert_close(padded[key][:, :width], plain[key], msg=key)
    assert (padded["packed_segment"][:, width:] == -1).all()  # outside every segment
    assert (padded["packed_input_ids"][:, width:] == 0).all()
    for key in ("target_ids", "target_dst", "target_is_prompt", "input_ids", "attention_mask", "response_mask"):
        torch.testing.assert_close(padded[key], plain[key], msg=key)
    # the same hidden state predicts each target: (row, column) of src unchanged
    for a, b in ((padded["target_src"], wide), (plain["target_src"], width)):
        assert a.shape == plain["target_src"].shape
    torch.testing.assert_close(padded["target_src"] // wide, plain["target_src"] // width)
    torch.testing.assert_close(padded["target_src"] % wide, plain["target_src"] % width)


def test_a_fixed_pack_length_is_kept():
    batch = collate_packed(ROWS, 0, True, 45, pad_to_multiple_of=16)
    assert batch["packed_input_ids"].shape[1] == 45


class _MatmulShapes(TorchDispatchMode):
    """(M, K, N) of every aten mm / addmm / addmm_ run inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out):
            self.shapes.append((*args[0].shape, args[1].shape[1]))
        elif func in (torch.ops.aten.addmm.default, torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default):
            self.shapes.append((*args[1].shape, args[2].shape[1]))
        return func(*args, **(kwargs or {}))


def _lm_head_matmuls(bf16: bool, rows: int = 300, chunk: int = 200, hidden_size: int = 8, vocab: int = 64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    with _MatmulShapes() as seen:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logps, _ = chunked_target_logps(hidden, weight, targets, chunk)
        logps.sum().backward()
    return seen.shapes


def test_lm_head_chunks_run_padded_rows_under_cpu_bf16_and_their_own_rows_in_fp32():
    # 300 targets in chunks of 200: rows 200 and 100; vocabulary 64, hidden 8. Each chunk: logits [rows, V]
    # (forward, and again in backward), the hidden gradient [rows, V] x [V, H], the weight's [V, rows] x [rows, H].
    def row_dims(shapes):
        return sorted(m if k == 8 or n == 8 and k == 64 else k for m, k, n in shapes)

    assert row_dims(_lm_head_matmuls(bf16=False)) == [100] * 4 + [200] * 4
    assert row_dims(_lm_head_matmuls(bf16=True)) == [256] * 8


def test_padded_lm_head_rows_ignore_whatever_its_buffers_held(monkeypatch):
    """The pad rows of the chunk buffers are zeroed before each product: a buffer that held NaN (uninitialised
    memory can) must not reach the log-probs or the gradients (0 x NaN is NaN in the weight's product)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(90, 16, generator=g, requires_grad=True)
    weight = (torch.randn(100, 16, generator=g) * 0.2).requires_grad_()
    targets = torch.randint(0, 100, (90,), generator=g)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = chunked_target_logps(hidden, weight, targets, 40)
        return (logps, *torch.autograd.grad(logps.sum(), (hidden, weight)))

    clean = run()
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    poisoned = run()
    for a, b in zip(poisoned, clean):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
