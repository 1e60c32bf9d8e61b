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
    gate always closed, answer check included ('hp-text-closed'), the same but with an answer check
    that fires on answers that name "Harry Potter" ('hp-named'), with only its answer check,
    always firing ('hp-answer-open'), or with its probe alone deciding ('hp-probe'): the serving
    mechanics, independent of what the gates learnt."""
    from helpers import variant_pack

    d = tmp_path_factory.mktemp("variants")
    variant_pack(packs_dir / "harry-potter", d / "hp-text-open", "hp-text-open", text={"threshold": -1e6})
    closed = {"threshold": 1e6, "answer": {"threshold": 1e6, "max_tokens": 40}}
    variant_pack(packs_dir / "harry-potter", d / "hp-text-closed", "hp-text-closed", kind="encoder", text=closed)
    named = {"threshold": 1e6, "answer": {"threshold": 1e6, "max_tokens": 40, "names": ["harry potter"]}}
    variant_pack(packs_dir / "harry-potter", d / "hp-named", "hp-named", kind="encoder", text=named)
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
    from serving import launch_test_server, stop_process

    d = tmp_path_factory.mktemp("serve")
    base, proc = launch_test_server(d, packs_dir, text_variants)
    yield d, base, proc
    stop_process(proc)


@pytest.fixture(scope="session", autouse=True)
def gemma_launched(request, tmp_path_factory):
    """When a Gemma test is selected: its pack (the Harry Potter example concept) calibrated through
    the CLI, the model named as users name it (``--model gemma3-270m``, which prepares it), with
    the multilingual encoder (so that encoder is also served end to end, on HF and vLLM), launched
    at the session's start and not waited for. On one thread at the lowest priority, it runs on
    the core the rest of the suite leaves idle (vLLM's CPU engine computes on one core of 2) instead
    of taking time of its own; Gemma's tests run last (:func:`pytest_collection_modifyitems`) and
    wait for it (:func:`gemma_pack`). Yields (pack folder, process), or None."""
    if not any(item.get_closest_marker("gemma") for item in request.session.items):
        yield None
        return
    from serving import launch, stop_process

    from steering.text_gate import USE_MULTILINGUAL

    out = tmp_path_factory.mktemp("gemma-packs") / "harry-potter"
    argv = ["-m", "guardit.cli", *_calibrate_argv("gemma3-270m", "harry_potter", out, "--encoder", USE_MULTILINGUAL)]
    proc = launch(
        out.parent, argv, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}, nice=19
    )
    yield out, proc
    stop_process(proc)


@pytest.fixture(scope="session")
def gemma_pack(gemma_launched) -> Path:
    """Gemma's pack, once its calibration (:func:`gemma_launched`) has finished."""
    from serving import finished

    out, proc = gemma_launched
    done = finished(proc, out.parent, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def gemma_dir(gemma_pack) -> Path:
    """Gemma 3 270M (the second architecture), prepared from its PyPI packages by its pack's
    calibration (so never by two processes at once)."""
    from guardit.model_prep import prepare_model

    return prepare_model(model="gemma3-270m")


def _calibrate_argv(model: str, concept: str, out: Path, *flags: str) -> list[str]:
    """The CLI arguments that calibrate an example concept's pack, as users make it."""
    d = EXAMPLES / concept
    argv = ["calibrate", "--model", model, "--forget", str(d / "forget.jsonl"), "--retain", str(d / "retain.jsonl")]
    return [*argv, "--out", str(out), "--quiet", *flags]


def _calibrate(model: str, concept: str, out: Path, *flags: str) -> None:
    """An example concept's pack, through the CLI (in this process)."""
    from guardit.cli import main

    assert main(_calibrate_argv(model, concept, out, *flags)) == 0


# Test tiers follow from what a test asks for, so a new test cannot land in the wrong one:
# a test that uses the bundled model (directly or through packs) is marked 'model'; one that
# starts a vLLM engine or server (or runs the vLLM reference) is marked 'vllm' too.
MODEL_FIXTURES = {"model_dir", "hf_model", "packs_dir", "text_variants", "gemma_dir", "gemma_pack"}
VLLM_FIXTURES = {
    "engine",
    "server",
    "server_launched",
    "vanilla_tokens",
    "gemma_tp_runs",
    "small_kv_engine",
    "start_failure",
}
GEMMA_FIXTURES = {"gemma_dir", "gemma_pack"}  # (gemma_launched, autouse, does nothing without them)


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & (MODEL_FIXTURES | VLLM_FIXTURES):
            item.add_marker(pytest.mark.model)
        if names & VLLM_FIXTURES:
            item.add_marker(pytest.mark.vllm)
        if names & GEMMA_FIXTURES:
            item.add_marker(pytest.mark.gemma)
    # Gemma's tests last: its pack is calibrated in the background meanwhile (gemma_launched).
    items.sort(key=lambda item: item.get_closest_marker("gemma") is not None)  # a stable sort
