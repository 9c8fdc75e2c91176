"""`--model-path org/name` through huggingface_hub, offline: a tiny model written into the HF cache
layout under a temporary HF_HOME (no network, ever)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from radixlm.runtime.model_source import resolve_model_path

REPO = "radixlm-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(hub_dir: Path, model_dir: Path, repo: str = REPO, commit: str = COMMIT,
                    refs: tuple[str, ...] = ("main",)) -> Path:
    """The layout huggingface_hub reads: models--org--name/{refs/<ref>, snapshots/<commit>/files}."""
    root = hub_dir / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copy(f, snapshot / f.name)
    (root / "refs").mkdir()
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model_dir) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    write_hub_cache(home / "hub", tiny_model_dir("llama"), refs=("main", "v1"))
    return home


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_resolves_from_the_cache(hf_home, offline):
    folder = resolve_model_path(REPO, download_dir=str(hf_home / "hub"))
    assert folder == hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (folder / "config.json").is_file()
    tagged = resolve_model_path(REPO, revision="v1", download_dir=str(hf_home / "hub"))
    assert tagged == folder


def test_hub_errors_are_clear(hf_home, offline, tmp_path):
    with pytest.raises(ValueError, match="not in the local hub cache") as info:
        resolve_model_path("radixlm-test/not-cached", download_dir=str(hf_home / "hub"))
    assert "radixlm-test/not-cached" in str(info.value)
    with pytest.raises(ValueError, match="not in the local hub cache"):
        resolve_model_path(REPO, revision="no-such-branch", download_dir=str(hf_home / "hub"))
    # A snapshot without safetensors (e.g. only pickled .bin weights) is refused by name.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    write_hub_cache(tmp_path / "hub", bare, repo="radixlm-test/bin-only")
    with pytest.raises(ValueError, match="no .safetensors"):
        resolve_model_path("radixlm-test/bin-only", download_dir=str(tmp_path / "hub"))
    # Not hub-id shaped and not on disk: the plain "does not exist" message.
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "a" / "b" / "c"))


def test_hf_home_is_honoured_in_a_fresh_process(hf_home):
    """HF_HOME picks the cache (read by huggingface_hub at import), HF_HUB_OFFLINE keeps it off the network."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    code = "from radixlm.runtime.model_source import resolve_model_path as r; print(r('%s'))" % REPO
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"snapshots/{COMMIT}")


def test_engine_serves_a_hub_id(hf_home, offline, monkeypatch, tiny_model_dir):
    import radixlm

    monkeypatch.setenv("HF_HOME", str(hf_home))  # the scheduler process is spawned: it reads the env
    with radixlm.Engine(REPO, download_dir=str(hf_home / "hub"), device="cpu", cpu_threads=1,
                        max_total_tokens=2048) as engine:
        assert Path(engine.model_path).name == COMMIT
        out = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3, "temperature": 0})
        assert out["meta_info"]["completion_tokens"] == 3
