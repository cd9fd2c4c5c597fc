"""What the outside world talks to: the OpenAI-compatible gateway and Prometheus metrics over HTTP.

Decides: OpenAI request and response shapes (:mod:`.openai`), a small h11 server
(:mod:`.http`), the gateway that turns requests into jobs (:mod:`.gateway`) and
the text exposition of a node's metrics (:mod:`.nodemetrics`). Sits on top of
:class:`~cocoon_p2p.node.Node`.
"""
