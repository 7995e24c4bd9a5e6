"""The HTTP front end (what vLLM calls ``entrypoints``): everything that speaks HTTP / JSON.

``app`` FastAPI factory, auth, and the mapping of every engine error to HTTP (``api_error``);
``routes`` thin OpenAI endpoints; ``protocol`` request models and the error body;
``field_policy`` what each field may be; ``request_params`` request -> SamplingParams with
per-family defaults; ``serving`` request -> engine -> response (``prompts`` prompt ids and their
bounds, ``choices`` a call's choices in flight); ``streaming`` SSE; ``detok`` incremental
UTF-8-safe text with stop strings; ``logprobs`` token texts and logprob shapes; ``responses``
bodies from ``openai.types``; ``chat_tokens`` token-exact multi-turn chat for RL clients;
``rl`` / ``rl_request`` / ``rl_control`` SGLang's native API; ``playground`` GET / (``static/``);
``security`` Host checks and header timeouts; ``limits`` the request body cap.

It drives the engine only through ``serve.engine.engine.Engine`` (and the plain types of
``serve.engine.requests`` / ``engine_types``); the engine never imports this package.
"""
