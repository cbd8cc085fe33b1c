"""Orbax checkpoints of params, and `load_run`: a trained run's config, params and tokenizer.

The on-disk layout of a training run's work dir (written by `train/`, readable from lmjax
alone, so inference never imports the trainer):

    WORKDIR/config.json            the resolved run config; its "model" section is
                                   `TransformerConfig.to_dict()`
    WORKDIR/tokenizer.model        the SentencePiece model (`SentencePieceTokenizer.save`),
                                   with tokenizer.model.json (its normalization) beside it;
    WORKDIR/tokenizer/             or, for a fine-tuned pretrained model, its Hugging Face
                                   tokenizer files (tokenizer.json, tokenizer_config.json)
    WORKDIR/checkpoints/<step>/    one orbax `CheckpointManager` step, with the items
        params/                    the raw params tree (`StandardSave`, float32)
        opt_state/                 the optimizer state (training only)
        meta/                      JSON: step, the run config, metrics at that step
        data/                      JSON per process: the data iterator's position

    cfg, params, tokenizer = lmjax.checkpoint.load_run("runs/demo")   # or gs://bucket/run
    save_params(folder, params); params = restore_params(folder, cfg)  # a bare params folder

Orbax (https://github.com/google/orbax) writes each step into a temporary folder and renames
it when complete, so a step folder that exists finished saving; a step whose files were later
damaged (a torn copy, a truncated upload) fails to restore, and `load_run` then warns and
falls back to the previous step. Only damage that is proven (`is_damaged`: a file of the step
missing, truncated or unparsable) is skipped; any other error (permissions, the network, a
timeout) is raised as a `CheckpointReadError` naming the step's folder. No pickle is ever
loaded: params are tensorstore arrays, everything else JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath

from lmjax.config import TransformerConfig
from lmjax.counting import abstract_params
from lmjax.sharding import param_shardings

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = "checkpoints"
PARAMS, OPT_STATE, META, DATA = "params", "opt_state", "meta", "data"

log = logging.getLogger(__name__)


class DamagedCheckpointError(ValueError):
  """A checkpoint step whose contents are proven bad (an item without metadata, non-finite
  params): what `is_damaged` accepts besides the errors of unreadable files."""


class CheckpointReadError(OSError):
  """A checkpoint step that could not be read for a reason other than proven damage
  (permissions, the network, a timeout, an unexpected error). It was left where it is.

  Attributes:
    step: the step.
    path: its folder.
  """

  def __init__(self, step: int, path, error: BaseException):
    super().__init__(
        f"checkpoint step {step} at {str(path)!r} could not be read ({type(error).__name__}: "
        f"{str(error)[:400]}). It is not proven damaged, so it was left in place: check access "
        "to the storage (permissions, network) and rerun; to resume from an earlier step "
        "instead, move this step's folder away yourself")
    self.step, self.path = step, path


# Tensorstore (orbax's array I/O) raises ValueError("CODE: ...") with an absl status code.
# These say the bytes on storage are bad (truncated, garbled or missing from a finished step);
# the rest (PERMISSION_DENIED, UNAVAILABLE, DEADLINE_EXCEEDED, ...) may pass.
_DAMAGE_CODES = frozenset({"DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION"})
_STATUS = re.compile(r"([A-Z][A-Z_]+): ")


def _causes(error: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def is_damaged(error: BaseException, step_dir) -> bool:
  """Whether `error`, raised while reading the checkpoint step in `step_dir`, proves the step
  damaged, so that skipping it (or moving it aside) is safe.

  Proof is an error (anywhere in its chain of causes) that says the step's bytes are bad: a
  file of the step missing while the step's folder exists, a JSON or text file that does not
  parse (`json.JSONDecodeError`, `UnicodeDecodeError`), an array file that tensorstore finds
  truncated, garbled or missing (status DATA_LOSS, OUT_OF_RANGE, NOT_FOUND or
  FAILED_PRECONDITION), or a `DamagedCheckpointError`. Any other error in the chain (an
  `OSError` such as PermissionError, ConnectionError or TimeoutError; another tensorstore
  status such as PERMISSION_DENIED or UNAVAILABLE) means the read may have failed for a reason
  that passes: not proven.
  """
  damage = False
  for e in _causes(error):
    if isinstance(e, FileNotFoundError):
      damage = damage or epath.Path(step_dir).is_dir()
    elif isinstance(e, OSError):
      return False  # PermissionError, ConnectionError, TimeoutError, EIO, ...
    elif isinstance(e, (DamagedCheckpointError, json.JSONDecodeError, UnicodeDecodeError)):
      damage = True
    elif isinstance(e, ValueError) and (m := _STATUS.match(str(e))):
      if m.group(1) not in _DAMAGE_CODES:
        return False
      damage = True
  return damage


def run_path(path: str | os.PathLike) -> epath.Path:
  """A run folder: a local path (made absolute) or a remote URL such as gs://bucket/run."""
  text = os.fspath(path)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(Path(text).expanduser().absolute())


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`WORKDIR/checkpoints`, where the steps live."""
  return run_path(workdir) / CHECKPOINT_DIR


def saved_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps saved in a work dir (finished saves only), ascending."""
  d = checkpoint_dir(workdir)
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
  """A JSON object from `path`, or a ValueError naming `what` and the file when its text is not
  a JSON object (FileNotFoundError when it is missing; other OSErrors as raised)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{what}: no file {str(path)!r}")
  text = path.read_text()  # An OSError (permissions, network) is raised as it is.
  try:
    data = json.loads(text)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{what}: {str(path)!r} is not readable JSON ({e})") from e
  if not isinstance(data, dict):
    raise ValueError(f"{what}: {str(path)!r} holds {type(data).__name__}, not an object")
  return data


def save_tokenizer(tokenizer, path: str | os.PathLike) -> None:
  """Writes a `SentencePieceTokenizer` as `path` plus `path.json` (its normalization), locally
  with `tokenizer.save`, remotely with the same two files."""
  if not is_remote(path):
    tokenizer.save(Path(os.fspath(path)))
    return
  path = epath.Path(path)
  norm = tokenizer.normalization
  path.write_bytes(tokenizer.model_proto)
  path.with_name(path.name + ".json").write_text(json.dumps(
      {"normalization": None if norm is None else dataclasses.asdict(norm)}, indent=1))


def load_tokenizer(path: str | os.PathLike):
  """Reads what `save_tokenizer` wrote (a `SentencePieceTokenizer`)."""
  from lmjax.tokenizer import NormalizationConfig, SentencePieceTokenizer

  if not is_remote(path):
    return SentencePieceTokenizer.load(path)
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no SentencePiece model file at {str(path)!r}")
  settings = path.with_name(path.name + ".json")
  norm = None
  if settings.exists():
    d = json.loads(settings.read_text()).get("normalization")
    norm = None if d is None else NormalizationConfig(**d)
  return SentencePieceTokenizer(path.read_bytes(), norm)


HF_TOKENIZER_DIR = "tokenizer"


def has_tokenizer(workdir: str | os.PathLike) -> bool:
  """Whether a work dir holds a tokenizer (`save_run_tokenizer`)."""
  w = run_path(workdir)
  return (w / TOKENIZER_FILE).exists() or (w / HF_TOKENIZER_DIR / "tokenizer.json").exists()


def save_run_tokenizer(tokenizer, workdir: str | os.PathLike) -> None:
  """Writes a run's tokenizer: a `SentencePieceTokenizer` as `tokenizer.model` (+ `.json`), a
  pretrained model's `HFTokenizer` (fine-tuning jobs) as the Hugging Face files in
  `tokenizer/` (`tokenizer.json`, `tokenizer_config.json` with its chat template, ...)."""
  w = run_path(workdir)
  if hasattr(tokenizer, "model_proto"):
    save_tokenizer(tokenizer, w / TOKENIZER_FILE)
    return
  if not hasattr(tokenizer, "save") or not hasattr(tokenizer, "backend"):
    raise ValueError(f"cannot save a {type(tokenizer).__name__} in a run folder: lmjax saves "
                     "SentencePieceTokenizer and HFTokenizer")
  if not is_remote(w):
    tokenizer.save(Path(os.fspath(w / HF_TOKENIZER_DIR)))
    return
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    for f in tokenizer.save(tmp):
      (w / HF_TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
      (w / HF_TOKENIZER_DIR / Path(f).name).write_bytes(Path(f).read_bytes())


def load_run_tokenizer(workdir: str | os.PathLike):
  """Reads what `save_run_tokenizer` wrote."""
  w = run_path(workdir)
  hf = w / HF_TOKENIZER_DIR
  if not (hf / "tokenizer.json").exists():
    return load_tokenizer(w / TOKENIZER_FILE)
  from lmjax.convert.hf_tokenizer import HFTokenizer

  if not is_remote(w):
    return HFTokenizer.from_folder(Path(os.fspath(hf)))
  import tempfile

  with tempfile.TemporaryDirectory() as tmp:
    for f in hf.iterdir():
      (Path(tmp) / f.name).write_bytes(f.read_bytes())
    return HFTokenizer.from_folder(tmp)


def read_step_meta(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
  """The JSON `meta` item of one step (step, run config, metrics)."""
  return read_json(checkpoint_dir(workdir) / str(step) / META / "metadata",
                   f"checkpoint step {step} meta")


def model_config_of(run_config: dict[str, Any], where: str) -> TransformerConfig:
  """The `TransformerConfig` of a run config dict's "model" section."""
  if not isinstance(run_config.get("model"), dict):
    raise ValueError(f"{where} has no 'model' section (a TransformerConfig dict)")
  try:
    return TransformerConfig.from_dict(run_config["model"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: its 'model' section is not a valid TransformerConfig: {e}") from e


def abstract_target(config: TransformerConfig, mesh: jax.sharding.Mesh | None = None,
                    head: str = "lm") -> Any:
  """`ShapeDtypeStruct`s (with shardings) of the params of `config`, for restoring into
  (`head`: "lm", the config's model; "reward", its `lmjax.RewardModel`)."""
  if head == "reward":
    return _reward_target(config, mesh)
  shapes = abstract_params(config)
  if mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: sharding, shapes)
  else:
    from lmjax.counting import example_inputs, model_for

    model = model_for(config)
    shardings = param_shardings(
        lambda: model.init(jax.random.key(0), *example_inputs(config))["params"], mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      shardings)


def _reward_target(config: TransformerConfig, mesh: jax.sharding.Mesh | None) -> Any:
  from lmjax.counting import example_inputs
  from lmjax.heads import RewardModel

  def init():
    return RewardModel(config).init(jax.random.key(0), *example_inputs(config))["params"]
  shapes = nn.meta.unbox(jax.eval_shape(init))
  if mesh is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: sharding, shapes)
  else:
    shardings = param_shardings(init, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      shardings)


HEADS = ("lm", "reward")


def run_head(run_config: dict[str, Any]) -> str:
  """What a run trained: "lm" (a language model) or "reward" (a `RewardModel`, whose run
  config says `"head": "reward"`)."""
  return run_config.get("head") or "lm"


def save_params(directory: str | os.PathLike, params: Any) -> epath.Path:
  """Writes a params tree to a new folder `directory` (an error if it exists)."""
  directory = run_path(directory)
  if directory.exists():
    raise FileExistsError(f"{str(directory)!r} exists; save_params never overwrites a folder")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, params)
  return directory


def restore_params(directory: str | os.PathLike, config: TransformerConfig,
                   mesh: jax.sharding.Mesh | None = None) -> Any:
  """Reads a params folder written by `save_params` into the shapes of `config`."""
  directory = run_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"no params folder at {str(directory)!r}")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(directory, abstract_target(config, mesh))


class _DropReadOnlyNotice(logging.Filter):
  """Drops orbax's "Given directory is read only" warning: opening a manager read-only is how
  lmjax promises not to write, not a property of the folder (which may well be writable)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


def _manager(workdir) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                         enable_async_checkpointing=False)
  absl_log, notice = logging.getLogger("absl"), _DropReadOnlyNotice()  # orbax logs with absl
  absl_log.addFilter(notice)
  try:
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=(PARAMS, OPT_STATE, META, DATA))
  finally:
    absl_log.removeFilter(notice)


def restore_step_params(workdir: str | os.PathLike, step: int, config: TransformerConfig,
                        mesh: jax.sharding.Mesh | None = None, head: str = "lm") -> Any:
  """The params of one checkpoint step (no optimizer state is read)."""
  manager = _manager(workdir)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        **{PARAMS: ocp.args.StandardRestore(abstract_target(config, mesh, head))}))
  finally:
    manager.close()
  return restored[PARAMS]


def load_run(workdir: str | os.PathLike, step: int | None = None, *,
             mesh: jax.sharding.Mesh | None = None, head: str = "lm"):
  """The model config, params and tokenizer of a training run's work dir.

  Args:
    workdir: the run's folder (layout in the module docstring).
    step: a saved step; None takes the newest step that restores. A newest step proven
      damaged (`is_damaged`) is skipped with a warning.
    mesh: shard the params over this mesh by `lmjax.sharding`'s rules (default: one device).
    head: what the caller expects: "lm" (a language model) or "reward" (a reward run's
      `RewardModel` params, `lmjax.load_reward_model`); a run of the other kind is an error.

  A PEFT run (its config's `peft.method` set) gives its base with the adapter of `adapter/`
  (`lmjax.peft.runs`; `step` is not used): LoRA merged into the params, other methods as
  `lmjax.peft.Adapted`.

  Returns:
    `(config, params, tokenizer)`: a `TransformerConfig`, the raw params tree, and the
    tokenizer the run trained with (`SentencePieceTokenizer`, or a fine-tuned pretrained
    model's `HFTokenizer` with its chat template).

  Raises:
    CheckpointReadError: a step failed to read for a reason that is not proven damage
      (permissions, network, ...): raised at once, with the step's folder, not skipped.
    ValueError: no step restores (each proven damaged), or `step` does not restore.
  """
  workdir = run_path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"no run folder at {str(workdir)!r}")
  run_config = read_json(workdir / CONFIG_FILE, f"run {str(workdir)!r}")
  config = model_config_of(run_config, str(workdir / CONFIG_FILE))
  if head not in HEADS:
    raise ValueError(f"head={head!r}; heads: {list(HEADS)}")
  if run_head(run_config) != head:
    raise ValueError(
        f"run {str(workdir)!r} is a reward model (python -m train.reward), not a language "
        "model: give a policy/language model here (read a reward model with "
        "lmjax.load_reward_model)" if head == "lm" else
        f"run {str(workdir)!r} is a language model, not a reward model: train one with "
        "python -m train.reward")
  from lmjax.peft import runs as peft_runs  # a PEFT run: its base, then its adapter/

  if peft_runs.is_peft_run(run_config):
    return peft_runs.load_peft_run(workdir, config, mesh, head)
  tokenizer = load_run_tokenizer(workdir)
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"run {str(workdir)!r} has no checkpoints in "
                            f"{str(checkpoint_dir(workdir))!r}")
  if step is not None:
    if step not in steps:
      raise ValueError(f"run {str(workdir)!r} has no checkpoint at step {step}; saved steps "
                       f"are {steps}")
    candidates = [step]
  else:
    candidates = steps[::-1]
  failures = []
  for s in candidates:
    step_dir = checkpoint_dir(workdir) / str(s)
    try:
      step_config = config
      try:  # The step's own config (the params' true shapes), when its meta reads.
        step_config = model_config_of(read_step_meta(workdir, s).get("config", {}),
                                      f"checkpoint step {s}")
      except (OSError, ValueError) as e:
        if isinstance(e, OSError) and not is_damaged(e, step_dir):
          raise
      params = restore_step_params(workdir, s, step_config, mesh, head)
      return step_config, params, tokenizer
    except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many kinds)
      if not is_damaged(e, step_dir):
        raise CheckpointReadError(s, step_dir, e) from e
      failures.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
      if step is not None:
        break
      log.warning("checkpoint step %d of %s does not restore (%s: %s); trying the previous step",
                  s, workdir, type(e).__name__, str(e)[:300])
  raise ValueError(f"no checkpoint of run {str(workdir)!r} restores:\n  " + "\n  ".join(failures))
