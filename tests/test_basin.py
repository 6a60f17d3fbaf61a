"""AsFT's narrow-basin measurement (harness.analysis.basin, python -m harness.basin): the
perturbations' math on a 4 x 3 weight with a rank-1 V worked by hand, and the runner end to end
on the tiny world, its deltas checked against V formed from the alignment adapter's factors."""
import json

import pytest
import torch

from harness.analysis.basin import along_share, basin_delta, project
from harness.basin import alignment_bases, compose_run, draw_deltas, main, parse_args
from harness.defenses.math import column_basis, factored_column_basis
from harness.models.loading import adapter_factors
from harness.pipeline import Pipeline
from harness.stages import ModelRef
from tests.helpers import TINY

U = torch.tensor([1.0, 2.0, 0.0, 0.0])  # V's one column direction
V = torch.outer(U, torch.tensor([1.0, 2.0, 0.0]))  # [[1,2,0],[2,4,0],[0,0,0],[0,0,0]], rank 1
G = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
W = torch.tensor([[3.0, 0, 0], [4, 0, 0], [0, 0, 0], [0, 0, 0]])  # ||W||_F = 5


def test_project_splits_g_into_its_part_in_span_v_and_the_rest():
    """P_V = u u^T / 5 with u = (1, 2, 0, 0): u^T G = (1, 2, 0), so P_V G = u (1, 2, 0) / 5."""
    Q = column_basis(V)
    assert Q.shape == (4, 1)
    along = torch.tensor([[0.2, 0.4, 0], [0.4, 0.8, 0], [0, 0, 0], [0, 0, 0]])
    orthogonal = torch.tensor([[0.8, -0.4, 0], [-0.4, 0.2, 0], [0, 0, 1], [1, 1, 1]])
    assert torch.allclose(project(G, Q, "along"), along, atol=1e-6)
    assert torch.allclose(project(G, Q, "orthogonal"), orthogonal, atol=1e-6)
    # V from a LoRA alignment's factors (B = u, A = (1, 2, 0)): the same projector
    Q_factored = factored_column_basis(U[:, None], torch.tensor([[1.0, 2.0, 0.0]]))
    assert torch.allclose(project(G, Q_factored, "along"), along, atol=1e-6)
    # ||P_V G||^2 = 0.04 + 0.16 + 0.16 + 0.64 = 1 of ||G||^2 = 6
    assert along_share(G, Q) == pytest.approx(1 / 6)
    assert along_share(torch.zeros(4, 3), Q) == 0.0
    with pytest.raises(ValueError, match="direction: got 'sideways'"):
        project(G, Q, "sideways")


def test_along_delta_lies_in_span_v_with_norm_eps_times_w():
    Q = column_basis(V)
    delta = basin_delta(W, Q, "along", 0.1, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_norm(delta).item() == pytest.approx(0.5, rel=1e-6)  # 0.1 * 5
    assert torch.allclose(project(delta, Q, "along"), delta, atol=1e-7)  # P_V delta = delta
    # every column a multiple of u: row 2 twice row 1, rows 3 and 4 zero
    assert torch.allclose(delta[1], 2 * delta[0], atol=1e-7)
    assert torch.equal(delta[2:], torch.zeros(2, 3))
    assert along_share(delta, Q) == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_delta_has_v_transpose_delta_zero_and_norm_eps_times_w():
    Q = column_basis(V)
    delta = basin_delta(W, Q, "orthogonal", 0.2, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_norm(delta).item() == pytest.approx(1.0, rel=1e-6)  # 0.2 * 5
    assert torch.allclose(V.T @ delta, torch.zeros(3, 3), atol=1e-6)
    assert torch.allclose(delta[0] + 2 * delta[1], torch.zeros(3), atol=1e-6)  # u^T delta = 0
    assert along_share(delta, Q) == pytest.approx(0.0, abs=1e-6)


def test_a_seed_fixes_the_delta_and_eps_zero_leaves_w_unchanged():
    Q = column_basis(V)
    one, two, other = (basin_delta(W, Q, "along", 0.1, torch.Generator().manual_seed(s))
                       for s in (7, 7, 8))
    assert torch.equal(one, two)
    assert not torch.allclose(one, other)
    zero = basin_delta(W, Q, "orthogonal", 0.0, torch.Generator().manual_seed(7))
    assert torch.equal(W + zero, W)
    # one seeded generator per eps: the same Gaussian, scaled (the runner's common draws)
    big = basin_delta(W, Q, "along", 0.3, torch.Generator().manual_seed(7))
    assert torch.allclose(big, 3 * one, atol=1e-6)


def test_a_direction_that_does_not_exist_is_refused():
    full = column_basis(torch.eye(3))  # V spans all of R^3: nothing is orthogonal to it
    with pytest.raises(ValueError, match="no orthogonal direction: .* dimension 3 of 3"):
        basin_delta(torch.eye(3), full, "orthogonal", 0.1, torch.Generator().manual_seed(0))
    none = column_basis(torch.zeros(4, 3))  # V = 0: nothing lies along it
    with pytest.raises(ValueError, match="no along direction"):
        basin_delta(W, none, "along", 0.1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="eps: .* >= 0"):
        basin_delta(W, column_basis(V), "along", -0.1)


def test_the_command_line_checks_its_grid():
    args = parse_args(["--out", "x", "--eps", "0,0.5", "--directions", "orthogonal",
                       "seed=1"])
    assert args.eps == (0.0, 0.5) and args.directions == ("orthogonal",)
    assert args.overrides == ["seed=1"] and args.draws == 3
    for bad in (["--directions", "sideways"], ["--draws", "0"], ["--eps", "0,-1"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", *bad])


# ================================================================ the runner, end to end
LORA_ALIGN = "train.align.lora=${train.finetune.lora}"
EPS = (0.0, 0.05, 0.5)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("basin_artifacts")


@pytest.fixture(scope="module")
def measured(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("basin")
    overrides = [*TINY, f"paths.artifacts={store}", LORA_ALIGN]
    results = main(["--out", str(out), "--eps", ",".join(map(str, EPS)), "--draws", "2",
                    *overrides])
    return results, out, overrides


@pytest.mark.slow
def test_the_runner_writes_every_row_and_eps_zero_is_the_aligned_model(measured):
    results, out, _ = measured
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "basin.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r["direction"], r["draw"], r["eps"]) for r in results["rows"]] == [
        (d, k, e) for d in ("along", "orthogonal") for k in (0, 1) for e in EPS]
    assert [p["eps"] for p in results["paired"]] == list(EPS)
    assert [(c["direction"], c["eps"]) for c in results["summary"]] == [
        (d, e) for d in ("along", "orthogonal") for e in EPS]
    assert results["v_source"] == "align_adapter"
    assert len(results["weights"]) == 4 * 7  # tiny_llama: 4 blocks x 7 linear layers
    assert {w["v_rank"] for w in results["weights"].values()} == {8}  # the alignment's r
    assert results["eval"]["n_harmful"] == 16 and results["eval"]["n_task"] == 8
    assert results["git"] and results["precision"] == "32-true" and results["cpu"]
    keys = ("hs", "hs_interval", "fa", "fa_interval", "refusal_rate", "refusal_rate_interval",
            "other_rate", "other_rate_interval")
    # the runner's own evaluation path agrees with the evaluation stage on the same model
    assert {k: results["unperturbed"][k] for k in keys} == {
        k: results["aligned"][k] for k in keys}
    for row in results["rows"]:
        assert row["hs_interval"] is not None and row["fa_interval"] is not None
        if row["eps"] == 0:
            assert {k: row[k] for k in keys} == {k: results["aligned"][k] for k in keys}
            assert row["answers_changed"] == {"harmful": 0, "task": 0}
            assert row["norm_error"] == 0.0
        else:  # as applied to the model: the norm eps * ||W||_F, and inside or outside col(V)
            assert row["norm_error"] < 1e-5
            lo, hi = row["along_share"]
            if row["direction"] == "along":
                assert lo > 1 - 1e-5  # Q is float32
            else:
                assert hi < 1e-9


@pytest.mark.slow
def test_the_runners_deltas_lie_along_or_orthogonal_to_v_from_the_adapter(measured, tmp_path):
    """V formed densely (float64) from the align stage's saved LoRA factors, independently of
    the bases the runner builds: along, (I - V V^+) delta = 0; orthogonal, V^T delta = 0."""
    results, _, overrides = measured
    pipe = Pipeline(compose_run(overrides), tmp_path)
    refs = {stage: ModelRef(stage, results["artifacts"][stage]["key"])
            for stage in ("base", "align")}
    model = pipe.models.eval_model(refs["align"])
    source, bases = alignment_bases(pipe, refs, model)
    assert source == "align_adapter"
    factors = adapter_factors(pipe.models.align_adapter(refs["align"], refs["base"]))
    weights = {n: model.get_submodule(n).weight.detach() for n in bases}
    for direction in ("along", "orthogonal"):
        deltas = draw_deltas(weights, bases, direction, 0.05, 0, 1)
        for name, delta in deltas.items():
            V_full = (factors[name][0] @ factors[name][1]).double()
            d = delta.double()
            assert torch.linalg.matrix_norm(d).item() == pytest.approx(
                0.05 * torch.linalg.matrix_norm(weights[name].double()).item(), rel=1e-6)
            if direction == "along":
                inside = V_full @ (torch.linalg.pinv(V_full) @ d)
                assert torch.linalg.matrix_norm(d - inside) < 1e-5 * torch.linalg.matrix_norm(d)
            else:
                assert torch.linalg.matrix_norm(V_full.T @ d) < 1e-5 * (
                    torch.linalg.matrix_norm(V_full) * torch.linalg.matrix_norm(d))
    first, again = (draw_deltas(weights, bases, "along", 0.05, 0, 1) for _ in range(2))
    assert all(torch.equal(first[n], again[n]) for n in first)


@pytest.mark.slow
def test_a_full_weight_alignment_has_no_orthogonal_direction_and_no_alignment_no_v(
        store, tmp_path):
    """The default toy protocol aligns every weight by full SFT: V from the float32 weights
    spans the whole output space of the square layers. And defense=none has no V at all."""
    common = [*TINY, f"paths.artifacts={store}"]
    with pytest.raises(ValueError, match="no direction is orthogonal to it.*train.align.lora"):
        main(["--out", str(tmp_path / "full"), "--directions", "orthogonal", *common])
    with pytest.raises(ValueError, match="no align stage"):
        main(["--out", str(tmp_path / "none"), "defense=none", *common])


def test_the_summary_averages_draws_and_pools_their_prompts():
    """Two draws of 10 prompts with HS 10% and 30%: mean 20, range [10, 30], Student-t
    half-width 127.06 (the standard error, sd 14.14 over sqrt 2 = 10, times t_0.975 with one
    degree of freedom, 12.706), and 4 of 20 pooled with its Wilson interval."""
    from harness.basin import summarise
    from harness.stats import prompt_interval

    def row(draw, hs):
        return {"direction": "along", "eps": 0.1, "draw": draw, "hs": hs, "refusal_rate": 0.0,
                "other_rate": 100.0 - hs, "fa": 50.0, "n_harmful": 10, "n_task": 4}

    (cell,) = summarise([row(0, 10.0), row(1, 30.0)])
    assert cell["hs"] == 20.0 and cell["hs_range"] == [10.0, 30.0]
    assert cell["hs_draw_halfwidth"] == pytest.approx(127.062, abs=1e-3)
    assert cell["hs_pooled_interval"] == list(prompt_interval(4, 20))
    assert cell["fa"] == 50.0 and cell["fa_draw_halfwidth"] == 0.0
    assert cell["fa_pooled_interval"] == list(prompt_interval(4, 8))


def test_paired_differences_compare_the_two_splits_of_each_draw():
    """Draws 0-2 at eps 0.5: along 20, 10, 5 against orthogonal 5, 10, 0 give differences 15,
    0, 5: mean 20/3, along higher in 2 draws, orthogonal in none."""
    from harness.basin import paired_differences

    rows = [{"direction": d, "eps": 0.5, "draw": k, "hs": hs}
            for d, values in (("along", (20.0, 10.0, 5.0)), ("orthogonal", (5.0, 10.0, 0.0)))
            for k, hs in enumerate(values)]
    rows.append({"direction": "along", "eps": 1.0, "draw": 0, "hs": 50.0})  # no partner
    (cell,) = paired_differences(rows)
    assert cell["eps"] == 0.5 and cell["hs_differences"] == [15.0, 0.0, 5.0]
    assert cell["hs_difference"] == pytest.approx(20 / 3)
    assert (cell["along_higher"], cell["orthogonal_higher"]) == (2, 0)
