"""The pruned model through ONNX and ONNX Runtime: export with a dynamic batch dimension and the
data config and architecture in the file's metadata, a parity check against PyTorch, dynamic int8
quantisation, and an ``nn.Module`` view of an ONNX Runtime session so that evaluation and latency
code runs on it unchanged.

ONNX support is an extra (``pip install -e '.[onnx]'``): ``onnx``, ``onnxruntime`` and
``onnxscript`` (which torch's exporter needs) are imported only here, on first use.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .checkpoint import atomic_write
from .errors import SpvitError, VerificationError

ONNX_EXTRA = "pip install -e '.[onnx]'"
# ONNX Runtime runs opset 18 on every provider; torch's exporter emits nothing newer for these models
OPSET = 18
PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 8)
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'
# metadata keys (JSON values)
META_FORMAT = 'spvit.format'
META_DATA_CONFIG = 'spvit.data_config'
META_ARCH = 'spvit.arch'
META_PROVENANCE = 'spvit.provenance'
META_QUANTIZED_FROM = 'spvit.quantized_from'
FORMAT = 'spvit-onnx'


def require_onnx() -> None:
    """One clear line when the extra is missing (before any file is written)."""
    missing = []
    for module in ('onnx', 'onnxruntime', 'onnxscript'):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SpvitError(f'ONNX needs the onnx extra ({", ".join(missing)} not installed): {ONNX_EXTRA}')


def unverified_path(path: str) -> str:
    return path + '.unverified'


def int8_path(path: str) -> str:
    """Where ``--int8`` writes the quantised model: ``model.onnx`` -> ``model.int8.onnx``."""
    root, ext = os.path.splitext(path)
    return f'{root}.int8{ext or ".onnx"}'


def export_onnx(
        model: nn.Module,
        path: str,
        input_size: Tuple[int, int, int],
        data_config: Optional[Dict[str, Any]] = None,
        arch: Optional[Dict[str, Any]] = None,
        provenance: Optional[Dict[str, Any]] = None,
        opset: int = OPSET,
) -> None:
    """Write ``model`` (eval mode, on the CPU) as ONNX with a dynamic batch dimension; the data
    config, architecture and provenance go into the metadata. Written atomically."""
    require_onnx()
    import onnx
    model = model.eval().cpu()
    x = torch.randn(2, *input_size)
    batch = torch.export.Dim('batch', min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), opset_version=opset, verbose=False)
    proto = program.model_proto
    meta = {META_FORMAT: FORMAT, META_DATA_CONFIG: dict(data_config or {}), META_ARCH: arch, META_PROVENANCE: provenance}
    for key, value in meta.items():
        if value is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


def read_metadata(path: str) -> Dict[str, Any]:
    """The spvit metadata of an ONNX file (JSON values decoded); empty for a foreign file."""
    require_onnx()
    import onnx
    if not os.path.isfile(path):
        raise SpvitError(f'file not found: {path}')
    try:
        proto = onnx.load_model(path, load_external_data=False)
    except Exception as e:
        raise SpvitError(f'cannot read {path} as ONNX: {type(e).__name__}') from None
    out: Dict[str, Any] = {}
    for entry in proto.metadata_props:
        if entry.key.startswith('spvit.'):
            out[entry.key] = entry.value if entry.key == META_FORMAT else json.loads(entry.value)
    return out


def session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime session on the CPU provider (``threads``: intra-op threads)."""
    require_onnx()
    import onnxruntime as ort
    if not os.path.isfile(path):
        raise SpvitError(f'file not found: {path}')
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])
    except Exception as e:
        raise SpvitError(f'ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}') from None


class OnnxModel(nn.Module):
    """An ONNX Runtime session behind ``nn.Module.forward``: a CPU float tensor in, logits out."""

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        super().__init__()
        self.path = path
        self.metadata = read_metadata(path)
        self.session = session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def num_parameters(self) -> int:
        """Elements of the graph's initializers (the weights the runtime holds)."""
        import numpy as np
        import onnx
        proto = onnx.load_model(self.path)
        return int(sum(np.prod(t.dims) for t in proto.graph.initializer))


def parity(model: nn.Module, path: str, input_size: Tuple[int, int, int],
           batches: Sequence[int] = PARITY_BATCHES, seed: int = 0) -> Dict[int, float]:
    """Max abs difference of ONNX Runtime's logits from PyTorch's on random inputs, per batch size."""
    ort_model = OnnxModel(path)
    model = model.eval().cpu()
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, *input_size, generator=g)
            diffs[b] = float((ort_model(x) - model(x)).abs().max())
    return diffs


def export_verified(model: nn.Module, path: str, input_size: Tuple[int, int, int],
                    tolerance: float = PARITY_TOLERANCE, **meta: Any) -> Dict[int, float]:
    """``export_onnx`` then ``parity``; above ``tolerance`` the file is kept as ``path.unverified``
    and ``VerificationError`` (exit 1) is raised."""
    export_onnx(model, path, input_size, **meta)
    diffs = parity(model, path, input_size)
    worst = max(diffs.values())
    if not worst <= tolerance:       # NaN fails too
        os.replace(path, unverified_path(path))
        raise VerificationError(f'ONNX Runtime differs from PyTorch by {worst:.3g} (> {tolerance:g}); '
                                f'kept as {unverified_path(path)}')
    return diffs


def quantize_int8(path: str, out: str) -> None:
    """Dynamic (weight) int8 quantisation with ONNX Runtime's quantiser; the metadata is carried
    over and names the fp32 file it came from."""
    require_onnx()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    source = onnx.load_model(path)

    def write(tmp: str) -> None:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)       # the quantiser's advice to pre-process (for static quantisation) is noise here
        try:
            quantize_dynamic(path, tmp, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        proto = onnx.load_model(tmp)
        del proto.metadata_props[:]
        for entry in source.metadata_props:
            proto.metadata_props.add().CopyFrom(entry)
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_QUANTIZED_FROM, json.dumps(os.path.abspath(path))
        onnx.save_model(proto, tmp)
    atomic_write(out, write)


def export_pruned_onnx(pruned: Any, path: str, int8: bool = False) -> List[str]:
    """A ``PrunedModel`` as ONNX (verified, see ``export_verified``), and with ``int8`` its
    quantised copy; returns the report lines."""
    from .families import family_of
    model = pruned.model
    input_size = tuple(pruned.data_config.get('input_size') or family_of(model).input_size(model))
    diffs = export_verified(model, path, input_size, data_config=pruned.data_config, arch=pruned.arch.to_dict(),
                            provenance=pruned.provenance)
    lines = [f'wrote {path}: opset {OPSET}, dynamic batch; ONNX Runtime vs PyTorch max abs difference '
             + ', '.join(f'{d:.2e} at batch {b}' for b, d in diffs.items())]
    if int8:
        out = int8_path(path)
        quantize_int8(path, out)
        lines.append(f'wrote {out}: dynamic int8 weights ({os.path.getsize(out) / 2**20:.1f} MiB, fp32 '
                     f'{os.path.getsize(path) / 2**20:.1f} MiB); tools/eval.py --onnx {out} reports its top-1 change')
    return lines


__all__ = ['ONNX_EXTRA', 'OPSET', 'export_pruned_onnx', 'PARITY_TOLERANCE', 'OnnxModel', 'export_onnx', 'export_verified', 'parity',
           'quantize_int8', 'read_metadata', 'require_onnx', 'session', 'int8_path', 'unverified_path']
