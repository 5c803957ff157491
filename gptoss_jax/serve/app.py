"""The FastAPI app: models, health, metrics, Chat Completions and Responses on one engine."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, AsyncIterator

import tiktoken
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from gptoss_jax import tokenizer as tok
from gptoss_jax.serve import chat, errors, responses
from gptoss_jax.serve.errors import APIError
from gptoss_jax.serve.metrics import Metrics, Timing
from gptoss_jax.serve.runner import EngineLike, Job, cancel_on_disconnect, check_available


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def create_app(engine: EngineLike, *, model_id: str, max_context: int, encoding: tiktoken.Encoding | None = None,
               store_capacity: int = 1024) -> FastAPI:
    """An OpenAI-compatible app serving ``model_id`` from ``engine`` (started, and warmed up or warming)."""
    app = FastAPI(title="gptoss-jax", docs_url=None, redoc_url=None)
    metrics = Metrics(engine.stats)
    endpoints = {"/v1/chat/completions": "chat", "/v1/responses": "responses"}

    def count_error(request: Request, status: int) -> None:
        if request.url.path in endpoints:
            metrics.outcome(endpoints[request.url.path], f"http_{status}")

    errors.install(app, count_error)
    encoding = encoding or tok.get_encoding()
    store = responses.ResponseStore(store_capacity)
    created = int(time.time())
    app.state.engine, app.state.metrics, app.state.store = engine, metrics, store

    def check_model(model: str | None) -> str:
        if model is not None and model != model_id:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found", type="invalid_request_error")
        return model_id

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "gptoss-jax"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": f"{type(engine.error).__name__}: {engine.error}"}, 503)
        if not engine.ready:
            return JSONResponse({"status": "starting"}, 503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", **_plain(engine.stats())})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: chat.ChatRequest, request: Request) -> Any:
        model = check_model(body.model)
        check_available(engine)
        prepared = chat.prepare(body, encoding, max_context)
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        job = Job(engine, encoding, prepared.prompt, prepared.settings, Timing(metrics, "chat"),
                  prepared.stop_strings, max_param)
        job.submit()
        completion_id, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            writer = chat.ChunkWriter(completion_id, model, now, prepared.parallel_tool_calls, include_usage)
            return EventSourceResponse(_chat_stream(job, writer), sep="\n", ping=15,
                                       background=BackgroundTask(job.cancel_unless_finished))
        async with cancel_on_disconnect(request, job):
            await job.run()
        reason = job.finish_reason()
        return chat.completion(completion_id, model, now, job.stream, reason, _chat_usage(job),
                               prepared.parallel_tool_calls)

    @app.post("/v1/responses", response_model=None)
    async def create_response(body: responses.ResponsesRequest, request: Request) -> Any:
        model = check_model(body.model)
        check_available(engine)
        prepared = responses.prepare(body, encoding, max_context, store)
        job = Job(engine, encoding, prepared.prompt, prepared.settings, Timing(metrics, "responses"),
                  max_param="max_output_tokens")
        job.submit()
        response_id, now = f"resp_{secrets.token_hex(12)}", int(time.time())
        output = responses.Output(body.parallel_tool_calls)

        def final(status: str, **extra: Any) -> dict[str, Any]:
            incomplete = status == "incomplete"
            items = output.items(job.stream.parts, incomplete) if status != "in_progress" else []
            return responses.response_object(response_id, now, model, body, prepared.effort, status=status,
                                             output=items, usage_=None if status == "in_progress"
                                             else _responses_usage(job), **extra)

        def finished() -> dict[str, Any]:
            reason = job.finish_reason()
            response = (final("incomplete", incomplete_reason="max_output_tokens") if reason == "length"
                        else final("completed"))
            if body.store:
                history, names = responses.stored_history(prepared, job.stream.parts, output)
                store.put(responses.Stored(response, history, names))
            return response

        if body.stream:
            return EventSourceResponse(_responses_stream(job, output, final, finished), sep="\n", ping=15,
                                       background=BackgroundTask(job.cancel_unless_finished))
        async with cancel_on_disconnect(request, job):
            await job.run()
        return finished()

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        stored = store.get(response_id)
        if stored is None:
            raise responses.not_found(response_id)
        return stored.response

    return app


def _plain(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}


def _chat_usage(job: Job) -> dict[str, Any]:
    return chat.usage(job.prompt_tokens, job.stream.tokens_seen, job.cached_tokens, job.stream.reasoning_tokens)


def _responses_usage(job: Job) -> dict[str, Any]:
    return responses.usage(job.prompt_tokens, job.stream.tokens_seen, job.cached_tokens, job.stream.reasoning_tokens)


async def _chat_stream(job: Job, writer: chat.ChunkWriter) -> AsyncIterator[dict[str, str]]:
    """``data:`` chunks, the usage chunk if asked for, then ``[DONE]``; a failure is an error chunk."""
    yield {"data": _dumps(writer.first())}
    async for events in job.events():
        for chunk in writer.events(events):
            yield {"data": _dumps(chunk)}
    try:
        reason = job.finish_reason()
    except APIError as err:
        yield {"data": _dumps(err.body())}
        return
    yield {"data": _dumps(writer.last(reason))}
    if writer.include_usage:
        yield {"data": _dumps(writer.usage_chunk(_chat_usage(job)))}
    yield {"data": "[DONE]"}


async def _responses_stream(job: Job, output: responses.Output, final: Any, finished: Any
                            ) -> AsyncIterator[dict[str, str]]:
    """``response.created``, ``response.in_progress``, the items' events, then completed | incomplete | failed."""
    writer = responses.EventWriter(output)
    snapshot = final("in_progress")
    for kind in ("response.created", "response.in_progress"):
        yield {"event": kind, "data": _dumps(writer.event(kind, response=snapshot))}
    async for events in job.events():
        incomplete = job.handle.finish_reason == "length"
        for event in writer.events(events, incomplete):
            yield {"event": event["type"], "data": _dumps(event)}
    try:
        response = finished()
    except APIError as err:
        failed = final("failed", error={"code": err.code or "server_error", "message": err.message})
        yield {"event": "response.failed", "data": _dumps(writer.event("response.failed", response=failed))}
        return
    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    yield {"event": kind, "data": _dumps(writer.event(kind, response=response))}
