"""LoRA over HTTP, on a live server with a tiny model and two PEFT adapters: /generate lora_path
(one or per prompt), OpenAI `model` naming an adapter, /v1/models, /server_info, runtime
load/unload, and 400s naming the unknown adapter."""
from __future__ import annotations

import sys

import pytest

from tests.fixtures.lora_adapters import make_peft_adapter
from tests.server.conftest import start_server


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("lora-server")
    a = make_peft_adapter(model_dir, root / "a", seed=1, r=4)
    b = make_peft_adapter(model_dir, root / "b", seed=2, r=4)
    c = make_peft_adapter(model_dir, root / "c", seed=3, r=4)
    log = root / "server.log"
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
           "--port", "0", "--max-total-tokens", "4096", "--cpu-threads", "1", "--served-model-name", "tiny",
           "--lora-paths", f"a={a}", f"b={b}", "--max-loras-per-batch", "2"]
    live = start_server(cmd, log, timeout=180)
    proc = live.proc
    yield live, c
    proc.terminate()
    proc.wait(30)


def _gen(lora, text="The quick brown fox", n=8):
    return {"text": text, "lora_path": lora, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}


def test_generate_with_adapters_and_unknown_adapter(lora_server) -> None:
    srv, _ = lora_server
    hd = {}
    st, base = srv.run(srv.post("/generate", _gen(None), headers=hd))
    st_a, out_a = srv.run(srv.post("/generate", _gen("a"), headers=hd))
    assert st == st_a == 200 and out_a["output_ids"] != base["output_ids"]
    body = {"text": ["The quick brown fox"] * 3, "lora_path": ["a", None, "b"],
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    st, outs = srv.run(srv.post("/generate", body, headers=hd))
    assert st == 200 and outs[0]["output_ids"] == out_a["output_ids"] and outs[1]["output_ids"] == base["output_ids"]
    st, err = srv.run(srv.post("/generate", _gen("nope"), headers=hd))
    assert st == 400 and "'nope'" in err["error"]["message"] and err["error"]["param"] == "lora_path"
    st, err = srv.run(srv.post("/generate", {**body, "lora_path": ["a", "zzz", None]}, headers=hd))
    assert st == 400 and err["error"]["param"] == "lora_path[1]"


def test_openai_model_names_the_adapter_and_models_lists_adapters(lora_server) -> None:
    srv, _ = lora_server
    hd = {}
    st, models = srv.run(srv.get("/v1/models", headers=hd))
    ids = [m["id"] for m in models["data"]]
    assert st == 200 and ids == ["tiny", "a", "b"] and models["data"][1]["parent"] == "tiny"
    req = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    texts = {}
    for model in ("tiny", "tiny:a", "a"):
        st, out = srv.run(srv.post("/v1/completions", {**req, "model": model}, headers=hd))
        assert st == 200, out
        texts[model] = out["choices"][0]["text"]
    st, native = srv.run(srv.post("/generate", _gen("a"), headers=hd))
    assert texts["tiny:a"] == texts["a"] == native["text"] != texts["tiny"]
    st, err = srv.run(srv.post("/v1/completions", {**req, "model": "tiny:nope"}, headers=hd))
    assert st == 400 and err["error"]["param"] == "model" and "'nope'" in err["error"]["message"]


def test_load_and_unload_at_runtime(lora_server, tmp_path) -> None:
    srv, c_dir = lora_server
    hd = {}
    st, out = srv.run(srv.post("/load_lora_adapter", {"lora_name": "c", "lora_path": str(c_dir)}, headers=hd))
    assert st == 200 and out["success"] and "c" in out["loaded_adapters"]
    st, info = srv.run(srv.get("/server_info", headers=hd))
    assert "c" in info["lora_adapters"] and "/load_lora_adapter" in info["lora_routes"]
    st, gen = srv.run(srv.post("/generate", _gen("c"), headers=hd))
    assert st == 200
    st, err = srv.run(srv.post("/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tmp_path)}, headers=hd))
    assert st == 400 and "no adapter_config.json" in err["error"]["message"]
    st, out = srv.run(srv.post("/unload_lora_adapter", {"lora_name": "c"}, headers=hd))
    assert st == 200 and "c" not in out["loaded_adapters"]
    st, err = srv.run(srv.post("/generate", _gen("c"), headers=hd))
    assert st == 400 and "'c'" in err["error"]["message"]
    st, err = srv.run(srv.post("/unload_lora_adapter", {"lora_name": "c"}, headers=hd))
    assert st == 404
