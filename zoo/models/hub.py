"""What a saved checkpoint needs to load in a fresh process: ``auto_map`` entries and the code file they name.

The code file is :mod:`zoo.models.zoo_hf`, copied as ``zoo_hf.py``; it only imports the installed seq-zoo, so its
content is the same for every checkpoint and every version.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CODE_FILE = "zoo_hf.py"
#: ``auto_map`` of config.json: every Auto class a zoo model registers with.
CONFIG_AUTO_MAP = {
    "AutoConfig": "zoo_hf.ZooConfig",
    "AutoModel": "zoo_hf.ZooModel",
    "AutoModelForCausalLM": "zoo_hf.ZooForCausalLM",
    "AutoModelForSequenceClassification": "zoo_hf.ZooForSequenceClassification",
}
#: ``auto_map`` of tokenizer_config.json: (slow, fast) tokenizer classes.
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["zoo_hf.ByteTokenizer", None]}


def write_code_file(directory: str | os.PathLike) -> Path:
    """Copy the ``trust_remote_code`` entry point into ``directory`` (created if missing); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CODE_FILE
    shutil.copyfile(Path(__file__).with_name(CODE_FILE), target)
    return target
