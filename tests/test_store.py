"""The policy store behind live policy changes: versions installed atomically, an id keeps its pack;
and the variables that name it, which every engine worker must see."""

import json
import os
import subprocess
import sys

import pytest
from helpers import toy_pack

from integrations.vllm.store import PolicyStore
from steering.errors import PolicyError
from steering.policy import PolicyConfig


def _config(tmp_path, packs: dict, tenants: dict) -> PolicyConfig:
    return PolicyConfig.parse(json.dumps({"packs": packs, "tenants": tenants}), tmp_path, "test")


def test_versions_are_installed_whole_and_an_id_keeps_its_pack(tmp_path):
    for cid, seed in (("a", 1), ("b", 2)):
        toy_pack(cid, seed=seed).save_pretrained(tmp_path / cid)
    toy_pack("a", seed=3).save_pretrained(tmp_path / "a-recalibrated")
    store = PolicyStore(tmp_path / "store")
    assert store.version() == 0 and store.pack_dirs() == {}
    with pytest.raises(PolicyError, match="no version installed"):
        store.config()
    t = {"kids": {"api_key_env": "K", "mandatory": ["a"]}}
    assert store.install(_config(tmp_path, {"a": "a"}, t)) == 1
    assert store.version() == 1 and set(store.pack_dirs()) == {"a"}
    assert store.config().tenants["kids"].mandatory == ["a"]
    # a pack added, the tenant moved to it, the first pack dropped from the policy
    v2 = _config(tmp_path, {"b": "b"}, {"kids": {"api_key_env": "K", "mandatory": ["b"]}})
    assert store.install(v2) == 2 and store.version() == 2
    assert set(store.config().packs) == {"b"} and store.config().tenants["kids"].mandatory == ["b"]
    assert set(store.pack_dirs()) == {"a", "b"}  # the engine may still be asked for "a" by earlier requests
    assert store.config(1).tenants["kids"].mandatory == ["a"]  # each version stays as installed
    # the same id with other content is refused, and nothing changes
    with pytest.raises(PolicyError, match="packs.a: concept 'a' is already served with other content"):
        store.install(_config(tmp_path, {"a": "a-recalibrated", "b": "b"}, {}))
    assert store.version() == 2 and not (tmp_path / "store" / "v3.yaml").exists()
    # the same content again is fine; a second reader sees the same version
    assert store.install(_config(tmp_path, {"a": "a", "b": "b"}, {})) == 3
    assert PolicyStore(tmp_path / "store").version() == 3
    # a copy still being made by another install is not a pack yet
    half = tmp_path / "store" / "packs" / ".c.tmp"
    half.mkdir()
    (half / "pack.json").write_text("{}")
    assert set(store.pack_dirs()) == {"a", "b"}
    # the stored copy does not follow the operator's folder
    (tmp_path / "a" / "pack.json").unlink()
    assert (store.pack_dirs()["a"] / "pack.json").is_file()


def test_vllms_ray_executor_copies_guardit_variables_to_its_workers(monkeypatch):
    """Multi-node engines run on vLLM's Ray executor, which copies to its workers only the
    variables it knows: the plugin adds guardit's prefix, keeping the user's own prefixes."""
    from vllm.ray.ray_env import get_env_vars_to_copy

    from integrations.vllm import config

    monkeypatch.setenv(config.ENV_PACKS, "/shared/packs/a")
    monkeypatch.setenv(config.RAY_PREFIXES, "MY_")
    assert config.ENV_PACKS not in get_env_vars_to_copy()
    config.carry_over_to_ray_workers()
    config.carry_over_to_ray_workers()
    assert os.environ[config.RAY_PREFIXES] == "MY_,GUARDIT_"
    assert config.ENV_PACKS in get_env_vars_to_copy()
    # The plugin's entry point does it in every vLLM process.
    code = f"import os; from integrations.vllm import register; register(); print(os.environ[{config.RAY_PREFIXES!r}])"
    env = {k: v for k, v in os.environ.items() if k != config.RAY_PREFIXES}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "GUARDIT_"


def test_cpu_workers_share_a_small_machines_cores(monkeypatch):
    """Tensor parallelism on a CPU: vLLM's automatic binding reserves a core per worker first, so
    on a small machine each worker is given an equal share (unless the user set a binding)."""
    from integrations.vllm import config
    from integrations.vllm.serve import _tensor_parallel_size
    from steering.errors import GuarditError

    monkeypatch.delenv(config.ENV_CPU_BIND, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert config.cpu_worker_binding(1) == {}
    assert config.cpu_worker_binding(2) == {config.ENV_CPU_BIND: "0|1"}
    with pytest.raises(GuarditError, match="tensor_parallel_size: 4 workers need at least 4 CPU cores"):
        config.cpu_worker_binding(4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {4, 5, 6, 7, 8})
    assert config.cpu_worker_binding(3) == {config.ENV_CPU_BIND: "4|5|6"}
    assert config.cpu_worker_binding(2) == {}  # enough cores: vLLM's own binding
    monkeypatch.setenv(config.ENV_CPU_BIND, "0|1|2")
    assert config.cpu_worker_binding(3) == {}  # the user's binding stands
    assert _tensor_parallel_size(["--dtype", "float32"]) == 1
    assert _tensor_parallel_size(["--tensor-parallel-size", "2"]) == 2
    assert _tensor_parallel_size(["--tensor-parallel-size=4"]) == 4
    assert _tensor_parallel_size(["-tp", "2", "--enforce-eager"]) == 2
    with pytest.raises(GuarditError, match="--tensor-parallel-size: expected a number of workers, got 'two'"):
        _tensor_parallel_size(["--tensor-parallel-size", "two"])
