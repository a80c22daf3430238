#!/usr/bin/env python
"""make demo: the whole spvit pipeline on Fashion-MNIST (search -> export -> fine-tune -> eval), beside a
uniform prune at the same FLOPs with the same training. --train-original rebuilds the shipped original."""

from spvit.cli import ArgumentParser, int_at_least, number_between, run
from spvit.demo import ORIGINAL, run_demo, train_original
from spvit.supernet import SEARCH_SPACES


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument('--data-root', default='data', help='where Fashion-MNIST and its image folders go')
    p.add_argument('--runs', default='runs/demo', help='where the runs go')
    p.add_argument('--train-per-class', type=int_at_least(1), default=2000,
                   help='training images per class that the search and the fine-tunes see')
    p.add_argument('--val-per-class', type=int_at_least(1), default=1000,
                   help='test images per class to report on (1000: the whole 10k test split)')
    p.add_argument('--ratio', type=number_between(0, 1), default=0.25, help="FLOPs budget as a fraction of the original's")
    p.add_argument('--search-space', choices=tuple(SEARCH_SPACES), default='full')
    p.add_argument('--epochs', type=int_at_least(2), default=4,
                   help='training of each pruned model (even): the searched one runs half in the search and half in '
                   'its fine-tune on one cosine, the uniform prune all in its fine-tune')
    p.add_argument('--original', default=ORIGINAL, help='the converged model to prune (spvit checkpoint)')
    p.add_argument('--report', default='demo-report.png', help="picture of the result ('' to skip)")
    p.add_argument('--train-original', action='store_true',
                   help='make original: train the original on all 60k training images and write it to --original')
    a = p.parse_args(argv)
    if a.train_original:
        train_original(a.data_root, 'runs/original', a.original)
        return
    run_demo(a.data_root, a.runs, a.train_per_class, a.val_per_class, a.ratio, a.search_space, a.original,
             a.epochs, a.report or None)


if __name__ == '__main__':
    run(main)
