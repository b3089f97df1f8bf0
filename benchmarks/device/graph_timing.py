"""GPU time of one call without its host time, for the device diagnostics (diag_cta_cost.py,
diag_host_bound.py): the call is warmed up on a side stream (as CUDA-graph capture
requires), captured once, and the graph's replay is timed by do_bench."""

from typing import Callable, Optional, Sequence

import torch
from triton.testing import do_bench


def graph_replay_ms(
    fn: Callable[[], object], rep: int = 800, grad_to_none: Optional[Sequence[torch.Tensor]] = None
) -> float:
    """Median ms of a replay of fn() captured in a CUDA graph. The .grad of the tensors in
    `grad_to_none` (as do_bench's argument) is cleared ahead of each warm-up call and of the
    capture, so the captured backward writes fresh gradients rather than accumulating."""

    def before():
        for x in grad_to_none or ():
            x.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            before()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=100, rep=rep, return_mode="median")
