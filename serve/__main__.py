"""``python -m serve``: an OpenAI-compatible server for LLaDA / Nemotron-Diffusion.

    python -m serve --model <orbax dir | hf dir | hub id> --mesh 8 --port 8000
    python -m serve            # no --model: the trained demo model (dllm_jax.DEMO_MODEL), no download

The HTTP server starts at once; /health answers 503 while the model loads and the
configured buckets compile, then 200. See docs/api.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger("serve")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    _http_args(p)
    _engine_args(p)
    _weights_args(p)
    p.add_argument("--log-level", default="info")
    _limit_args(p.add_argument_group("request limits (docs/api.md, Limits)"))
    _multihost_args(p.add_argument_group("multi-host (SLURM is auto-detected)"))
    args = p.parse_args(argv)
    _check_ranges(p, args)
    return args


def _model_args(p) -> None:
    """What to serve, on which devices, under which names."""
    p.add_argument("--model", help="Orbax dir from convert, HF dir or hub id (default: the trained demo model, dllm_jax.DEMO_MODEL)")
    p.add_argument("--mesh", default=None, help="'8' (data parallel) or '4x2' (data x model); default: all devices")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the checkpoint dir name or hub id)")


def _http_args(p) -> None:
    """Where to listen and whom to answer (docs/security.md)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; see --allowed-hosts and docs/security.md)")
    p.add_argument("--allowed-hosts", nargs="*", default=None,
                   help="Host names answered besides localhost/127.0.0.1/::1 ('*': any). Without an API key a "
                        "server on a loopback address answers only loopback names (DNS-rebinding protection); "
                        "with a key, or bound to another address, any name unless this flag is given")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed (0: none)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections + in-flight requests before new requests get 503")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: env DLLM_API_KEY; prefer the env var)")


def _engine_args(p) -> None:
    """The parameter dtype, batching, and the compiled programs."""
    from dllm_jax.checkpoint.dtypes import PARAM_DTYPES  # (importing jax initialises no backend)

    p.add_argument("--dtype", choices=PARAM_DTYPES, default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--max-batch-size", type=int, default=32, help="slots per compiled batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a new batch waits to fill before it starts")
    p.add_argument("--max-queue", type=int, default=1024, help="waiting sequences before 429")
    p.add_argument("--max-sessions", type=int, default=4, help="batches (decode sessions) in flight")
    p.add_argument("--steps-per-call", type=int, default=None,
                   help="denoising steps per device call; a call also ends as soon as a row finishes, so its "
                        "slot takes a waiting request at the next step (default: dllm_jax's STEPS_PER_CALL)")
    p.add_argument("--call-budget-ms", type=float, default=0.0,
                   help="when no request waits, no burst of arrivals is on and none is expected back (recent "
                        "demand), one device call runs as many denoising steps as fit in this long (at most "
                        "--max-steps-per-call; it still ends when a row finishes): fewer host round trips per "
                        "step (default 0: off, --steps-per-call always)")
    p.add_argument("--max-steps-per-call", type=int, default=32, help="the cap of --call-budget-ms")
    p.add_argument("--refill-wait-ms", type=float, default=20.0,
                   help="after rows finish, hold the next step up to this long (and a quarter of a step) for "
                        "their clients' next requests, when recent demand says they come back; it ends once as "
                        "many requests arrived as rows left (0: never)")
    p.add_argument("--batch-buckets", default=None,
                   help="compiled batch sizes, e.g. '1,8,32' (default: powers of two up to --max-batch-size)")
    p.add_argument("--prompt-buckets", default=None, help="compiled prompt lengths, e.g. '64,256,1024'")
    p.add_argument("--warmup-buckets", nargs="*", default=None,
                   help="BATCHxPROMPTxGEN programs to compile before ready, e.g. 1x128x128 32x128x128 "
                        "('none' for none; default: 1x128x128 and MAX_BATCHx128x128)")
    p.add_argument("--max-score-tokens", type=int, default=4096,
                   help="prompt positions one echo + logprobs request may score (a prompt of L tokens costs "
                        "L - 1 forward passes); more is a 413")
    p.add_argument("--max-programs", type=int, default=64,
                   help="compiled programs kept in memory (LRU over program keys and scoring programs; "
                        "0: unbounded); an evicted one compiles again when next needed")
    p.add_argument("--compile-cache", default=None, help="directory for JAX's persistent compilation cache")
    p.add_argument("--no-share-forwards", dest="share_forwards", action="store_false",
                   help="every row runs its own block-start forward (by default rows entering a block with identical "
                        "inputs, such as the n samples of one prompt, share one; same tokens either way)")
    p.add_argument("--lean-head", choices=("auto", "on", "off"), default="auto",
                   help="step programs without [batch, block, vocab] float32 logits (the head in vocabulary chunks, "
                        "docs/sampling.md 'The lean head') for requests that allow them: greedy ones, and T > 0 ones "
                        "without top_k/top_p/min_p on algorithms other than dinfer_credit. The others run the full "
                        "programs, which are different compiled programs: the two kinds never share a batch and each "
                        "compiles its own buckets (auto, the default: on for vocabularies of 32768 tokens or more, "
                        "off for small ones such as the demo model's)")


def _weights_args(p) -> None:
    """Weight updates while serving (POST /update_weights_from_disk)."""
    p.add_argument("--allow-weight-updates", action="store_true",
                   help="enable POST /update_weights_from_disk (new weights of the same architecture, no restart; "
                        "protect it with --api-key / DLLM_API_KEY)")
    p.add_argument("--weights-root", default=None,
                   help="with --allow-weight-updates: model_path must be a directory inside DIR once symlinks are "
                        "resolved (400 otherwise; default: any directory the server can read)")


def _limit_args(lim) -> None:
    """What one request may ask for (each limit's answer: docs/api.md, Limits)."""
    lim.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                     help="largest request body; more is a 413 before it is parsed (default 4 MiB)")
    lim.add_argument("--max-prompt-chars", type=int, default=0,
                     help="characters of a prompt (or all message contents) before it is tokenized; more is a 413 "
                          "(0, the default: the context x the longest vocabulary entry, which refuses no prompt that "
                          "fits the context); also /tokenize and /detokenize (tokens)")
    lim.add_argument("--max-gen-length", type=int, default=0,
                     help="canvas cap: max_tokens, block_length and max_tokens rounded up to whole blocks; steps are "
                          "at most the canvas (0, the default: the model's context)")
    lim.add_argument("--max-stop-chars", type=int, default=256,
                     help="characters of one stop string (streaming holds back that many characters)")


def _multihost_args(g) -> None:
    """jax.distributed across processes (serve.engine.multihost)."""
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--coordinator-bind-address", default=None,
                   help="host:port process 0's coordination service listens on (default: --coordinator-address; "
                        "under SLURM auto-detection jax's default, every interface)")
    g.add_argument("--peer-timeout", type=float, default=30.0,
                   help="seconds without a heartbeat from a peer process before this one reports it lost "
                        "(process 0: /health 503, then exit status 3) and exits")


def _check_ranges(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts and sizes must be > 0, waits and caps >= 0 (else argparse's usage error)."""
    positive = ("max_batch_size", "max_queue", "max_sessions", "steps_per_call", "max_steps_per_call", "max_connections",
                "max_body_bytes", "max_stop_chars", "peer_timeout")
    non_negative = ("max_wait_ms", "refill_wait_ms", "call_budget_ms", "max_score_tokens", "max_programs", "header_timeout",
                    "max_prompt_chars", "max_gen_length")
    for name in positive + non_negative:
        value = getattr(args, name)
        if value is not None and (value <= 0 if name in positive else value < 0):
            p.error(f"--{name.replace('_', '-')} must be {'> 0' if name in positive else '>= 0'} (got {value})")


def _ints(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else None


def warmup_buckets(spec, max_batch: int) -> tuple[tuple[int, int, int], ...]:
    if spec is None:
        spec = ["1x128x128", f"{max_batch}x128x128"]
    if spec in (["none"], []):
        return ()
    out = []
    for item in spec:
        parts = item.lower().split("x")
        if len(parts) != 3:
            raise SystemExit(f"--warmup-buckets {item!r} must look like BATCHxPROMPTxGEN, e.g. 8x128x128")
        out.append(tuple(int(x) for x in parts))
    return tuple(dict.fromkeys(out))


def default_name(model: str | None) -> str:
    from serve.engine.demo import DEMO_NAME

    if model is None:
        return DEMO_NAME
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from serve.engine import multihost

    multi = multihost.initialize(args.coordinator_address, args.num_processes, args.process_id,
                                 args.coordinator_bind_address)
    engine = None  # (process 0 reports a lost follower through its /health)
    liveness = multihost.Liveness(args.peer_timeout, multihost.exit_on_peer_lost(
        lambda why: engine is not None and engine.fail(why))).start() if multi else None

    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    load = _loader(args)
    if multi and jax.process_index() != 0:
        _follow(args, load, liveness)
        return
    engine = _make_engine(args, load, multi)

    def stop_distributed():
        liveness.stop()
        jax.distributed.shutdown()

    _serve(args, engine, on_shutdown=stop_distributed if multi else None)


def _loader(args):
    """The mesh (built now, logged) and the function that loads the model onto it."""
    import jax

    import dllm_jax
    from serve.engine.demo import demo_model

    mesh = dllm_jax.make_mesh(args.mesh)
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.devices.size, jax.devices()[0].platform)

    def load():
        if args.model is None:
            return demo_model(mesh=mesh, dtype=args.dtype)
        log.info("loading %s (dtype=%s)", args.model, args.dtype or "checkpoint")
        return dllm_jax.load(args.model, mesh=mesh, dtype=args.dtype)

    return load


def _follow(args, load, liveness) -> None:
    """A multi-host follower (process > 0): replay process 0's commands until it shuts down."""
    import jax

    from serve.engine import multihost
    from serve.engine.engine_types import lean_head_on

    model = load()
    model.programs.set_limit(args.max_programs or None)  # the same cache as process 0's
    model.programs.share_forwards = args.share_forwards  # the same step programs as process 0's
    # (process 0's commands carry its program keys, lean or not; the same flag keeps this model's
    # programs alike should it ever make keys itself)
    model.programs.lean_head = lean_head_on(args.lean_head, model.spec.vocab)
    multihost.follow(model, weights_root=args.weights_root)
    liveness.stop()
    jax.distributed.shutdown()


def _make_engine(args, load, multi: bool):
    """The engine (not started) with the options the flags give."""
    from serve.engine import multihost
    from serve.engine.engine import Engine, EngineOptions
    from serve.engine.metrics import Metrics

    names = args.served_model_name or [default_name(args.model)]
    options = EngineOptions(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_sessions=args.max_sessions, batch_buckets=_ints(args.batch_buckets),
        prompt_buckets=_ints(args.prompt_buckets), warmup=warmup_buckets(args.warmup_buckets, args.max_batch_size),
        max_score_tokens=args.max_score_tokens, heartbeat_s=10.0 if multi else None,
        background_compile=not multi, max_programs=args.max_programs or None, share_forwards=args.share_forwards, lean_head=args.lean_head,
        allow_weight_updates=args.allow_weight_updates, weights_root=args.weights_root,
        refill_wait_ms=args.refill_wait_ms, call_budget_ms=args.call_budget_ms,
        max_steps_per_call=args.max_steps_per_call,
        max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars or None,
        max_gen_length=args.max_gen_length or None, max_stop_chars=args.max_stop_chars,
        **({"steps_per_call": args.steps_per_call} if args.steps_per_call else {}))
    if args.allow_weight_updates and not args.api_key:
        log.warning("--allow-weight-updates without an API key: anyone who reaches this port can replace the "
                    "weights (set DLLM_API_KEY)")
    return Engine(load, names=names, options=options, metrics=Metrics(names[0]), demo=args.model is None,
                  make_executor=multihost.leader_executor if multi else None)


def _serve(args, engine, on_shutdown) -> None:
    """Start the engine and serve HTTP until uvicorn exits (the engine stops with it)."""
    import uvicorn

    from serve.api.app import create_app
    from serve.api.security import allowed_hosts, guarded_protocol

    hosts = allowed_hosts(args.host, args.api_key, args.allowed_hosts)
    app = create_app(engine, api_key=args.api_key, on_shutdown=on_shutdown, allowed_hosts=hosts)
    engine.start()
    log.info("serving %s on http://%s:%d (API key %s; Host names %s)", ", ".join(engine.names), args.host, args.port,
             "required" if args.api_key else "off", "any" if hosts is None else ", ".join(sorted(hosts)))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False,
                    http=guarded_protocol(args.header_timeout), limit_concurrency=args.max_connections)
    finally:
        engine.stop()

if __name__ == "__main__":
    main()
