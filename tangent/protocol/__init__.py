"""What the sites and the server agree on, without Flower: the model spec, limits, signed requests.

- :mod:`.spec` — the base-model spec the server sends and w0 built from it.
- :mod:`.limits` — protocol limits and site-id rules every side enforces.
- :mod:`.signed_requests` — keys, canonical bytes and signatures of withdrawal / forget requests.
- :mod:`.signatures` — canonical JSON, key fingerprints and Ed25519 checks of ledger heads and exports.
"""
