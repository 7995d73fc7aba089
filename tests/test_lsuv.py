import pytest
import torch
from torch import nn

from napari_cnnt.model import CNNTDenoiser
from napari_cnnt.training.lsuv import lsuv_init

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _output_variances(model, x):
    """Variance of every convolution's output, the fused q/k/v ones computed from the attention input."""
    out = {}
    hooks = []
    for name, m in model.named_modules():
        if name.endswith(".attn"):
            def pre(mod, args, name=name):
                for p in ("query", "key", "value"):
                    out[f"{name}.{p}.conv2d"] = float(getattr(mod, p)(args[0]).var())
            hooks.append(m.register_forward_pre_hook(pre))
        elif isinstance(m, nn.Conv2d):
            def post(mod, args, output, name=name):
                out.setdefault(name, float(output.var()))
            hooks.append(m.register_forward_hook(post))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_lsuv_gives_unit_variance_everywhere(tiny_config):
    model = CNNTDenoiser(tiny_config.replace(norm_mode="mixed", blocks=(8, 8, 16), dropout_p=0.0))
    x = torch.rand(2, 4, 1, 16, 16)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    before = _output_variances(model.train(), x)
    running = model.cnnt.down2.blocks[0].bn1.running_var.clone()
    adjusted = lsuv_init(model, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.cnnt.down2.blocks[0].bn1.running_var, running)
    after = _output_variances(model.train(), x)

    assert set(adjusted) == convs  # fused query/key/value convolutions included
    assert set(after) == convs
    assert max(abs(v - 1) for v in after.values()) < 0.1
    assert max(abs(v - 1) for v in before.values()) > 0.5
    assert all(not m.bias.detach().any() for m in model.modules() if isinstance(m, nn.Conv2d))


def test_lsuv_is_reproducible_with_a_generator(tiny_config):
    x = torch.rand(2, 4, 1, 16, 16)
    a, b = CNNTDenoiser(tiny_config), CNNTDenoiser(tiny_config)
    lsuv_init(a, x, generator=torch.Generator().manual_seed(3))
    lsuv_init(b, x, generator=torch.Generator().manual_seed(3))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
