"""``type: openai``: caption with a model that a serving engine serves over the OpenAI API.

Teams that caption millions of images run an engine with continuous batching and a paged
KV cache (vLLM, lmdeploy, SGLang; ``transformers serve`` for tests and small jobs) and
point the pipeline at it. This captioner is the client side:

- one or more base URLs (``server.endpoints``); each request goes to the endpoint with the
  most free slots of its ``server.concurrency``;
- images travel as data URLs (PNG by default: the server decodes exactly the pixels our
  preprocessing made), so no image URL has to be reachable from the server;
- the prompt goes as the user message with the image first, as the native
  ``TransformersCaptioner`` renders it; the server applies the model's own chat template
  (for CogVLM on lmdeploy, its ``Question: ... Answer:`` template);
- retries with exponential backoff on 429, 5xx, timeouts and refused connections,
  honouring ``Retry-After``; a request that still fails is an error row with its reason
  (``http_<status>``, ``timeout``, ``connection_error``), as are ``empty_content`` and
  ``refusal`` answers; ``finish_reason: length`` comes back as truncated;
- after ``server.max_consecutive_failures`` failed requests in a row, :class:`EndpointsFailing`
  stops the stage: the batch in flight is not written, its rows stay pending.

The API key is read from the environment variable ``server.api_key_env`` names (never
from the config) and registered with :func:`paradiffusion.log.add_secret`, so no log line
or saved command shows it.

httpx (already a dependency of the annotations and eval extras) is used directly rather
than the ``openai`` package: the client needs the HTTP status, the ``Retry-After`` header
and per-endpoint connection pools, and the requests are three JSON fields.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from captioning.captioners import CAPTIONERS, Captioner, CaptionResult
from paradiffusion.log import add_secret, get_logger

if TYPE_CHECKING:
    from PIL import Image

    from captioning.config import CaptionerSpec, GenerationSettings, ServerSettings

log = get_logger("captioning")

#: ``owned_by`` values of ``/v1/models`` that name the engine itself.
KNOWN_ENGINES = ("vllm", "lmdeploy", "sglang", "tgi", "llama.cpp")

RETRY_STATUS = {429, 500, 502, 503, 504}


class EndpointsFailing(RuntimeError):
    """Too many requests in a row failed: stop the stage, leave the rows in flight pending."""


class EndpointError(ValueError):
    """An endpoint that cannot be used (unreachable, other model): one line naming it."""


@dataclass(frozen=True)
class ServedModel:
    """What the endpoints say they serve; recorded with every caption."""

    name: str  # the model name requests use (served_model or model)
    model_id: str  # the captions' model_id: "<engine>:<id as /v1/models reports it>"
    revision: str | None
    engine: str  # "vllm 0.32.0", "lmdeploy 0.18.0", "transformers-serve", ...


def api_key(server: ServerSettings) -> str | None:
    """The API key from the environment (registered as a secret so logs never show it)."""
    if not server.api_key_env:
        return None
    key = os.environ.get(server.api_key_env) or None
    add_secret(key)
    return key


def _headers(server: ServerSettings) -> dict[str, str]:
    key = api_key(server)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _root(url: str) -> str:
    return url[: -len("/v1")] if url.endswith("/v1") else url


def probe_endpoints(spec: CaptionerSpec, key: str = "caption.captioners.<name>") -> ServedModel:
    """Ask every endpoint what it serves (``GET /v1/models``, ``GET /version``), before any work.

    Raises :class:`EndpointError` (one line) for an unreachable endpoint, one that does not
    serve the configured model (both names), or endpoints that disagree.
    """
    import httpx

    server = spec.server
    name = server.served_model or spec.model
    found: list[tuple[str, ServedModel]] = []
    timeout = httpx.Timeout(server.connect_timeout_s, read=max(server.connect_timeout_s, 30.0))
    with httpx.Client(timeout=timeout, headers=_headers(server)) as client:
        for url in server.endpoints:
            try:
                r = client.get(f"{url}/models")
            except httpx.HTTPError as exc:
                raise EndpointError(
                    f"{key}.server.endpoints: {url} is unreachable ({type(exc).__name__}: {exc}); "
                    "start the engine there or remove it from the list"
                ) from None
            if r.status_code != 200:
                raise EndpointError(
                    f"{key}.server.endpoints: {url}/models answered HTTP {r.status_code}: {r.text[:200]!r}"
                )
            try:
                models = r.json()["data"]
            except (ValueError, KeyError, TypeError):
                raise EndpointError(f"{key}.server.endpoints: {url}/models is not an OpenAI model list") from None
            entry = next((m for m in models if m.get("id") == name), None)
            if entry is None:
                served = ", ".join(str(m.get("id")) for m in models) or "nothing"
                raise EndpointError(
                    f"{key}: {url} serves {served}, not the configured model {name!r} "
                    "(set model, or server.served_model, to the name the engine serves)"
                )
            engine = _engine_of(client, url, entry, server)
            model, _, rev = str(entry["id"]).partition("@")  # transformers serve names a Hub revision "id@rev"
            revision = rev or spec.revision
            found.append((url, ServedModel(name, f"{engine.split()[0]}:{model}", revision, engine)))
    first_url, first = found[0]
    for url, other in found[1:]:
        if (other.model_id, other.revision) != (first.model_id, first.revision):
            raise EndpointError(
                f"{key}.server.endpoints: {first_url} serves {first.model_id}@{first.revision or '-'} but "
                f"{url} serves {other.model_id}@{other.revision or '-'}: one caption set needs one engine and model"
            )
    return first


def _engine_of(client, url: str, entry: dict, server: ServerSettings) -> str:
    """``"<name> <version>"`` as the server reports it, else the configured label."""
    import httpx

    owner = str(entry.get("owned_by") or "").lower()
    name = owner if owner in KNOWN_ENGINES else None
    version = None
    try:  # vLLM answers GET /version
        r = client.get(f"{_root(url)}/version")
        if r.status_code == 200 and isinstance(r.json(), dict):
            version = r.json().get("version")
    except (httpx.HTTPError, ValueError):
        pass
    if name is None:
        name = server.engine or "openai-compatible"  # a version alone does not say which engine
    return f"{name} {version}" if version else name


def data_url(img: Image.Image, fmt: str, quality: int) -> str:
    """The image as a ``data:`` URL (PNG: lossless)."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=1)  # fast; still lossless
        mime = "image/png"
    else:
        img.convert("RGB").save(buf, "JPEG", quality=quality)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def request_body(name: str, prompt: str, url: str, generation: GenerationSettings, extra: dict) -> dict:
    """The chat completion request: the image first, then the prompt (as the native captioners render it)."""
    body: dict = {
        "model": name,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
            }
        ],
        "max_tokens": generation.max_new_tokens,
    }
    if generation.do_sample:
        body.update(temperature=generation.temperature, top_p=generation.top_p)
    else:
        body["temperature"] = 0.0  # greedy on every engine
    # vLLM / SGLang / lmdeploy extensions; sent only when set (transformers serve refuses unknown fields)
    if generation.min_new_tokens:
        body["min_tokens"] = generation.min_new_tokens
    if generation.repetition_penalty != 1.0:
        body["repetition_penalty"] = generation.repetition_penalty
    body.update(extra)
    return body


def retry_after(headers) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date), else None."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_choice(data: dict) -> CaptionResult:
    """One chat completion answer -> a caption, or an error row with its reason."""
    try:
        choice = data["choices"][0]
        msg = choice.get("message") or {}
    except (KeyError, IndexError, TypeError):
        return CaptionResult(None, 0, "error", f"bad_response: no choices in {str(data)[:200]}")
    finish = choice.get("finish_reason") or "stop"
    tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    if msg.get("refusal"):
        return CaptionResult(None, tokens, "error", f"refusal: {str(msg['refusal'])[:300]}")
    if finish == "content_filter":
        return CaptionResult(None, tokens, "error", "refusal: the server's content filter stopped the answer")
    text = (msg.get("content") or "").strip()
    if not text:
        return CaptionResult(
            None, tokens, "error", f"empty_content: the server returned no text (finish_reason {finish})"
        )
    return CaptionResult(text, tokens, "length" if finish == "length" else "stop")


def first_difference(a: list, b: list) -> int | None:
    """First position where two token sequences differ (a length difference counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class OpenAICaptioner(Captioner):
    """``type: openai``: captions from OpenAI-compatible servers, many requests in flight."""

    def __init__(self, spec: CaptionerSpec, generation: GenerationSettings):
        super().__init__(spec, generation)
        self.server = spec.server
        self.name = self.server.served_model or spec.model
        self.headers = _headers(self.server)
        self.loop = asyncio.new_event_loop()  # one loop for the actor's life: connection pools are reused
        self.clients: dict = {}
        self.slots: dict[str, asyncio.Semaphore] = {}
        self.in_flight = dict.fromkeys(self.server.endpoints, 0)
        self.consecutive_failures = 0
        self.requests = 0

    # the loop's objects are made inside it
    def _setup_loop_objects(self) -> None:
        import httpx

        if self.clients:
            return
        s = self.server
        timeout = httpx.Timeout(s.timeout_s, connect=s.connect_timeout_s)
        limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)
        for url in s.endpoints:
            self.clients[url] = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=self.headers)
            self.slots[url] = asyncio.Semaphore(s.concurrency)

    def caption(self, images: list[Image.Image], prompt: str) -> list[CaptionResult]:
        """Caption ``images`` concurrently; one result per image, in order.

        Raises :class:`EndpointsFailing` when too many requests in a row failed (nothing of
        the batch is returned, so its rows stay pending).
        """
        if not images:
            return []
        return self.loop.run_until_complete(self._caption_all(images, prompt))

    def _caption_batch(self, images, prompt):  # pragma: no cover - caption() is overridden
        return self.caption(images, prompt)

    async def _caption_all(self, images: list[Image.Image], prompt: str) -> list[CaptionResult]:
        self._setup_loop_objects()
        tasks = [asyncio.ensure_future(self._one(img, prompt)) for img in images]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _pick(self) -> str:
        """The endpoint with the most free slots (ties: at random, so endpoints share the load)."""
        free = {u: self.server.concurrency - n for u, n in self.in_flight.items()}
        best = max(free.values())
        return random.choice([u for u, f in free.items() if f == best])

    async def _one(self, img: Image.Image, prompt: str) -> CaptionResult:
        s = self.server
        url_data = await asyncio.to_thread(data_url, img, s.image_format, s.jpeg_quality)
        body = request_body(self.name, prompt, url_data, self.generation, s.extra_body)
        last_error = ""
        for attempt in range(s.retries + 1):
            endpoint = self._pick()
            self.in_flight[endpoint] += 1
            wait = None
            try:
                async with self.slots[endpoint]:
                    result, wait, last_error = await self._post(endpoint, body)
            finally:
                self.in_flight[endpoint] -= 1
            if result is not None:
                self.consecutive_failures = 0
                return result
            if wait is None:  # not worth retrying (a 4xx other than 429)
                break
            if attempt < s.retries:
                delay = wait if wait > 0 else min(s.max_backoff_s, s.backoff_s * 2**attempt) * random.uniform(0.8, 1.2)
                await asyncio.sleep(delay)
        self.consecutive_failures += 1
        if self.consecutive_failures >= s.max_consecutive_failures:
            raise EndpointsFailing(
                f"{self.consecutive_failures} requests in a row failed after their retries (last: {last_error}); "
                "stopping with the rows in flight still pending: fix the endpoints and rerun to resume"
            )
        return CaptionResult(None, 0, "error", last_error[:500])

    async def _post(self, endpoint: str, body: dict) -> tuple[CaptionResult | None, float | None, str]:
        """One attempt: ``(result, None, "")``, or ``(None, wait, error)`` (wait 0: back off; None: give up)."""
        import httpx

        self.requests += 1
        try:
            r = await self.clients[endpoint].post("/chat/completions", json=body)
        except httpx.TimeoutException as exc:
            return None, 0.0, f"timeout: {endpoint} gave no answer in time ({type(exc).__name__})"
        except httpx.TransportError as exc:
            return None, 0.0, f"connection_error: {endpoint}: {type(exc).__name__}: {exc}"
        if r.status_code == 200:
            try:
                return parse_choice(r.json()), None, ""
            except ValueError:
                return CaptionResult(None, 0, "error", f"bad_response: not JSON: {r.text[:200]!r}"), None, ""
        error = f"http_{r.status_code}: {endpoint}: {r.text[:300]}"
        if r.status_code in RETRY_STATUS:
            after = retry_after(r.headers)
            wait = min(after, 3600.0) if after is not None else 0.0
            return None, wait, error
        return None, None, error

    def close(self) -> None:
        if self.clients:
            self.loop.run_until_complete(asyncio.gather(*(c.aclose() for c in self.clients.values())))
            self.clients.clear()


CAPTIONERS["openai"] = OpenAICaptioner
