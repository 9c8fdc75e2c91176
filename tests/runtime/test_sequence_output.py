"""The typed result path without a model: deltas summed per sequence, SGLang's /generate shape
rendered from them, and the one request builder shared by a JSON body and Python arguments."""
from __future__ import annotations

import json

import pytest

from radixlm.runtime.generate_request import build_generate_request, parse_generate_request
from radixlm.runtime.io_struct import FinishReason
from radixlm.runtime.native_output import native_output
from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.sequence_output import LogprobDelta, SequenceDelta, SequenceResult, TokenLogprob, common_prefix_len


def _delta(text: str, start: int, ids: list[int], n: int, **kw) -> SequenceDelta:
    return SequenceDelta(index=0, rid="r", text=text, text_start=start, output_ids=ids, prompt_tokens=3,
                         completion_tokens=n, cached_tokens=1, **kw)


def test_deltas_sum_to_the_sequence_and_a_finish_may_rewrite_held_text() -> None:
    r = SequenceResult(0)
    r.add(_delta("Hel", 0, [1], 1))
    r.add(_delta("lo wo", 3, [2, 3], 3))
    assert (r.text, r.output_ids, r.finish) == ("Hello wo", [1, 2, 3], None)
    # the finish trims at a stop regex inside what was already shown: text from 6 on is replaced
    r.add(_delta("", 6, [4], 4, finish=FinishReason.stop("wor", regex=True), e2e_latency=0.5))
    assert r.text == "Hello " and r.output_ids == [1, 2, 3, 4] and r.completion_tokens == 4
    assert r.finish is not None and r.finish.kind == "stop" and r.e2e_latency == 0.5


def test_native_output_is_sglangs_generate_shape() -> None:
    lp1 = LogprobDelta(input_tokens=[TokenLogprob(None, 5, "a"), TokenLogprob(-0.5, 6, "b")],
                       output_tokens=[TokenLogprob(-0.25, 7, "c")],
                       input_top=[None, [TokenLogprob(-0.5, 6, "b")]], output_top=[[TokenLogprob(-0.25, 7, "c")]])
    lp2 = LogprobDelta(input_tokens=[], output_tokens=[TokenLogprob(-1.0, 8, "d")], input_top=[],
                       output_top=[[TokenLogprob(-1.0, 8, "d"), TokenLogprob(-2.0, 9, "e")]])
    r = SequenceResult(0).add(_delta("c", 0, [7], 1, logprobs=lp1, forced_tokens=2))
    mid = native_output(r)
    assert list(mid) == ["text", "output_ids", "meta_info"]
    assert list(mid["meta_info"]) == ["id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
                                      "forced_tokens", "input_token_logprobs", "output_token_logprobs",
                                      "input_top_logprobs", "output_top_logprobs"]
    r.add(_delta("d", 1, [8], 2, logprobs=lp2, forced_tokens=2, num_retractions=1,
                 finish=FinishReason.of_length(2), e2e_latency=1.5))
    out = native_output(r)
    meta = out["meta_info"]
    assert out["text"] == "cd" and out["output_ids"] == [7, 8]
    assert meta["finish_reason"] == {"type": "length", "length": 2}
    assert (meta["e2e_latency"], meta["num_retractions"], meta["forced_tokens"]) == (1.5, 1, 2)
    assert meta["input_token_logprobs"] == [[None, 5, "a"], [-0.5, 6, "b"]]
    assert meta["output_token_logprobs"] == [[-0.25, 7, "c"], [-1.0, 8, "d"]]
    assert meta["input_top_logprobs"] == [None, [[-0.5, 6, "b"]]]
    assert meta["output_top_logprobs"] == [[[-0.25, 7, "c"]], [[-1.0, 8, "d"], [-2.0, 9, "e"]]]
    assert json.loads(json.dumps(out)) == out  # plain JSON: lists, not tuples


def test_no_logprob_keys_unless_asked_and_abort_status_stays_internal() -> None:
    failed = _delta("", 0, [], 0, finish=FinishReason.abort("the grammar does not compile", status_code=400))
    assert failed.failed_status == 400
    out = native_output(SequenceResult(0).add(failed))
    assert out["meta_info"]["finish_reason"] == {"type": "abort", "message": "the grammar does not compile"}
    assert "input_token_logprobs" not in out["meta_info"] and "error_status" not in out
    assert _delta("", 0, [], 0, finish=FinishReason.abort("server abort")).failed_status is None


def test_python_arguments_and_a_json_body_build_the_same_request() -> None:
    body = {"text": ["a", "b"], "rid": "x", "sampling_params": [{"max_new_tokens": 3}, {"temperature": 0}],
            "return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True, "stream": True,
            "extra_key": "k", "lora_path": ["a", None]}
    from_body = parse_generate_request(json.loads(json.dumps(body)), 100)
    from_args = build_generate_request(100, **body)
    assert from_body == from_args
    assert [i.rid for i in from_args.items] == ["x_0", "x_1"] and from_args.is_batch and from_args.stream
    assert [(i.lora_path, i.lora_field) for i in from_args.items] == [("a", "lora_path[0]"), (None, "lora_path[1]")]


def test_a_batchs_equal_sampling_params_are_parsed_once(monkeypatch) -> None:
    from radixlm.runtime.sampling_params import SamplingParams

    calls = []
    parse = SamplingParams.from_dict
    monkeypatch.setattr(SamplingParams, "from_dict", lambda *a, **k: calls.append(k["prefix"]) or parse(*a, **k))
    same = {"temperature": 0, "max_new_tokens": 4, "stop": ["x", "y"], "ignore_eos": True}
    req = build_generate_request(100, input_ids=[[1, 2]] * 5, sampling_params=[dict(same) for _ in range(4)]
                                 + [{**same, "max_new_tokens": 5}])
    assert calls == ["sampling_params[0]", "sampling_params[4]"]
    assert req.items[0].params is req.items[3].params and req.items[0].params.ignore_eos
    assert req.items[4].params.max_new_tokens == 5
    with pytest.raises(InvalidRequestError, match=r"^sampling_params\[1\]\.ignore_eos: must be a boolean"):
        build_generate_request(100, input_ids=[[1]] * 2, sampling_params=[same, {**same, "ignore_eos": 1}])  # True is not 1
    calls.clear()
    shared = build_generate_request(100, input_ids=[[1, 2]] * 3, sampling_params={"temperature": 0.5})
    assert calls == ["sampling_params"] and shared.items[2].params.temperature == 0.5
    calls.clear()
    nested = {"logit_bias": {"5": 1.0}}  # nested values: parsed every time (no key)
    build_generate_request(100, input_ids=[[1, 2]] * 2, sampling_params=[nested, nested])
    assert calls == ["sampling_params[0]", "sampling_params[1]"]
    # a bad entry is still named where it is, after equal good ones
    with pytest.raises(InvalidRequestError, match=r"^sampling_params\[2\]\.temperature"):
        build_generate_request(100, input_ids=[[1]] * 3, sampling_params=[{"top_k": 3}] * 2 + [{"temperature": -1}])


@pytest.mark.parametrize("fields,error", [
    ({"text": "a", "top_logprobs_num": 101}, "^top_logprobs_num: must be <= 100"),
    ({"text": "\ud800"}, "^text: contains a lone surrogate"),
    ({"text": "a", "sampling_params": {"stop": ["\ud800"]}}, r"^sampling_params\.stop\[0\]: contains a lone surrogate"),
    ({"text": "a", "image_data": "x"}, "^image_data: is not supported"),
    ({"text": "a", "priority": "high"}, "^priority: must be of type int"),
    ({"text": "a", "stream": None}, "^stream: must be a boolean"),
    ({"input_ids": [1, 200]}, r"^input_ids: token id 200 at \[1\] is outside the vocabulary"),
    # long batches take a whole-list check first; a bad id is still named where it is
    ({"input_ids": [[3] * 900, [4] * 700 + [-1] + [5] * 99]}, r"^input_ids\[1\]: token id -1 at \[700\] is outside"),
    ({"input_ids": [[3] * 900, [4] * 300 + [True]]}, r"^input_ids\[1\]: \[300\] must be an integer token id, got bool"),
    ({"input_ids": [7] * 500 + [2.0]}, r"^input_ids: \[500\] must be an integer token id, got float"),
    ({"input_ids": [[1] * 800], "sampling_params": [{"stop": [[2] * 50, "\udc00"]}]},
     r"^sampling_params\[0\]\.stop\[1\]: contains a lone surrogate"),
])
def test_the_builder_names_the_field_for_python_callers_as_for_json(fields, error) -> None:
    with pytest.raises(InvalidRequestError, match=error):
        build_generate_request(100, **fields)
    with pytest.raises(InvalidRequestError, match=error):
        parse_generate_request(json.loads(json.dumps(fields)), 100)


def test_common_prefix_len_is_where_a_text_delta_starts() -> None:
    assert common_prefix_len("", "abc") == 0
    assert common_prefix_len("ab", "abc") == 2
    assert common_prefix_len("abX", "abc") == 2  # a finish rewrote held-back text
    assert common_prefix_len("abc", "ab") == 2
