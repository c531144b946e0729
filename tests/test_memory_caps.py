"""Every feature group whose memory grows with the calibration set has a cap checked BEFORE the first forward
(``observe/memory.py``); the estimates equal what the statistics actually hold."""
from __future__ import annotations

import pytest
import torch

from moeprune.cli import build_parser
from moeprune.models import byte_tokenizer
from moeprune.observe.calibration import calibrate
from moeprune.observe.memory import CAPS, batch_shape
from moeprune.observe.partials import is_partial
from moeprune.recipe import CalibrationConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "t.txt"
    p.write_text("\n\n".join(f"sample {i} about experts, routers and calibration" for i in range(40)))
    return str(p)


def _cfg(data, **kw):
    return CalibrationConfig(**{"dataset": data, "num_samples": 4, "seq_len": 16, "batch_size": 2, **kw})


class _Forwards:
    """Counts forwards of the model (a pre-hook on the top module)."""

    def __init__(self, model):
        self.n = 0
        self.h = model.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


@pytest.mark.parametrize("group, features, extra", [
    ("paths", ("paths",), {}),
    ("cluster", ("cluster",), {}),
    ("partials", ("routed", "direction"), {}),
    ("transitions", ("transitions",), {"layerwise": True}),
])
def test_each_cap_fails_before_any_forward(group, features, extra, data, tiny_cache):
    opt, _ = CAPS[group]
    model = tiny_cache("qwen3_moe")
    with _Forwards(model) as fw, pytest.raises(ValueError) as err:
        calibrate(model, byte_tokenizer(), _cfg(data, **{opt: 1e-9}, **extra), features, progress=False)
    assert fw.n == 0
    msg = str(err.value)
    assert f"feature group {group!r}" in msg and f"calibration.{opt}=1e-09 GB" in msg
    assert f"--{opt.replace('_', '-')}" in msg and "before calibration starts" in msg
    with _Forwards(model) as fw:  # within the cap (the default) the run proceeds
        st = calibrate(model, byte_tokenizer(), _cfg(data, **extra), features, progress=False)
    assert fw.n > 0 and st.meta["memory_estimate"][group] > 0


def test_estimates_equal_the_bytes_the_statistics_hold(data, tiny_cache):
    model = tiny_cache("qwen3_moe")
    st = calibrate(model, byte_tokenizer(), _cfg(data), ("routed", "direction", "paths", "cluster"), progress=False)
    est = st.meta["memory_estimate"]

    def held(pred) -> int:
        return sum(t.numel() * t.element_size() for d in st.layers.values() for n, t in d.items() if pred(n))

    assert est["partials"] == held(is_partial)
    assert est["paths"] == held(lambda n: n.startswith("sample_"))
    assert est["cluster"] == held(lambda n: n == "sentence_out")
    assert "transitions" not in est  # the full-model pass pairs layers batch by batch: nothing held


def test_transitions_estimate_by_hand(data, tiny_cache):
    """The layer-wise pass holds one layer's routed ids (int32, k per valid token) until the next layer runs."""
    model = tiny_cache("qwen3_moe")
    st = calibrate(model, byte_tokenizer(), _cfg(data, layerwise=True), ("transitions",), progress=False)
    assert st.meta["memory_estimate"]["transitions"] == 4 * st.meta["num_tokens"] * 2


def test_batch_shape_counts_valid_samples_and_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    batches = [{"input_ids": torch.zeros(2, 3), "attention_mask": mask}, {"input_ids": torch.zeros(1, 4)}]
    assert batch_shape(batches) == (2, 2, 6)  # the all-padding row is no sample


def test_caps_in_recipe_and_cli():
    p = build_parser()
    a = p.parse_args(["observe", "--model", "tiny:mixtral", "--out", "x", "--cluster-max-gb", "none",
                      "--paths-max-gb", "0.5"])
    assert a.cluster_max_gb is None and a.paths_max_gb == 0.5
    assert a.partials_max_gb == CalibrationConfig().partials_max_gb
    with pytest.raises(ValueError, match=r"calibration.cluster_max_gb=0 must be a number > 0 \(GB\) or null"):
        CalibrationConfig(cluster_max_gb=0)
    with pytest.raises(SystemExit):
        p.parse_args(["observe", "--model", "tiny:mixtral", "--out", "x", "--transitions-max-gb", "-1"])


def test_cluster_float16_rows_give_cprune_the_same_plan(data, tiny_cache):
    """float16 storage = the reference's fp16 cast of the same values: C-Prune's default plan is identical,
    a quarter of the memory; precision='float64' refuses the float16 rows."""
    from moeprune.methods.cprune import CPrune
    from moeprune.methods.target import Target

    model, tok = tiny_cache("qwen3_moe"), byte_tokenizer()
    cfg = {"num_samples": 8, "batch_size": 2}
    full = calibrate(model, tok, _cfg(data, **cfg), ("cluster",), progress=False)
    half = calibrate(model, tok, _cfg(data, cluster_dtype="float16", **cfg), ("cluster",), progress=False)
    for li in full.moe_layers:  # bitwise the method's own fp16 cast of the float64 rows
        assert torch.equal(half.get(li, "sentence_out"), full.get(li, "sentence_out").half())
    assert half.meta["memory_estimate"]["cluster"] * 4 == full.meta["memory_estimate"]["cluster"]
    assert half.meta["memory_estimate"]["cluster"] == sum(d["sentence_out"].numel() * 2 for d in half.layers.values())
    target = Target(expert_sparsity=0.25, allocation="method")
    method = CPrune(batch_size=4, layer_clusters=3, global_clusters=2)
    with pytest.warns(UserWarning, match="the code's counting"):  # int() counts: 13 of 16 kept, as the code
        assert method.plan(half, target).keep() == method.plan(full, target).keep()
    with pytest.raises(ValueError, match="precision='float64' needs float64 sentence_out.*cluster_dtype"):
        CPrune(precision="float64").plan(half, target)
