"""Unified family == the REAP reference formulas (CerebrasResearch/reap@1970473, ``pruning_metrics.py``
``update_pruning_state``, ``model_util.get_super_expert_indices``, ``prune.prune``).

The oracle is independent of moeprune's capture and accumulators: a forward pre-hook on every MoE block
(found by class name, as REAP's observer does) recomputes, on the block input of the same plain forward,
the raw router logits, ``selected = topk(logits, k)``, EVERY expert on EVERY token in the model dtype
(REAP's ``activations``), and REAP's statistics over valid (attention-mask) tokens: softmax over all
experts, renormalised over the selected top-k iff ``config.norm_topk_prob``, clamped at fp32 eps; per-expert
sums, routed means, signed max activation floored at 0. Sums are float64 from the fp32 copies of the
activations. MSAN and (0,2,2) extend the same loop with ||f||^2 and (g||f||)^2.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from moeprune.arch.tiny import tiny_model
from moeprune.methods.registry import METHODS
from moeprune.methods.target import Target
from moeprune.methods.unified import super_expert_mask
from moeprune.observe.runner import observe

BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock")  # REAP's observer hook regexes
# moeprune name -> REAP observer key (None: the two extra How-to-Score members, same loop)
REAP_KEYS = {"frequency": "expert_frequency", "soft_frequency": "weighted_expert_frequency_sum",
             "ean": "ean_sum", "man": "ean_mean", "reap": "reap", "gated_ean_sum": "weighted_ean_sum",
             "msan": None, "squared_gated_sum": None}
SPARSITY = 0.5  # REAP prunes int(E * ratio) experts per layer: 4 of 8
# Relative tolerance on scores. fp32: moeprune evaluates each expert on its routed rows only, the oracle on
# all tokens; different GEMM shapes round differently (~1e-6 relative per element). bf16: the same, but
# one bf16 rounding (2^-9 relative) can flip in an output element; averaged norms stay well inside 1e-2.
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def batches() -> list[dict[str, torch.Tensor]]:
    """Two batches; the first right-padded (row 0 has 5 padding tokens) so the mask matters."""
    g = torch.Generator().manual_seed(11)
    a = torch.randint(3, 250, (2, 12), generator=g)
    mask = torch.ones_like(a)
    mask[0, 7:] = 0
    b = torch.randint(3, 250, (1, 10), generator=g)
    return [{"input_ids": a, "attention_mask": mask}, {"input_ids": b, "attention_mask": torch.ones_like(b)}]


def expert_outputs(experts, x: torch.Tensor) -> torch.Tensor:
    """``[E, T, H]`` f_e(x) for every expert on every token, in the model dtype (REAP's ``activations``)."""
    outs = []
    for e in range(experts.gate_up_proj.shape[0]):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        outs.append(torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e]))
    return torch.stack(outs)


class ReapOracle:
    """REAP's per-layer pruning state from the reference formulas (float64 sums)."""

    def __init__(self, num_experts: int, renormalize: bool):
        keys = ("count", "g", "n", "n2", "gn", "gn2", "max")
        self.s = {k: torch.zeros(num_experts, dtype=torch.float64) for k in keys}
        self.renormalize = renormalize

    def update(self, logits: torch.Tensor, acts: torch.Tensor, top_k: int, valid: torch.Tensor) -> None:
        """``logits [T, E]`` raw router output, ``acts [E, T, H]``, ``valid [T]`` bool."""
        logits, acts = logits[valid], acts[:, valid].float()
        selected = torch.topk(logits, top_k, dim=-1).indices  # [T, k] REAP: topk of the raw logits
        w = torch.softmax(logits, dim=1, dtype=torch.float)  # [T, E] over ALL experts
        if self.renormalize:
            w = (w / torch.gather(w, 1, selected).sum(-1, keepdim=True)).clamp_min(torch.finfo(w.dtype).eps)
        for i in range(acts.shape[0]):
            active = (selected == i).any(-1)
            if not active.any():
                continue
            n, g = acts[i, active].norm(dim=-1).double(), w[active, i].double()  # [T_i]
            for key, v in (("count", torch.ones_like(n)), ("g", g), ("n", n), ("n2", n * n), ("gn", g * n),
                           ("gn2", (g * n) ** 2)):
                self.s[key][i] += v.sum()
            self.s["max"][i] = max(self.s["max"][i], float(acts[i, active].max()))  # floored at 0 by init

    def scores(self) -> dict[str, torch.Tensor]:
        s, cnt = self.s, self.s["count"].clamp_min(1)
        return {"frequency": s["count"], "soft_frequency": s["g"], "ean": s["n"], "man": s["n"] / cnt,
                "reap": s["gn"] / cnt, "gated_ean_sum": s["gn"], "msan": s["n2"] / cnt,
                "squared_gated_sum": s["gn2"], "max_activations": s["max"]}


@contextlib.contextmanager
def reference_hooks(model, valid: dict[str, torch.Tensor]):
    """Oracle hooks on every MoE block; yields ``{layer: ReapOracle}`` filled by whatever forward runs."""
    renorm = bool(getattr(model.config, "norm_topk_prob", False))  # REAP main._setup_observer
    state, hooks = {}, []
    for li, layer in enumerate(model.model.layers):
        block = layer.mlp
        if type(block).__name__ not in BLOCKS:
            continue
        state[li] = ReapOracle(block.experts.gate_up_proj.shape[0], renorm)

        def pre(mod, args, li=li):
            x = args[0].reshape(-1, args[0].shape[-1])  # [T, H]
            logits = torch.nn.functional.linear(x, mod.gate.weight)  # the block's raw router output
            state[li].update(logits, expert_outputs(mod.experts, x), mod.gate.top_k, valid["mask"])

        hooks.append(block.register_forward_pre_hook(pre))
    try:
        yield state
    finally:
        for h in hooks:
            h.remove()


class _Masked:
    """The batches, telling the oracle each batch's attention mask as the forward consumes it."""

    def __init__(self, data, valid):
        self.data, self.valid = data, valid

    def __iter__(self):
        for b in self.data:
            self.valid["mask"] = b["attention_mask"].reshape(-1).bool()
            yield b


def observe_with_reference(model, forward: str):
    """``(stats, {layer: {name: [E]}})``. ``forward='plain'``: the oracle hooks a separate plain forward;
    ``'observe'``: it hooks observe's own forward (the same bf16 forward moeprune measured)."""
    valid: dict[str, torch.Tensor] = {}
    with reference_hooks(model, valid) as state:
        if forward == "plain":
            with torch.no_grad():
                for b in _Masked(batches(), valid):
                    model(**b)
        else:
            stats = observe(model, _Masked(batches(), valid), progress=False)
    if forward == "plain":
        stats = observe(model, batches(), progress=False)
    assert all(float(st.s["count"].sum()) == stats.meta["num_tokens"] * 2 for st in state.values())  # top-2
    return stats, {li: st.scores() for li, st in state.items()}


def kept(scores: torch.Tensor, n_prune: int) -> list[int]:
    """REAP ``prune``: drop ``topk(saliency, n, largest=False)``, keep the rest (sorted ids)."""
    drop = set(torch.topk(scores, n_prune, largest=False).indices.tolist())
    return [i for i in range(scores.numel()) if i not in drop]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.fixture(scope="module")
def observed():
    """``(arch, dtype) -> (stats, reference)``, built once. fp32: the oracle runs on its own plain forward;
    bf16: on observe's forward (observe's expert kernels may round the routed sum differently from the
    model's eager loop, and in bf16 that moves later layers' inputs by ~1e-3; parity is about statistics
    of one forward)."""
    cache = {}

    def get(arch: str, dtype: torch.dtype):
        if (arch, dtype) not in cache:
            forward = "plain" if dtype == torch.float32 else "observe"
            cache[(arch, dtype)] = observe_with_reference(tiny_model(arch, dtype=dtype), forward)
        return cache[(arch, dtype)]

    return get


CASES = [(a, d) for a in ("mixtral", "qwen3_moe") for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize(("arch", "dtype"), CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name", sorted(REAP_KEYS))
def test_scores_and_kept_sets_equal_reference(observed, arch, dtype, name):
    stats, ref = observed(arch, dtype)
    assert stats.meta["norm_topk_prob"] == (arch == "qwen3_moe")  # Mixtral's config has no such field
    assert stats.moe_layers == sorted(ref)
    got = METHODS[name]().score(stats)
    keep = METHODS[name]().plan(stats, Target(expert_sparsity=SPARSITY)).keep()
    for li in stats.moe_layers:
        want = ref[li][name]
        torch.testing.assert_close(got[li], want, rtol=RTOL[dtype], atol=1e-9, msg=f"{arch} L{li} {name}")
        n_prune = int(want.numel() * SPARSITY)
        lo, hi = torch.sort(want).values[n_prune - 1 : n_prune + 1]
        if lo == hi:  # an exact tie at the cut (integer counts): any tie order is REAP-valid
            dropped = [i for i in range(want.numel()) if i not in keep[li]]
            assert len(keep[li]) == want.numel() - n_prune and want[keep[li]].min() >= want[dropped].max()
            continue
        # premise: the cut's gap exceeds the measured score error, so the kept sets must be equal
        assert hi - lo > 2 * float((got[li] - want).abs().max()), f"{arch} L{li} {name}: near-tie at the cut"
        assert keep[li] == kept(want, n_prune), f"{arch} L{li} {name}"


@pytest.mark.parametrize(("arch", "dtype"), CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_super_expert_guard_equals_reference(observed, arch, dtype):
    """REAP's max_activations (signed, floored at 0) and its threshold rule pick the same experts."""
    stats, ref = observed(arch, dtype)
    layers = stats.moe_layers
    for li in layers:
        torch.testing.assert_close(stats.get(li, "max_act_signed"), ref[li]["max_activations"],
                                   rtol=RTOL[dtype], atol=1e-9)
    allv = torch.cat([ref[li]["max_activations"] for li in layers])
    n_guard = int(len(layers) * 0.75)
    guarded = 0
    for q in (0.995, 0.5):  # REAP's 99.5th percentile; the median as well, so the guard surely fires
        tau = max(float(torch.quantile(allv, q)), float(allv.max()) / 10)
        want = {li: (ref[li]["max_activations"] > tau) & (i < n_guard) for i, li in enumerate(layers)}
        got = super_expert_mask(stats, quantile=q)
        assert {li: m.tolist() for li, m in got.items()} == {li: m.tolist() for li, m in want.items()}
        guarded += sum(int(m.sum()) for m in got.values())
    assert guarded >= 1  # the comparison is not vacuous


def test_applied_gate_differs_from_reference_on_mixtral(observed):
    """Why the default matters: Mixtral applies renormalised top-k gates, REAP's reference the plain
    softmax (no norm_topk_prob field); gate='applied' is the named option for the model's own gate."""
    stats, ref = observed("mixtral", torch.float32)
    for li in stats.moe_layers:
        applied = METHODS["reap"](gate="applied").score(stats)[li]
        assert rel_diff(applied, ref[li]["reap"]) > 0.05
        manual = stats.get(li, "gate_norm_sum") / stats.get(li, "count").clamp_min(1)
        torch.testing.assert_close(applied, manual, rtol=0, atol=0)


def _report() -> None:
    """``PYTHONPATH=src python3 tests/test_parity_unified.py``: the numbers of docs/PARITY.md."""
    cases = [(torch.float32, "plain"), (torch.bfloat16, "observe"), (torch.bfloat16, "plain")]
    for arch, (dtype, forward) in [(a, c) for a in ("mixtral", "qwen3_moe") for c in cases]:
        stats, ref = observe_with_reference(tiny_model(arch, dtype=dtype), forward)
        for label, gate in (("reference", "reference"), ("applied", "applied")):
            worst, same = 0.0, 0
            for name in REAP_KEYS:
                m = METHODS[name](gate=gate)
                got, keep = m.score(stats), m.plan(stats, Target(expert_sparsity=SPARSITY)).keep()
                for li in stats.moe_layers:
                    worst = max(worst, rel_diff(got[li], ref[li][name]))
                    same += keep[li] == kept(ref[li][name], int(ref[li][name].numel() * SPARSITY))
            total = len(REAP_KEYS) * len(stats.moe_layers)
            print(f"{arch:9s} {str(dtype)[6:]:8s} {forward:7s} gate={label:9s} max rel diff {worst:.1e}  "
                  f"kept sets equal {same}/{total} (member x layer)")
        mx = max(rel_diff(stats.get(li, "max_act_signed"), ref[li]["max_activations"]) for li in stats.moe_layers)
        print(f"{'':36s} max_act_signed max rel diff {mx:.1e}")


if __name__ == "__main__":
    _report()
