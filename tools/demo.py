#!/usr/bin/env python
"""make demo: the whole spvit pipeline on Fashion-MNIST (search -> export -> fine-tune -> eval)."""

from spvit.cli import ArgumentParser, int_at_least, run
from spvit.demo import run_demo


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument('--data-root', default='data', help='where Fashion-MNIST and its image folder go')
    p.add_argument('--runs', default='runs/demo', help='where the runs go')
    p.add_argument('--train-per-class', type=int_at_least(1), default=600)
    p.add_argument('--val-per-class', type=int_at_least(1), default=200)
    p.add_argument('--pretrain-epochs', type=int_at_least(1), default=10)
    p.add_argument('--search-epochs', type=int_at_least(1), default=6)
    p.add_argument('--finetune-epochs', type=int_at_least(1), default=6)
    p.add_argument('--report', default='demo-report.png', help="picture of the result ('' to skip)")
    a = p.parse_args(argv)
    run_demo(a.data_root, a.runs, a.train_per_class, a.val_per_class, a.pretrain_epochs, a.search_epochs,
             a.finetune_epochs, a.report or None)


if __name__ == '__main__':
    run(main)
