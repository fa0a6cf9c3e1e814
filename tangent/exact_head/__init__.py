"""The exact head: ridge regression on frozen features φ of w0, from summed integer statistics.

- :mod:`.feature_spec` — which frozen pieces and fixed-point grid make φ (torch-free).
- :mod:`.features` — the extractor of φ from the pretrained backbone.
- :mod:`.phi_cache` — on-disk cache of the base features next to the token cache.
- :mod:`.statistics` — quantization, the exact integer statistics, the solver (λ by GCV), DP release.
- :mod:`.stats_file` — a site's statistics as one safetensors file.
- :mod:`.row_form` — a small site's statistics as its quantized rows (the server forms the sums).
"""
