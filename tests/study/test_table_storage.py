"""The study on object storage (the S3 test server): the per-problem files are read through
``io.storage``, and ``study.json``, ``study.csv`` and ``index.html`` land in the bucket; an arm links
its seed run's linked phases."""

from __future__ import annotations

import json

from tests.study.test_table import _records
from wmss_ray.config.loading import load_config
from wmss_ray.io import storage
from wmss_ray.study.page import write_study_page
from wmss_ray.study.table import study_table, write_table


def test_the_table_and_the_page_are_written_to_the_bucket(s3_server, tmp_path):
    root = f"s3://{s3_server['bucket']}/study-table"
    base = load_config("configs/test-tiny.yaml", [f"run.storage={tmp_path}", "study.n_boot=200"])
    records, _ = _records(storage.join(root, "outcomes"))
    table = study_table(base, records)
    js, csv_path = write_table(root, table)
    page = write_study_page(root, table)
    assert page == f"{root}/index.html" and "SFT-continued" in storage.read_text(page)
    assert json.loads(storage.read_text(js))["rows"][1]["label"] == "SFT-continued"
    assert storage.read_text(csv_path).startswith("arm,label,checkpoint")
    local = study_table(base, _records(tmp_path)[0])  # the same outcomes read from local files
    assert [r.get("diff_sample_ci_low") for r in local["rows"]] == [r.get("diff_sample_ci_low") for r in table["rows"]]


def test_an_arm_links_its_seed_runs_linked_phases_in_the_bucket(s3_server):
    """On object storage a link is a reference file ``<phase>.link``, not a directory: the arm's
    link was missed, and each arm of a study on S3 ran its seed's data and tokenize again
    (a study's seed run links them from the base run; ``sweep.trial.link_shared_phases``)."""
    from wmss_ray.io.manifest import linked_phase
    from wmss_ray.sweep.trial import link_shared_phases

    root = f"s3://{s3_server['bucket']}/unit/linked-links"
    base, seed, arm = (storage.join(root, d) for d in ("base", "seed0", "seed0-arm"))
    storage.write_text(storage.join(base, "tokenize", "manifest.json"), "{}")
    link_shared_phases(base, seed, ("tokenize",))
    link_shared_phases(seed, arm, ("tokenize",))
    assert linked_phase(storage.join(arm, "tokenize")) == storage.join(base, "tokenize")
    assert not storage.exists(storage.join(arm, "tokenize"))  # a reference, nothing copied or rerun
