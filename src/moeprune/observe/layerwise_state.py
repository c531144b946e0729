"""The resumable state of a layer-wise pass: per-layer activations and accumulator commits in a folder.

``Checkpoint`` writes each finished layer's outputs and the accumulator state atomically; ``fingerprint``
names what the state belongs to (features, seed, NAEE candidates, data, model config, sequential rules), so a
rerun only resumes a pass it can continue. Nothing is unpickled beyond tensors and plain containers.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moeprune.atomic import atomic_write, atomic_write_text
from moeprune.observe.data import batches_hash
from moeprune.observe.runner import Observer

FORMAT = "moeprune.layerwise/v1"


class Checkpoint:
    """``folder/progress.json`` -> committed layer; ``acts_{i}/b{j}.safetensors`` = inputs of layer i;
    ``observer_{i}.pt`` = accumulators after layers < i (tensors and plain containers, loaded with
    ``weights_only=True``). The per-layer call kwargs are re-recorded on resume, not stored."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.folder, self.fingerprint = os.fspath(folder), fingerprint
        os.makedirs(self.folder, exist_ok=True)

    def _p(self, *parts) -> str:
        return os.path.join(self.folder, *parts)

    def next_layer(self) -> int | None:
        """Layer to resume at, or None for a fresh run (an error if the folder holds another run)."""
        if not os.path.exists(self._p("progress.json")):
            return None
        with open(self._p("progress.json")) as f:
            prog = json.load(f)
        if prog.get("format") != FORMAT or prog.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self.folder} holds a layer-wise run of another model/data/features "
                             f"(fingerprint {prog.get('fingerprint')} != {self.fingerprint}); use an empty "
                             "checkpoint_dir or resume=False")
        return int(prog["next_layer"])

    def reset(self) -> None:
        """Forget a previous run in this folder (only the files this class writes)."""
        for name in os.listdir(self.folder):
            if name.startswith("acts_"):
                shutil.rmtree(self._p(name), ignore_errors=True)
            elif name in ("progress.json", "calls.pt") or (name.startswith("observer_") and name.endswith(".pt")):
                os.remove(self._p(name))

    def write_act(self, layer: int, b: int, h: torch.Tensor) -> None:
        os.makedirs(self._p(f"acts_{layer}"), exist_ok=True)
        atomic_write(self._p(f"acts_{layer}", f"b{b}.safetensors"),
                     lambda p: save_file({"h": h.detach().to("cpu").contiguous()}, p))

    def read_act(self, layer: int, b: int) -> torch.Tensor:
        return load_file(self._p(f"acts_{layer}", f"b{b}.safetensors"))["h"]

    def _load(self, name: str) -> Any:
        """``torch.load`` restricted to tensors and plain containers (``weights_only``): a planted or shared
        work folder cannot run code on resume."""
        try:
            return torch.load(self._p(name), weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{self._p(name)} holds objects other than tensors and plain containers; it was not "
                             f"written by this resumable pass (refusing to unpickle it): delete {self.folder} "
                             "or pass resume=False") from e

    def load_observer(self, layer: int) -> dict:
        return self._load(f"observer_{layer}.pt")

    def commit(self, next_layer: int, state: dict) -> None:
        """Outputs of ``next_layer - 1`` are in ``acts_{next_layer}``: record the accumulators, then progress."""
        atomic_write(self._p(f"observer_{next_layer}.pt"), lambda p: torch.save(state, p))
        prog = {"format": FORMAT, "fingerprint": self.fingerprint, "next_layer": next_layer}
        atomic_write_text(self._p("progress.json"), json.dumps(prog))
        for old in range(next_layer):
            shutil.rmtree(self._p(f"acts_{old}"), ignore_errors=True)
            if os.path.exists(self._p(f"observer_{old}.pt")):
                os.remove(self._p(f"observer_{old}.pt"))


def fingerprint(model: nn.Module, batches: list[dict], obs: Observer, n_layers: int,
                 sequential: dict | None = None) -> str:
    cfg = getattr(model, "config", None)
    naee = {str(li): sp.meta() for li, sp in obs.naee.items()} if obs.naee is not None else None
    blob = json.dumps({"features": obs.features, "seed": obs.seed, "recon": obs.recon_tokens, "layers": n_layers,
                       "naee": naee, "cluster_dtype": obs.cluster_dtype,
                       "data": batches_hash(batches), "n": len(batches),
                       "config": cfg.to_json_string() if hasattr(cfg, "to_json_string") else type(model).__name__,
                       **({"sequential": sequential} if sequential else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
