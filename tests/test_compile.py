"""torch.compile of the search step: no graph breaks in the training forward and the FLOPs model,
no recompilation when the gate noise changes, and a compiled search that resumes where it stopped."""
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import spvit
from spvit.families import FAMILIES
from spvit.finetune import main as finetune_main
from spvit.search import main as search_main

from helpers import SEARCH_DATA, SMALL, args, load, supernet_and_original, tool

SPACES = [('vit_tiny_patch16_224', SMALL, 'spvit'), ('vit_tiny_patch16_224', SMALL, 'full'),
          ('swin_tiny_patch4_window7_224', FAMILIES['swin'].examples[0][1], 'full')]


def search_step(supernet):
    def step(x):
        return supernet(x).logsumexp(-1).mean() + supernet.flops()
    return step


@pytest.mark.parametrize('name,kwargs,space', SPACES, ids=[f'{n.split("_")[0]}-{s}' for n, _, s in SPACES])
def test_search_forward_has_no_graph_break(name, kwargs, space):
    supernet, _ = supernet_and_original(name, search_space=space, **kwargs)
    supernet.train()
    supernet.set_gate_noise(0.5)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(search_step(supernet))(torch.randn(2, *supernet.input_size))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_search_step_matches_eager(monkeypatch):
    """Traced, the conv ops take the shifted-sum formulation (eager, the depthwise conv): the loss
    and every gradient agree. aot_eager runs dynamo's graph without inductor's compile time."""
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', search_space='full', **SMALL)
    supernet.train()
    supernet.set_gate_noise(0.)
    x = torch.randn(2, *supernet.input_size)
    results = []
    torch._dynamo.reset()
    for step in (search_step(supernet), torch.compile(search_step(supernet), backend='aot_eager')):
        if results:     # the traced step must not fall back to the eager formulation
            monkeypatch.setattr(spvit.mixing, 'depthwise_mixed_convs', None)
        supernet.zero_grad()
        loss = step(x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in supernet.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (traced, traced_grads) = results
    assert torch.allclose(eager, traced, rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == traced_grads.keys() and any('head_assign' in n for n in eager_grads)
    for n, g in eager_grads.items():
        assert torch.allclose(g, traced_grads[n], rtol=1e-4, atol=1e-6), n


def test_changing_gate_noise_does_not_recompile():
    """The noise is a tensor set in place (anneal changes it every step): one graph for all values."""
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', search_space='full', **SMALL)
    supernet.train()
    counter = CompileCounter()
    torch._dynamo.reset()
    step = torch.compile(search_step(supernet), backend=counter)
    x = torch.randn(2, *supernet.input_size)
    for noise in (1.0, 0.5, 0.0):
        supernet.set_gate_noise(noise)
        step(x).backward()
    assert counter.frame_count == 1


@pytest.mark.slow
def test_compiled_search_resumes(image_folder, pretrained, tmp_path):
    """--compile (inductor): a search stopped half way and resumed ends where an uninterrupted one
    does, on its target."""
    common = ['--checkpoint', pretrained, '--target-ratio', '0.6', '--epochs', '2', '--seed', '3', '--compile',
              '--gate-noise', 'anneal']
    search_main(args(image_folder, tmp_path / 'whole', *common))
    search_main(args(image_folder, tmp_path / 'split', *common, '--max-steps', '13'))
    search_main(['--resume', str(tmp_path / 'split' / 'checkpoint-last.pth')])
    whole = load(tmp_path / 'whole' / 'search-final.pth')
    split = load(tmp_path / 'split' / 'search-final.pth')
    assert whole['arch'] == split['arch']
    assert abs(whole['achieved_gflops'] - whole['target_gflops']) / whole['target_gflops'] <= 0.02
    w, s = whole['supernet']['state_dict'], split['supernet']['state_dict']
    assert max((v.float() - s[k].float()).abs().max().item() for k, v in w.items()) <= 1e-5
    steps = {run: [r['step'] for r in map(json.loads, open(tmp_path / run / 'log.jsonl')) if r['kind'] == 'step']
             for run in ('whole', 'split')}
    assert sorted(set(steps['whole']) | {13}) == steps['split']      # one log history, plus the stop at step 13
    # the pruned model fine-tunes compiled too (with EMA, which, like evaluation, runs eagerly)
    pruned = tmp_path / 'pruned.pth'
    assert tool('export.py', ['--search', str(tmp_path / 'whole' / 'search-final.pth'), '--output', str(pruned)]).returncode == 0
    finetune_main(['--pruned', str(pruned), *SEARCH_DATA, '--data-dir', image_folder, '--batch-size', '16', '--epochs', '1',
                   '--output-dir', str(tmp_path / 'ft'), '--compile', '--model-ema'])
    assert spvit.load_pruned(str(tmp_path / 'ft' / 'best.pth')).num_classes == 4
