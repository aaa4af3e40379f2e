"""Orbax checkpoints of a training run: trainable weights, optimiser state, RNG, loop position.

Layout under `<output_dir>/checkpoints/`:

    <step>/state   trainable tree + optimiser state + rng key (orbax StandardSave, async)
    <step>/meta    JSON: optimiser step, micro step, pending log-window sums, early-stop counters
    best/<step>/   the trainable tree at the best eval loss (only with evaluation)

Orbax writes into a temporary directory and renames it when complete, so a run killed during an
async save never leaves a checkpoint that `latest_step()` would pick up. Frozen base weights are
never checkpointed (they are reloaded from the HF directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStruct tree (with shardings) to restore onto the same layout."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree_util.tree_map(leaf, tree)


def _to_saveable(state: dict) -> dict:
    # Typed PRNG keys are stored as their raw uint32 data.
    out = dict(state)
    if "rng" in out and jax.dtypes.issubdtype(out["rng"].dtype, jax.dtypes.prng_key):
        out["rng"] = jax.random.key_data(out["rng"])
    return out


def _from_saved(state: dict) -> dict:
    out = dict(state)
    if "rng" in out:
        out["rng"] = jax.random.wrap_key_data(out["rng"])
    return out


class RunCheckpoints:
    """Latest-N checkpoints of the full training state plus the best trainable weights."""

    def __init__(self, directory: str | Path, *, keep: int = 1, async_save: bool = True):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=opts, item_names=("state", "meta")
        )
        self._best: ocp.CheckpointManager | None = None

    @property
    def best(self) -> ocp.CheckpointManager:
        """The best-weights manager, made on first use: orbax creates its directory, and a run
        without evaluation must not be left with an empty `checkpoints/best/`."""
        if self._best is None:
            best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
            self._best = ocp.CheckpointManager(
                self.directory / "best", options=best_opts, item_names=("trainable", "meta")
            )
        return self._best

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saveable(state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, like_state: dict) -> tuple[dict, dict]:
        target = _abstract(_to_saveable(like_state))
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return _from_saved(out["state"]), out["meta"]

    def save_best(self, step: int, trainable: Any, meta: dict) -> None:
        if step in self.best.all_steps():
            # Written by a run killed before the state checkpoint of this step; the resumed run
            # has recomputed the same weights, so replace it.
            self.best.delete(step)
        self.best.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(trainable), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def best_step(self) -> int | None:
        if self._best is None and not (self.directory / "best").is_dir():
            return None
        return self.best.latest_step()

    def restore_best(self, like_trainable: Any) -> tuple[Any, dict]:
        step = self.best.latest_step()
        out = self.best.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(_abstract(like_trainable)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["trainable"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()
        if self._best is not None:
            self._best.close()


def host_floats(tree: Any) -> Any:
    """Device scalars -> Python floats (for JSON meta)."""
    return jax.tree_util.tree_map(lambda x: float(np.asarray(x)), tree)
