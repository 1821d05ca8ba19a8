"""Trains the byte-level BPE tokenizer shipped with mimo on the shipped corpus.

Byte-level BPE needs no unknown token and no normalisation, so any UTF-8 text round-trips exactly.
Run ``python -m mimo.data.train_tokenizer`` to regenerate ``data/assets/tokenizer``.
"""

import argparse
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mimo.data.config import TokenizerTrainingConfig
from mimo.data.shipped_corpus import ASSETS, shipped_corpus_path

SHIPPED_TOKENIZER_DIR = ASSETS / "tokenizer"
# Spelled out: in transformers 5 PreTrainedTokenizerFast is an alias whose __name__ is the v5-only backend.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _corpus_texts(path: Path) -> Iterator[str]:
    with gzip.open(path, "rt", encoding="utf-8") as reader:
        for line in reader:
            yield json.loads(line)["text"]


def train_tokenizer(texts: Iterable[str], out_dir: Path, cfg: TokenizerTrainingConfig) -> PreTrainedTokenizerFast:
    """Trains on ``texts`` and saves tokenizer.json + tokenizer_config.json that AutoTokenizer loads."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eod_token, cfg.pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=cfg.eod_token,
        bos_token=cfg.eod_token,
        pad_token=cfg.pad_token,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    _name_portable_class(out_dir / "tokenizer_config.json")
    return wrapped


def _name_portable_class(config_path: Path) -> None:
    """transformers 5 records its own backend class name, which transformers 4 cannot resolve;
    PreTrainedTokenizerFast loads the same tokenizer.json in both."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    defaults = TokenizerTrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default=str(shipped_corpus_path()), help="JSONL.gz with a 'text' field")
    parser.add_argument("--output", default=str(SHIPPED_TOKENIZER_DIR))
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    args = parser.parse_args()
    cfg = TokenizerTrainingConfig(vocab_size=args.vocab_size)
    tokenizer = train_tokenizer(_corpus_texts(Path(args.corpus)), Path(args.output), cfg)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output}")


if __name__ == "__main__":
    main()
