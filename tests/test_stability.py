"""Per-batch partials (observe) and plan stability under resampled calibration data (moeprune.stability)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeprune.methods import Target, get_method
from moeprune.observe import ExpertStats, observe
from moeprune.observe.partials import INDEX, base_name, is_partial, partial_name
from moeprune.observe.stats import SCHEMA
from moeprune.stability import (
    agreement,
    bootstrap,
    bootstrap_weights,
    check_resamplable,
    jaccard,
    resample,
    sufficiency,
)

FEATS = ("routed", "direction")


def _batches(n: int = 6, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (1, 12), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def observed():
    """{dtype: stats} of a tiny qwen3_moe over 6 single-sample batches, in fp32 and bf16."""
    from moeprune.arch.tiny import tiny_model

    return {dt: observe(tiny_model("qwen3_moe", dtype=dt), _batches(), features=FEATS, progress=False)
            for dt in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_add_up_to_the_totals(observed, dtype):
    stats = observed[dtype]
    for d in stats.layers.values():
        assert d[INDEX].tolist() == list(range(6))
        partials = [n for n in d if is_partial(n) and n != INDEX]
        assert {base_name(n) for n in partials} == {n for n in d if not is_partial(n)}
        for name in partials:
            total, p = d[base_name(name)], d[name]
            assert p.shape == (6, *total.shape) and p.dtype == torch.float64
            if SCHEMA[base_name(name)][1] == "max":  # max is associative: bitwise
                assert torch.equal(p.amax(0), total), name
            else:  # the totals add token by token, the partials per batch: float64 re-association only
                torch.testing.assert_close(p.sum(0), total, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", ["frequency", "reap", "man", "easyep"])
def test_every_batch_once_reproduces_the_full_plan(observed, name):
    stats, method = observed[torch.bfloat16], get_method(name)
    target = Target(expert_sparsity=0.5)
    full = method.plan(stats, target)
    assert method.plan(resample(stats, torch.ones(6)), target).keep() == full.keep()
    res = bootstrap(stats, method, target, weights=torch.ones(1, 6))
    assert all(j == 1.0 for j in res["jaccard"].values())
    assert all(not u for u in res["unstable"].values())
    suff = sufficiency(stats, method, target, n_resamples=3)
    assert suff[-1]["batches"] == 6 and suff[-1]["mean"] == 1.0 and [s["batches"] for s in suff] == [1, 2, 3, 6]


def _hand_stats(b: int) -> ExpertStats:
    """4 experts, ``b`` batches of one token each: expert 0 always wins; expert 1 gets 10 hits in batch 0
    only, expert 2 one hit in every other batch, expert 3 nothing. At 50 % frequency keeps {0, 1} iff
    batch 0 is drawn (10 > hits of expert 2 <= b-1 = 7), else {0, 2}."""
    count = torch.zeros(b, 4, dtype=torch.float64)
    count[:, 0] = 100.0
    count[0, 1] = 10.0
    count[1:, 2] = 1.0
    d = {partial_name("count"): count, partial_name("tokens"): torch.ones(b, dtype=torch.float64),
         INDEX: torch.arange(b)}
    d |= {"count": count.sum(0), "tokens": torch.tensor(float(b), dtype=torch.float64)}
    meta = {"moe_layers": [0], "num_experts": {"0": 4}, "top_k": {"0": 1}, "num_samples": b}
    return ExpertStats(layers={0: d}, meta=meta)


def test_flip_rate_is_the_fraction_of_resamples_without_the_decisive_batch():
    stats, method, target = _hand_stats(8), get_method("frequency"), Target(expert_sparsity=0.5)
    assert method.plan(stats, target).keep() == {0: [0, 1]}
    w = bootstrap_weights(8, 200, seed=3)
    without = float((w[:, 0] == 0).double().mean())  # known from the draws themselves
    assert 0.2 < without < 0.5  # (7/8)^8 = 0.344 in expectation: a sanity check of the draws
    res = bootstrap(stats, method, target, n_resamples=200, seed=3)
    assert res["flip_rate"][0] == pytest.approx([0.0, without, without, 0.0], abs=1e-12)
    assert res["unstable"][0] == [1, 2]
    assert res["jaccard"][0] == pytest.approx(1 - without + without / 3, abs=1e-12)  # {0,1} vs {0,2}: 1/3


def test_shards_merge_in_batch_order(observed):
    from moeprune.arch.tiny import tiny_model

    model, batches = tiny_model("qwen3_moe"), _batches()
    a = observe(model, batches[:2], features=FEATS, progress=False)
    b = observe(model, batches[2:], features=FEATS, progress=False, batch_offset=2)
    merged = b.merge(a)  # the later shard first: rows still come out in batch order
    full = observed[torch.float32]
    for li, d in full.layers.items():
        for name, t in d.items():
            if is_partial(name):  # each batch's partial is computed alike in both runs: bitwise
                assert torch.equal(merged[li][name], t), name


def test_partials_survive_save_load_and_accumulator_checkpoints(observed, tmp_path):
    from moeprune.observe.accumulators import RoutedAccumulator

    stats = observed[torch.float32]
    back = ExpertStats.load(stats.save(tmp_path / "s"))
    li = stats.moe_layers[0]
    assert all(torch.equal(back[li][n], t) for n, t in stats[li].items())
    acc = RoutedAccumulator(stats.num_experts(li), partials=True)
    sd = {n: t for n, t in stats[li].items() if SCHEMA.get(base_name(n), ("",))[0] == "routed" or n == INDEX}
    again = RoutedAccumulator(stats.num_experts(li), partials=True).load_state_dict(acc.load_state_dict(sd).state_dict())
    assert all(torch.equal(again.result()[n], t) for n, t in sd.items())


def test_methods_without_partials_get_a_clear_error(observed):
    with pytest.raises(ValueError, match=r"'pathfinder' needs feature group\(s\) \['paths'\].*partials"):
        check_resamplable(observed[torch.float32], get_method("pathfinder"))
    no = ExpertStats(layers={li: {n: t for n, t in d.items() if not is_partial(n)}
                             for li, d in observed[torch.float32].layers.items()}, meta={})
    with pytest.raises(ValueError, match="re-run `moeprune observe`"):
        check_resamplable(no, get_method("frequency"))


def test_agreement_lists_consensus_and_contested():
    stats = _hand_stats(8)  # frequency keeps {0, 1}; a method scoring tokens per expert equally would differ
    res = agreement(stats, {"frequency": get_method("frequency"), "random": get_method("random", seed=1)},
                    Target(expert_sparsity=0.5))
    rand = set(get_method("random", seed=1).plan(stats, Target(expert_sparsity=0.5)).layers[0].keep)
    assert res["layers"][0]["consensus"] == sorted({0, 1} & rand)
    assert set(res["layers"][0]["contested"]) == {0, 1} ^ rand
    assert res["pairwise_jaccard"]["frequency"]["random"] == pytest.approx(jaccard([0, 1], sorted(rand)))


def test_cli_writes_json_markdown_and_plot(observed, tmp_path, capsys):
    from moeprune.cli import main
    from moeprune.report.stability import stability_section

    stats_dir = observed[torch.float32].save(tmp_path / "stats")
    out = tmp_path / "stab"
    rc = main(["stability", stats_dir, "--method", "reap", "--sparsity", "0.5", "--resamples", "4",
               "--subsamples", "2", "--compare", "frequency,man", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"stability.json", "stability.md", "sufficiency.png"}
    md = stability_section(out / "stability.json")
    assert "| layer | mean Jaccard |" in md and "kept by every method" in md
    assert (out / "sufficiency.png").stat().st_size > 10_000
    rc = main(["stability", stats_dir, "--method", "pathfinder", "--sparsity", "0.5", "--out", str(out)])
    assert rc == 2 and "needs feature group(s) ['paths']" in capsys.readouterr().err


def test_disjoint_halves_disagree_exactly_as_hand_computed():
    """8 batches in two disjoint halves of 4: exactly one half holds batch 0, so one plan is {0, 1} and the
    other {0, 2}: Jaccard 1/3 in every draw; against the full plan {0, 1} each draw scores 1 or 1/3."""
    res = sufficiency(_hand_stats(8), get_method("frequency"), Target(expert_sparsity=0.5), fractions=(0.5,),
                      n_resamples=10, seed=1)[0]
    assert res["batches"] == 4 and res["independent"] == pytest.approx(1 / 3) and res["independent_sd"] < 1e-12
    assert all(d == pytest.approx(1.0) or d == pytest.approx(1 / 3) for d in res["draws"])


def test_report_includes_the_stability_section(observed, tmp_path, capsys):
    from moeprune.cli import main
    from moeprune.report import make_report

    stats_dir = observed[torch.float32].save(tmp_path / "run" / "stats")
    rc = main(["stability", stats_dir, "--method", "reap", "--sparsity", "0.5", "--resamples", "4",
               "--subsamples", "2"])  # default out: STATS/stability-reap-0.5
    assert rc == 0, capsys.readouterr().err
    report = make_report(tmp_path / "run")[-1]
    text = Path(report).read_text(encoding="utf-8")
    assert "## Calibration stability (stability-reap-0.5)" in text and "| layer | mean Jaccard |" in text
