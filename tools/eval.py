#!/usr/bin/env python
"""Evaluate an exported spvit model or a timm baseline: top-1/5, loss, images/s, GFLOPs, params."""
from spvit.cli import run
from spvit.evaluation import main

if __name__ == '__main__':
    run(main)
