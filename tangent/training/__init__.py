"""Local training of the trainable part of a tangent ViT, with or without differential privacy.

- :mod:`.trainer` — :func:`~tangent.training.trainer.fit`, evaluation and the train config.
- :mod:`.losses` — RSL, MSE and cross-entropy losses, Δ regularisers.
- :mod:`.privacy` — DP-SGD through Opacus over the whole local schedule.
- :mod:`.budget` — a site's durable (ε, δ) budget, composed over every release.
"""
