"""Phase 2A input: weak/strong answer-token entropies of every sample, and the curriculum draw.

- ``scorer.EntropyScorer`` — the plain class (no Ray): both models, padded batches, fp32 entropy.
- ``ray_scoring`` — its Ray Data wiring: ``score_corpus``, ``score_tokenized``,
  ``ScoringResult`` (imported lazily: ``import wmss_ray.scoring`` does not start or import Ray).
- ``curriculum`` — the curriculum phase (Ray-free): ``sample_curriculum`` writes the weights it
  drew from and the sampled ids; ``curriculum_weights``.
"""

_RAY_NAMES = ("score_corpus", "score_tokenized", "ScoringResult")
_CURRICULUM_NAMES = ("sample_curriculum", "curriculum_weights", "CurriculumResult")


def __getattr__(name):
    if name in _RAY_NAMES:
        from wmss_ray.scoring import ray_scoring

        return getattr(ray_scoring, name)
    if name in _CURRICULUM_NAMES:
        from wmss_ray.scoring import curriculum

        return getattr(curriculum, name)
    if name == "EntropyScorer":
        from wmss_ray.scoring.scorer import EntropyScorer

        return EntropyScorer
    raise AttributeError(name)
