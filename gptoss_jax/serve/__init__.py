"""An OpenAI-compatible HTTP server (Chat Completions, Responses) on the continuous-batching engine.

    from gptoss_jax.serve import create_app
    app = create_app(engine, model_id="gpt-oss-20b", max_context=4096)   # then: uvicorn.run(app)
"""

from gptoss_jax.serve.app import create_app

__all__ = ["create_app"]
