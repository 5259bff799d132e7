"""Which runs and phases make each arm of a study, and the checks that fail before anything runs.
Plain code, no Ray.

A study of a base config (``study`` section) lays its runs out under ``<run>/study/``:

- ``seed<i>/``: seed ``i``'s run, the pipeline's phases with ``run.train_seed = seed + i`` (i = 0
  keeps the base's training seed). Its ``data``, ``phase0`` and ``tokenize`` are links to the
  base run's (:data:`SEED_SHARED`: the training seed does not touch them), everything from SFT
  on is its own: ``sft``, ``score_1``, ``curriculum_1`` (seed 0 links the base run's when they
  completed with its fingerprints: ``runner.trunk_links``), ``wmss_1`` (the arm ``wmss``),
  ``sft_continued`` (``sft_matched_updates``) and the SFT arms (``controls.arms``), and per arm
  its evaluation ``eval_<arm>`` (``runner.evaluate_arm``; no ``eval`` or ``report`` of the run's own);
- ``seed<i>-<arm>/`` for each fake-weak arm: ``wmss_1`` with ``mix.weak_source`` set, linking
  seed ``i``'s phases up to ``curriculum_1`` (:data:`FAKE_SHARED`): the same M1, scores and draw.

Every arm's training phase validates itself every ``study.validate_every`` steps on the
validation split and keeps its validation-selected peak (``training/validation.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from wmss_ray.config.loading import config_from_dict
from wmss_ray.config.names import CONTROL_ARM_LABELS, FAKE_WEAK_ARMS, SFT_CONTINUED, STUDY_ARM_LABELS
from wmss_ray.config.schema import ConfigError, WMSSConfig
from wmss_ray.io import storage

STUDY_DIR = "study"
SEED_SHARED = ("data", "phase0", "tokenize")
FAKE_SHARED = SEED_SHARED + ("sft", "score_1", "curriculum_1")
VALIDATION_ROWS = "validation_rows.jsonl"  # <seed run>/: the validation split, as the ranks read it
#: ``<arm phase dir>/<CADENCE_FILE>``: ``{"validate_every": N}``, the validations its peak was selected among
CADENCE_FILE = "study_validation.json"


@dataclass(frozen=True)
class ArmRun:
    """Where arm ``arm`` of seed ``index`` is trained: phase ``phase`` of the run in ``run_dir``."""

    arm: str
    label: str
    index: int
    run_dir: str
    phase: str

    @property
    def phase_dir(self) -> str:
        return storage.join(self.run_dir, self.phase)


def study_root(base: WMSSConfig) -> str:
    """``<run>/study``: an absolute local path or a URI."""
    return storage.join(storage.location(base.run_dir()), STUDY_DIR)


def seed_name(index: int, arm: str | None = None) -> str:
    return f"seed{index}" if arm is None else f"seed{index}-{arm}"


def seed_config(base: WMSSConfig, index: int) -> WMSSConfig:
    """Seed ``index``'s run config: the base with its own run dir under the study, training seed
    ``base.train_seed + index``, and the SFT arms the study asks for."""
    arms = base.study.arms
    overrides = [f"run.storage={study_root(base)}", f"run.name={seed_name(index)}",
                 f"controls.arms=[{','.join(a for a in arms if a in CONTROL_ARM_LABELS)}]",
                 f"evaluation.sft_continued={'true' if 'sft_matched_updates' in arms else 'false'}"]
    if index:
        overrides.append(f"run.train_seed={base.train_seed + index}")
    return config_from_dict(base.to_dict(), overrides, source=f"study seed {index}")


def fake_config(seed_cfg: WMSSConfig, index: int, arm: str) -> WMSSConfig:
    """The run of fake-weak arm ``arm`` of seed ``index``: seed ``index``'s config with
    ``mix.weak_source`` set, nothing trained after WMSS."""
    source, _ = FAKE_WEAK_ARMS[arm]
    base_storage = storage.location(seed_cfg.run.storage)
    return config_from_dict(seed_cfg.to_dict(), [f"run.storage={base_storage}", f"run.name={seed_name(index, arm)}",
                                                 f"mix.weak_source={source}", "controls.arms=[]",
                                                 "evaluation.sft_continued=false"],
                            source=f"study seed {index}, arm {arm}")


def arm_runs(base: WMSSConfig, index: int) -> list[ArmRun]:
    """Seed ``index``'s arms, WMSS first, in :data:`STUDY_ARM_LABELS` order."""
    root, k = study_root(base), base.run.iterations
    seed_dir = storage.join(root, seed_name(index))
    out = []
    for arm in [a for a in STUDY_ARM_LABELS if a == "wmss" or a in base.study.arms]:
        if arm == "wmss":
            where = (seed_dir, f"wmss_{k}")
        elif arm == "sft_matched_updates":
            where = (seed_dir, SFT_CONTINUED)
        elif arm in CONTROL_ARM_LABELS:
            where = (seed_dir, arm)
        else:
            where = (storage.join(root, seed_name(index, arm)), "wmss_1")
        out.append(ArmRun(arm, STUDY_ARM_LABELS[arm], index, *where))
    return out


def check_study(base: WMSSConfig) -> None:
    """What a study of ``base`` cannot honour, refused before anything runs (``ConfigError``)."""
    from wmss_ray.data.splits import has_validation

    if not has_validation(base):
        raise ConfigError("a study selects each arm's peak on a validation split apart from data.eval (the test "
                          "set): set data.validation_fraction (carved from data.train) or data.validation")
    if base.mix.weak_source != "model":
        raise ConfigError(f"mix.weak_source is {base.mix.weak_source!r}: a study's WMSS arm is the real weak "
                          "model (the fake weak sides are its arms: study.arms); set mix.weak_source: model")
    if base.controls.arms:
        raise ConfigError("controls.arms is set: a study chooses its arms in study.arms (the SFT arms there too); "
                          "leave controls.arms empty")
    fake = [a for a in base.study.arms if a in FAKE_WEAK_ARMS]
    if fake and base.run.iterations != 1:
        raise ConfigError(f"study.arms {fake} need run.iterations 1 (a fake weak side replaces the weak model "
                          f"of one WMSS iteration), got {base.run.iterations}")
    for arm in fake:  # the fake weak sides' own rules (mix.mode frozen, colocated), named per arm
        try:
            fake_config(seed_config(base, 0), 0, arm)
        except (ConfigError, ValueError) as err:
            raise ConfigError(f"study.arms {arm}: {err}") from None


def record_cadence(base: WMSSConfig, run: ArmRun) -> None:
    """Before and after arm ``run``'s phase runs: which validation cadence selects its peak (kept
    when there is a record already: a phase skipped as completed, or resumed with its peak so far,
    was validated as recorded then; a phase run from an emptied directory loses the record and gets
    this one)."""
    path = storage.join(run.phase_dir, CADENCE_FILE)
    if not storage.exists(path):
        storage.write_text(path, json.dumps({"validate_every": base.study.validate_every}))


def check_cadence(base: WMSSConfig) -> None:
    """Refuse (``ConfigError``) to continue a study whose arms selected their peaks (or a peak so
    far) among validations at another ``study.validate_every``: a completed phase would be skipped
    and an interrupted one resumed with its peak so far (validation is not part of a phase's
    fingerprint), and the table would mix two rules."""
    every = base.study.validate_every
    for index in range(base.study.seeds):
        for run in arm_runs(base, index):
            path = storage.join(run.phase_dir, CADENCE_FILE)
            if not storage.exists(path):
                continue
            was = json.loads(storage.read_text(path)).get("validate_every")
            if was != every:
                raise ConfigError(f"study.validate_every is {every}, but {storage.redact(run.phase_dir)} selected its "
                                  f"peak among validations every {was} steps: set study.validate_every {was} to "
                                  f"continue this study, or give it another run.name to train every arm again")
