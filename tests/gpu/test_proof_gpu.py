"""verify on a GPU engine: the one-hot rows are built on the layer's device and its GEMM
reads the weight back exactly, so the fingerprint equals the trainer's CPU one (needs CUDA;
the engine-side read is ``weightsync.engines.vllm_plugin.readback``)."""

import pytest
import torch

from weightsync.engines.vllm_plugin.readback import _through_kernel
from weightsync.proof import Probe, fingerprint, partial, text

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


class _Linear(torch.nn.Module):
    """A layer as vLLM's linear layers look to the read-back: a weight and a quant method."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(w, requires_grad=False)
        self.quant_method = self

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.weight, bias)


@pytest.mark.parametrize("level", ["sample", "full"])
def test_a_cuda_layer_reads_back_exactly_what_the_trainer_fingerprints(level):
    w = torch.randn(384, 1024).to(torch.bfloat16)
    probe, name = Probe(seed=3, level=level), "model.layers.0.mlp.down_proj.weight"
    layer = _Linear(w.cuda())
    cols = probe.columns(name, 1024)
    cols = torch.arange(1024) if cols is None else cols
    w_OC = _through_kernel(layer, 1024, cols)
    assert w_OC.device.type == "cuda"
    assert text(partial(w_OC, probe, name, (0, 384), cols, 1024)) == fingerprint(w, probe, name)
