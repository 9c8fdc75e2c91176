"""Input top-logprobs leave the scheduler's loop as arrays, one `TopRows` a prefill chunk, and the
front's lists are exactly those the loop used to make."""
from __future__ import annotations

import pickle
import time

import torch

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampler import token_logprobs
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.top_rows import TopRows, expand
from tests.runtime.helpers import assert_pool_idle, make_scheduler


def test_the_pairs_equal_the_tensors_lists() -> None:
    torch.manual_seed(0)
    logits = torch.randn(37, 500) * 4
    targets = torch.randint(0, 500, (37,))
    _, vals, ids = token_logprobs(logits, targets, 20)
    old = [list(zip(v, t)) for v, t in zip(vals.tolist(), ids.tolist())]  # what the loop made before
    got = expand([None, TopRows(vals.numpy(), ids.numpy()), [(-1.0, 3)]])
    assert got == [None, *old, [(-1.0, 3)]]
    assert all(type(v) is float and type(t) is int for row in got[1:-1] for v, t in row)


def test_the_scheduler_ships_each_chunks_top_as_arrays(tiny_model_dir) -> None:
    sched = make_scheduler(tiny_model_dir("llama"), chunked_prefill_size=16)
    prompt = list(range(5, 45))
    params = SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True)
    sched.handle(TokenizedGenerateReq(rid="r", input_ids=prompt, params=params, return_logprob=True,
                                      logprob_start_len=0, top_logprobs_num=5))
    outs = []
    deadline = time.monotonic() + 120
    while not sched.idle:
        assert time.monotonic() < deadline
        sched.step()
        outs.extend(pickle.loads(pickle.dumps(o)) for o in sched.pop_outputs())  # through the pipe
    shipped = [e for o in outs for e in o.input_top_logprobs or []]
    assert shipped[0] is None and len(shipped) == 1 + 3  # the first token, then the three chunks' arrays
    assert all(isinstance(e, TopRows) and e.values.shape[1] == 5 for e in shipped[1:])
    tops = expand(shipped)
    chosen = [lp for o in outs for lp, _ in o.input_token_logprobs or []]
    assert len(tops) == len(prompt) == len(chosen)
    for lp, row in zip(chosen[1:], tops[1:]):
        assert len(row) == 5 and [v for v, _ in row] == sorted((v for v, _ in row), reverse=True)
        assert lp <= row[0][0] + 1e-6
    assert_pool_idle(sched)
