"""mimo-eval reads ``input_ids`` without a tokenizer: a tokenizer with more tokens than the model's vocabulary
stops only text, which it would encode into ids the embedding does not have."""

import json

import pytest

from mimo.data.tokenizer import load_hf_tokenizer
from mimo.data.train_tokenizer import SHIPPED_TOKENIZER_DIR
from mimo.train.tools.evaluate import evaluate, main

from tiny_hub import HF_TINY, IMPORT_OVERRIDES

EXTRA_TOKENS = ["<|extra_0|>", "<|extra_1|>"]


@pytest.fixture(scope="module")
def oversized_tokenizer(tmp_path_factory):
    """mimo's tokenizer plus two tokens: more ids than the imported model's vocabulary."""
    tokenizer = load_hf_tokenizer(SHIPPED_TOKENIZER_DIR)
    tokenizer.add_tokens(EXTRA_TOKENS)
    assert len(tokenizer) == HF_TINY["vocab_size"] + len(EXTRA_TOKENS)
    directory = tmp_path_factory.mktemp("oversized_tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


def test_input_ids_need_no_tokenizer_and_text_is_still_checked(imported, oversized_tokenizer, tmp_path, capsys):
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": list(range(1, 200, 3))}) + "\n")
    oversized = [*IMPORT_OVERRIDES, f"data.tokenizer={oversized_tokenizer}"]
    assert evaluate(imported, ids, oversized) == evaluate(imported, ids, IMPORT_OVERRIDES)

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "a document"}) + "\n")
    assert main([str(imported), str(text), *oversized]) == 2
    assert (
        f"has {HF_TINY['vocab_size'] + len(EXTRA_TOKENS)} tokens but model.vocab_size is 4096"
        in capsys.readouterr().err
    )
