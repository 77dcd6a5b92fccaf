"""The torch engine under a real 2-rank gloo process group (spawning two processes takes ~10 s, hence here):
deepspeed.enabled=false with several workers averages gradients, as ZeRO does."""

import pytest
import torch

from orpo_ray.train.engine import TorchEngine

pytestmark = pytest.mark.integration


def test_torch_engine_averages_gradients_over_a_process_group(tmp_path):
    """Two gloo ranks (threads sharing a FileStore would not do: one process per rank) each hold a different
    gradient; after step() both hold the mean, so both take the same optimizer step."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_step, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    params = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=0)
    # By hand: gradients +1 (rank 0) and -3 (rank 1) average to -1; AdamW's first step moves each weight by lr
    # against the gradient's sign: 1 + 0.1. Unaveraged, rank 0 would step to 0.9 and rank 1 to 1.1.
    torch.testing.assert_close(params[0], torch.full((3,), 1.1))


def _two_rank_step(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    engine = TorchEngine(model, lr=0.1, weight_decay=0.0, max_grad_norm=0.0, lr_lambda=lambda s: 1.0)
    engine.backward(model.weight.sum() * (1.0 if rank == 0 else -3.0))  # rank 0: grad +1, rank 1: grad -3
    engine.step()
    torch.save(model.weight.detach().flatten().clone(), f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
