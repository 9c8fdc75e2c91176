"""The server's edges against the live default-model server: the served name, /get_model_info's chat
template, /tokenize and /detokenize in SGLang's and vLLM's shapes, /version, and which paths need no key."""
from __future__ import annotations

from pathlib import Path

from radixlm.runtime.served_name import DEFAULT_MODEL_ID


def test_served_name_and_model_info(server):
    async def go():
        st, models = await server.get("/v1/models")
        assert st == 200 and [m["id"] for m in models["data"]] == [DEFAULT_MODEL_ID]
        assert models["data"][0]["root"] == DEFAULT_MODEL_ID  # never the converted cache folder
        st, card = await server.get("/v1/models/" + DEFAULT_MODEL_ID)
        assert st == 200 and card["id"] == DEFAULT_MODEL_ID
        st, info = await server.get("/get_model_info")
        assert st == 200 and info["served_model_name"] == DEFAULT_MODEL_ID
        # model_path stays loadable (SGLang's programs build a tokenizer from get_model_name()).
        assert (Path(info["model_path"]) / "config.json").is_file()
        assert "<|im_start|>" in info["chat_template"] and info["chat_template_name"] is None
        st, out = await server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 1})
        assert st == 200 and out["model"] == DEFAULT_MODEL_ID
    server.run(go())


def test_tokenize_detokenize(server):
    async def go():
        st, out = await server.post("/tokenize", {"prompt": "Hello world"})
        assert st == 200 and out["count"] == len(out["tokens"]) == 2 and out["max_model_len"] == 8192
        st, back = await server.post("/detokenize", {"tokens": out["tokens"]})
        assert st == 200 and back == {"text": "Hello world", "prompt": "Hello world"}
        st, many = await server.post("/v1/tokenize", {"prompt": ["a b", "Hello world"], "return_token_strs": True})
        assert st == 200 and many["tokens"][1] == out["tokens"] and many["count"] == [len(t) for t in many["tokens"]]
        assert many["token_strs"][1] == ["Hello", "Ġworld"]
        # vLLM's chat form: the server's template, the generation prompt added by default.
        messages = [{"role": "user", "content": "Hi"}]
        st, chat = await server.post("/tokenize", {"messages": messages})
        st2, text = await server.post("/detokenize", {"tokens": chat["tokens"]})
        assert st == st2 == 200 and text["text"].endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        assert text["text"].startswith("<|im_start|>system\n")
        st, bare = await server.post("/tokenize", {"messages": messages, "add_generation_prompt": False})
        assert st == 200 and chat["tokens"][:bare["count"]] == bare["tokens"] and bare["count"] < chat["count"]
        for path, body, param in (("/tokenize", {"prompt": 3}, "prompt"), ("/tokenize", {}, "prompt"),
                                  ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
                                  ("/detokenize", {"tokens": [1, "2"]}, "tokens"),
                                  ("/detokenize", {"tokens": [10 ** 9]}, "tokens[0]"),
                                  ("/tokenize", {"messages": [{"role": "bogus", "content": "x"}]}, "messages[0].role")):
            st, err = await server.post(path, body)
            assert st == 400 and err["error"]["param"] == param, (path, body, err)
    server.run(go())


def test_open_paths_and_version(server):
    async def go():
        for path in ("/health", "/metrics", "/version", "/"):
            st, _ = await server.get(path, headers={})
            assert st == 200, path
        st, version = await server.get("/version", headers={})
        assert isinstance(version["version"], str) and version["version"]
        for path in ("/v1/models", "/get_model_info", "/get_server_info"):
            st, _ = await server.get(path, headers={})
            assert st == 401, path
        st, _ = await server.post("/tokenize", {"prompt": "x"}, headers={})
        assert st == 401
    server.run(go())
