"""A LLaMA-style tokenizer built locally, for tiny models that must not download anything."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

IMAGE_TOKEN = "<image>"


def build_llama_tokenizer(
    texts: Iterable[str], folder: str | os.PathLike, vocab_size: int = 512, add_bos_token: bool = False
):
    """Train a small SentencePiece BPE model on ``texts`` and return a ``LlamaTokenizer``.

    The tokenizer has byte fallback (any text encodes), BOS=1, EOS=2, UNK=0 (also used as pad),
    and ``<image>`` as a special token that encodes to one id. ``add_bos_token=True`` prepends BOS
    to every encoded text, as LLaMA's own tokenizer does. It is saved to ``folder`` with
    ``save_pretrained`` so ``AutoTokenizer.from_pretrained(folder)`` reloads it.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=add_bos_token)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(str(folder))
    return tokenizer
