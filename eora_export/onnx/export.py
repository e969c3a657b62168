"""Export a Hugging Face ``LlamaForCausalLM`` (float16, EoraLinear modules inside) to ONNX.

The graph is written directly with ``onnx.helper`` (gpt-fast style) rather than traced:
we choose every dtype and each compensated Linear becomes exactly the canonical pattern
of :mod:`eora_export.onnx.pattern` (or, with ``fused=True``, one ``eora::EoraLinear``).

Graph (opset 21, float16 activations)::

    input_ids int64 [batch, seq] ─► Gather(embed) ─► N × decoder layer ─► RMSNorm ─► MatMul(lm_head)
                                                                            ─► logits fp16 [batch, seq, vocab]

- RMSNorm follows ``LlamaRMSNorm``: Cast to float32, x·rsqrt(mean(x²)+eps), Cast back to
  float16, then times the float16 weight.
- RoPE: cos/sin tables ``[max_position_embeddings, head_dim]`` float16 are computed by the
  model's own ``rotary_emb`` (so rope_theta, rope scaling and attention_scaling are HF's),
  gathered at the positions; q·cos + rotate_half(q)·sin with HF's rotate_half.
- Attention: causal, GQA by repeating each kv head ``heads/kv_heads`` times (HF repeat_kv);
  scores = q·kᵀ (float16), scaled, masked and soft-maxed in float32, cast to float16.
  No padding mask: every row of a batch is all valid tokens.
- MLP: down(silu(gate(x)) · up(x)); silu runs in float32 (one rounding, like torch's).
- kv_cache=True adds inputs ``past_key_values.{i}.key/value`` and outputs
  ``present.{i}.key/value`` ``[batch, kv_heads, len, head_dim]`` float16 (keys after RoPE, as
  HF caches them). Positions are ``past_len + arange(seq)`` with past_len read from the
  first cache input, so past_len = 0 (an empty cache) is the prompt step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ..eora_linear import EoraLinear
from .builder import EXTERNAL_THRESHOLD_BYTES, ExternalDataFile, GraphBuilder, InitializerSink, save_model
from .fuse import emit_fused
from .pattern import OPSET, LinearWeights, emit

F16 = TensorProto.FLOAT16
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


def export_onnx(model: nn.Module, path: str | Path, *, kv_cache: bool = False, fused: bool = False,
                external_data: bool | None = None) -> Path:
    """Write ``model`` (a LlamaForCausalLM, or an :class:`eora_export.folder.LazyLlama` whose
    layers load one at a time) to ``path``; returns the path.

    kv_cache: add past/present key-value inputs and outputs. fused: one EoraLinear node per
    compensated Linear instead of the pattern. external_data: put initializers in
    ``<path>.data``; None chooses it when the weights exceed 1.5 GiB.
    """
    path = Path(path)
    cfg = _LlamaShape.of(model)
    if external_data is None:
        external_data = estimate_bytes(model) > EXTERNAL_THRESHOLD_BYTES
    data = ExternalDataFile(path) if external_data else None
    try:
        sink = InitializerSink(data.file if data else None, data.location if data else "")
        graph = _build(model, cfg, GraphBuilder(sink), kv_cache=kv_cache, fused=fused)
        onnx_model = helper.make_model(graph, opset_imports=_opsets(graph), producer_name="eora_export")
        onnx_model.ir_version = 10
        if data:
            data.commit()
        save_model(onnx_model, path)
    except BaseException:
        if data:
            data.discard()
        raise
    return path


def export_baseline_onnx(model_fp16: nn.Module, path: str | Path, *, kv_cache: bool = False,
                         external_data: bool | None = None) -> Path:
    """Export the uncompressed float16 model (plain Linears only) with the same graph layout."""
    if isinstance(model_fp16, nn.Module) and any(isinstance(m, EoraLinear) for m in model_fp16.modules()):
        raise ValueError("the baseline model contains EoraLinear modules; pass the original float16 model "
                         "(or use export_onnx for the compressed one)")
    return export_onnx(model_fp16, path, kv_cache=kv_cache, fused=False, external_data=external_data)


def estimate_bytes(model: nn.Module) -> int:
    """Bytes the exported initializers will take (float16 tensors, packed EoraLinear storage)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, EoraLinear):
            total += mod.storage_bytes()
        else:  # EoraLinear holds buffers only, so its parameters are never counted twice
            total += sum(p.numel() * 2 for p in mod.parameters(recurse=False))
    return total


class _LlamaShape:
    """The config numbers the graph needs, checked once."""

    def __init__(self, model: nn.Module) -> None:
        if not all(hasattr(model, a) for a in ("config", "model", "lm_head")) or not hasattr(model.model, "layers"):
            raise ValueError(f"{type(model).__name__} is not a LlamaForCausalLM-like model; export takes "
                             "model.config, model.model.layers, model.model.embed_tokens and model.lm_head")
        c = model.config
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={c.hidden_act!r}; the exporter implements Llama's silu MLP only")
        rope = (getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        if rope.get("rope_type", "default") in ("dynamic", "longrope"):
            raise ValueError(f"rope_type={rope['rope_type']!r} depends on the sequence length; export a model "
                             "with a static RoPE (default, linear, llama3, yarn)")
        self.hidden = c.hidden_size
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(c, "head_dim", None) or self.hidden // self.heads
        self.eps = float(c.rms_norm_eps)
        self.max_pos = int(c.max_position_embeddings)
        self.layers = len(model.model.layers)
        if self.heads % self.kv_heads:
            raise ValueError(f"num_attention_heads={self.heads} is not a multiple of num_key_value_heads="
                             f"{self.kv_heads}")

    @classmethod
    def of(cls, model: nn.Module) -> _LlamaShape:
        return cls(model)


def _opsets(graph: onnx.GraphProto) -> list[onnx.OperatorSetIdProto]:
    ops = [helper.make_opsetid("", OPSET)]
    domains = sorted({n.domain for n in graph.node if n.domain not in ("", "ai.onnx")})
    return ops + [helper.make_opsetid(d, 1) for d in domains]


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).cpu().contiguous().numpy()


def _rope_tables(model: nn.Module, cfg: _LlamaShape) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float16 ``[max_pos, head_dim]`` from the model's own rotary embedding."""
    pos = torch.arange(cfg.max_pos).unsqueeze(0)
    dummy = torch.zeros(1, dtype=torch.float16)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(dummy, pos)
    return _f16(cos[0]), _f16(sin[0])


def _build(model: nn.Module, cfg: _LlamaShape, g: GraphBuilder, *, kv_cache: bool, fused: bool) -> onnx.GraphProto:
    inputs = [helper.make_tensor_value_info("input_ids", I64, ["batch", "seq"])]
    vocab = int(model.lm_head.weight.shape[0])
    outputs = [helper.make_tensor_value_info("logits", F16, ["batch", "seq", vocab])]
    kv_shape = ["batch", cfg.kv_heads, "past_len", cfg.head_dim]
    if kv_cache:
        for i in range(cfg.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", F16, kv_shape))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", F16, ["batch", cfg.kv_heads, "total_len", cfg.head_dim]))

    c = _Consts(g)
    ctx = _positions(g, c, cfg, model, kv_cache)
    h = g.op("Gather", [g.const("model.embed_tokens.weight", _f16(model.model.embed_tokens.weight)),
                        "input_ids"], "embed")
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        x = _rms_norm(g, c, h, layer.input_layernorm, f"{p}.input_layernorm", cfg.eps)
        attn = _attention(g, c, x, layer.self_attn, p, cfg, ctx, i, kv_cache, fused)
        h = g.op("Add", [h, attn], f"{p}/attn_residual")
        x = _rms_norm(g, c, h, layer.post_attention_layernorm, f"{p}.post_attention_layernorm", cfg.eps)
        h = g.op("Add", [h, _mlp(g, x, layer.mlp, f"{p}.mlp", fused)], f"{p}/mlp_residual")
    h = _rms_norm(g, c, h, model.model.norm, "model.norm", cfg.eps)
    w = g.const("lm_head.weight_t", np.ascontiguousarray(_f16(model.lm_head.weight).T))
    g.nodes.append(helper.make_node("MatMul", [h, w], ["logits"], name="lm_head"))
    return helper.make_graph(g.nodes, "llama_eora", inputs, outputs, g.sink.tensors)


class _Consts:
    """Small shared constants, each made once."""

    def __init__(self, g: GraphBuilder) -> None:
        self.g = g
        self._made: dict[str, str] = {}

    def __call__(self, name: str, value: Any, dtype: Any) -> str:
        if name not in self._made:
            self._made[name] = self.g.const(f"const/{name}", np.asarray(value, dtype=dtype))
        return self._made[name]


def _positions(g: GraphBuilder, c: _Consts, cfg: _LlamaShape, model: nn.Module, kv_cache: bool) -> dict[str, str]:
    """cos/sin ``[seq, head_dim]`` at the current positions and the boolean causal mask.

    mask ``[seq, total_len]`` is True where key position > query position (masked out).
    """
    seq = g.op("Shape", ["input_ids"], "seq_len", start=1, end=2)
    if kv_cache:
        past = g.op("Shape", ["past_key_values.0.key"], "past_len", start=2, end=3)
    else:
        past = c("zero_1d", [0], np.int64)
    total = g.op("Add", [past, seq], "total_len")
    past_s = g.op("Squeeze", [past, c("axis0", [0], np.int64)], "past_len_scalar")
    total_s = g.op("Squeeze", [total, c("axis0", [0], np.int64)], "total_len_scalar")
    one = c("one", 1, np.int64)
    positions = g.op("Range", [past_s, total_s, one], "positions")
    cos_t, sin_t = _rope_tables(model, cfg)
    cos = g.op("Gather", [g.const("rope.cos", cos_t), positions], "rope_cos")
    sin = g.op("Gather", [g.const("rope.sin", sin_t), positions], "rope_sin")
    keys = g.op("Range", [c("zero", 0, np.int64), total_s, one], "key_positions")
    query = g.op("Unsqueeze", [positions, c("axis1", [1], np.int64)], "query_positions")
    mask = g.op("Greater", [keys, query], "causal_mask")
    return {"cos": cos, "sin": sin, "mask": mask}


def _rms_norm(g: GraphBuilder, c: _Consts, x: str, norm: nn.Module, name: str, eps: float) -> str:
    x32 = g.op("Cast", [x], f"{name}/cast_f32", to=F32)
    var = g.op("ReduceMean", [g.op("Mul", [x32, x32], f"{name}/square"), c("axis_last", [-1], np.int64)],
               f"{name}/mean", keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, c(f"eps_{eps}", eps, np.float32)], f"{name}/add_eps")],
                                   f"{name}/sqrt")], f"{name}/rsqrt")
    y16 = g.op("Cast", [g.op("Mul", [x32, inv], f"{name}/normalize")], f"{name}/cast_f16", to=F16)
    return g.op("Mul", [g.const(f"{name}.weight", _f16(norm.weight)), y16], f"{name}/scale")


def _linear(g: GraphBuilder, x: str, mod: nn.Module, prefix: str, fused: bool) -> str:
    """y = Linear(x): the EoraLinear pattern (or fused node), or a plain float16 MatMul."""
    y = g.fresh(f"{prefix}/output")
    if isinstance(mod, EoraLinear):
        weights = LinearWeights.from_module(mod)
        nodes, inits = (emit_fused if fused else emit)(prefix, x, y, weights)
    elif isinstance(mod, nn.Linear):
        w = g.const(f"{prefix}.weight_t", np.ascontiguousarray(_f16(mod.weight).T))
        if mod.bias is None:
            nodes, inits = [helper.make_node("MatMul", [x, w], [y], name=f"{prefix}/MatMul")], []
        else:
            mm = f"{prefix}/matmul"
            b = g.const(f"{prefix}.bias", _f16(mod.bias))
            nodes = [helper.make_node("MatMul", [x, w], [mm], name=mm),
                     helper.make_node("Add", [mm, b], [y], name=f"{prefix}/bias")]
            inits = []
    else:
        raise ValueError(f"{prefix} is a {type(mod).__name__}; export takes nn.Linear or EoraLinear there")
    g.nodes.extend(nodes)
    for t in inits:
        g.add_initializer(t)
    return y


def _heads(g: GraphBuilder, c: _Consts, x: str, n: int, hd: int, name: str) -> str:
    """[b, s, n*hd] -> [b, n, s, hd]."""
    r = g.op("Reshape", [x, c(f"shape_0_0_{n}_{hd}", [0, 0, n, hd], np.int64)], f"{name}/split_heads")
    return g.op("Transpose", [r], f"{name}/to_bhsd", perm=[0, 2, 1, 3])


def _rope(g: GraphBuilder, c: _Consts, x: str, ctx: dict[str, str], hd: int, name: str) -> str:
    """x·cos + rotate_half(x)·sin, rotate_half(x) = cat(-x[..., hd/2:], x[..., :hd/2])."""
    x1, x2 = g.op("Split", [x, c(f"halves_{hd}", [hd // 2, hd // 2], np.int64)], f"{name}/split", n_out=2,
                  axis=-1)
    rot = g.op("Concat", [g.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rotate_half", axis=-1)
    return g.op("Add", [g.op("Mul", [x, ctx["cos"]], f"{name}/mul_cos"),
                        g.op("Mul", [rot, ctx["sin"]], f"{name}/mul_sin")], f"{name}/rope")


def _repeat_kv(g: GraphBuilder, c: _Consts, x: str, n_rep: int, heads: int, hd: int, name: str) -> str:
    """[b, kvh, t, hd] -> [b, kvh*n_rep, t, hd], each kv head repeated n_rep times in a row."""
    if n_rep == 1:
        return x
    u = g.op("Unsqueeze", [x, c("axis2", [2], np.int64)], f"{name}/unsqueeze")
    t = g.op("Tile", [u, c(f"tile_{n_rep}", [1, 1, n_rep, 1, 1], np.int64)], f"{name}/tile")
    return g.op("Reshape", [t, c(f"shape_0_{heads}_m1_{hd}", [0, heads, -1, hd], np.int64)], f"{name}/merge")


def _attention(g: GraphBuilder, c: _Consts, x: str, attn: nn.Module, p: str, cfg: _LlamaShape,
               ctx: dict[str, str], i: int, kv_cache: bool, fused: bool) -> str:
    a = f"{p}.self_attn"
    hd = cfg.head_dim
    q = _rope(g, c, _heads(g, c, _linear(g, x, attn.q_proj, f"{a}.q_proj", fused), cfg.heads, hd, f"{a}/q"),
              ctx, hd, f"{a}/q")
    k = _rope(g, c, _heads(g, c, _linear(g, x, attn.k_proj, f"{a}.k_proj", fused), cfg.kv_heads, hd, f"{a}/k"),
              ctx, hd, f"{a}/k")
    v = _heads(g, c, _linear(g, x, attn.v_proj, f"{a}.v_proj", fused), cfg.kv_heads, hd, f"{a}/v")
    if kv_cache:
        k = g.op("Concat", [f"past_key_values.{i}.key", k], f"{a}/k_cat", axis=2)
        v = g.op("Concat", [f"past_key_values.{i}.value", v], f"{a}/v_cat", axis=2)
        g.nodes.append(helper.make_node("Identity", [k], [f"present.{i}.key"], name=f"{a}/present_key"))
        g.nodes.append(helper.make_node("Identity", [v], [f"present.{i}.value"], name=f"{a}/present_value"))
    n_rep = cfg.heads // cfg.kv_heads
    k = _repeat_kv(g, c, k, n_rep, cfg.heads, hd, f"{a}/k_rep")
    v = _repeat_kv(g, c, v, n_rep, cfg.heads, hd, f"{a}/v_rep")
    kt = g.op("Transpose", [k], f"{a}/k_t", perm=[0, 1, 3, 2])
    scores = g.op("Cast", [g.op("MatMul", [q, kt], f"{a}/qk")], f"{a}/qk_f32", to=F32)
    scores = g.op("Mul", [scores, c(f"scale_{hd}", hd ** -0.5, np.float32)], f"{a}/scaled")
    scores = g.op("Where", [ctx["mask"], c("neg_max", np.finfo(np.float32).min, np.float32), scores], f"{a}/masked")
    probs = g.op("Cast", [g.op("Softmax", [scores], f"{a}/softmax", axis=-1)], f"{a}/probs_f16", to=F16)
    out = g.op("MatMul", [probs, v], f"{a}/pv")
    out = g.op("Transpose", [out], f"{a}/to_bshd", perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, c(f"shape_0_0_{cfg.heads * hd}", [0, 0, cfg.heads * hd], np.int64)], f"{a}/merge")
    return _linear(g, out, attn.o_proj, f"{a}.o_proj", fused)


def _mlp(g: GraphBuilder, x: str, mlp: nn.Module, p: str, fused: bool) -> str:
    gate = _linear(g, x, mlp.gate_proj, f"{p}.gate_proj", fused)
    up = _linear(g, x, mlp.up_proj, f"{p}.up_proj", fused)
    g32 = g.op("Cast", [gate], f"{p}/gate_f32", to=F32)
    act = g.op("Cast", [g.op("Mul", [g32, g.op("Sigmoid", [g32], f"{p}/sigmoid")], f"{p}/silu")],
               f"{p}/silu_f16", to=F16)
    return _linear(g, g.op("Mul", [act, up], f"{p}/gate_up"), mlp.down_proj, f"{p}.down_proj", fused)
