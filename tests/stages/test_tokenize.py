"""The tokenise stage: the same output on every run, and what its processes import (bad rows,
formats and splits on real runs: tests/data/test_corpus.py).

Every Ray Data worker pays for its imports when it starts: read and write tasks unpickle
``CorpusDatasource`` / ``TokenizedSink`` / ``TokenizedDatasource`` (module ``stages.tokenize_io``),
each tokenising actor ``TokenizeBatch`` (``stages.tokenize``) and its tokenizer. A fresh interpreter that does the same
shows what each of them loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wmss_ray.models.tokenizer import build_demo_tokenizer

from .conftest import N_ROWS, TOKENIZE_BLOCK_ROWS, tiny_cfg, tokenize_cfg

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter, as a Ray worker would: import the stage's modules (what a read or
# write task unpickles), then build and call the tokenising actor's class on one row.
PROBE = """
import json, sys
import pyarrow as pa
from wmss_ray.config.schema import DataConfig
from wmss_ray.data.corpus import READ_SCHEMA
import wmss_ray.stages.tokenize_io
import wmss_ray.stages.tokenize as T
seen = {"io_task": sorted(m for m in ("torch", "transformers") if m in sys.modules)}
batch = T.TokenizeBatch(sys.argv[1], DataConfig())
row = {"sample_id": "s1", "prompt_messages": [{"role": "user", "content": "1+1?"}], "answer": "2",
       "reference": None, "source_file": "f.jsonl", "source_row": 1, "reject_reason": None, "reject_detail": None}
out = batch(pa.Table.from_pylist([row], schema=READ_SCHEMA))
assert out["input_ids"][0].as_py(), out
seen["actor"] = sorted(m for m in sys.modules
                       if m == "transformers.modeling_utils" or m.startswith("transformers.models.llama.modeling"))
print(json.dumps(seen))
"""


def test_tokenising_processes_import_no_model_code(tmp_path):
    """A read/write task of the stage loads neither torch nor transformers, and a tokenising actor
    loads a tokenizer but no model code (``transformers.modeling_utils``: ~1.8 CPU-s of imports
    per actor start, paid by every tokenising actor on a cluster and in every tokenise run of
    this suite). torch is not asserted away: ``AutoTokenizer`` imports it (transformers 5's
    ``configuration_utils`` does, when torch is installed)."""
    build_demo_tokenizer(tmp_path / "tok")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "tok")], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"io_task": [], "actor": []}


def _parts(tokenized_path: str) -> list[tuple[str, pa.Table]]:
    return [(f.name, pq.read_table(f)) for f in sorted(Path(tokenized_path).glob("*.parquet"))]


@pytest.mark.integration
def test_ray_tokenisation_is_the_same_every_run(tiny_world, tokenized_world, tmp_path):
    """Two tokenisations of one corpus by a pool of 2 actors, in small blocks, write the same
    parts with the same rows in the same order (Ray Data preserves read order), whichever
    actor finished first: the scoring batches built from them are then the same too.

    The first run is the session's ``tokenized_world`` (made with this pool and these blocks).
    """
    from wmss_ray.stages.tokenize import tokenize_corpus

    again = tokenize_corpus(tokenize_cfg(), tiny_world.strong, tiny_world.corpus, str(tmp_path),
                            block_rows=TOKENIZE_BLOCK_ROWS)
    assert again.counts["rows_ok"] == tokenized_world.counts["rows_ok"] == N_ROWS
    first, second = _parts(tokenized_world.tokenized_path), _parts(again.tokenized_path)
    assert [n for n, _ in first] == [n for n, _ in second]
    assert all(a.equals(b) for (_, a), (_, b) in zip(first, second))
    rows = pa.concat_tables([t for _, t in first])["sample_id"].to_pylist()
    assert rows == [f"train.jsonl:{i}" for i in range(1, N_ROWS + 1)]  # file order


@pytest.mark.integration
def test_rows_per_file_sets_the_part_size(tiny_world, tmp_path):
    """``data.rows_per_file``: parts of at least that many rows (the last one aside), every row once,
    in file order (the default 8192 writes the 100 rows as one part)."""
    from wmss_ray.stages.tokenize import tokenize_corpus

    cfg = tiny_cfg("data.rows_per_file=32")
    out = tokenize_corpus(cfg, tiny_world.strong, tiny_world.corpus, str(tmp_path), block_rows=TOKENIZE_BLOCK_ROWS)
    sizes = [t.num_rows for _, t in _parts(out.tokenized_path)]
    assert len(sizes) >= 2 and sum(sizes) == N_ROWS and all(n >= 32 for n in sizes[:-1]), sizes
    rows = pa.concat_tables([t for _, t in _parts(out.tokenized_path)])["sample_id"].to_pylist()
    assert rows == [f"train.jsonl:{i}" for i in range(1, N_ROWS + 1)]
