"""The demo world's tokenizer: character-level, built locally, saved as a plain HF tokenizer.

One token per character (printable ASCII plus newline and tab) and five special tokens:

    id 0 <|pad|>        padding only; never supervised
    id 1 <|endoftext|>  document separator in phase-0 pre-training
    id 2 <|im_start|>   chat turn start (Qwen-style template)
    id 3 <|im_end|>     chat turn end == ``tokenizer.eos_token`` (the generation stop)
    id 4 <|unk|>        any character outside the alphabet

EOS choice: ``eos_token`` is ``<|im_end|>`` (as in Qwen instruct tokenizers) because every
consumer that reads ``tokenizer.eos_token_id`` (generation stop, ``answer + eos`` fallbacks,
the answer's end-of-turn label) works on the chat format. The model's ``generation_config``
lists both ``<|im_end|>`` and ``<|endoftext|>`` as stops (see ``models.tiny``) so that M0, pre-
trained on plain text separated by ``<|endoftext|>``, also stops.

The result is a ``PreTrainedTokenizerFast`` (transformers 5: ``TokenizersBackend``) that
``AutoTokenizer.from_pretrained(dir)`` reloads without remote code; ``decode`` returns the exact
text (the ``Fuse`` decoder joins characters without spaces).
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOT, IM_START, IM_END, UNK = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, EOT, IM_START, IM_END, UNK]

# string.printable minus vertical tab, form feed and carriage return (never in demo text).
ALPHABET = [c for c in string.printable if c not in "\x0b\x0c\r"]

# Qwen2.5-style ChatML without a default system prompt. The assistant turn renders as
# "<|im_start|>assistant\n" + content + "<|im_end|>\n", so the answer's supervised text is
# content + "<|im_end|>\n" (see data.tokenize).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_demo_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Build the char-level demo tokenizer (102 tokens); save it to ``save_dir`` when given."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; [\s\S] (not '.') so newlines split too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=UNK,
        bos_token=None,
        additional_special_tokens=[EOT, IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(save_dir))
    return tok
