"""sglang/test/test_programs.py, every function that needs no network, image or OpenAI key, through
SGLang's own frontend and through `import radixlm as sgl`, against a live server (default model).
A content assertion the default model fails is a known model failure only when it is listed in
catalog.KNOWN_MODEL_FAILURES with transformers' output on the same prompt as evidence (xfail, with
that evidence as the reason); any other failure fails. (API speculation on a chat model fails the
program, as a step failure, when the model's replies never fit the assistant turn's format.)
CI runs them with program_source.CI_TRIMS (shorter generations no assertion depends on)."""
from __future__ import annotations

import pytest

from tests.compat.catalog import CI_PROGRAMS, FRONTEND_LIMITS, KNOWN_MODEL_FAILURES, PROGRAMS
from tests.compat.conftest import RUN_ALL
from tests.compat.program_source import FRONTENDS
from tests.compat.runner import ProgramStepFailed, run_program

pytest.importorskip("sglang")
pytest.importorskip("openai")

SELECTED = list(PROGRAMS) if RUN_ALL else list(CI_PROGRAMS)


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name", SELECTED)
def test_program(compat_server, frontend: str, name: str) -> None:
    limit = FRONTEND_LIMITS.get((frontend, name))
    if limit:
        pytest.skip(f"not runnable through {frontend}'s frontend here: {limit}")
    try:
        run_program(frontend, name, compat_server.url, trimmed=not RUN_ALL)
    except (AssertionError, ProgramStepFailed) as exc:  # a content check, or a reply that does not fit the format
        known = KNOWN_MODEL_FAILURES.get(name)
        if known is None or frontend not in known.frontends:
            raise
        pytest.xfail(f"known model failure ({known.assertion}): {exc}; transformers on the same weights and "
                     f"prompt: {known.evidence}")


# Greedy programs without roles: SGLang's frontend and ours must send the same /generate bodies
# (docs/sglang_compat.md; radixlm's fork prefill, `max_new_tokens: 0`, is the one documented extra).
SAME_BODIES = ("test_tool_use", "test_regex")


@pytest.mark.parametrize("name", SAME_BODIES)
def test_both_frontends_send_sglangs_request_bodies(compat_server, name: str) -> None:
    from tests.compat.recording_proxy import RecordingProxy

    proxy = RecordingProxy(compat_server.url).start()
    try:
        bodies = {}
        for frontend in FRONTENDS:
            proxy.take()
            try:
                run_program(frontend, name, proxy.url)
            except AssertionError:
                pass  # content is compared in test_program; here only what was sent
            bodies[frontend] = [b for method, path, b in proxy.take() if path == "/generate"]
    finally:
        proxy.stop()
    ours = [b for b in bodies["radixlm"] if b["sampling_params"] != {"max_new_tokens": 0}]
    assert bodies["sglang"] and ours == bodies["sglang"]
