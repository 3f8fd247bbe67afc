"""Exponential moving average of a model's weights, updated with one multi-tensor kernel per step."""

import contextlib

import torch
from safetensors.torch import load_file, save_file

EMA_WEIGHTS_NAME = "model_ema.safetensors"


class ModelEMA:
    """`ema = decay * ema + (1 - decay) * weights` over every floating-point tensor of the state dict.

    The average keeps the model's own key names, so its file loads like the model's weights. It reads the weights
    by name from their modules at every use, not through views taken at start: `model.to(device)` (the Trainer may
    move the model after the EMA is built) and `--bf16_full_eval` / `--fp16_full_eval` (which cast it for
    evaluation) replace the tensors, and the average follows the new ones. The average stays at its own precision
    and moves to the weights' device when they move."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        state = model.state_dict()
        self.names = [name for name, tensor in state.items() if tensor.is_floating_point()]
        # (module, attribute) of each name: a parameter object survives `.to()` but a buffer is replaced by a new one.
        self.owners = [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name in self.names]
        self.shadow = [state[name].detach().clone() for name in self.names]

    @property
    def live(self) -> list[torch.Tensor]:
        """The model's tensors now."""
        return [getattr(module, attribute).detach() for module, attribute in self.owners]

    def follow_device(self, live: list[torch.Tensor]) -> None:
        if live and live[0].device != self.shadow[0].device:
            self.shadow = [shadow.to(tensor.device) for shadow, tensor in zip(self.shadow, live)]

    @torch.no_grad()
    def update(self) -> None:
        live = self.live
        self.follow_device(live)
        torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """`with ema.applied():` the model holds the average (at its weights' precision) inside the block and its
        own weights again after it; the average itself is untouched."""
        with torch.no_grad():
            live = self.live
            self.follow_device(live)
            weights = [tensor.clone() for tensor in live]
            for tensor, shadow in zip(live, self.shadow):
                tensor.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():  # the tensors read again: the block may have replaced them (an evaluation's cast)
                for tensor, saved in zip(self.live, weights):
                    tensor.copy_(saved)

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

