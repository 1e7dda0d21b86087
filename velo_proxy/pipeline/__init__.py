"""The steps of the request path, one module each; ``velo_proxy.engine.ChatEngine`` runs them in order.

- ``context``: ``RequestContext`` (the request, its caller, target, cacheability and trace) and the
  ``Choice`` of what to do;
- ``guard``: deadline + circuit breaker + metric + log line around every fail-open call;
- ``components``: the embedder, store, verifier, exact tier and experience stream, called through the guard;
- ``lookup``: exact tier, then embed + search + verify;
- ``decide``: the policy's decision, made into one ``Choice``;
- ``act``: the HTTP response: serve from the cache, forward, forward with context, JSON or SSE;
- ``after``: the work after the response (store the answer, use counts, exact-tier copies, shadow
  checks, experience, feedback) and the eviction tick.
"""
