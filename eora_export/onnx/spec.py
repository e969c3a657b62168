"""The machine-readable contract of the fused ``EoraLinear`` node.

The canonical file is ``graphs/eora_linear.spec.json`` at the repository root. An
installed wheel carries a copy as package data ``eora_export/onnx/eora_linear.spec.json``
(pyproject force-includes it); :func:`spec_path` prefers that copy and falls back to the
source tree, so both layouts read the same bytes. The pattern emitter, the fusion
matcher, the CPU custom op and the plugin tests all read their attribute list and input
order from here, so they cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

SPEC_FILENAME = "eora_linear.spec.json"

# Input order of the node, all of them; input_names() drops the absent ones.
ALL_INPUTS = ("x", "w", "w_scale", "a", "a_scale", "b", "b_scale", "bias")


def spec_path() -> Path:
    """Where the spec JSON is read from: package data first, then ``<repo>/graphs/``."""
    packaged = resources.files(__package__) / SPEC_FILENAME
    if packaged.is_file():
        return Path(str(packaged))
    source = Path(__file__).resolve().parents[2] / "graphs" / SPEC_FILENAME
    if source.is_file():
        return source
    raise FileNotFoundError(
        f"{SPEC_FILENAME} found neither as package data of {__package__} nor at {source}; "
        "reinstall eora-export or run from the repository checkout"
    )


@lru_cache(maxsize=1)
def load_spec() -> dict[str, Any]:
    """The parsed spec (cached; treat it as read-only)."""
    return json.loads(spec_path().read_text())


def op_type() -> str:
    return load_spec()["op_type"]


def domain() -> str:
    return load_spec()["domain"]


def attribute_types() -> dict[str, str]:
    """``{name: "int" | "string"}`` in spec order."""
    return {a["name"]: a["type"] for a in load_spec()["attributes"]}


def attribute_names() -> list[str]:
    return list(attribute_types())


def fixed_string_attributes() -> dict[str, str]:
    """String attributes with a fixed value (plugin_version, plugin_namespace)."""
    return {a["name"]: a["value"] for a in load_spec()["attributes"] if "value" in a}


def input_names(attrs: Mapping[str, Any]) -> list[str]:
    """The names of the inputs present, in node order (the spec's input-order rule).

    x, w, w_scale if weight_bits < 16, then if rank > 0: a, a_scale if lowrank_bits < 16,
    b, b_scale if lowrank_bits < 16, then bias if has_bias.
    """
    names = ["x", "w"]
    if int(attrs["weight_bits"]) < 16:
        names.append("w_scale")
    if int(attrs["rank"]) > 0:
        quantized = int(attrs["lowrank_bits"]) < 16
        names += ["a", "a_scale"] if quantized else ["a"]
        names += ["b", "b_scale"] if quantized else ["b"]
    if int(attrs["has_bias"]):
        names.append("bias")
    return names


def input_layouts(attrs: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{input: (numpy dtype name, shape)}`` of each constant input of the fused node.

    Packed INT4 travels as int8 ``[K, N/2]``; the activation ``x`` is left out.
    """
    k, n, r = int(attrs["in_features"]), int(attrs["out_features"]), int(attrs["rank"])
    wb, lb = int(attrs["weight_bits"]), int(attrs["lowrank_bits"])
    g, lg = int(attrs["group_size"]), int(attrs["lowrank_group_size"])
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    if wb < 16:
        out["w"] = ("int8", (k, n // 2))
        out["w_scale"] = ("float16", (k // g, n))
    else:
        out["w"] = ("float16", (k, n))
    if r:
        for name, rows, cols in (("a", k, r), ("b", r, n)):
            if lb == 16:
                out[name] = ("float16", (rows, cols))
            else:
                out[name] = ("int8", (rows, cols // 2 if lb == 4 else cols))
                out[f"{name}_scale"] = ("float16", (rows // lg, cols))
    if int(attrs["has_bias"]):
        out["bias"] = ("float16", (n,))
    return out


def layer_attrs(layer: Any) -> dict[str, Any]:
    """The validated node attributes of an ``eora_export.eora_linear.EoraLinear`` (its ``weight_q``,
    ``a_q``, ``b_q`` carry bits and group sizes). Shared by the graph emitter and the plugin's
    torch-only input builder, so both describe a layer the same way."""
    wq, aq, bq = layer.weight_q, layer.a_q, layer.b_q
    if wq.bits not in (3, 4, 16):
        raise ValueError(f"weight_bits={wq.bits} has no EoraLinear layout; EoraLinear takes 3, 4 or 16")
    lowrank_bits, lg = 16, 0
    if layer.rank:
        if aq.bits != bq.bits or aq.group_size != bq.group_size:
            raise ValueError(f"factors a ({aq.bits} bit, group {aq.group_size}) and b ({bq.bits} bit, group "
                             f"{bq.group_size}) differ; quantize both with the same bits and group size")
        # 3-bit factors live in the INT4 container, like 3-bit weights.
        lowrank_bits = 4 if aq.bits == 3 else aq.bits
        lg = 0 if lowrank_bits == 16 else aq.group_size
    return validate_attrs({
        "in_features": layer.in_features, "out_features": layer.out_features, "rank": layer.rank,
        "weight_bits": wq.bits, "group_size": 0 if wq.bits == 16 else wq.group_size,
        "lowrank_bits": lowrank_bits, "lowrank_group_size": lg,
        "sparse24": int(bool(layer.sparse24)), "has_bias": int(layer.bias is not None),
    })


def validate_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Check names, types, allowed values and the spec's constraints.

    Returns a complete dict (fixed string attributes filled in). Raises a one-line
    ValueError naming the problem and the fix.
    """
    types = attribute_types()
    fixed = fixed_string_attributes()
    unknown = sorted(set(attrs) - set(types))
    if unknown:
        raise ValueError(f"unknown EoraLinear attribute(s) {unknown}; allowed: {sorted(types)}")
    out: dict[str, Any] = {}
    for spec_attr in load_spec()["attributes"]:
        name = spec_attr["name"]
        if name not in attrs:
            if name in fixed:
                out[name] = fixed[name]
                continue
            raise ValueError(f"EoraLinear attribute {name!r} is missing; set it (see {SPEC_FILENAME})")
        value = attrs[name]
        if spec_attr["type"] == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"EoraLinear attribute {name!r} must be an int, got {value!r}")
        elif isinstance(value, bytes):
            value = value.decode()
        if spec_attr["type"] == "string" and not isinstance(value, str):
            raise ValueError(f"EoraLinear attribute {name!r} must be a string, got {value!r}")
        if "values" in spec_attr and value not in spec_attr["values"]:
            raise ValueError(f"EoraLinear attribute {name}={value!r}; use one of {spec_attr['values']}")
        if "value" in spec_attr and value != spec_attr["value"]:
            raise ValueError(f"EoraLinear attribute {name}={value!r}; it must be {spec_attr['value']!r}")
        out[name] = value
    _check_constraints(out)
    return out


def _check_constraints(a: Mapping[str, Any]) -> None:
    k, n, r = a["in_features"], a["out_features"], a["rank"]
    if k <= 0 or n <= 0 or r < 0:
        raise ValueError(f"EoraLinear needs in_features, out_features > 0 and rank >= 0, got {k}, {n}, {r}")
    if n % 2:
        raise ValueError(f"out_features={n} must be even (INT4 packs two columns per byte)")
    if a["weight_bits"] < 16:
        g = a["group_size"]
        if g <= 0 or g % 2 or k % g:
            raise ValueError(f"group_size={g} must be even and divide in_features={k}")
    elif a["group_size"] != 0:
        raise ValueError(f"group_size={a['group_size']} must be 0 when weight_bits is 16")
    lg = a["lowrank_group_size"]
    if r > 0 and a["lowrank_bits"] < 16:
        if a["lowrank_bits"] == 4 and r % 2:
            raise ValueError(f"rank={r} must be even for 4-bit factors (two per byte)")
        if lg <= 0 or k % lg or r % lg:
            raise ValueError(f"lowrank_group_size={lg} must divide in_features={k} and rank={r}")
    elif lg != 0:
        raise ValueError(f"lowrank_group_size={lg} must be 0 when rank is 0 or lowrank_bits is 16")
