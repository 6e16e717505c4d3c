#!/usr/bin/env python
"""Fine-tune a zoo checkpoint (causal LM or classifier, optional LoRA): the same flags as ``zoo finetune``.

Example::

    python scripts/finetune.py runs/demo/final --data my.jsonl --out runs/ft --pack --lora --max-steps 200
"""

import sys

from zoo.finetune import main

if __name__ == "__main__":
    sys.exit(main())
