"""Exponential moving average of a model's weights, updated with one multi-tensor kernel per step."""

import torch
from safetensors.torch import load_file, save_file

EMA_WEIGHTS_NAME = "model_ema.safetensors"


class ModelEMA:
    """`ema = decay * ema + (1 - decay) * weights` over every floating-point tensor of the state dict.

    The average keeps the model's own key names, so its file loads like the model's weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        state = model.state_dict()
        self.names = [name for name, tensor in state.items() if tensor.is_floating_point()]
        self.live = [state[name] for name in self.names]  # views of the model's storage, updated in place
        self.shadow = [tensor.detach().clone() for tensor in self.live]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, self.live, 1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the average (call again to swap back)."""
        for live, shadow in zip(self.live, self.shadow):
            buffer = live.clone()
            live.copy_(shadow)
            shadow.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy on the CPU (the live average keeps changing)."""
        return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA weights lack {len(missing)} tensors of the model, e.g. {missing[:3]}.")
        for name, tensor in zip(self.names, self.shadow):
            tensor.copy_(state[name])

    def save(self, path: str) -> None:
        save_file(self.state_dict(), path)

    def load(self, path: str) -> None:
        self.load_state_dict(load_file(path))
