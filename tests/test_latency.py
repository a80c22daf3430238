"""Latency tables: format, interpolation, the predictor against a hand computation, its gradient,
the builder on a tiny ViT, and refusals."""
import json
from dataclasses import asdict

import pytest
import torch

import spvit
from spvit.latency_model import (LatencyTable, LatencyTableError, ShapeLatency, build_latency_table, device_name,
                                 interpolate, mlp_grid)

from helpers import SMALL, random_arch, set_gates, start, supernet_and_original

OPS = {'skip': 0.01, 'conv1x1': 0.05, 'conv3x3': 0.09, 'msa': 0.4}


def hand_table(supernet, fixed=1.0, device='cpu'):
    """A table for the small ViT with round numbers: msa with h of 4 heads 0.1 h ms, the MLP 0.1 ms
    at one unit, 0.3 at 128 and 0.5 at all 256 (two slopes)."""
    dims = asdict(supernet.block_dims[0])
    shape = ShapeLatency(dims, dict(OPS), [0.1, 0.2, 0.3, 0.4], [1, 128, 256], [0.1, 0.3, 0.5])
    return LatencyTable(model=supernet.model_name, model_kwargs=dict(supernet.model_kwargs), input_size=[3, 32, 32],
                        device=device, device_name=device_name(device), torch_version=torch.__version__,
                        batch_size=1, threads=1, fixed_ms=fixed, shapes=[shape], blocks=[0] * len(supernet.block_dims))


def test_interpolation_is_piecewise_linear_and_differentiable():
    xs, ys = torch.tensor([1., 128., 256.]), torch.tensor([0.1, 0.3, 0.5])
    assert float(interpolate(1., xs, ys)) == pytest.approx(0.1)
    assert float(interpolate(64.5, xs, ys)) == pytest.approx(0.2)
    assert float(interpolate(192., xs, ys)) == pytest.approx(0.4)
    assert float(interpolate(256., xs, ys)) == pytest.approx(0.5)
    assert float(interpolate(0., xs, ys)) == pytest.approx(0.1 - 0.2 / 127)     # linear beyond the ends
    for x, slope in ((10., 0.2 / 127), (200., 0.2 / 128)):
        t = torch.tensor(x, requires_grad=True)
        interpolate(t, xs, ys).backward()
        assert t.grad.item() == pytest.approx(slope)
    assert mlp_grid(256, 5) == [1, 64, 128, 192, 256] and mlp_grid(3, 13) == [1, 2, 3]


def test_table_round_trips_and_malformed_tables_are_refused(small_supernet, tmp_path):
    supernet, _ = small_supernet
    table = hand_table(supernet)
    path = str(tmp_path / 't.json')
    table.save(path)
    assert LatencyTable.load(path) == table
    good = table.to_dict()
    assert good['format'] == 'spvit-latency-table' and good['version'] == 1
    bad = [
        ({'format': 'x'}, 'not an spvit-latency-table file'),
        ({'version': 99}, 'version 99 is newer'),
        ({'fixed_ms': float('nan')}, 'fixed_ms must be a finite number'),
        ({'threads': 0}, 'threads must be an integer >= 1'),
        ({'blocks': [0, 0, 0, 1]}, 'blocks must be a non-empty list of shape indices below 1'),
        ({'shapes': [{**good['shapes'][0], 'mlp_widths': [1, 200, 128]}]}, 'mlp_widths must ascend from 1'),
        ({'shapes': [{**good['shapes'][0], 'mlp_widths': [1, 128, 255]}]}, 'to the full width 256'),
        ({'shapes': [{**good['shapes'][0], 'msa_heads': [0.1, 0.2]}]}, 'msa_heads must give msa with 1..4 heads'),
        ({'shapes': [{**good['shapes'][0], 'ops': {'skip': 0.1}}]}, 'ops must give skip, conv1x1, conv3x3, msa'),
        ({'shapes': [{**good['shapes'][0], 'msa_heads': [0.1, 0.2, 0.3, 0.5]}]}, 'differs from ops.msa'),
        ({'shapes': [{**good['shapes'][0], 'mlp_ms': [0.1, -1, 0.5]}]}, 'mlp_ms must be a finite number of ms >= 0'),
    ]
    for change, message in bad:
        with pytest.raises(LatencyTableError, match=message.replace('(', r'\(').replace('.', r'\.')):
            LatencyTable.from_dict({**good, **change}, source='t')
    (tmp_path / 'broken.json').write_text('{"format": ')
    with pytest.raises(LatencyTableError, match='not valid JSON'):
        LatencyTable.load(str(tmp_path / 'broken.json'))
    del good['blocks']
    with pytest.raises(LatencyTableError, match='missing blocks'):
        LatencyTable.from_dict(good)


def test_prediction_of_an_architecture_by_hand(small_supernet):
    supernet, _ = small_supernet
    table = hand_table(supernet)
    arch = spvit.Architecture(supernet.model_name, [spvit.BlockArch('skip', 1), spvit.BlockArch('conv3x3', 64),
                                                    spvit.BlockArch('msa', 256, [0, 3]), spvit.BlockArch('msa', 192)])
    hand = 1.0 + (0.01 + 0.1) + (0.09 + 0.1 + 63 * 0.2 / 127) + (0.2 + 0.5) + (0.4 + 0.4)
    assert table.predict(arch) == pytest.approx(hand)
    assert table.original_ms() == pytest.approx(1.0 + 4 * (0.4 + 0.5))
    with pytest.raises(LatencyTableError, match='architecture has 3 blocks'):
        table.predict(spvit.Architecture(supernet.model_name, arch.blocks[:3]))


@pytest.mark.parametrize('space', ['spvit', 'full'])
def test_the_differentiable_predictor_is_the_architecture_s_and_moves_the_gates(space):
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', search_space=space, **SMALL)
    table = hand_table(supernet)
    for seed in range(4):
        arch, kept = random_arch(supernet, seed, heads=space == 'full')
        set_gates(supernet, arch, kept)
        for a, b in zip(supernet.attn_slots, arch.blocks):
            if a.head_logits is not None:
                a.head_logits.data = torch.tensor([1. if b.heads is None or h in b.heads else -1. for h in range(4)])
        predicted = supernet.latency(table)
        assert predicted.item() == pytest.approx(table.predict(supernet.architecture()), rel=1e-6)
    # all gates open: the original; gradients reach every gate, with the slope of the table
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **SMALL)
    table = hand_table(supernet)
    predicted = supernet.latency(table)
    assert predicted.item() == pytest.approx(table.original_ms())
    predicted.backward()
    sig = torch.sigmoid(torch.tensor(1.5))
    slope = (sig * (1 - sig)).item()          # the surrogate's gradient at theta0
    for a, m in zip(supernet.attn_slots, supernet.mlp_slots):
        # msa open: the cheaper gates are detached; the msa gate controls msa - conv3x3
        assert a.gate_logits.grad.tolist() == pytest.approx([0, 0, (0.4 - 0.09) * slope], rel=1e-5)
        assert m.gate_logits.grad == pytest.approx(torch.full((256,), 0.2 / 128 * slope), rel=1e-5)
    costs = supernet.latency_gate_costs(table)
    assert costs[0].tolist() == pytest.approx([v / table.original_ms() for v in (0.04, 0.04, 0.31)], rel=1e-5)
    assert costs[1].tolist() == pytest.approx([0.4 / 255 / table.original_ms()] * 256, rel=1e-5)


def test_tables_for_another_model_or_device_are_refused(small_supernet):
    supernet, _ = small_supernet
    table = hand_table(supernet)
    table.check_model(supernet.model_name, supernet.block_dims, supernet.input_size)
    table.check_device('cpu', threads=1)
    with pytest.raises(LatencyTableError, match='is for vit_tiny_patch16_224, not deit_tiny_patch16_224'):
        table.check_model('deit_tiny_patch16_224', supernet.block_dims, supernet.input_size)
    with pytest.raises(LatencyTableError, match=r'is for input \[3, 32, 32\], not \[3, 64, 64\]'):
        table.check_model(supernet.model_name, supernet.block_dims, (3, 64, 64))
    other = supernet_and_original('vit_tiny_patch16_224', **{**SMALL, 'embed_dim': 32})[0]
    with pytest.raises(LatencyTableError, match='other block shapes'):
        table.check_model(supernet.model_name, other.block_dims, supernet.input_size)
    table.device_name = 'a CPU this is not'
    with pytest.raises(LatencyTableError, match=r'measured on cpu \(a CPU this is not\), not on cpu'):
        table.check_device('cpu')
    table = hand_table(supernet)
    with pytest.raises(LatencyTableError, match='measured with 1 threads, not 2'):
        table.check_device('cpu', threads=2)


def test_build_a_table_of_a_tiny_vit():
    """The builder's structure (times are whatever this machine gives: only their form is checked)."""
    kwargs = dict(SMALL, depth=2)
    table = build_latency_table('vit_tiny_patch16_224', kwargs, batch_size=2, threads=1, mlp_points=5, warmup=0,
                                runs=1, min_run_s=0.001, progress=False)
    assert (table.model, table.model_kwargs, table.input_size) == ('vit_tiny_patch16_224', kwargs, [3, 32, 32])
    assert (table.device, table.device_name, table.batch_size, table.threads) == ('cpu', device_name('cpu'), 2, 1)
    assert table.blocks == [0, 0] and len(table.shapes) == 1
    shape = table.shapes[0]
    assert shape.dims['tokens'] == 65 and shape.dims['hidden'] == 256 and shape.mlp_widths == [1, 64, 128, 192, 256]
    assert len(shape.msa_heads) == 4 and shape.ops['msa'] == shape.msa_heads[-1]
    assert all(v > 0 for v in [*shape.ops.values(), *shape.msa_heads, *shape.mlp_ms])
    # the fixed part is the model without blocks, the block timings scaled so that the original's
    # prediction is its measurement
    assert table.fixed_ms == table.timing['fixed_alone_ms'] and table.timing['block_scale'] > 0
    assert table.original_ms() == pytest.approx(table.timing['original_ms'])
    assert LatencyTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


@pytest.mark.slow
def test_latency_table_tool(tmp_path):
    out = tmp_path / 't.json'
    common = ['--model-kwargs', 'img_size=32', 'patch_size=4', 'embed_dim=64', 'depth=2', 'num_heads=4',
              '--batch-size', '1', '--threads', '1', '--runs', '1', '--warmup', '0', '--min-run-s', '0.001',
              '--mlp-points', '3']
    proc = start('latency_table.py', '--model', 'vit_tiny_patch16_224', *common, '--output', out)
    stdout, err = proc.communicate()
    assert proc.returncode == 0, err
    table = LatencyTable.load(str(out))
    assert table.shapes[0].mlp_widths == [1, 128, 256] and f'wrote {out}' in stdout
    cases = [(('--model', 'vit_tiny_patch16_224', *common, '--output', out), 'output exists'),
             (('--model', 'swin_tiny_patch4_window7_224', '--output', tmp_path / 's.json'),
              'latency tables support the vit family for now; swin_tiny_patch4_window7_224 is of the swin family')]
    for args, message in cases:
        proc = start('latency_table.py', *args)
        _, err = proc.communicate()
        assert proc.returncode == 2 and err.count('\n') == 1 and message in err, err
    assert not (tmp_path / 's.json').exists()


@pytest.mark.slow
def test_a_tiny_latency_budget_search_lands_on_its_predicted_target(image_folder, pretrained, tmp_path):
    from spvit.search import main as search_main
    from helpers import args, load
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **{**SMALL, 'num_classes': 4})
    table = hand_table(supernet, fixed=0.5)
    path = tmp_path / 'table.json'
    table.save(str(path))
    out = tmp_path / 'run'
    search_main(args(image_folder, out, '--checkpoint', pretrained, '--target-latency-ratio', '0.6',
                     '--latency-table', str(path), '--epochs', '4'))
    final = load(out / 'search-final.pth')
    budget = final['budget']
    arch = spvit.Architecture.from_dict(final['arch'])
    target = 0.6 * table.original_ms()
    assert budget['kind'] == 'latency' and budget['target'] == pytest.approx(target) and budget['ratio'] == 0.6
    assert budget['achieved'] == pytest.approx(table.predict(arch))
    assert abs(budget['achieved'] - target) / target <= 0.02
    assert LatencyTable.from_dict(budget['table']) == table and final['target_gflops'] is None
    assert LatencyTable.load(str(out / 'latency-table.json')) == table
    steps = [json.loads(line) for line in open(out / 'log.jsonl')]
    steps = [r for r in steps if r['kind'] == 'step']
    assert {'latency_ms', 'gflops', 'target'} <= set(steps[0]) and steps[-1]['target'] == pytest.approx(target)
    assert steps[0]['latency_ms'] > steps[-1]['latency_ms']
    # the pruned checkpoint's provenance carries the budget and the table's device
    proc = start('export.py', '--search', out / 'search-final.pth', '--output', tmp_path / 'pruned.pth')
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    provenance = spvit.read_pruned(str(tmp_path / 'pruned.pth')).provenance['latency_budget']
    assert provenance['target_ms'] == pytest.approx(target) and provenance['device_name'] == device_name('cpu')
    assert provenance['predicted_ms'] == pytest.approx(budget['achieved'])


@pytest.mark.slow
def test_flops_and_benchmark_report_predicted_latency_and_refuse_other_tables(image_folder, tmp_path):
    from spvit.export import latency_provenance
    from helpers import args
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **SMALL)
    table = hand_table(supernet)
    table_path, other_device, other_model = tmp_path / 't.json', tmp_path / 'device.json', tmp_path / 'model.json'
    table.save(str(table_path))
    LatencyTable.from_dict({**table.to_dict(), 'device_name': 'another CPU'}).save(str(other_device))
    hand_table(supernet_and_original('vit_tiny_patch16_224', **{**SMALL, 'qk_norm': True})[0]).save(str(other_model))
    arch = spvit.Architecture('vit_tiny_patch16_224', [spvit.BlockArch('conv3x3', 100), spvit.BlockArch('msa', 256),
                                                       spvit.BlockArch('skip', 10), spvit.BlockArch('msa', 50, [1])],
                              SMALL)
    pruned = spvit.build_from_arch('vit_tiny_patch16_224', SMALL, arch)
    pruned.provenance['latency_budget'] = latency_provenance({'target': 2.0, 'ratio': 0.5, 'table': table.to_dict()}, arch)
    path = tmp_path / 'pruned.pth'
    pruned.save(str(path))

    proc = start('flops.py', '--pruned', path, '--latency-table', table_path, '--compare', '--json')
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert [b['latency_ms'] for b in report['blocks']] == pytest.approx([a + m for a, m in table.block_ms(arch)])
    assert report['predicted_latency_ms'] == pytest.approx(table.predict(arch))
    assert report['latency_ratio'] == pytest.approx(table.predict(arch) / table.original_ms())

    proc = start('benchmark.py', '--pruned', path, '--batch-sizes', 2, '--runs', 1, '--warmup', 0, '--device', 'cpu',
                 '--json')
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    report = json.loads(out)
    p = report['latency_prediction']
    assert set(report['batches']) == {'1', '2'} and p['batch'] == 1 and report['threads'] == 1    # the table's
    assert p['predicted_ms'] == pytest.approx({'original': table.original_ms(), 'pruned': table.predict(arch)})
    measured = report['batches']['1']['pruned']['latency_ms']
    assert p['measured_ms']['pruned'] == pytest.approx(measured)
    assert p['measured_over_target'] == pytest.approx(measured / 2.0)

    cases = [(('flops.py', '--pruned', path, '--latency-table', other_model), 'other block shapes'),
             (('benchmark.py', '--pruned', path, '--latency-table', other_device, '--device', 'cpu'),
              f'the latency table {other_device} was measured on cpu (another CPU), not on cpu'),
             (('benchmark.py', '--pruned', path, '--latency-table', table_path, '--threads', '2', '--device', 'cpu'),
              'was measured with 1 threads, not 2'),
             (('search.py', *args(image_folder, tmp_path / 'out', '--target-latency-ratio', '0.6', '--latency-table',
                                  other_model)), f'the latency table {other_model} is for other block shapes'),
             (('search.py', *args(image_folder, tmp_path / 'out', '--target-latency-ms', '1', '--target-ratio', '0.5')),
              'give --target-ratio or --target-latency-ms, not both')]
    procs = [start(*a) for a, _ in cases]
    for proc, (a, message) in zip(procs, cases):
        _, err = proc.communicate()
        assert proc.returncode == 2 and err.count('\n') == 1 and message in err, (a, err)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_a_latency_search_resumes_exactly_with_its_own_table(image_folder, tmp_path):
    """The resumed run predicts with the table in its state, even when the file changed since."""
    from spvit.search import main as search_main
    from helpers import args, load
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **{**SMALL, 'num_classes': 4})
    path = tmp_path / 'table.json'
    hand_table(supernet, fixed=0.5).save(str(path))
    common = ['--target-latency-ratio', '0.6', '--latency-table', str(path), '--epochs', '2', '--seed', '3']
    search_main(args(image_folder, tmp_path / 'whole', *common))
    search_main(args(image_folder, tmp_path / 'split', *common, '--max-steps', '11'))
    hand_table(supernet, fixed=5.0).save(str(path))
    search_main(['--resume', str(tmp_path / 'split' / 'checkpoint-last.pth')])
    whole, split = load(tmp_path / 'whole' / 'search-final.pth'), load(tmp_path / 'split' / 'search-final.pth')
    assert whole['arch'] == split['arch'] and split['budget']['target'] == pytest.approx(whole['budget']['target'])
    assert max((v.float() - split['supernet']['state_dict'][k].float()).abs().max().item()
               for k, v in whole['supernet']['state_dict'].items()) <= 1e-6
