"""What the outside world talks to: the OpenAI-compatible gateway and Prometheus metrics over HTTP.

Decides: OpenAI request and response shapes (:mod:`.openai`), a small h11 server
(:mod:`.http`), and the gateway that turns requests into jobs and serves the
node's metrics (:mod:`.gateway`; each service of the node reports its own, see
:meth:`~cocoon_p2p.node.Node.metrics`). Sits on top of :class:`~cocoon_p2p.node.Node`.
"""
