"""Measured against predicted latency: what ``tools/benchmark.py`` adds for a latency table or a
latency-budget checkpoint, so a user sees how far the table's device is from the one timed now."""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Tuple

from .compare import ModelPair
from .latency import LatencyReport
from .latency_model import LatencyTable, LatencyTableError


def prediction_table(pair: ModelPair, table_path: Optional[str], device: str, threads: Optional[int],
                     pruned: Optional[str] = None) -> Tuple[Optional[LatencyTable], Optional[Dict[str, Any]]]:
    """The table to predict with, and the latency budget the checkpoint carries: ``table_path``
    (refused, one line, if it is for another model, device or thread count), else the table of a
    latency-budget checkpoint ``pruned`` (skipped with a note on another device)."""
    budget = pair.provenance.get('latency_budget') if pruned else None
    if table_path is None and not budget:
        return None, None
    explicit = table_path is not None
    table = (LatencyTable.load(table_path) if explicit
             else LatencyTable.from_dict(budget['table'], source=f'{pruned} (latency budget)'))
    where = table_path if explicit else f'of {pruned}'
    table.check_model(pair.arch.model, pair.block_dims, pair.input_size, where=where)
    try:
        table.check_device(device, threads=threads, where=where)
    except LatencyTableError as e:
        if explicit:
            raise
        print(f'benchmark.py: note: no measured-against-predicted latency: {e}', file=sys.stderr)
        return None, None
    return table, budget


def prediction(report: LatencyReport, table: LatencyTable, budget: Optional[Dict[str, Any]],
               pair: ModelPair) -> Dict[str, Any]:
    """Predicted against measured at the table's batch size, and against the budget's target."""
    b = table.batch_size
    measured = {name: report.timings[b][name].latency_ms for name in ('original', 'pruned')}
    predicted = {'original': table.original_ms(), 'pruned': table.predict(pair.arch)}
    out = {'table': table.describe(), 'batch': b, 'predicted_ms': predicted, 'measured_ms': measured,
           'measured_over_predicted': {k: measured[k] / predicted[k] for k in measured}}
    if budget:
        out.update(target_ms=budget['target_ms'], ratio=budget.get('ratio'),
                   measured_over_target=measured['pruned'] / budget['target_ms'],
                   measured_ratio=measured['pruned'] / measured['original'])
    return out


def format_prediction(p: Dict[str, Any]) -> str:
    lines = [f'\npredicted latency (table: {p["table"]}), batch {p["batch"]}:']
    for name in ('original', 'pruned'):
        r = p['measured_over_predicted'][name]
        lines.append(f'  {name:<8} predicted {p["predicted_ms"][name]:.2f} ms, measured {p["measured_ms"][name]:.2f} ms '
                     f'(measured/predicted {r:.3f}, {r - 1:+.1%})')
    if 'target_ms' in p:
        ratio = '' if p['ratio'] is None else f' ({p["ratio"]:g} of the original\'s predicted)'
        lines.append(f'  budget {p["target_ms"]:.2f} ms{ratio}: pruned measured/target {p["measured_over_target"]:.3f} '
                     f'({p["measured_over_target"] - 1:+.1%}); measured latency ratio {p["measured_ratio"]:.3f}')
    return '\n'.join(lines)


__all__ = ['format_prediction', 'prediction', 'prediction_table']
