#!/usr/bin/env python
"""Search: train gates and weights of a supernet under a FLOPs penalty. See README."""
from spvit.cli import run
from spvit.search import main

if __name__ == '__main__':
    run(main)
