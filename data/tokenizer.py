"""The tokenizer object the training loop and megatron-core's datasets share."""

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy
from megatron.core.tokenizers import MegatronTokenizerBase
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mimo.data.config import DataConfig
from mimo.data.errors import DataError
from mimo.data.train_tokenizer import SHIPPED_TOKENIZER_DIR

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def tokenizer_dir(cfg: DataConfig) -> Path:
    """The Hugging Face tokenizer directory a config names (the shipped one when it names none)."""
    return Path(cfg.tokenizer) if cfg.tokenizer else SHIPPED_TOKENIZER_DIR


def has_tokenizer(directory: Path) -> bool:
    """Whether a directory holds a Hugging Face tokenizer (a model directory often does)."""
    return any((Path(directory) / name).is_file() for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE))


def save_tokenizer(cfg: DataConfig, directory: Path) -> list[Path]:
    """Write the tokenizer a config names (the shipped one when it names none) into ``directory`` as
    ``save_pretrained`` writes it: the tokenizer's files only, whatever else its own directory holds."""
    return [Path(path) for path in load_hf_tokenizer(tokenizer_dir(cfg)).save_pretrained(str(directory))]


def load_hf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Loads a local tokenizer directory, refusing anything that would need the network."""
    if not path.is_dir():
        raise DataError(
            f"tokenizer directory {path} does not exist; set data.tokenizer to a local "
            f"Hugging Face tokenizer directory, or leave it empty for the shipped tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot load the tokenizer in {path}: {error}") from error
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {path} has no eos_token; mimo appends it as the end-of-document "
            f"token, so set eos_token in {path}/tokenizer_config.json"
        )
    return tokenizer


def _fingerprint(path: Path) -> str:
    """Content hash of the tokenizer files, so caches follow the vocabulary and not the checkout path."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


class MimoTokenizer(MegatronTokenizerBase):
    """A Hugging Face tokenizer with the attributes megatron-core's GPT datasets read (eod, pad,
    vocab_size, unique_identifiers) and plain encode/decode for everyone else."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), {})
        self.hf = load_hf_tokenizer(path)
        self.fingerprint = _fingerprint(path)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can emit, added special tokens included."""
        return len(self.hf)

    @property
    def vocab(self) -> dict:
        return self.hf.get_vocab()

    @property
    def eod(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad(self) -> int:
        """A distinct pad id when the tokenizer has one; otherwise megatron's own out-of-vocab pad."""
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else -1

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Part of megatron's index-cache key: same vocabulary, same cache, wherever it is stored."""
        return OrderedDict(cls=type(self).__name__, fingerprint=self.fingerprint)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pre-training data has no chat turns")


def build_tokenizer(cfg: DataConfig) -> MimoTokenizer:
    """The tokenizer of ``cfg.tokenizer`` (or the shipped one); never downloads."""
    return MimoTokenizer(tokenizer_dir(cfg))


def check_vocab(tokenizer: MimoTokenizer, model_vocab_size: int) -> None:
    """Token ids at or above the embedding size would index past the embedding table on a GPU."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{model_vocab_size}; raise model.vocab_size to at least {tokenizer.vocab_size} "
            f"(or use a smaller tokenizer via data.tokenizer)"
        )


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], dtype: type) -> list[numpy.ndarray]:
    """Token ids of each text with the end-of-document id appended, in one batched (Rust-parallel) call."""
    eod = tokenizer.eos_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [numpy.array(ids + [eod], dtype=dtype) for ids in encoded]
