"""Bad input through the CLI: one clear error line naming the problem, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import edit_tensors

from guardit.cli import main


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _prompts(path, n=3, word="question"):
    path.write_text("".join(json.dumps({"prompt": f"{word} {i}?"}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize(
    "content,msg",
    [
        (None, "prompt file not found"),
        ("", "holds no prompts"),
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', ":2: malformed JSON"),
        ('{"text": "no prompt field"}\n', ":1: field 'prompt'"),
        ('{"prompt": "  "}\n', ":1: field 'prompt'"),
        ('["a list"]\n', ":1: expected a JSON object"),
        ('{"prompt": "x", "answers": "not a list"}\n', ":1: field 'answers'"),
        ('{"messages": []}\n', ":1: field 'messages': a conversation needs at least one message"),
        ('{"messages": "hi"}\n', ":1: field 'messages': Input should be a valid list"),
        ('{"messages": [{"role": "bot", "content": "a"}]}\n', ":1: field 'messages.0.role'"),
        ('{"messages": [{"role": "user", "content": ""}]}\n', ":1: field 'messages.0.content'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
            ":1: field 'messages': the last message is the ask to answer: its role must be 'user'",
        ),
        (
            '{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}\n',
            ":1: prompt differs from the last message's content",
        ),
        ('{"prompt": "x", "gate": "mine"}\n', ":1: field 'gate' is written by guardit in each output row"),
    ],
)
def test_calibrate_bad_prompt_files(tmp_path, capsys, content, msg):
    forget = tmp_path / "forget.jsonl"
    if content is not None:
        forget.write_text(content)
    retain = _prompts(tmp_path / "retain.jsonl")
    rc, err = _run(
        capsys, ["calibrate", "--forget", str(forget), "--retain", str(retain), "--out", str(tmp_path / "p")]
    )
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("guardit: error:") and msg in err[0], err


def test_calibration_and_eval_refuse_conversations(tmp_path):
    """Calibration sets and evaluation suites are single prompts: a conversation among them is an
    error naming the set, the record and the field (before any model is needed)."""
    from calibration import ConceptCalibrator, read_prompts
    from guardit.evaluate import read_suite
    from steering.errors import GuarditError

    turns = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
             {"role": "user", "content": "Who is Harry Potter's best friend?"}]  # fmt: skip
    conv = tmp_path / "forget_test.jsonl"
    conv.write_text(json.dumps({"prompt": "Who wrote Hamlet?"}) + "\n" + json.dumps({"messages": turns}) + "\n")
    plain = read_prompts(_prompts(tmp_path / "retain_test.jsonl"))
    with pytest.raises(GuarditError, match=r"forget prompt 2 \(.Who is Harry.*field 'messages': forget takes single"):
        ConceptCalibrator("c").fit(None, None, read_prompts(conv), plain)
    with pytest.raises(GuarditError, match=r"forget_test prompt 2 .*field 'messages'"):
        read_suite(tmp_path)
    # A conversation of one user message is a single prompt.
    conv.write_text(json.dumps({"messages": turns[-1:]}) + "\n")
    assert [r.prompt for r in read_suite(tmp_path)["forget_test"]] == ["Who is Harry Potter's best friend?"]


def test_too_few_retain_prompts_for_alpha(tmp_path, capsys, model_dir):
    forget, retain = _prompts(tmp_path / "f.jsonl", 8), _prompts(tmp_path / "r.jsonl", 8, "retain")
    rc, err = _run(
        capsys,
        [
            "calibrate",
            "--model",
            str(model_dir),
            "--forget",
            str(forget),
            "--retain",
            str(retain),
            "--out",
            str(tmp_path / "p"),
            "--quiet",
        ],
    )
    assert rc == 2 and "retain set needs at least 19 prompts for alpha=0.05" in err[-1]


def test_calibrate_joins_prompt_files_and_refuses_a_prompt_in_both_sets(tmp_path, capsys, model_dir):
    forget = _prompts(tmp_path / "f.jsonl", 8)
    r1, r2 = tmp_path / "r1.jsonl", tmp_path / "r2.jsonl"
    r1.write_text("".join(json.dumps({"prompt": f"retain {i}?"}) + "\n" for i in range(9)))
    r2.write_text("".join(json.dumps({"prompt": f"other {i}?"}) + "\n" for i in range(9)))
    base = ["calibrate", "--model", str(model_dir), "--forget", str(forget), "--out", str(tmp_path / "p"), "--quiet"]
    rc, err = _run(capsys, [*base, "--retain", str(r1), "--retain", str(r2)])
    assert rc == 2 and "retain set needs at least 19 prompts for alpha=0.05 (conformal threshold), got 18" in err[-1]
    r2.write_text(r2.read_text() + json.dumps({"prompt": "question 3?"}) + "\n")
    rc, err = _run(capsys, [*base, "--retain", str(r1), str(r2)])
    assert rc == 2 and "1 prompt(s) in both the forget and the retain set, e.g. 'question 3?'" in err[-1]


@pytest.mark.model
def test_generate_refuses_wrong_model_and_nan_packs(tmp_path, capsys, packs_dir, model_dir):
    prompts = _prompts(tmp_path / "p.jsonl")
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(packs_dir / "harry-potter", wrong)
    meta = json.loads((wrong / "pack.json").read_text())
    meta["model"]["weights_sha256"] = "f" * 64
    meta["model"]["name"] = "some-other-model"
    (wrong / "pack.json").write_text(json.dumps(meta))
    gen = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]
    rc, err = _run(
        capsys,
        [
            "generate",
            "--model",
            str(model_dir),
            "--pack",
            str(wrong),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
    )
    assert rc == 2 and len(err) == 1 and "calibrated on model 'some-other-model'" in err[0]
    rc, err = _run(capsys, gen + ["--pack", str(wrong), "--allow-precision-change"])
    assert rc == 2 and "calibrated on model 'some-other-model'" in err[0]  # another model, even so

    # the same model in bf16: refused unless allowed knowingly; an unknown precision is named
    rc, err = _run(capsys, gen + ["--pack", str(packs_dir / "harry-potter"), "--precision", "bfloat16"])
    assert rc == 2 and len(err) == 1 and "in float32; this copy of it runs in bfloat16" in err[0]
    assert "--allow-precision-change" in err[0]
    rc, err = _run(capsys, gen + ["--precision", "int4"])
    assert rc == 2 and "precision: 'int4' is not one of float32, bfloat16, int8-dynamic" in err[0]
    rc, err = _run(
        capsys, gen + ["--pack", str(packs_dir / "harry-potter"), "--precision", "bfloat16", "--engine", "vllm"]
    )
    assert rc == 2 and "in float32; this copy of it runs in bfloat16" in err[0]  # before the engine starts
    rc, err = _run(capsys, gen + ["--precision", "int8-dynamic", "--engine", "vllm"])
    assert rc == 2 and "precision: 'int8-dynamic' is not one of float32, bfloat16 on the vLLM engine" in err[0]

    nan = tmp_path / "nan"
    shutil.copytree(packs_dir / "harry-potter", nan)
    edit_tensors(nan, lambda t: t["planes"].__setitem__((0, 0, 0), float("nan")))
    rc, err = _run(
        capsys,
        [
            "generate",
            "--model",
            str(model_dir),
            "--pack",
            str(nan),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
    )
    assert rc == 2 and len(err) == 1 and "'planes' contains NaN" in err[0]

    rc, err = _run(
        capsys,
        [
            "generate",
            "--model",
            str(tmp_path / "no-model"),
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
    )
    assert rc == 2 and "no config.json" in err[0]


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guardit.cli",
            "calibrate",
            "--forget",
            str(tmp_path / "missing.jsonl"),
            "--retain",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(tmp_path / "p"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "prompt file not found" in proc.stderr


def test_model_names_and_tensor_parallel_flags(tmp_path, capsys):
    """Fast: an unknown model name for `model prepare` is refused by argparse, naming the choices;
    tensor parallelism asked of the HF engine is refused naming the flag (before any model loads)."""
    with pytest.raises(SystemExit) as exit_:
        main(["model", "prepare", "--model", "llama-7b"])
    assert exit_.value.code == 2
    assert "argument --model: invalid choice: 'llama-7b'" in capsys.readouterr().err
    out = tmp_path / "o.jsonl"
    rc, err = _run(capsys, ["generate", "--prompts", str(_prompts(tmp_path / "p.jsonl")), "--out", str(out),
                            "--tensor-parallel-size", "2"])  # fmt: skip
    assert rc == 2 and err == [
        "guardit: error: --tensor-parallel-size: tensor parallelism is vLLM's (use --engine vllm)"
    ]
    assert not out.exists()


def test_calibrate_refuses_contradicting_or_empty_names(tmp_path, capsys):
    """`--name` and `--no-name` together are one error line before any model work; a name without a
    word is refused by the calibrator, naming the field."""
    from calibration import ConceptCalibrator
    from steering.errors import GuarditError

    f, r = _prompts(tmp_path / "f.jsonl"), _prompts(tmp_path / "r.jsonl", word="other")
    argv = ["calibrate", "--forget", str(f), "--retain", str(r), "--out", str(tmp_path / "p")]
    rc, err = _run(capsys, [*argv, "--name", "Apollo 11", "--no-name"])
    assert rc == 2 and err == ["guardit: error: --name and --no-name contradict each other: give one of them"]
    forget, retain = [f"question {i}?" for i in range(4)], [f"other {i}?" for i in range(20)]
    with pytest.raises(GuarditError, match=r"name: every name needs a word .*'\?\!'"):
        ConceptCalibrator("x", name=["Apollo 11", "?!"])._validate(forget, retain)
    ConceptCalibrator("x", name=["Apollo 11"])._validate(forget, retain)
