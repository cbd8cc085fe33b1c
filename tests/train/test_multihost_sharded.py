"""A model split over a mesh that spans two processes (`jax.distributed`, gloo on CPU, 2 devices
each): the params' model width (fsdp) and heads / vocab (tensor) live partly on the other host.

One two-process launch (compiling is the cost) does both:
- decoding: `infer.generate` (greedy, a ragged batch) from params split over fsdp x tensor
  (fsdp across the hosts) and over tensor = 4 (tensor across the hosts), under `jax.set_mesh`,
  gives on both hosts the tokens of the unsharded model and of one process with 4 devices;
- training: `train.pretrain` with `mesh.fsdp=2 mesh.tensor=2` (fsdp across the hosts), each
  host reading its own rows, gives the losses and params of one process with 4 devices fed the
  same global batches;
- data-parallel training: `train.pretrain` with `mesh.data=-1` (the data axis across the hosts)
  trains like one process with 4 devices fed the same global batches, and only process 0 prints.
"""

import json

import jax
import numpy as np

import infer
import lmjax
from tests.lmjax import helpers
from tests.train.multihost_util import TwoHosts, two_processes
from tests.train.trainer_util import data_dirs, tiny_config, tiny_sets, train_losses  # noqa: F401
from train import data as data_lib
from train import pretrain

STEPS = 2
DATA_STEPS = 3  # the data-parallel run
DECODE_MESHES = ((1, 2, 2), (1, 1, 4))  # (data, fsdp, tensor): fsdp, then tensor across hosts
TRAIN_MESH = ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"]
PROMPTS = [[5, 7, 9], [11, 3, 4, 8, 20, 1], [2], [4, 4]]  # ragged
NEW_TOKENS = 5

# Run as `python -c SCRIPT OUT --set ...` by each of the two processes.
SCRIPT = """
import json
import sys
import jax
import numpy as np
from train import config as config_lib
from train import job as job_lib
from train import pretrain

job_lib.initialize_distributed(True)
import lmjax
from tests.train import test_multihost_sharded as t

out, data_sets, sets, rank = sys.argv[1], json.loads(sys.argv[2]), sys.argv[4:], jax.process_index()
facts = {"hosts_per_mesh": {}, "tokens": {}}
model, params, x = t.decode_model()
for sizes in t.DECODE_MESHES:
  mesh = lmjax.make_mesh(*sizes)
  facts["hosts_per_mesh"][str(sizes)] = t.hosts_along(mesh)
  facts["tokens"][str(sizes)] = t.sharded_generate(model, params, x, mesh)

config = config_lib.apply_overrides(config_lib.preset("demo"), sets)
result = pretrain.run(config, f"{out}/run")
kernel = result["state"].params["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]
facts["kernel_split"] = t.split_over_hosts(kernel)
params = lmjax.sharding.to_host(result["state"].params)
if rank == 0:
  np.savez(f"{out}/params.npz", **t.flat(params))
with open(f"{out}/facts_{rank}.json", "w") as f:
  json.dump(facts, f)

pretrain.run(config_lib.apply_overrides(config_lib.preset("demo"), data_sets), f"{out}/data_run")
"""


def decode_model():
  """The tiny decoder of the decoding check, unit-scale random params (numpy, so greedy output
  varies), and its init input."""
  cfg = helpers.tiny(vocab_size=96)  # 96: the vocab splits over tensor = 4
  model = lmjax.model_for(cfg)
  x = np.zeros((1, 8), np.int32)
  return model, jax.tree.map(np.asarray, helpers.random_params(model, (x,), 3)), x


def sharded_generate(model, params, x, mesh) -> list[list[int]]:
  """Greedy tokens of `PROMPTS` from `params` placed by the logical rules on `mesh`."""
  shardings = lmjax.sharding.param_shardings(
      lambda: model.init(jax.random.key(0), x)["params"], mesh)
  placed = jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda i: a[i]),
                        params, shardings)
  with jax.set_mesh(mesh):
    return infer.generate(model, placed, PROMPTS, max_new_tokens=NEW_TOKENS).tokens


def hosts_along(mesh) -> dict[str, int]:
  """Per mesh axis, how many processes one line of devices along it touches."""
  out = {}
  for i, name in enumerate(mesh.axis_names):
    lines = np.moveaxis(mesh.devices, i, -1).reshape(-1, mesh.devices.shape[i])
    out[name] = max(len({d.process_index for d in line}) for line in lines)
  return out


def split_over_hosts(x: jax.Array) -> bool:
  """Whether `x` is cut into pieces that live on different processes (not replicated)."""
  return bool(not x.is_fully_addressable and not x.is_fully_replicated
              and x.addressable_shards[0].data.size < x.size)


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_model_across_two_processes(data_dirs, tmp_path):  # noqa: F811
  # Per host 4 rows (8 in all); the tokenizer is trained first so both hosts find it cached.
  extra = [f"train.steps={STEPS}", "train.eval_batches=1"]
  host_config = tiny_config(data_dirs, steps=STEPS, extra=["data.batch_size=4", *extra])
  tokenizer = data_lib.build_tokenizer(host_config.data)
  sets = tiny_sets(data_dirs, steps=STEPS, extra=["data.batch_size=4", *extra, *TRAIN_MESH,
                                                  "mesh.distributed=true"])
  data_sets = tiny_sets(data_dirs, steps=DATA_STEPS, extra=["data.batch_size=4", "mesh.data=-1",
                                                            "mesh.distributed=true"])
  outs = two_processes(["-c", SCRIPT, str(tmp_path), json.dumps(data_sets), "--set", *sets])
  assert "4 cpu devices, 2 process(es)" in outs[0]
  assert "run config" in outs[0] and "run config" not in outs[1]  # Process 0 prints.
  facts = [json.loads((tmp_path / f"facts_{i}.json").read_text()) for i in range(2)]

  # Decoding: each mesh puts the named axis across the hosts; both hosts get the tokens of the
  # unsharded model and of one process with the same mesh on 4 devices.
  model, params, x = decode_model()
  want = infer.generate(model, params, PROMPTS, max_new_tokens=NEW_TOKENS).tokens
  assert len({tuple(r) for r in want}) > 1 and all(len(r) == NEW_TOKENS for r in want)
  assert facts[0]["hosts_per_mesh"] == {"(1, 2, 2)": dict(data=1, fsdp=2, tensor=1, sequence=1),
                                        "(1, 1, 4)": dict(data=1, fsdp=1, tensor=2, sequence=1)}
  for sizes in DECODE_MESHES:
    one = sharded_generate(model, params, x, lmjax.make_mesh(*sizes, devices=jax.devices()[:4]))
    assert one == want, sizes
    for f in facts:
      assert f["tokens"][str(sizes)] == want, sizes

  # Training: the params really were cut across the hosts; losses and params equal one process
  # with the same mesh on 4 devices fed host 0's rows then host 1's at every step.
  assert all(f["kernel_split"] for f in facts)
  single = tmp_path / "single"
  config = tiny_config(data_dirs, steps=STEPS, extra=["data.batch_size=8", *extra, *TRAIN_MESH])
  result = pretrain.run(config, single, train_batches=TwoHosts(host_config, tokenizer))
  got, want = train_losses(tmp_path / "run"), train_losses(single)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  assert len(set(got.values())) == STEPS  # The losses move: the steps really trained.
  a, b = np.load(tmp_path / "params.npz"), flat(jax.device_get(result["state"].params))
  assert sorted(a.files) == sorted(b)
  for k in b:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)

  # Data-parallel training: losses equal one process with 4 devices fed host 0's 4 rows then
  # host 1's 4 rows at every step.
  data_host = tiny_config(data_dirs, steps=DATA_STEPS, extra=["data.batch_size=4"])
  single = tmp_path / "data_single"
  config = tiny_config(data_dirs, steps=DATA_STEPS, extra=["data.batch_size=8", "mesh.data=4"])
  pretrain.run(config, single, train_batches=TwoHosts(data_host, tokenizer))
  got, want = train_losses(tmp_path / "data_run"), train_losses(single)
  assert sorted(got) == list(range(1, DATA_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  assert len(set(got.values())) == DATA_STEPS  # The losses move: the steps really trained.
