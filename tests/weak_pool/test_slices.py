"""A request split over a replica's shards, without Ray: the slices' merged replies are the whole
request's reply, padded and packed, with odd row counts and more shards than rows; a padded
request is cut into ceil/floor(B / S) rows, a packed one at the row boundary nearest L / S tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tests.training.test_training_units import make_artifacts
from tests.weak_pool.rows import RowsById, assert_same_reply
from wmss_ray.weak_pool.server import WeakServer
from wmss_ray.weak_pool.slices import cut_points, merge_replies, split_request
from wmss_ray.weak_pool.wire import WeakReply, WeakRequest


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("pool_slices"))


@pytest.fixture(scope="module")
def server(art):
    return WeakServer(art["weak"], top_k=4, chunk_size=7)


def _request(art, n_rows: int, packed: bool) -> WeakRequest:
    rows = RowsById.from_parquet(art["tokenized"])
    ids = [f"s{i:04d}" for i in range(3, 3 + n_rows)]
    return WeakRequest.from_batch(rows.packed(ids) if packed else rows.batch(ids, pad_id=0), n_exact=4)


def _rows(req: WeakRequest) -> int:
    return int((req.position_ids[0] == 0).sum()) if req.packed else req.input_ids.shape[0]


def test_cut_points():
    assert cut_points(np.ones(3), 2).tolist() == [0, 2, 3]  # odd: the first part takes the extra row
    assert cut_points(np.ones(1), 2).tolist() == [0, 1, 1]  # more parts than rows: empty parts
    assert cut_points(np.ones(4), 1).tolist() == [0, 4]
    assert cut_points(np.array([5, 1, 1, 1, 1, 1]), 2).tolist() == [0, 1, 6]  # 5 | 5 tokens
    assert cut_points(np.array([9, 1]), 2).tolist() == [0, 1, 2]  # nearest boundary to 5 is after the 9
    with pytest.raises(ValueError, match="parts must be >= 1"):
        cut_points(np.ones(2), 0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("n_rows,parts", [(2, 2), (3, 2), (5, 4), (1, 2)])
def test_merged_slices_answer_like_the_whole_request(art, server, packed, n_rows, parts):
    req = _request(art, n_rows, packed)
    whole = server.answer(req)
    slices = split_request(req, parts)
    assert len(slices) == parts
    real = [s for s in slices if s is not None]
    assert sum(_rows(s) for s in real) == n_rows and len(real) == min(parts, n_rows)
    assert sum(len(s.labels) for s in real) == len(req.labels)
    if not packed:  # whole rows, ceil/floor(B / S) each, every slice trimmed to its longest row
        assert [0 if s is None else _rows(s) for s in slices] == np.diff(cut_points(np.ones(n_rows), parts)).tolist()
        for s in real:
            assert s.input_ids.shape[1] == s.lengths.max()
    merged = merge_replies([server.answer(s) for s in real])
    assert merged.nbytes == whole.nbytes and merged.checkpoint_id == whole.checkpoint_id
    assert_same_reply(merged, whole)


def test_one_slice_is_the_request_itself(art):
    req = _request(art, 3, packed=False)
    assert split_request(req, 1)[0] is req


def test_packed_cuts_balance_tokens_not_rows(art):
    req = _request(art, 5, packed=True)
    starts = np.flatnonzero(req.position_ids[0] == 0)
    lengths = np.diff(np.append(starts, req.input_ids.shape[1]))
    a, b = split_request(req, 2)
    half = req.input_ids.shape[1] / 2
    assert abs(a.input_ids.shape[1] - half) <= lengths.max() / 2 + 0.5  # the cut nearest the middle
    assert a.input_ids.shape[1] + b.input_ids.shape[1] == req.input_ids.shape[1]
    assert b.position_ids[0, 0] == 0  # b starts on a row boundary


def test_filler_forward_counts_a_forward_and_no_rows(art):
    fresh = WeakServer(art["weak"], top_k=4)
    req = _request(art, 3, packed=False)
    fresh.answer(req)
    fresh.join()
    assert fresh.served() == {"forwards": 2, "rows": 3, "tokens": int(req.lengths.sum())}


def test_merge_refuses_replies_of_different_models():
    a, b = WeakReply("aaaa", 10, 0), WeakReply("bbbb", 10, 0)
    a.dense_logp = b.dense_logp = np.zeros((1, 10), np.float32)
    with pytest.raises(RuntimeError, match="different models: bbbb"):
        merge_replies([a, b])
