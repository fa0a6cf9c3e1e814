"""The run configuration the driver hands both `flwr run`s: pyproject's defaults, the federation's size
and resources, and a brought backbone's keys (torch-free).
"""
from __future__ import annotations

import argparse

from simulations.driver import REPO


def pyproject_config() -> dict:
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def federation_config(args: argparse.Namespace) -> dict:
    """`flwr run --federation-config` of the local simulation federation (Flower's SimulationConfig
    keys): the sites, and the Ray resources each virtual client asks for."""
    federation = {"num-supernodes": args.num_clients, "client-resources-num-cpus": args.cpus_per_client}
    if args.gpus_per_client is not None:
        federation["client-resources-num-gpus"] = float(args.gpus_per_client)
    return federation


def resolve_backbone(args, defaults: dict, user_config: dict) -> dict:
    """The run-config keys of --backbone/--backbone-weights, resolved against the file (torch-free):
    its sha256 pins it for the ServerApp and every site, and img-size 0 (the default with a
    weights file and no --img-size) becomes the checkpoint's input size. ValueError if refused."""
    from tangent.protocol.spec import ModelSpec

    config: dict = {}
    if args.backbone_weights is not None:
        config |= {"backbone-weights": str(args.backbone_weights.expanduser().resolve()), "img-size": 0}
    for key, value in (("backbone", args.backbone), ("img-size", args.img_size)):
        if value is not None:
            config[key] = value
    spec = ModelSpec.from_config(defaults | config | user_config).resolved()  # CheckpointError is a ValueError
    if spec.backbone_weights:
        config |= {"img-size": spec.img_size, "backbone-sha256": spec.backbone_sha256}
    return config
