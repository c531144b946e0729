"""TENP (no public code; dossier section 4 formulas): the plan equals a brute force from plain HF hooks.

importance_e = sum_{t, slot j: idx = e} w_{t,j} * ||f_e(x_t)|| * (1 - cos(x_t, f_e(x_t)))   (full-width experts:
the trapezoid count of highest importances per layer), and per narrowed expert the channels with the largest
ENP projection P_{e,k} = sum_t a_{t,k} <W_down[:, k], f_e(x_t)> / ||f_e(x_t)|| over its routed tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeprune.methods.target import Target
from moeprune.methods.tenp import TENP


def oracle(model, batches):
    """{layer: (importance [E], projection [E, I])} in float64 from the captured block inputs / routes."""
    seen: dict[str, list] = {}
    hooks = []
    layers = [(li, layer.mlp) for li, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    for li, blk in layers:
        hooks.append(
            blk.gate.register_forward_hook(
                lambda m, a, o, li=li: seen.setdefault(li, []).append(
                    (a[0].reshape(-1, a[0].shape[-1]), o[1], o[2])
                )
            )
        )
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        return {li: brute_layer(blk.experts, seen[li]) for li, blk in layers}


def brute_layer(ex, seen: list) -> tuple[torch.Tensor, torch.Tensor]:
    E, _, inter = ex.down_proj.shape
    imp, proj = torch.zeros(E, dtype=torch.float64), torch.zeros(E, inter, dtype=torch.float64)
    for x, w, idx in seen:
        x = x.double()
        for e in range(E):
            gate, up = F.linear(x, ex.gate_up_proj[e].double()).chunk(2, dim=-1)
            a = ex.act_fn(gate) * up  # [T, I]
            wd = ex.down_proj[e].double()  # [H, I]
            f = a @ wd.T  # [T, H]
            n = f.norm(dim=-1)
            for t, j in (idx == e).nonzero().tolist():
                imp[e] += w[t, j].double() * n[t] * (1 - torch.dot(x[t], f[t]) / (x[t].norm() * n[t]))
                proj[e] += a[t] * (wd.T @ f[t]) / n[t]
    return imp, proj


def test_tenp_plan_equals_brute_force():
    from moeprune.arch.tiny import tiny_model
    from moeprune.observe import observe

    model = tiny_model("qwen3_moe", num_experts=8)
    batches = list(torch.randint(3, 256, (4, 10), generator=torch.Generator().manual_seed(1)).split(2))
    want = oracle(model, batches)
    stats = observe(model, batches, features=("routed", "direction", "neurons"), progress=False)
    method = TENP(full_start=0.25, full_end=0.5)
    plan = method.plan(stats, Target(param_ratio=0.75))
    assert 0 < min(plan.meta["channels"].values()) < 32  # narrowed experts really lose channels (I = 32)
    for li, (imp, proj) in want.items():
        # fp32 model: moeprune works in float32 from the same fp32 tensors, the oracle in float64 (rtol 1e-4)
        torch.testing.assert_close(
            torch.tensor(plan.layers[li].scores, dtype=torch.float64),
            imp,
            rtol=1e-4,
            atol=1e-6 * float(imp.abs().max()),
        )
        torch.testing.assert_close(
            stats.get(li, "neuron_proj_sum").double(), proj, rtol=1e-4, atol=1e-5 * float(proj.abs().max())
        )
        n_full = plan.meta["full_width"][str(li)]
        full = set(torch.argsort(imp, descending=True)[:n_full].tolist())
        narrowed = plan.layers[li].neurons or {}
        assert set(range(8)) - set(narrowed) == full
        k = plan.meta["channels"][str(li)]
        for e, chans in narrowed.items():
            assert list(chans) == sorted(torch.argsort(proj[e], descending=True)[:k].tolist()), (li, e)
