"""The checkpoint's tokenizer and chat template, through transformers."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path):
    """transformers' tokenizer from the checkpoint directory, or None if it has none."""
    path = Path(path)
    if not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def chat_prompt_ids(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of `messages` rendered with the checkpoint's chat template."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # the template writes the special tokens itself
    return tokenizer.encode(text, add_special_tokens=False)
