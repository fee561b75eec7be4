"""What a compiled step costs per chip, counted from the program itself: train-state bytes from the shardings,
matmul FLOPs from the jaxpr (scan bodies times their length), and the collectives in the compiled HLO (ops,
executions per step, bytes moved). The dry run (dryrun.py) reports them for a TPU topology; they work on any
traced / compiled step.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import jax
from flax import nnx


# --------------------------------------------------------------------------------------------- bytes


def _shard_bytes(sds) -> int:
    shape = sds.sharding.shard_shape(sds.shape) if sds.sharding is not None else sds.shape
    return int(math.prod(shape)) * sds.dtype.itemsize  # dtype.itemsize also covers PRNG key arrays


def _global_bytes(sds) -> int:
    return int(math.prod(sds.shape)) * sds.dtype.itemsize


def state_bytes(abstract_state) -> dict:
    """Per-chip and total bytes of the train state, from each leaf's sharding: parameters (and, of those,
    the routed experts'), other model variables, and optimizer state."""
    out = dict(params_per_chip=0, params_total=0, expert_params_per_chip=0, expert_params_total=0,
               other_model_state_per_chip=0, optimizer_per_chip=0, optimizer_total=0)
    is_var = lambda v: isinstance(v, nnx.Variable)
    for part, key in ((abstract_state[0], "model"), (abstract_state[1], "optimizer")):
        for variable in jax.tree.leaves(part, is_leaf=is_var):
            sds = variable.get_value() if is_var(variable) else variable
            per_chip, total = _shard_bytes(sds), _global_bytes(sds)
            if key == "optimizer":
                out["optimizer_per_chip"] += per_chip
                out["optimizer_total"] += total
            elif isinstance(variable, nnx.Param):
                out["params_per_chip"] += per_chip
                out["params_total"] += total
                if "expert" in tuple(variable.get_metadata().get("out_sharding") or ()):
                    out["expert_params_per_chip"] += per_chip
                    out["expert_params_total"] += total
            else:
                out["other_model_state_per_chip"] += per_chip
    return out


# --------------------------------------------------------------------------------------------- FLOPs


def matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general / ragged_dot in a (closed) jaxpr, global shapes.

    Scan bodies count `length` times, shard_map bodies once per shard, `cond` its costliest branch, a
    `while` body once (its trip count is not static). Everything else that holds a jaxpr (pjit, remat,
    custom_vjp, ...) is entered once.
    """
    return sum(flops for flops, _ in _matmul_terms(jaxpr, ""))


# The jax.named_scope names the MoE layer runs its parts under (moe.py, dispatch.py); transposes keep them.
MOE_SCOPES = ("moe_router", "moe_dispatch", "moe_experts", "moe_combine")


def matmul_flops_by_scope(jaxpr, scopes=MOE_SCOPES) -> dict:
    """`matmul_flops` split by the first of `scopes` in each matmul's name stack (forward and backward alike);
    the rest under "other"."""
    out = dict.fromkeys((*scopes, "other"), 0.0)
    for flops, stack in _matmul_terms(jaxpr, ""):
        out[next((scope for scope in scopes if scope in stack), "other")] += flops
    return out


def _matmul_terms(jaxpr, prefix):
    """(FLOPs, name stack) of each matmul, times how often it runs (see `matmul_flops`)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        stack = f"{prefix}/{eqn.source_info.name_stack}"
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            yield 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract), stack
        elif name == "ragged_dot":  # [m, k] x [g, k, n]: each row meets one group
            m, k = eqn.invars[0].aval.shape[-2:]
            yield 2.0 * m * k * eqn.invars[1].aval.shape[-1], stack
        elif name == "scan":
            yield from _scaled(eqn.params["length"], _matmul_terms(eqn.params["jaxpr"], stack))
        elif name == "cond":
            branches = [list(_matmul_terms(b, stack)) for b in eqn.params["branches"]]
            yield from max(branches, key=lambda terms: sum(f for f, _ in terms))
        elif name == "shard_map":
            shards = math.prod(eqn.params["mesh"].shape[a] for a in eqn.params["newly_manual_axes"])
            yield from _scaled(shards, _matmul_terms(eqn.params["jaxpr"], stack))
        else:
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                        yield from _matmul_terms(sub, stack)


def _scaled(times, terms):
    for flops, stack in terms:
        yield times * flops, stack


# --------------------------------------------------------------------------------------------- HLO


COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s([a-z][a-z0-9\-]*)\((.*)$")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_CALLEE_RE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                        r"(\{[^}]*\}|%[^\s,)]+)")


def _array_sizes(type_text: str) -> list[float]:
    sizes = []
    for dtype, dims in _ARRAY_RE.findall(type_text):
        itemsize = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if itemsize is not None:
            sizes.append(itemsize * math.prod(int(d) for d in dims.split(",") if d))
    return sizes


def _parse_hlo(text: str):
    """{computation: [(name, type, op, rest)]}, the entry computation's name."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            header = _HEADER_RE.match(line)
            if header:
                current = header.group(2)
                computations[current] = []
                if header.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        instr = _INSTR_RE.match(line)
        if instr:
            computations[current].append(instr.groups())
    return computations, entry


def _trip_count(rest: str, condition: list) -> Optional[int]:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    if known:
        return int(known.group(1))
    constants = [int(m.group(1)) for _, type_, op, args in condition if op == "constant"
                 for m in [re.match(r"(-?\d+)\)", args)] if m and re.match(r"[su](32|64)\[\]", type_)]
    compares_lt = any(op == "compare" and "direction=LT" in args for _, _, op, args in condition)
    return constants[0] if compares_lt and len(constants) == 1 else None


def hlo_collectives(text: str) -> dict:
    """Collectives of a compiled (per-chip) HLO module.

    For each kind: `ops` (instructions in the HLO), `per_step` (executions per step: an op inside the layer
    loop counts once per iteration) and `bytes_per_step` per chip: the buffer each one moves, i.e. all-gather's
    gathered output, reduce-scatter's full input, all-reduce's, all-to-all's and collective-permute's operand.
    Async pairs count once (the -start op). A while loop whose trip count cannot be read counts once and is
    listed in `unknown_trip_counts`.
    """
    computations, entry = _parse_hlo(text)
    callers: dict[str, list[tuple[str, float]]] = {}
    unknown = []
    for comp, instrs in computations.items():
        for name, _, op, rest in instrs:
            edges = {kind: [c.strip().lstrip("%") for c in value.strip("{}").split(",") if c.strip()]
                     for kind, value in _CALLEE_RE.findall(rest)}
            trips = 1.0
            if op == "while" and edges.get("condition"):
                count = _trip_count(rest, computations.get(edges["condition"][0], []))
                if count is None:
                    unknown.append(name)
                trips = float(count or 1)
            for kind, callees in edges.items():
                for callee in callees:
                    callers.setdefault(callee, []).append((comp, trips if kind == "body" else 1.0))

    memo: dict[str, float] = {}

    def executions(comp: str) -> float:
        if comp == entry:
            return 1.0
        if comp not in memo:
            memo[comp] = 0.0  # guards against cycles (none in valid HLO)
            memo[comp] = sum(executions(caller) * mult for caller, mult in callers.get(comp, ()))
        return memo[comp]

    result = {kind: dict(ops=0, per_step=0.0, bytes_per_step=0.0) for kind in COLLECTIVES}
    largest = []
    for comp, instrs in computations.items():
        symbols = {name: type_ for name, type_, _, _ in instrs}
        for name, type_, op, rest in instrs:
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in COLLECTIVES:
                continue
            if base == "reduce-scatter":
                operands = re.findall(r"%([^\s,)]+)", rest.split(")", 1)[0])
                size = sum(sum(_array_sizes(symbols.get(o, ""))) for o in operands)
            else:
                sizes = _array_sizes(type_)
                size = max(sizes, default=0.0) if op.endswith("-start") or base == "all-gather" else sum(sizes)
            runs = executions(comp)
            entry_ = result[base]
            entry_["ops"] += 1
            entry_["per_step"] += runs
            entry_["bytes_per_step"] += runs * size
            source = re.search(r'op_name="([^"]*)"', rest)
            largest.append(dict(kind=base, type=type_.split("{")[0], per_step=int(round(runs)),
                                bytes_per_step=int(round(runs * size)), op_name=source.group(1) if source else ""))
    for value in result.values():
        value["per_step"] = int(round(value["per_step"]))
        value["bytes_per_step"] = int(round(value["bytes_per_step"]))
    result["unknown_trip_counts"] = unknown
    result["largest"] = sorted(largest, key=lambda c: -c["bytes_per_step"])[:8]  # where the bytes come from
    return result
