"""Who may change the ledgers: identities, signed withdrawal and forget requests, hostile JSON.

- :mod:`.identity` — a reply's site id bound to its authenticated SuperNode.
- :mod:`.withdrawal` — signed withdrawal requests, the site registry and the nonce store.
- :mod:`.forgetting` — signed sample-level forgetting of the exact head's statistics.
- :mod:`.safejson` — bounded JSON from hostile input.
"""
