"""The playground page at / in a real headless Chromium against the live default-model server: a chat
message streams in (several partial texts seen, the greedy answer equal to the API's), the stats
fill in, a JSON-schema request returns valid JSON, and the page fetches nothing from elsewhere.

Needs Debian's chromium (`apt-get install -y chromium`, a line of .ci/run); skipped outside CI
without it, a failure in CI (CI=true). RADIXLM_SCREENSHOT_DIR=docs/images refreshes the screenshots."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from radixlm.runtime.served_name import DEFAULT_MODEL_ID
from tests.server.chromium import Browser, find_chromium, screenshot_dir
from tests.server.conftest import API_KEY

CHROMIUM = find_chromium()
if CHROMIUM is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("chromium is not installed; .ci/run installs it with apt-get before the tests")
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

QUESTION = "What is the capital of France?"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
LAST_REPLY = "[...document.querySelectorAll('.msg.assistant')].at(-1)"


async def _set(browser: Browser, element_id: str, value: object, event: str = "input") -> None:
    await browser.evaluate(f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); "
                           f"e.value = {json.dumps(value)}; e.dispatchEvent(new Event('{event}')); }})()")


async def _send_and_watch(browser: Browser, prompt: str) -> list[str]:
    """Send `prompt`; the distinct texts of the reply seen while it streams, the final one last."""
    await _set(browser, "prompt", prompt)
    await browser.evaluate("document.getElementById('send').click()")
    seen: list[str] = []
    deadline = asyncio.get_running_loop().time() + 240
    while asyncio.get_running_loop().time() < deadline:
        text, done = await browser.evaluate(f"(() => {{ const m = {LAST_REPLY}; "
                                            "return m ? [m.firstChild ? m.firstChild.textContent : '', "
                                            "m.dataset.done === 'true'] : ['', false]; })()")
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if done:
            return seen
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no finished reply within 240 s; seen {seen[-1:]}")


def test_playground_chat_and_json_schema(server):
    shots = screenshot_dir()

    async def go():
        browser = Browser(CHROMIUM)
        try:
            await browser.start()
            await browser.navigate(server.url + "/")
            assert await browser.evaluate("document.title") == "radixlm playground"
            await _set(browser, "api-key", API_KEY, "change")
            await browser.wait_for(f"document.getElementById('model').textContent.includes({json.dumps(DEFAULT_MODEL_ID)})")
            await _set(browser, "temperature", "0")
            await _set(browser, "max_tokens", "24")

            seen = await _send_and_watch(browser, QUESTION)
            assert len(seen) >= 3, f"the reply did not stream: {seen}"
            assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
            assert int(await browser.evaluate(f"{LAST_REPLY}.dataset.chunks")) >= 3
            status, api = await server.post("/v1/chat/completions", {
                "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 24})
            assert status == 200 and seen[-1] == api["choices"][0]["message"]["content"]
            assert "Paris" in seen[-1]
            stats = await browser.evaluate("Object.fromEntries([...document.querySelectorAll('#stats dd')]"
                                           ".map(d => [d.id, d.textContent]))")
            assert stats["stat-ttft"].endswith(" ms") and stats["stat-tps"].endswith(" tok/s"), stats
            assert int(stats["stat-prompt"]) == api["usage"]["prompt_tokens"]
            assert int(stats["stat-completion"]) == api["usage"]["completion_tokens"]
            assert stats["stat-cached"].isdigit() and stats["stat-finish"] in ("stop", "length")
            if shots:
                await browser.screenshot(shots / "playground-chat.png")

            await browser.evaluate("document.getElementById('clear').click()")
            await _set(browser, "constraint-mode", "json_schema", "change")
            example = json.loads(await browser.evaluate("document.getElementById('constraint-text').value"))
            assert example == SCHEMA
            await _set(browser, "max_tokens", "64")
            seen = await _send_and_watch(browser, "Make up a person. Answer in JSON with their name and age.")
            import jsonschema

            jsonschema.validate(json.loads(seen[-1]), SCHEMA)
            assert (await browser.evaluate(f"{LAST_REPLY}.querySelector('.badge').textContent")) == "✓ valid JSON"
            if shots:
                await browser.screenshot(shots / "playground-json-schema.png")

            own = [u for u in browser.requests if not u.startswith((server.url, "data:", "about:"))]
            assert not own, f"the page fetched from outside the server: {own}"
            assert any(u.endswith("/v1/chat/completions") for u in browser.requests)
        finally:
            await browser.close()

    asyncio.run(go())
