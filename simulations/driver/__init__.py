"""`make simulate`: 50 virtual sites fine-tune TAFT-1 through Flower, then 3 of them are unlearned.

    python -m simulations.run                     # 50 sites, IID, remove 3, warm cache ≈ minutes
    python -m simulations.run --num-clients 3 --train-subset 600 --epochs 1   # smoke

What it does, in order:

0. checks the data sets (Fashion-MNIST, or ``--dataset``/``--test-dataset``: an .npz or an
   ImageFolder) and takes the number of classes from them; a malformed one stops here;
1. builds the trunk-token cache of the train + test sets once (progress bar) in
   ``--cache-dir``; every virtual client later opens it memory-mapped (no copies in Ray workers);
   with the exact head on (run config ``exact-head``, not in DP runs) also the φ cache of both
   (tangent/exact_head/phi_cache.py), from which the sites read their features;
2. ``flwr run .`` (mode='train') against Flower's *local simulation federation*. Flower 1.41 has no
   ``flower-simulation`` command: the local connection starts a detached SuperLink in simulation
   mode and the size comes from ``--federation-config``::

       flwr run . --federation-config "num-supernodes=50 client-resources-num-cpus=1" \\
                  --run-config "federation-mode='simulation' state-dir='<run dir>' mode='train' cache-dir='...'" --stream

   Each site trains one TAFT contribution from w0 (and sends its exact-head statistics in the same
   reply) and the ServerApp records it in the ledger(s), evaluates the composed model on the test
   split and writes a report;
3. from the ledger, outside Flower: the ensemble of ``--ensemble-sites`` sites' models (weighted
   logit average) against the model composed of the same sites, on ``--ensemble-subset`` cached
   test images; the stats ledger's
   sums against the central statistics of every trained row, computed in one pass over the φ
   cache, and the exact head's test accuracy (simulations/exact_head_check.py);
4. ``flwr run .`` (mode='unlearn', remove-sites=...): subtraction only, no client trains;
5. checks the removal is bit-identical to a fresh aggregation of the remaining contributions
   (both ledgers, streamed: one contribution in memory at a time; the stats ledger also against
   the central statistics of the remaining rows);
6. writes ``runs/<timestamp>/summary.json`` (+ ``runs/latest``), a plot, and prints a table.

The SuperLink runs with a private ``FLWR_HOME`` inside the run directory and on free ports, so
it never meets another user's local SuperLink; everything started (SuperLink, its ServerApp and
simulation processes, Ray) is stopped by PID at the end, on failure and on Ctrl-C. Peak memory
is sampled over that whole process tree: ``peak_private_mib`` (RssAnon + RssShmem summed),
``peak_rss_mib``, ``peak_pss_mib``; ``run_dir_bytes`` is the run directory's size at the end. While
a `flwr run` runs, a line every 30 s says how many sites the ledger holds.

    python -m simulations.run --num-clients 1000 --remove 100   # 60 images a site (docs/scale.md)
    python -m simulations.run --dp-epsilon 1      # private: ε = 1 a site, DP-TAFT and the DP head composed

With ``--dp-epsilon E`` every site's contribution spends ε = E in all: DP-TAFT and the DP exact
head's noisy statistics (``--dp-head-share`` of the μ², default 0.9) composed in one accountant
(docs/dp_head.md); DP-SGD runs at the run config's ``dp-batch-size`` and ``dp-lr`` (128, 0.012;
``--lr`` sets the latter). The exact
head's central check of step 3 cannot apply to noisy statistics; simulations/driver/dp_head.py
checks the ledger's sums against a fresh sum of the releases as stored, and removal against the
staying sites' releases, bit for bit.
"""
from __future__ import annotations

from pathlib import Path

# One concern per module: processes.py (SuperLink, `flwr run`, the process tree and its memory),
# config.py (the run configuration), data.py (data sets and caches), checks.py (the checks after
# each run), report.py (plot and table), cli.py (the arguments and main); simulations/run.py is the
# entry point.

#: the repository root: `flwr run` runs this app, pyproject.toml holds its defaults
REPO = Path(__file__).resolve().parents[2]
