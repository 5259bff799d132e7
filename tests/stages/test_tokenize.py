"""What the processes of the tokenise stage import (the Ray Data side's behaviour is tested on
real runs in tests/data/test_corpus.py).

Every Ray Data worker pays for its imports when it starts: read and write tasks unpickle
``CorpusDatasource`` / ``TokenizedSink`` / ``TokenizedDatasource`` (module ``stages.tokenize``),
each tokenising actor ``TokenizeBatch`` and its tokenizer. A fresh interpreter that does the same
shows what each of them loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from wmss_ray.models.tokenizer import build_demo_tokenizer

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter, as a Ray worker would: import the stage's module (what a read or
# write task unpickles), then build and call the tokenising actor's class on one row.
PROBE = """
import json, sys
import pyarrow as pa
from wmss_ray.config.schema import DataConfig
from wmss_ray.data.corpus import READ_SCHEMA
import wmss_ray.stages.tokenize as T
seen = {"io_task": sorted(m for m in ("torch", "transformers") if m in sys.modules)}
batch = T.TokenizeBatch(sys.argv[1], DataConfig())
row = {"sample_id": "s1", "prompt_messages": [{"role": "user", "content": "1+1?"}], "answer": "2",
       "reference": None, "source_file": "f.jsonl", "source_row": 1, "reject_reason": None, "reject_detail": None}
out = batch(pa.Table.from_pylist([row], schema=READ_SCHEMA))
assert out["input_ids"][0].as_py(), out
seen["actor"] = sorted(m for m in sys.modules if m == "transformers.modeling_utils" or m.startswith("transformers.models.llama.modeling"))
print(json.dumps(seen))
"""


def test_tokenising_processes_import_no_model_code(tmp_path):
    """A read/write task of the stage loads neither torch nor transformers, and a tokenising actor
    loads a tokenizer but no model code (``transformers.modeling_utils``: ~1.8 CPU-s of imports
    per actor start, paid by every actor on a cluster and ~30 times in this suite)."""
    build_demo_tokenizer(tmp_path / "tok")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "tok")], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"io_task": [], "actor": []}
