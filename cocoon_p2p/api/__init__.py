"""What the outside world talks to: the OpenAI-compatible gateway and Prometheus metrics over HTTP.

Decides: OpenAI request and response shapes, sans-IO (:mod:`.openai`, the public surface,
over :mod:`.wire` for errors and bounded JSON, :mod:`.params` for which parameters are
honoured, ignored or refused, :mod:`.chat` and :mod:`.completions`); a small h11 server
(:mod:`.http`); API keys (:mod:`.keys`); the models offered (:mod:`.models`); and the
gateway that turns requests into jobs (:mod:`.gateway`, with :mod:`.choices` running a
request's choices and :mod:`.results` turning job outcomes into answers), serving the
node's metrics and its own request metrics (:mod:`.metrics`; each service of the node
reports its own, see :meth:`~cocoon_p2p.node.Node.metrics`). Sits on top of
:class:`~cocoon_p2p.node.Node`.
"""
