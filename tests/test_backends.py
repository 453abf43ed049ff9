"""Circuit backends against the emulation's exact distributions (chi-square, fixed seeds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from experiments import cli
from qcnn import QConv2d
from qcnn.backends import get_backend, inner_products, sample_positions
from qcnn.backends.circuits import grover_operator, hadamard_states, zero_probability
from qcnn.estimation import ae_outcome_probabilities
from tests.stats import ALPHA, assert_matches_distribution

CIRCUIT_BACKENDS = [("pennylane", "default.qubit"), ("pennylane", "lightning.qubit"), ("qiskit-aer", None)]
ALL_BACKENDS = [("outcome-law", None), *CIRCUIT_BACKENDS]
IDS = ["-".join(filter(None, b)) for b in ALL_BACKENDS]


def backend(name: str, simulator: str | None):
    return get_backend(name, "cpu", simulator)


def vector_pair(cosine: float, dimension: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two vectors of the given normalised inner product (and different norms)."""
    rng = np.random.default_rng(seed)
    a, other = rng.normal(size=(2, dimension))
    a /= np.linalg.norm(a)
    other -= (other @ a) * a
    other /= np.linalg.norm(other)
    return 2.5 * a, 0.7 * (cosine * a + math.sqrt(1 - cosine**2) * other)


def test_hadamard_state_probability_is_one_plus_cosine_over_two():
    a, f = vector_pair(0.3, dimension=5)
    states = hadamard_states(a[None], f[None])
    assert states.shape == (1, 16) and math.isclose(np.linalg.norm(states), 1.0)
    assert zero_probability(states)[0] == pytest.approx(0.65)


def test_grover_operator_rotates_by_two_theta():
    a, f = vector_pair(-0.4)
    state = hadamard_states(a[None], f[None])[0]
    eigenvalues = np.linalg.eigvals(grover_operator(state))
    theta = math.asin(math.sqrt(0.3))  # P = (1 − 0.4)/2
    assert np.min(np.abs(eigenvalues - np.exp(2j * theta))) < 1e-9
    assert np.min(np.abs(eigenvalues - np.exp(-2j * theta))) < 1e-9


@pytest.mark.parametrize("name,simulator", ALL_BACKENDS, ids=IDS)
def test_many_shots_converge_to_the_exact_inner_product(name, simulator):
    cosines = np.array([-0.8, -0.1, 0.35, 0.9])
    pairs = [vector_pair(c, seed=i) for i, c in enumerate(cosines)]
    a = torch.tensor(np.stack([p[0] for p in pairs]))
    f = torch.tensor(np.stack([p[1] for p in pairs]))
    shots = 20000
    generator = torch.Generator().manual_seed(1)
    estimate = inner_products(backend(name, simulator), a, f, shots=shots, generator=generator)
    bound = stats.norm.ppf(1 - ALPHA / 2) / math.sqrt(shots)  # std of 2P̂ − 1 is at most 1/√N
    assert np.abs(estimate.numpy() - cosines).max() < bound


@pytest.mark.parametrize("name,simulator", ALL_BACKENDS, ids=IDS)
def test_shot_counts_are_binomial(name, simulator):
    """N = 30 shots, repeated on 3000 copies of one pair: counts ~ Binomial(30, (1 + x)/2)."""
    cosine, shots = 0.4, 30
    a, f = vector_pair(cosine)
    states = hadamard_states(np.repeat(a[None], 3000, 0), np.repeat(f[None], 3000, 0))
    counts = backend(name, simulator).hadamard_counts(states, shots, seed=7)
    expected = stats.binom.pmf(np.arange(shots + 1), shots, (1 + cosine) / 2)
    assert_matches_distribution(np.bincount(counts, minlength=shots + 1), expected)


@pytest.mark.parametrize("name,simulator", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("cosine,m", [(0.3, 3), (-0.55, 4)])
def test_amplitude_estimation_outcomes_match_the_emulation(name, simulator, cosine, m):
    a, f = vector_pair(cosine, dimension=3)
    states = hadamard_states(a[None], f[None])
    outcomes = backend(name, simulator).ae_outcomes(states, m, shots=4000, seed=11)[0]
    probability = torch.tensor([(1 + cosine) / 2], dtype=torch.float64)
    expected = ae_outcome_probabilities(probability, m)[0]
    assert_matches_distribution(np.bincount(outcomes, minlength=2**m), expected)


def test_amplitude_estimation_of_a_batch_follows_each_states_own_law():
    """PennyLane runs a batch as one broadcast execution: every row must keep its own state."""
    cosines, m = (0.3, -0.55, 0.9), 3
    pairs = [vector_pair(cosine, dimension=3) for cosine in cosines]
    states = hadamard_states(np.stack([a for a, _ in pairs]), np.stack([f for _, f in pairs]))
    outcomes = backend("pennylane", None).ae_outcomes(states, m, shots=3000, seed=12)
    for row, cosine in zip(outcomes, cosines, strict=True):
        expected = ae_outcome_probabilities(torch.tensor([(1 + cosine) / 2], dtype=torch.float64), m)[0]
        assert_matches_distribution(np.bincount(row, minlength=2**m), expected)


@pytest.mark.parametrize("name,simulator", ALL_BACKENDS, ids=IDS)
def test_sampled_positions_follow_values(name, simulator):
    values = torch.tensor([0.0, 1.0, 3.0, 0.5, 2.0, 0.0, 4.0, 1.5, 0.25, 2.75])  # K = 10 → 4 qubits
    positions = sample_positions(backend(name, simulator), values, 6000, torch.Generator().manual_seed(3))
    assert positions.max() < len(values)
    counts = np.bincount(positions.numpy(), minlength=len(values))
    assert_matches_distribution(counts, (values / values.sum()).numpy())


@pytest.mark.parametrize("name,simulator", CIRCUIT_BACKENDS, ids=IDS[1:])
def test_layer_on_circuits_agrees_with_emulation(name, simulator):
    """Same layer, sampling off, shots estimator: circuit and emulation outputs have the same
    distribution per entry. Two-sample z-test on the mean of (Ŷ − Y)/(‖A‖‖F‖) and on its
    variance, which the Binomial model fixes to (1 − x²)/N per entry."""
    torch.manual_seed(0)
    shots = 64
    options = {"estimator": "shots", "shots": shots, "sigma": None, "cap": math.inf}
    layer = QConv2d(2, 3, 3, stride=2, padding=1, dtype=torch.float64, **options)
    with torch.no_grad():
        layer.bias.fill_(50.0)  # keeps every estimate above 0, so the ReLU hides nothing
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.nn.functional.conv2d(x, layer.weight, layer.bias, 2, 1)
    errors = {}
    for backend_name in ("torch", name):
        layer.configure(backend=backend_name)
        layer.generator = torch.Generator().manual_seed(2)
        errors[backend_name] = torch.cat([(layer(x) - exact).detach().flatten() for _ in range(8)]).numpy()
    difference = errors["torch"].mean() - errors[name].mean()
    spread = math.sqrt(errors["torch"].var() / len(errors["torch"]) + errors[name].var() / len(errors[name]))
    assert abs(difference) < stats.norm.ppf(1 - ALPHA / 2) * spread
    variance_ratio = errors[name].var() / errors["torch"].var()
    n = len(errors[name])
    low, high = stats.f.ppf([ALPHA / 2, 1 - ALPHA / 2], n - 1, n - 1)
    assert low < variance_ratio < high


def test_layer_with_circuit_backend_samples_floor_sigma_k():
    torch.manual_seed(0)
    layer = QConv2d(1, 2, 3, estimator="shots", epsilon=0.1, sigma=0.25, backend="qiskit-aer",
                    backend_device="cpu", generator=torch.Generator().manual_seed(4))  # fmt: skip
    out = layer(torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(5)))
    assert out.shape == (2, 2, 4, 4)
    kept = (out != 0).flatten(1).sum(1)
    assert (kept >= 1).all() and (kept <= 8).all()  # ⌊0.25 · 32⌋ = 8 draws with replacement


def test_circuit_backends_reject_what_they_cannot_do():
    with pytest.raises(ValueError, match="estimator"):
        QConv2d(1, 2, 3, backend="pennylane")  # gaussian is an emulation, not a circuit
    with pytest.raises(ValueError, match="norms"):
        QConv2d(1, 2, 3, backend="qiskit-aer", estimator="shots", norms="authors")
    with pytest.raises(ValueError, match="backend"):
        get_backend("cirq")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("name", ["outcome-law", "pennylane", "qiskit-aer"])
def test_explicit_gpu_without_one_is_an_error(name):
    with pytest.raises(RuntimeError, match="gpu"):
        get_backend(name, "gpu")


def test_auto_device_falls_back_with_a_notice(caplog):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: auto does not fall back")
    get_backend.cache_clear()
    with caplog.at_level("WARNING", logger="qcnn.backends"):
        assert "CPU" in get_backend("qiskit-aer", "auto").device
        assert get_backend("qiskit-aer", "auto") is get_backend("qiskit-aer", "auto")
    assert caplog.text.count("running on the CPU") == 1  # once, not at every use


def test_the_backend_table_names_every_allowed_backend():
    from qcnn.backends import CIRCUIT_BACKENDS
    from qcnn.options import BACKENDS

    # one name per thing: the layer's "torch" is its vectorised emulation, no circuit backend
    assert CIRCUIT_BACKENDS == ("outcome-law", *BACKENDS[1:]) and "torch" not in CIRCUIT_BACKENDS
    with pytest.raises(ValueError, match="only be chosen for pennylane"):
        get_backend("qiskit-aer", "cpu", "lightning.qubit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("name", ["outcome-law", "pennylane", "qiskit-aer"])
def test_gpu_backends_sample_like_the_cpu(name):
    try:
        gpu = get_backend(name, "gpu")
    except RuntimeError as error:
        pytest.skip(f"{name} has no GPU build here: {error}")
    values = torch.tensor([1.0, 0.0, 2.0, 5.0])
    positions = sample_positions(gpu, values, 4000, torch.Generator().manual_seed(0))
    counts = np.bincount(positions.cpu().numpy(), minlength=4)
    assert_matches_distribution(counts, (values / values.sum()).numpy())


def test_validate_network_runs_every_layer_on_every_backend(tmp_path, mnist_raw_dir, capsys):
    """With 10⁹ shots and no sampling, circuits and emulation estimate every inner product to
    about 10⁻⁴ of its scale: the same predictions, image for image."""
    out = tmp_path / "validate"
    cli.main(["validate", "network", "--images", "6", "--train-images", "500", "--shots", "1000000000",
              "--sigma", "none", "--backend-device", "cpu", "--out", str(out)])  # fmt: skip
    report = json.loads((out / "validate-network.json").read_text())
    rows = {row["backend"]: row for row in report["results"]}
    assert list(rows) == ["torch", "pennylane", "qiskit-aer"]
    for name in ("pennylane", "qiskit-aer"):
        assert rows[name]["disagreements"] == 0 and rows[name]["difference"] == 0
    assert rows["torch"]["inner_products"] == 6 * (5 * 22 * 22 + 10 * 16 * 16)  # both layers, every pair
    assert all(row["inner_products_per_s"] > 0 for row in rows.values())
    assert "difference to the emulation" in (out / "validate-network.md").read_text()
    assert "| qiskit-aer | AerSimulator on CPU | 6 |" in capsys.readouterr().out


def test_validate_first_layer_and_bench_print_their_tables(tmp_path, mnist_raw_dir, capsys):
    out = tmp_path / "validate"
    cli.main(["validate", "layer", "--images", "2", "--backends", "outcome-law", "qiskit-aer",
              "--backend-device", "cpu", "--out", str(out)])  # fmt: skip
    report = json.loads((out / "validate.json").read_text())
    assert [row["backend"] for row in report["results"]] == ["outcome-law", "qiskit-aer"]
    assert report["results"][1]["inner_products"] == 2 * 5 * 22 * 22 and "ks_p_value" in report["results"][1]
    cli.main(["validate", "bench", "--pairs", "8", "--backends", "pennylane", "--backend-device", "cpu"])
    cli.main(["validate", "bench", "--pairs", "4", "--ae-qubits", "2", "--backends", "pennylane",
              "--backend-device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("| pennylane | default.qubit on CPU | 9 |") == 2 and "| AE qubits |" in printed


def test_validate_network_states_an_exact_interval_even_when_no_image_differs():
    """The normal approximation gave "+0.00 ± 0.00 %" for 5 images that all agree."""
    from experiments.validate import paired_difference

    same = paired_difference(torch.ones(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool))
    upper = 1 - 0.0125 ** (1 / 5)  # two-sided Clopper–Pearson at 97.5 % (Bonferroni): 0 successes in 5
    assert same["difference"] == 0 and same["mcnemar_p"] == 1 and same["disagreements"] == 0
    assert same["difference_low"] == pytest.approx(-upper) and same["difference_high"] == pytest.approx(upper)
    better = paired_difference(torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool))
    assert better["difference"] == 1 and better["mcnemar_p"] == pytest.approx(2 * 0.5**8)
    assert better["difference_low"] < 1 and better["difference_high"] == pytest.approx(1)
