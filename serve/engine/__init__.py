"""The engine: no HTTP in sight (it never imports ``serve.api``).

``engine`` the interface the front end sees (load, health, submit, score, weight updates,
control); ``engine_types`` its plain data (options, model info, states); ``errors`` its domain
errors (``serve.api.app.api_error`` maps them to HTTP); ``requests`` what crosses between the
event loop and the scheduler thread (SeqRequest, Event, Handle, Inbox); ``scheduler`` the
thread that batches into decode sessions, applying ``policy`` (pure batching decisions);
``compiler`` background compiles; ``executor`` the device-facing command sequence
(``host_copy`` host copies of released weights); ``weights`` versions and the swapper,
``weight_reading`` reading / staging / confining new weights; ``multihost`` jax.distributed and
the follower loop; ``metrics`` Prometheus metrics; ``demo`` the demo model ``python -m serve``
loads without ``--model``.
"""
