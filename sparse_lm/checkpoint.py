"""Orbax checkpoints of a training run: state, data-iterator position and run metadata.

Layout: ``<workdir>/checkpoints/<step>/{state,data,meta}``. Orbax writes each step
into a temporary folder (``<step>.orbax-checkpoint-tmp``) and renames it only when
complete, so a run killed in the middle of an (asynchronous) write leaves nothing
that a later run would trust; the next training run deletes such leftovers. A step
folder that is nevertheless unreadable (damaged on disk, or cut short by a kill while
Orbax was deleting an old step) is reported as a ``CheckpointError``, never loaded in
part. docs/reliability.md lists the faults that were tried.

``meta`` records the model's shape-defining config; restoring into a different model
is refused before any array is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from sparse_lm import sharding
from sparse_lm.steps import ModelFns, TrainState, abstract_model, split_model

ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message says why and what to do."""


def model_signature(config: ml_collections.ConfigDict) -> dict:
    """The config fields that decide parameter shapes and what the parameters mean."""
    m, a = config.model, config.attention
    return {
        "vocab_size": m.vocab_size,
        "num_layers": m.num_layers,
        "d_model": m.d_model,
        "num_heads": m.num_heads,
        "ff_ratio": m.ff_ratio,
        "qk_ratio": m.qk_ratio,
        "pos_shape": list(m.pos_shape),
        "seq_len": config.data.seq_len,
        "pattern": a.pattern,
        "stride": a.stride,
        "summary": a.summary,
        "combine": a.combine,
        "distinct_summaries": a.distinct_summaries,
        # Orbax would silently cast float32 parameters to another dtype on restore.
        "param_dtype": m.param_dtype,
        # Stacked (scanned) and per-layer parameters are different trees.
        "scan_layers": bool(m.get("scan_layers", False)),
    }


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


class Checkpointer:
    """Saves and restores one run's checkpoints. ``read_only`` for evaluation and sampling."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = checkpoint_dir(workdir)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(
                f"no checkpoints in {self.directory}: train first with "
                f"`python scripts/train.py --config ... --workdir {Path(workdir)}`, or point "
                "--workdir at a training run's folder."
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            read_only=read_only,
            # Leftovers of writes cut short by a kill; never for readers, which must not
            # touch a training run's folder.
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: TrainState, data_state: dict, config: ml_collections.ConfigDict
    ) -> None:
        meta = {"step": step, "model": model_signature(config), "config": config.to_json()}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_dict(state)),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def _unreadable(self, step: int, error: BaseException) -> CheckpointError:
        return CheckpointError(
            f"the checkpoint at step {step} in {self.directory} cannot be read "
            f"({type(error).__name__}: {_brief(error)}). It is damaged or incomplete; "
            f"nothing was loaded. Delete the folder {self.directory / str(step)} to resume from "
            f"the previous checkpoint (steps on disk: {self.all_steps()})."
        )

    def read_meta(self, step: int) -> dict:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(restored["meta"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._unreadable(step, e) from e

    def check_compatible(self, step: int, config: ml_collections.ConfigDict) -> None:
        saved = self.read_meta(step)["model"]
        wanted = model_signature(config)
        # A field missing from an older checkpoint's signature is not compared.
        diffs = [
            f"{k}: checkpoint {saved[k]!r}, config {v!r}"
            for k, v in wanted.items()
            if k in saved and saved[k] != v
        ]
        if diffs:
            # The layer layout is a speed setting whose default changed (enwik8 unrolls
            # its layers since session 5): when it is the only difference, say how to
            # resume such a run as it was written.
            layout = ""
            if len(diffs) == 1 and "scan_layers" in saved and saved["scan_layers"] != wanted["scan_layers"]:
                layout = (f" To resume it, add --config.model.scan_layers={saved['scan_layers']} "
                          "(the checkpoint's layer layout).")
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} was written by a different "
                f"model ({'; '.join(diffs)}). Nothing was loaded. Use the config that wrote it, "
                f"or a new --workdir for the new model.{layout}"
            )

    def restore(
        self, step: int, abstract_state: TrainState, config: ml_collections.ConfigDict
    ) -> tuple[TrainState, dict]:
        """Restores state (placed as ``abstract_state``'s shardings) and the data position."""
        self.check_compatible(step, config)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_as_dict(abstract_state)),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except ValueError as e:
            if "tree structures do not match" in str(e):
                # Orbax compares the saved tree with the target before reading arrays.
                raise CheckpointError(
                    f"the checkpoint at step {step} in {self.directory} holds a training state "
                    f"of a different structure than this config builds ({_brief(e)}); "
                    "optimizer settings such as optim.clip_norm probably differ. Nothing was "
                    "loaded. Use the config that wrote it, or a new --workdir."
                ) from e
            raise self._unreadable(step, e) from e
        except (OSError, KeyError, TypeError) as e:
            raise self._unreadable(step, e) from e
        return TrainState(**restored["state"]), restored["data"]

    def restore_params(self, step: int, abstract_params: Any, config: ml_collections.ConfigDict) -> Any:
        """Restores only the parameters (for evaluation and sampling)."""
        self.check_compatible(step, config)
        # partial_restore reads only the 'params' subtree: optimizer moments (twice the
        # parameters' size) are never loaded.
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item={"params": abstract_params},
                        restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract_params)},
                        partial_restore=True,
                    )
                ),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise self._unreadable(step, e) from e
        return restored["state"]["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _brief(error: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, cut to ``limit`` characters, for a one-paragraph error."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or "no details"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_dict(state: TrainState) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def restore_for_inference(
    config: ml_collections.ConfigDict, workdir: str | Path, *, step: int | None = None
) -> tuple[ModelFns, Any, int, Any]:
    """Parameters of a training run's checkpoint, read-only: (fns, params, step, mesh).

    ``step`` None means the latest. Nothing is ever written into the run's folder.
    """
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(
                f"no complete checkpoint in {ckpt.directory}; train first, or wait for the "
                "running training to write its first checkpoint."
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {ckpt.directory}; available: {steps}."
            )
        mesh = sharding.make_mesh(config.mesh)
        fns, abstract_params = split_model(abstract_model(config))
        shardings = sharding.tree_shardings(abstract_params, fns.logical_specs(), mesh)
        target = sharding.abstract_with_shardings(abstract_params, shardings)
        params = ckpt.restore_params(step, target, config)
    finally:
        ckpt.close()
    return fns, params, step, mesh
