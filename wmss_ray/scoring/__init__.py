"""Phase 2A input: weak/strong answer-token entropies of every sample, and the curriculum draw.

- ``scorer.EntropyScorer`` — the plain class (no Ray): both models, padded batches, fp32 entropy.
- ``ray_scoring`` — its Ray Data wiring: ``score_corpus``, ``score_tokenized``,
  ``sample_curriculum``, ``ScoringResult`` (imported lazily: ``import wmss_ray.scoring`` does not
  start or import Ray).
"""

_RAY_NAMES = ("score_corpus", "score_tokenized", "sample_curriculum", "ScoringResult", "curriculum_weights")


def __getattr__(name):
    if name in _RAY_NAMES:
        from wmss_ray.scoring import ray_scoring

        return getattr(ray_scoring, name)
    if name == "EntropyScorer":
        from wmss_ray.scoring.scorer import EntropyScorer

        return EntropyScorer
    raise AttributeError(name)
