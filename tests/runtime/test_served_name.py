from radixlm.runtime.served_name import DEFAULT_MODEL_ID, served_model_name


def test_served_model_name(tmp_path):
    assert served_model_name(None) == DEFAULT_MODEL_ID
    assert served_model_name(None, "my-model") == "my-model"
    assert served_model_name("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"
    folder = tmp_path / "Qwen2-0.5B-Instruct"
    folder.mkdir()
    assert served_model_name(str(folder) + "/") == "Qwen2-0.5B-Instruct"
    gguf = tmp_path / "tinyllama-1.1b-chat.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert served_model_name(str(gguf)) == "tinyllama-1.1b-chat.Q4_0"
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert served_model_name(str(snapshot)) == "Qwen/Qwen3-0.6B"
