"""Two "nodes" on loopback through torch.distributed's TCP rendezvous (gloo): node 0 is an Engine
(front + ranks 0-1), node 1 is `radixlm serve --node-rank 1` (ranks 2-3), one TP=4 replica. Four
ranks over a model with 2 KV heads also covers replicated KV heads. Node 1 exits when node 0 stops."""
from __future__ import annotations

import subprocess
import sys

import radixlm
from radixlm.runtime.parallel.launch import free_port
from tests.parallel.helpers import ENGINE_OPTIONS, assert_same_or_near_tie, greedy, random_prompts, reference


def test_two_nodes_on_loopback(tiny_model_dir) -> None:
    model_dir = str(tiny_model_dir("llama"))
    prompts = random_prompts(4, 390, seed=10)
    refs = reference(tiny_model_dir("llama"), prompts, 8)
    addr = f"127.0.0.1:{free_port()}"
    common = ["--model-path", model_dir, "--tp-size", "4", "--nnodes", "2", "--dist-init-addr", addr]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_OPTIONS.items()]
    node1 = subprocess.Popen([sys.executable, "-m", "radixlm.launch_server", *common, "--node-rank", "1", *flags],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with radixlm.Engine(model_dir, tp_size=4, nnodes=2, node_rank=0, dist_init_addr=addr, **ENGINE_OPTIONS) as e:
            assert_same_or_near_tie(greedy(e, prompts, 8), refs)
            assert e.tokenizer_manager.replicas[0].ranks == [0, 1]
        out, _ = node1.communicate(timeout=60)
        assert node1.returncode == 0, out
        assert "node 1 runs ranks [2, 3]" in out
    finally:
        if node1.poll() is None:
            node1.kill()
