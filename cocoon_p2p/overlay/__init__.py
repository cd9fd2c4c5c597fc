"""Who is out there: identity-bound records, gossip discovery, the DHT, peer management.

Pure cores: signed capability records (:mod:`.capability`) and announcements
(:mod:`.announcement`), the worker directory (:mod:`.directory`), peer scores
(:mod:`.peerscore`) and the set of peers to stay connected to (:mod:`.peerset`).
Trio services that :class:`~cocoon_p2p.node.Node` composes: gossip
(:mod:`.gossip`), the dialer (:mod:`.dialer`), the advertiser (:mod:`.advertiser`)
and DHT records (:mod:`.dht`). Leaves to others: jobs, money, models.
"""
