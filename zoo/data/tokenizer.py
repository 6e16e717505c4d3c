"""Tokenizers: the built-in byte-level tokenizer (no download) and local HF tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AddedToken, PreTrainedTokenizer, PreTrainedTokenizerBase

from zoo.models.hub import TOKENIZER_AUTO_MAP, write_code_file

_SPECIALS = ("<pad>", "<bos>", "<eos>")


class ByteTokenizer(PreTrainedTokenizer):
    """UTF-8 byte tokenizer: ids 0-255 are the bytes, then ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258.

    Encoding adds no special tokens; decoding drops invalid UTF-8 sequences. It has no vocabulary file, so
    ``save_pretrained`` writes only ``tokenizer_config.json`` (with an ``auto_map``) and ``zoo_hf.py``, and
    ``from_pretrained`` never downloads; ``AutoTokenizer.from_pretrained(path, trust_remote_code=True)`` loads it in
    a process that never imported ``zoo``.
    """

    model_input_names = ["input_ids", "attention_mask"]
    _auto_map = TOKENIZER_AUTO_MAP  # written into tokenizer_config.json by save_pretrained

    def __init__(self, pad_token: str = "<pad>", bos_token: str = "<bos>", eos_token: str = "<eos>", **kwargs) -> None:
        kwargs.pop("added_tokens_decoder", None)
        self._added_tokens_decoder = {
            256 + i: AddedToken(tok, special=True, normalized=False) for i, tok in enumerate(_SPECIALS)
        }
        super().__init__(pad_token=pad_token, bos_token=bos_token, eos_token=eos_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        """Number of byte ids (256); ``len(tokenizer)`` counts the specials too (259)."""
        return 256

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id for the bytes and the special tokens."""
        vocab = {chr(i): i for i in range(256)}
        vocab.update({tok: 256 + i for i, tok in enumerate(_SPECIALS)})
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) == 1 and ord(token) < 256:
            return ord(token)
        return self.pad_token_id

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < 256:
            return chr(index)
        return _SPECIALS[index - 256] if 256 <= index < 256 + len(_SPECIALS) else ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join byte tokens back into text (special tokens are kept as their strings)."""
        out = bytearray()
        for tok in tokens:
            if len(tok) == 1 and ord(tok) < 256:
                out.append(ord(tok))
            else:
                out.extend(tok.encode("utf-8"))
        return out.decode("utf-8", errors="ignore")

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """No special tokens are added: the text pipeline inserts ``<eos>`` between documents itself."""
        return token_ids_0 + (token_ids_1 or [])

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 where an id is a special token, 0 for bytes."""
        ids = token_ids_0 + (token_ids_1 or [])
        if already_has_special_tokens:
            return [int(i >= 256) for i in ids]
        return [0] * len(ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """The byte vocabulary is implicit: nothing to write."""
        return ()

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoTokenizer") -> None:
        """A no-op: ``save_pretrained`` always writes the ``auto_map`` and ``zoo_hf.py``."""

    def save_pretrained(self, save_directory, *args, **kwargs) -> tuple[str, ...]:
        """``tokenizer_config.json`` (class name, specials, ``auto_map``) plus ``zoo_hf.py``, the file it names."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        return (*files, str(write_code_file(save_directory)))


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``"byte"`` -> :class:`ByteTokenizer`; a local directory -> the tokenizer saved there (never downloads).

    A directory written by ``ByteTokenizer.save_pretrained`` loads back as a ``ByteTokenizer``; any other directory
    goes through ``AutoTokenizer.from_pretrained(path, local_files_only=True)``.
    """
    if name_or_path == "byte":
        return ByteTokenizer()
    path = Path(os.path.expanduser(str(name_or_path)))
    if not path.is_dir():
        raise FileNotFoundError(
            f"task.tokenizer: {str(name_or_path)!r} is not 'byte' nor a local tokenizer directory; "
            "use tokenizer: byte or the path of a folder written by tokenizer.save_pretrained()."
        )
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("tokenizer_class") == "ByteTokenizer":
            return ByteTokenizer.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"task.tokenizer: could not load a tokenizer from {str(path)!r} ({e}); "
            "point it at a folder written by tokenizer.save_pretrained() or use tokenizer: byte."
        ) from e


def checkpoint_tokenizer(checkpoint: str | Path, name: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder: ``name`` when given ("byte" or a folder), else the one saved beside the
    checkpoint (``tokenizer_config.json`` / ``tokenizer.json``), else the byte tokenizer. The one rule that
    ``zoo eval``, ``zoo generate``, ``zoo finetune`` and the lm-eval adapter share."""
    if name is None:
        p = Path(checkpoint)
        own = p.is_dir() and any((p / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
        name = str(p) if own else "byte"
    return load_tokenizer(name)
