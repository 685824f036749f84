"""Layer-wise sparsity profiles (uniform, OWL, a user mapping) on a toy model whose blocks differ in shape:
exact overall accounting, OWL's ratios against a direct computation of the paper's definition, refusals."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prunetune.errors import UsageError
from prunetune.pruning import PruneConfig, prune
from prunetune.pruning.profile import meet_target, outlier_ratio, owl_block_ratios
from prunetune.pruning.selection import balanced_row_mask, row_mask

HIDDEN, FFNS, VOCAB = 24, (40, 72, 16, 104), 50  # every block has another MLP width: unequal weight counts


class ToyBlock(nn.Module):
    def __init__(self, ffn: int):
        super().__init__()
        self.attn = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.up = nn.Linear(HIDDEN, ffn, bias=False)
        self.down = nn.Linear(ffn, HIDDEN, bias=False)

    def forward(self, hidden):
        hidden = hidden + self.attn(hidden)
        return hidden + self.down(torch.relu(self.up(hidden)))


class ToyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(ToyBlock(f) for f in FFNS)
        self.config = SimpleNamespace(num_hidden_layers=len(FFNS), max_position_embeddings=64)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return hidden


def toy_model(seed: int = 0) -> ToyLM:
    torch.manual_seed(seed)
    model = ToyLM()
    with torch.no_grad():  # a few heavy input features and weights: outliers, as in LLMs
        model.embed.weight[:, :3] *= 8
        for i, block in enumerate(model.layers):
            block.up.weight[: 2 + 3 * i, : 1 + i] *= 6
    return model


IDS = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))
METHODS = [("magnitude", {}), ("wanda", {}), ("sparsegpt", {"blocksize": 16})]


def linears(model):
    return {f"layers.{i}.{n}": m for i, b in enumerate(model.layers) for n, m in b.named_children()}


def zeros_and_sizes(model):
    return {name: (int((m.weight == 0).sum()), m.weight.numel()) for name, m in linears(model).items()}


def run(method, options, ratio, profile, **extra):
    model = toy_model()
    report = prune(model, None, PruneConfig(method=method, sparsity_ratio=ratio, calibration_ids=IDS, batch_size=4,
                                            options=options, sparsity_profile=profile, **extra))
    return model, report


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("profile,ratio", [
    (None, 0.5),  # uniform, the papers' rounding: exact where ratio * width is whole
    ("owl", 0.55),
    ({0: 0.3, 2: 0.8, "up": 0.65}, 0.55),
    ({"layers.3.*": 0.9}, 0.37),
], ids=["uniform", "owl", "mapping", "glob"])
def test_overall_sparsity_is_the_target_within_one_weight_per_layer(method, options, profile, ratio):
    model, report = run(method, options, ratio, profile, owl_m=3.0)
    counts = zeros_and_sizes(model)
    zeros, total = sum(z for z, _ in counts.values()), sum(n for _, n in counts.values())
    assert 0 <= ratio * total - zeros < len(counts)  # floors: never over, under by less than one per layer
    if profile is not None:  # and every layer prunes exactly floor(its ratio * numel)
        for name, (layer_zeros, size) in counts.items():
            assert layer_zeros == int(report.profile.layer_ratios[name] * size + 1e-9)


def test_uniform_magnitude_is_exact_at_any_ratio():
    model, _ = run("magnitude", {}, 0.55, None)
    counts = zeros_and_sizes(model)
    assert 0 <= 0.55 * sum(n for _, n in counts.values()) - sum(z for z, _ in counts.values()) < len(counts)


def dense_outlier_ratios(model, m):
    """The paper's definition, computed directly: Wanda scores |W_ij| * ||X_j||_2 on the dense model's own
    activations (all calibration tokens), per block the fraction above m x the block's mean score."""
    inputs = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0]))
             for name, mod in linears(model).items()]
    with torch.no_grad():
        model(IDS)
    for hook in hooks:
        hook.remove()
    ratios = []
    for i in range(len(FFNS)):
        scores = []
        for name, mod in linears(model).items():
            if name.startswith(f"layers.{i}."):
                x = torch.cat(inputs[name]).reshape(-1, mod.in_features).double()
                scores.append(mod.weight.abs().double() * x.norm(dim=0))
        flat = torch.cat([s.flatten() for s in scores])
        ratios.append(float((flat > m * flat.mean()).double().mean()))
    return ratios


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_owl_ratios_equal_the_papers_definition_on_the_same_activations(method, options):
    m, lam, target = 3.0, 0.1, 0.6
    model, report = run(method, options, target, "owl", owl_m=m, owl_lambda=lam)
    expected_outliers = dense_outlier_ratios(toy_model(), m)
    measured = report.profile.owl["outlier_ratios"]
    sizes = {i: sum(mod.weight.numel() for mod in block.children()) for i, block in enumerate(toy_model().layers)}
    for i, expected in enumerate(expected_outliers):  # at most one score on the other side of the threshold
        assert measured[str(i)] == pytest.approx(expected, abs=1.5 / sizes[i])
    assert len(set(expected_outliers)) > 1  # the toy model has a spread to allocate
    # paper's code: min-max onto [0, 2 lambda], most outliers -> least sparsity, mean at the target ...
    low, high = min(expected_outliers), max(expected_outliers)
    spread = [(o - low) / (high - low) * 2 * lam for o in expected_outliers]
    paper = [target - (d - sum(spread) / len(spread)) for d in spread]
    # ... then one shift so that the mean weighted by each block's weight count is the target exactly
    shift = target - sum(p * sizes[i] for i, p in enumerate(paper)) / sum(sizes.values())
    for i, ratio in enumerate(paper):
        assert report.profile.block_ratios[i] == pytest.approx(ratio + shift, abs=1e-9)
        assert report.sparsity.per_block()[i] == pytest.approx(ratio + shift, abs=len(FFNS) / sizes[i])


def test_owl_allocation_rule():
    ratios = owl_block_ratios([0.01, 0.03, 0.02, 0.05], target=0.7, owl_lambda=0.08)
    assert max(ratios) - min(ratios) == pytest.approx(0.16)  # width 2 lambda
    assert sum(ratios) / 4 == pytest.approx(0.7)  # mean at the target
    assert ratios.index(min(ratios)) == 3 and ratios.index(max(ratios)) == 0  # most outliers keep most weights
    assert owl_block_ratios([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]
    scores = [torch.tensor([[1.0, 1.0, 10.0]]), torch.tensor([[1.0], [1.0], [1.0]])]  # mean 16/6: one above 2x
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 6)


def test_balanced_rows_prune_exactly_floor_of_ratio_times_numel():
    scores = torch.rand(7, 30, generator=torch.Generator().manual_seed(0))
    for ratio in (0.1, 0.33, 0.55, 0.71):
        pruned_per_row = (~balanced_row_mask(scores, ratio)).sum(1)
        assert int(pruned_per_row.sum()) == int(ratio * scores.numel() + 1e-9)
        assert int(pruned_per_row.max()) - int(pruned_per_row.min()) <= 1
    assert torch.equal(balanced_row_mask(scores, 0.5), row_mask(scores, 0.5))  # a whole count per row: Wanda's rule


def test_meet_target_weights_blocks_by_size():
    shifted = meet_target({"a": 0.4, "b": 0.8}, {"a": 100, "b": 300}, 0.5)
    assert (shifted["a"] * 100 + shifted["b"] * 300) / 400 == pytest.approx(0.5)
    assert shifted["b"] - shifted["a"] == pytest.approx(0.4)


@pytest.mark.parametrize("profile,fragment", [
    ({0: 1.0}, "1.0"),
    ({"1": -0.1}, "-0.1"),
    ({0: "half"}, "half"),
    ({7: 0.5}, "7"),
    ({"layers.*.nosuch": 0.5}, "nosuch"),
    ({0: 0.0, 1: 0.0, 2: 0.0}, "cannot meet the target"),
    ("owl_typo.json", "owl_typo.json"),
])
def test_bad_profile_refused_before_any_weight_changes(profile, fragment):
    model = toy_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UsageError) as err:
        prune(model, None, PruneConfig(method="wanda", sparsity_ratio=0.7, calibration_ids=IDS, sparsity_profile=profile))
    assert fragment in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("settings,fragment", [
    ({"sparsity_type": "2:4"}, "N:M"),
    ({"sparsity_profile": "owl", "owl_lambda": 0.5}, "owl_lambda"),
    ({"sparsity_profile": "owl", "owl_m": 0}, "owl_m"),
    ({"sparsity_profile": "owl", "sparsity_ratio": 0.95}, "lower --owl_lambda"),
])
def test_profile_settings_refused_in_the_config(settings, fragment):
    config = {"method": "wanda", "sparsity_profile": {0: 0.5}, **settings}
    with pytest.raises(UsageError) as err:
        PruneConfig(**config)
    assert fragment in str(err.value)


def test_glob_beats_block_index_and_uncovered_layers_start_at_the_target():
    _, report = run("magnitude", {}, 0.5, {0: 0.2, "layers.0.down": 0.6})
    ratios = report.profile.layer_ratios
    shift = ratios["layers.1.attn"] - 0.5
    assert ratios["layers.0.attn"] == pytest.approx(0.2 + shift) and ratios["layers.0.down"] == pytest.approx(0.6 + shift)


def test_the_config_prunes_uniformly_again_after_a_profile():
    config = PruneConfig(method="magnitude", sparsity_ratio=0.5, sparsity_profile={0: 0.1})
    prune(toy_model(), None, config)
    assert config.pruner.layer_ratios is None
    report = prune(toy_model(), None, PruneConfig(method="magnitude", sparsity_ratio=0.5))
    assert report.profile is None and report.to_dict()["sparsity_profile"] == {"kind": "uniform"}


def test_wanda_variant_follows_the_layer_ratios():
    model, report = run("wanda", {}, 0.55, {0: 0.3, 3: 0.7}, use_variant=True)
    for name, (zeros, size) in zeros_and_sizes(model).items():  # the variant meets each layer's ratio to its tolerance
        assert zeros / size == pytest.approx(report.profile.layer_ratios[name], abs=0.02)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_true_sequential_prunes_each_layer_at_its_ratio(method):
    model, report = run(method, {"blocksize": 16} if method == "sparsegpt" else {}, 0.55, "owl", owl_m=3.0,
                        true_sequential=True)
    for name, (zeros, size) in zeros_and_sizes(model).items():
        assert zeros == int(report.profile.layer_ratios[name] * size + 1e-9)
