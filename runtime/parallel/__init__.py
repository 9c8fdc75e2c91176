"""Scale-out on torch.distributed (NCCL on GPUs, gloo on CPUs).

- `state`: this process's place in its replica (TP x PP ranks) and the process groups.
- `layers`: tensor-parallel linear / embedding layers, checkpoint slicing per rank, pipeline stages.
- `worker`: the per-step broadcast from rank 0, the pipeline forward, the loop of the other ranks.
- `launch`: the processes of a data-parallel replica (spawn, ready, watch, stop), other nodes.
- `replica_set`: the front's replicas as one object (start, watch, route, send, control fan-out, stop).
- `router`: cache-aware routing of requests across data-parallel replicas.
"""
