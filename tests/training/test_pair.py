"""``PairLM``'s step keeps every tensor on the device of its inputs, in every placement.

On a GPU the step crashed at the pool placement's first logged step: its sampled-error
statistics stacked CUDA sums with ``torch.tensor(float(n))`` made on the host. A CPU machine
cannot see that (both are CPU tensors), so the step runs under ``tests.host_device``'s check,
which keeps host-made tensors apart from device ones as CUDA does. What runs under it is what a
rank runs per micro-batch: collate on the host, move the batch to the device (as
``PhaseWorker.train_step``), the pool's reply (``weak_pool.feed``/``wire``/``server``, sampled
exact rows included), ``PairLM.forward`` and its backward, the statistics over micro-batches, the
reduction and the metrics (``training.metrics``).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.host_device import HostDeviceCheck
from tests.weak_pool.rows import RowsById
from tests.weak_pool.test_server import _InProcessClient
from wmss_ray.losses.stats import LossStats
from wmss_ray.training.dataset import answer_tokens
from wmss_ray.training.metrics import all_reduce_stats, pool_metrics, step_metrics
from wmss_ray.training import pair as pair_module
from wmss_ray.training.pair import PairLM

DEVICE = torch.device("cpu")  # "the device" of the check: every tensor not made on the host
ACCUM = 2
PAIR = pair_module.__file__


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from tests.training.test_training_units import make_artifacts

    return make_artifacts(tmp_path_factory.mktemp("pair"))


def _pair(art, placement: str) -> PairLM:
    from wmss_ray.models.loading import load_causal_lm

    strong = load_causal_lm(art["strong"], dtype="float32")
    if placement == "sft":
        return PairLM(strong, None, "sft", 1.0, chunk_size=5)
    if placement.startswith("pool"):
        return PairLM(strong, None, "frozen", 0.5, chunk_size=5, weak_pool=True)
    if placement in ("uniform", "entropy_matched"):
        return PairLM(strong, load_causal_lm(art["weak"], dtype="float32"), "frozen", 0.5, chunk_size=5,
                      weak_source=placement)
    return PairLM(strong, load_causal_lm(art["weak"], dtype="float32"), placement, 0.5, chunk_size=5)


def _pool_side(art, top_k: int, rows: RowsById):
    from wmss_ray.weak_pool.feed import PooledWeakSide
    from wmss_ray.weak_pool.server import WeakServer

    def read_step(step):  # the worker's collate, on the host
        return [rows.batch([f"s{(4 * step + 2 * a + j):04d}" for j in range(2)], pad_id=0) for a in range(ACCUM)]

    client = _InProcessClient(WeakServer(art["weak"], top_k=top_k))
    # every step logged: the first micro-batch of each also asks for exact rows (the crashing path)
    return PooledWeakSide(client, read_step, ACCUM, end_step=1, is_logged=lambda step: True, prefetch=1,
                          exact_sample=3, device=DEVICE)


@pytest.mark.parametrize("placement", ["pool_topk", "pool_dense", "frozen", "joint", "sft", "uniform",
                                       "entropy_matched"])
def test_step_makes_no_tensor_off_the_device_of_its_inputs(art, placement):
    pair = _pair(art, placement)
    rows = RowsById(art["tokenized"])
    with HostDeviceCheck():
        side = _pool_side(art, 4 if placement == "pool_topk" else 0, rows) if placement.startswith("pool") else None
        mbs = side.micro_batches(0) if side else [rows.batch([f"s{a * 2 + j:04d}" for j in range(2)], pad_id=0)
                                                  for a in range(ACCUM)]
        n_global = float(sum(answer_tokens(b) for b in mbs))
        stats = LossStats.zeros(DEVICE)
        for a, b in enumerate(mbs):
            b = {k: v.to(DEVICE) for k, v in b.items()}
            reply = side.reply(0, a) if side else None
            pool_in = dict(weak_logp=reply.weak, exact=reply.exact) if reply else {}
            if pair.weak_source == "entropy_matched":
                pool_in["weak_key"] = (0, 0, a)
            loss, mb_stats = pair(b["input_ids"], b["attention_mask"], b["labels"], num_tokens=n_global,
                                  loss_scale=2.0, **pool_in)
            if reply:
                mb_stats.add_pool_reply(reply.nbytes, reply.wait_s)
            loss.backward()
            stats.add_(mb_stats)
        stats = all_reduce_stats(stats)
        metrics = step_metrics(stats, step=1, phase="wmss", grad_norm=None, lr=1e-3, step_time=1.0,
                               input_tokens=1.0, samples_seen=4)
        if side:
            metrics |= pool_metrics(stats, side.checkpoint_id, 0.01)
    assert metrics["loss"] > 0
    if side:  # the sampled-error statistics ran (the path that crashed)
        assert metrics["n_sampled"] == 3
    assert all(p.grad is not None for p in pair.strong.parameters())


@pytest.mark.parametrize("placement", ["pool_topk", "frozen", "joint"])
def test_loss_step_reads_nothing_back_from_the_device(art, placement):
    """Forward and backward of the loss with the answer positions found on the host (as the
    worker does): no device-to-host sync in ``losses/`` or ``training/pair.py`` (the decoders'
    own are the model library's)."""
    from wmss_ray.losses.positions import answer_positions

    pair = _pair(art, placement)
    rows = RowsById(art["tokenized"])
    side = _pool_side(art, 4, rows) if placement.startswith("pool") else None
    b = side.micro_batches(0)[0] if side else rows.batch(["s0000", "s0001"], pad_id=0)
    reply = side.reply(0, 0) if side else None
    pool_in = dict(weak_logp=reply.weak, exact=reply.exact) if reply else {}
    pos = answer_positions(b["labels"])  # on the host, before the batch moves
    with HostDeviceCheck() as check:
        b = {k: v.to(DEVICE) for k, v in {**b, "answer_pos": pos}.items()}
        loss, _ = pair(b["input_ids"], b["attention_mask"], b["labels"], num_tokens=40.0, loss_scale=2.0,
                       answer_pos=b["answer_pos"], **pool_in)
        loss.backward()
    ours = [r for r in check.host_reads if f"wmss_ray{os.sep}losses" in r or r.split(" at ")[1].startswith(PAIR)]
    assert ours == []
    assert all(p.grad is not None for p in pair.strong.parameters())


@pytest.mark.parametrize("source", ["uniform", "entropy_matched"])
def test_fake_weak_sources_equal_their_naive_definition_through_the_pair(art, source):
    """``mix.weak_source`` in ``PairLM``: the loss and the strong gradients equal the naive mixed CE
    of the strong logits with the fake weak log-probs written out densely from the definition
    (uniform: -log V; entropy_matched: the weak model's row entropies on the spikes of the key)."""
    import math

    from wmss_ray.losses.fake_weak import row_entropy, spike_ids, spike_mass_for_entropy
    from wmss_ray.losses.positions import answer_positions
    from wmss_ray.losses.reference import mixed_ce_naive

    pair = _pair(art, source)
    b = RowsById(art["tokenized"]).batch(["s0000", "s0001", "s0002"], pad_id=0)
    loss, _ = pair(b["input_ids"], b["attention_mask"], b["labels"], num_tokens=30.0, weak_key=(1, 2, 3))
    ours = torch.autograd.grad(loss, list(pair.strong.parameters()))
    pos = answer_positions(b["labels"])
    y = b["labels"].reshape(-1)[pos + 1]
    z_s = pair.strong(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    z_s = z_s.reshape(-1, z_s.shape[-1])[pos]  # [N, V]
    n, vocab = z_s.shape
    if source == "uniform":
        logq = torch.full((n, vocab), -math.log(vocab))
    else:
        with torch.no_grad():
            z_w = pair.weak(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            z_w = z_w.reshape(-1, vocab)[pos].double()
        h = -(torch.softmax(z_w, -1) * torch.log_softmax(z_w, -1)).sum(-1)
        p = spike_mass_for_entropy(h, vocab)
        q = ((1 - p) / (vocab - 1)).unsqueeze(1).repeat(1, vocab)
        q.scatter_(1, spike_ids((1, 2, 3), n, vocab).unsqueeze(1), p.unsqueeze(1))
        logq = torch.log(q).float()
        assert torch.allclose(row_entropy(z_w, torch.eye(vocab, dtype=torch.float64), 4), h)
    ref = mixed_ce_naive(z_s, logq, y, 0.5, num_tokens=30.0)
    theirs = torch.autograd.grad(ref, list(pair.strong.parameters()))
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


def test_label_smoothing_reaches_the_loss_through_the_pair(art):
    """``training.label_smoothing`` (the SFT label-smoothing arm): ``PairLM``'s SFT loss equals
    ``F.cross_entropy(z, y, label_smoothing=0.1)`` of the strong logits; the stats keep plain CE."""
    import torch.nn.functional as F

    from wmss_ray.losses.positions import answer_positions
    from wmss_ray.models.loading import load_causal_lm

    pair = PairLM(load_causal_lm(art["strong"], dtype="float32"), None, "sft", 1.0, chunk_size=5,
                  label_smoothing=0.1)
    b = RowsById(art["tokenized"]).batch(["s0000", "s0001"], pad_id=0)
    loss, stats = pair(b["input_ids"], b["attention_mask"], b["labels"], num_tokens=20.0)
    pos = answer_positions(b["labels"])
    y = b["labels"].reshape(-1)[pos + 1]
    z = pair.strong(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    z = z.reshape(-1, z.shape[-1])[pos]
    ref = F.cross_entropy(z, y, reduction="sum", label_smoothing=0.1) / 20.0
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.ce_mix_sum.float(), F.cross_entropy(z, y, reduction="sum").detach(),
                               atol=1e-4, rtol=1e-5)


def test_the_check_catches_a_host_tensor_stacked_with_device_ones():
    """The check itself: the old pool statistics' ``torch.tensor(float(n))`` next to device sums."""
    e = torch.rand(5, dtype=torch.float64)  # made outside the check: a device tensor
    with HostDeviceCheck(), pytest.raises(RuntimeError, match="same device"):
        torch.stack([e.sum(), torch.tensor(float(e.numel()), dtype=torch.float64), e.max()])
    with HostDeviceCheck():  # what the code does instead: made where its inputs are
        torch.stack([e.sum(), torch.tensor(float(e.numel()), dtype=e.dtype, device=e.device), e.max()])
