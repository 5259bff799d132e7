"""A copy of a saved model whose tokenizer has one token more (and the embedding resized to it):
the "another tokenizer" case the pair checks must refuse."""

from __future__ import annotations

from pathlib import Path


def save_with_an_extra_token(model_dir: str, out_dir: Path) -> Path:
    from wmss_ray.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.add_tokens(["<extra>"])
    model = load_causal_lm(model_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
