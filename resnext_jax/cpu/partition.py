"""Custom partitioning for our FFI ops: a batch sharded over devices or processes stays sharded.

Without these rules XLA would gather the whole batch onto every device around a custom call. Each op runs on
each device's images; ops whose results are sums over the batch (kernel gradients, batch-norm statistics) are
psum'd over the batch's mesh axes.
"""

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P


def batch_partitioned(fn, rule, num_batched, reduce_batch=False):
  """fn(*operands) as a custom_partitioning op whose first `num_batched` operands are sharded on the batch.

  `rule` is the Shardy rule (einsum-like, batch factor 'n'). Every other dimension is replicated. With
  `reduce_batch`, the results are sums over the batch: each device's are psum'd over the batch's mesh axes;
  otherwise results are per image and stay batch-sharded. Without these rules XLA would gather the whole
  batch onto every device around the custom call.
  """
  op = custom_partitioning(fn)

  def shardings(mesh, arg_shapes, result_shape):
    spec = arg_shapes[0].sharding.spec
    batch = spec[0] if len(spec) else None
    sharded, replicated = NamedSharding(mesh, P(batch)), NamedSharding(mesh, P())
    args = tuple(sharded if i < num_batched else replicated for i in range(len(arg_shapes)))
    results = jax.tree.map(lambda _: replicated if reduce_batch else sharded, result_shape)
    return batch, results, args

  def partition(mesh, arg_shapes, result_shape):
    batch, results, args = shardings(mesh, arg_shapes, result_shape)
    def lower(*operands):
      out = fn(*operands)
      return jax.lax.psum(out, batch) if reduce_batch and batch is not None else out
    return mesh, lower, results, args

  def infer(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes, result_shape)[1]

  op.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                   reduction_factors=("n",) if reduce_batch else (),
                   need_replication_factors=_factors_in_order(rule, skip="n"))
  return op


def _factors_in_order(rule, skip):
  """The rule's factors in order of first appearance (Shardy wants special factors sorted), less `skip`."""
  seen = []
  for f in rule.replace(",", " ").replace("->", " ").split():
    if f != skip and f not in seen:
      seen.append(f)
  return tuple(seen)
