"""The demo tokenizer: exact round-trip, AutoTokenizer reload, chat template."""

from __future__ import annotations

from transformers import AutoTokenizer

from wmss_ray.models.tokenizer import IM_END, IM_START, build_demo_tokenizer

TEXT = "Q: Compute (23 + 45) * 3 - 17.\nA: 23+45=68\n68*3=204\n204-17=187\n#### 187"


def test_round_trip_is_exact():
    tok = build_demo_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)  # one token per character
    assert tok.decode(ids) == TEXT
    assert tok.unk_token_id not in ids
    assert tok.decode(tok("a  b\t!", add_special_tokens=False)["input_ids"]) == "a  b\t!"


def test_special_tokens():
    tok = build_demo_tokenizer()
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 0
    assert tok.eos_token == IM_END
    ids = tok(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(IM_START) and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + len("user\nhi")
    assert len(set(tok.get_vocab().values())) == len(tok)


def test_chat_template_rendering():
    tok = build_demo_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 1 + 2."}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 1 + 2.<|im_end|>\n<|im_start|>assistant\n"
    )
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "1+2=3\n#### 3"}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\n1+2=3\n#### 3<|im_end|>\n")


def test_autotokenizer_reload(tmp_path):
    tok = build_demo_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    re = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))  # no trust_remote_code
    assert re.get_vocab() == tok.get_vocab()
    assert (re.pad_token_id, re.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert re.decode(re(TEXT, add_special_tokens=False)["input_ids"]) == TEXT
    msgs = [{"role": "user", "content": "Compute 1 + 2."}]
    assert re.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
