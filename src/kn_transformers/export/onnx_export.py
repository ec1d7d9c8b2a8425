"""``export_onnx``: a Kronecker (or dense) transformers model as an ONNX graph, factored form kept.

Each Kronecker layer exports as the two contractions the PyTorch forward runs (``MatMul`` /
``Reshape`` / ``Transpose`` on the factors ``A``, ``B``): no ``out × in`` matrix exists in the
graph. The exporter is ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript):
Optimum's exporter keys its ONNX configs on model types and would need one registered per
Kronecker type while tracing through the same ``torch.onnx`` underneath; exporting the model's
own forward needs no registration, and the input/output names follow Optimum's conventions so
that ONNX Runtime code written for Optimum's GPT-2 / BERT graphs runs these too.

Causal language models (``with_past=True``) take ``input_ids``, ``attention_mask`` (past + new
positions), ``position_ids`` and ``past_key_values.{i}.key`` / ``.value``
(``batch × heads × past_len × head_dim``; ``past_len`` may be 0 for the first step) and return
``logits`` and ``present.{i}.key`` / ``.value``. Encoders take ``input_ids``,
``attention_mask`` (and ``token_type_ids`` where the model has them) and return the model's
outputs (``logits``, ``last_hidden_state``, ``start_logits``/``end_logits``). Batch and
sequence axes are dynamic.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from ..core.layers import KroneckerEmbedding, KroneckerLinear
from .merge import dense_class_of

logger = logging.getLogger(__name__)

__all__ = ["ONNX_ARCHITECTURES", "QUANTIZE_MIN_DIM", "export_onnx", "quantize_onnx", "check_factored_graph"]

#: model type of the dense architecture -> how its graph is exported ("causal": decoder with
#: a KV cache; "encoder": bidirectional, optional token types). Each entry is tested on a tiny
#: random configuration (tests/test_export.py); a new one is a line here once its test passes.
ONNX_ARCHITECTURES = {
    **dict.fromkeys(("gpt2", "llama", "mistral", "qwen2", "phi3", "gemma", "opt", "gpt_neox"), "causal"),
    **dict.fromkeys(("bert", "roberta", "distilbert"), "encoder"),
}
#: opsets the dynamo exporter writes (it translates to opset 18 and converts upwards)
MIN_OPSET = 18
#: the default: opset 20 has ``Gelu``, one fused operator in ONNX Runtime where opset 18 spells the
#: activation out in five elementwise ones (BERT-base at 32x128 tokens: 11% faster, Kronecker graphs
#: more, because the activation is a larger share of their time)
DEFAULT_OPSET = 20


def _export_kind(model: PreTrainedModel) -> str:
    """``ONNX_ARCHITECTURES``' entry for the model's dense architecture, or a one-line error."""
    dense_cls = type(model) if type(model).__module__.startswith("transformers.models.") else dense_class_of(model)
    model_type = dense_cls.config_class.model_type
    kind = ONNX_ARCHITECTURES.get(model_type)
    if kind is None:
        raise ValueError(
            f"export_onnx knows the architectures {sorted(ONNX_ARCHITECTURES)}, not {model_type!r} "
            f"({type(model).__name__}); export merge_to_dense(model) with Optimum instead"
        )
    return kind


def _check_output_path(path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    if path.suffix != ".onnx":
        path = path / "model.onnx"
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create {str(folder)!r} for the ONNX file ({e.strerror}); choose a writable folder") from None
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OSError(f"cannot write {str(path)!r}: permission denied; choose a writable folder")
    return path


def _check_opset(opset: int) -> int:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {newest}] (the exporter's range), got {opset!r}")
    return opset


@contextlib.contextmanager
def _plain_torch_path(model: nn.Module):
    """During export: layers prepared with ``optimize_for_inference`` use the plain contraction (the
    native kernel is not an ONNX op), every Kronecker layer the order for graph runtimes
    (``graph_contraction_order``) with its bias added last, attention transformers' eager
    implementation; all restored after."""
    from ..core.contraction import graph_contraction_order
    from ..core.inference import OptimizedKroneckerLinear

    swapped = [m for m in model.modules() if isinstance(m, OptimizedKroneckerLinear)]
    layers = [m for m in model.modules() if isinstance(m, KroneckerLinear)]
    orders = [m.order for m in layers]
    if swapped:
        logger.info("export_onnx: %d layers prepared by optimize_for_inference export their plain PyTorch "
                    "contraction (the native kernel is not an ONNX operator)", len(swapped))
    configs = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    attn = [c._attn_implementation for c in configs]
    training = model.training
    for m in swapped:
        m.__class__ = KroneckerLinear
    for m in layers:  # no transposes where a form avoids them: what graph runtimes run fast
        m.order = graph_contraction_order(m.A, m.B)
        m.bias_last = True
    for c in configs:
        c._attn_implementation = "eager"
    model.eval()
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = OptimizedKroneckerLinear
        for m, order in zip(layers, orders):
            m.order = order
            del m.bias_last  # back to the class default
        for c, value in zip(configs, attn):
            c._attn_implementation = value
        model.train(training)


class _CausalLMWithFlatCache(nn.Module):
    """A causal LM whose cache goes in and out as flat tensors (ONNX has no cache objects)."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, return_dict=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


class _Outputs(nn.Module):
    """An encoder returning the named outputs as a tuple (the ONNX outputs, in order)."""

    def __init__(self, model: PreTrainedModel, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.model(**inputs, return_dict=True)
        return tuple(out[name] for name in self.names)


def _causal_example(model: PreTrainedModel, batch: int, length: int, past: int):
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = config.num_hidden_layers
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    mask = torch.ones(batch, past + length, dtype=torch.long, device=device)
    positions = torch.arange(past, past + length, device=device).expand(batch, length)
    cache = [torch.zeros(batch, kv_heads, past, head_dim, device=device, dtype=dtype) for _ in range(2 * layers)]
    names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return (ids, mask, positions, cache), names


@torch.no_grad()
def export_onnx(
    model: PreTrainedModel,
    path: Union[str, os.PathLike],
    *,
    with_past: Optional[bool] = None,
    opset: int = DEFAULT_OPSET,
    example_batch: int = 2,
    example_length: int = 8,
) -> Path:
    """Export ``model`` (KnGPT2, KroneckerBERT, a ``kroneckerize``-d model of an architecture in
    ``ONNX_ARCHITECTURES``, or the dense model it came from) to ONNX.

    Args:
        model: the model; not changed (layers prepared by ``optimize_for_inference`` export their
            plain PyTorch contraction).
        path: a ``.onnx`` file, or a folder that gets ``model.onnx``.
        with_past: causal LMs only: export the KV-cache inputs and outputs (default ``True``).
        opset: ONNX opset, ``MIN_OPSET`` (18) up to the installed ``onnx``'s newest; ``DEFAULT_OPSET``
            (20) by default.
        example_batch, example_length: the shapes traced (any batch and length run afterwards).

    Returns the path of the ``.onnx`` file. Weights are stored inside the file up to protobuf's
    2 GB limit and beside it (``.onnx.data``) above that.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'kn-transformers[export]'") from None
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"export_onnx expects a transformers PreTrainedModel, got {type(model).__name__}")
    kind = _export_kind(model)
    path = _check_output_path(path)
    opset = _check_opset(opset)
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")

    with _plain_torch_path(model):
        if kind == "causal" and with_past is not False and hasattr(model, "generate"):
            wrapper = _CausalLMWithFlatCache(model)
            args, past_names = _causal_example(model, example_batch, example_length, past=3)
            past_len, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
            dynamic = ({0: batch, 1: sequence}, {0: batch, 1: total}, {0: batch, 1: sequence},
                       [{0: batch, 2: past_len}] * len(past_names))
            input_names = ["input_ids", "attention_mask", "position_ids", *past_names]
            output_names = ["logits", *[n.replace("past_key_values", "present") for n in past_names]]
            kwargs = {}
        else:
            config = model.config
            device = next(model.parameters()).device
            ids = torch.randint(0, config.vocab_size, (example_batch, example_length), device=device)
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if kind == "encoder" and getattr(config, "type_vocab_size", 0) > 1:
                kwargs["token_type_ids"] = torch.zeros_like(ids)
            if kind == "causal" and getattr(config, "pad_token_id", None) is None and "Classification" in type(model).__name__:
                raise ValueError("export_onnx: set model.config.pad_token_id (sequence classification pools the last "
                                 "non-padding token)")
            probe = model(**kwargs, return_dict=True)
            output_names = [k for k, v in probe.items() if isinstance(v, torch.Tensor)
                            and k not in ("hidden_states", "attentions", "past_key_values")]
            wrapper = _Outputs(model, output_names)
            input_names = list(kwargs)
            dynamic = {name: {0: batch, 1: sequence} for name in kwargs}
            args = ()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not the user's concern
            program = torch.onnx.export(
                wrapper, args, kwargs=kwargs or None, dynamo=True, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic, opset_version=opset, verbose=False,
            )
    program.save(str(path), external_data=_too_big_for_one_file(model))
    return path


def _too_big_for_one_file(model: nn.Module) -> bool:
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size > 1_800_000_000  # protobuf's 2 GB limit on one message


class _ErrorRecords(logging.Handler):
    """Collects the messages of the error records it receives."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


#: ``quantize_onnx`` quantises a matmul only when its weight has at least this many rows and columns:
#: below that the per-call quantisation of the activations costs more than the int8 product saves
#: (the Kronecker graphs' ``B 2×2`` / ``A 16×2`` stages: ``benchmarks/bench_onnx.py``)
QUANTIZE_MIN_DIM = 32


def quantize_onnx(path: Union[str, os.PathLike], output: Optional[Union[str, os.PathLike]] = None, *,
                  min_weight_dim: int = QUANTIZE_MIN_DIM) -> Path:
    """ONNX Runtime dynamic int8 quantisation (weights int8, activations quantised per call) of the
    graph at ``path``; writes ``output`` (default: ``<name>.int8.onnx`` beside it) and returns it.

    The graph is first pre-processed as ONNX Runtime recommends for quantisation (its basic graph
    optimisations, constant folding included), so that each matmul of a Kronecker factor reads the
    factor as a constant in the layout it multiplies by (the export reshapes and transposes the
    factors inside the graph, which the quantiser does not look through: it would otherwise quantise
    only the tiny matmuls). Matmuls whose weight has fewer than ``min_weight_dim`` rows or columns
    stay fp32.
    """
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ImportError("quantize_onnx needs onnx and onnxruntime: pip install 'kn-transformers[export]'") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r}")
    if not isinstance(min_weight_dim, int) or isinstance(min_weight_dim, bool) or min_weight_dim < 1:
        raise ValueError(f"min_weight_dim must be an integer >= 1, got {min_weight_dim!r}")
    output = Path(output) if output is not None else path.with_name(path.stem + ".int8.onnx")
    output = _check_output_path(output)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        errors = _ErrorRecords()
        pre_logger = logging.getLogger(quant_pre_process.__module__)
        pre_logger.addHandler(errors)
        try:  # it logs a failed optimisation and goes on without it: the int8 graph would keep fp32 factors
            quant_pre_process(str(path), str(folded), skip_symbolic_shape=True, save_as_external_data=external,
                              all_tensors_to_one_file=True)
        finally:
            pre_logger.removeHandler(errors)
        if errors.messages:
            cause = errors.messages[-1].strip().splitlines()[-1]  # the traceback's last line
            raise RuntimeError(f"quantize_onnx: ONNX Runtime could not pre-process {str(path)!r} ({cause}); "
                               "check that the graph loads in onnxruntime")
        model = onnx.load(str(folded))
        keep_fp32 = _small_matmuls(model, min_weight_dim)
        onnx.save(model, str(folded), save_as_external_data=external, all_tensors_to_one_file=True)
        quantize_dynamic(str(folded), str(output), weight_type=QuantType.QInt8, nodes_to_exclude=keep_fp32,
                         use_external_data_format=external)
    return output


def _small_matmuls(model, min_weight_dim: int) -> list[str]:
    """Names of the MatMul / Gemm nodes of ``model`` (an ``onnx.ModelProto``, renamed in place so that
    every node has a unique name: the quantiser selects nodes by name) whose weight is not a 2-D
    constant with both dimensions ``>= min_weight_dim``."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    small, names = [], set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in names:
            node.name = f"{node.op_type}_kn{i}"
        names.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            dims = weights.get(node.input[1], ())
            if len(dims) != 2 or min(dims) < min_weight_dim:
                # dynamic quantisation first rewrites a Gemm as MatMul "<name>_MatMul" + Add
                small += [node.name, node.name + "_MatMul"] if node.op_type == "Gemm" else [node.name]
    return small


def check_factored_graph(onnx_model, model: nn.Module) -> None:
    """Raise ``AssertionError`` if the ONNX graph holds a constant, or computes a tensor of static
    shape, with the shape of one of ``model``'s Kronecker matrices (``out × in`` either way round,
    or the ``vocab × dim`` table) beyond the dense parameters of that shape: the export must keep
    the factors.
    ``onnx_model``: an ``onnx.ModelProto`` or a path."""
    import onnx

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model))
    full = {}  # the shapes a full matrix would have (either orientation) -> the layer
    for name, module in model.named_modules():
        if isinstance(module, KroneckerLinear):
            shape = (module.out_features, module.in_features)
        elif isinstance(module, KroneckerEmbedding):
            shape = (module.num_embeddings, module.embedding_dim)
        else:
            continue
        full.setdefault(shape, name)
        full.setdefault(shape[::-1], name)
    if not full:
        return
    kron = {id(m) for m in model.modules() if isinstance(m, (KroneckerLinear, KroneckerEmbedding))}
    dense = collections.Counter()  # dense parameters of those shapes are allowed, once each
    for module in model.modules():
        if id(module) not in kron:
            dense.update(tuple(p.shape) for p in module.parameters(recurse=False))
    tensors = [(init.name, list(init.dims)) for init in onnx_model.graph.initializer]
    tensors += [(node.output[0], list(attr.t.dims)) for node in onnx_model.graph.node if node.op_type == "Constant"
                for attr in node.attribute if attr.type == onnx.AttributeProto.TENSOR]
    constant_names = {name for name, _ in tensors}
    inferred = onnx.shape_inference.infer_shapes(onnx_model)
    for info in inferred.graph.value_info:  # computed tensors (shape inference also lists the constants)
        dims = info.type.tensor_type.shape.dim
        if info.name not in constant_names and dims and all(d.HasField("dim_value") for d in dims):
            tensors.append((info.name, [d.dim_value for d in dims]))
    seen = collections.Counter()
    for name, dims in tensors:
        shape = tuple(dims)
        if shape in full:
            seen[shape] += 1
            if seen[shape] > dense[shape] + dense[shape[::-1]]:
                raise AssertionError(f"the ONNX graph holds {name!r} of shape {list(shape)}, {full[shape]}'s full matrix")
