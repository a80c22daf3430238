#!/usr/bin/env python
"""Fine-tune an exported spvit model (or an unpruned timm baseline), optionally distilled. See README."""
from spvit.cli import run
from spvit.finetune import main

if __name__ == '__main__':
    run(main)
