"""The architecture of a CNNT denoiser, as one JSON-serialisable object.

A config fully determines the network's modules and so the keys and shapes
of its state dict: two models built from equal configs can exchange weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

NORM_MODES = ("layer", "batch", "instance", "mixed")


class ConfigError(ValueError):
    """A model configuration that cannot describe a working network."""


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")
_INT_FIELDS = ("blocks_per_set", "n_head", "kernel_size", "stride", "padding", "time", "height", "width")


def _flag(name: str, value: Any) -> bool:
    """A yes/no setting from JSON: a bool, 0/1 or the words true/false; anything else is refused
    (``bool("false")`` is true, which would turn a feature on that the file turns off)."""
    if isinstance(value, (bool, int)) and not isinstance(value, float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"invalid CNNT configuration: {name} must be true or false, got {value!r}")


def _whole(name: str, value: Any) -> int:
    """A count from JSON: an int (or a whole float, or its digits); fractions are refused, not truncated."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid CNNT configuration: {name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ConfigError(f"invalid CNNT configuration: {name} must be a whole number, got {value!r}")


@dataclass(frozen=True)
class CNNTConfig:
    """Hyper-parameters of the CNNT denoiser (``docs/cnnt.md`` sections 1-5).

    ``time``, ``height`` and ``width`` describe the patch the model was trained
    on. Only the ``layer`` norm depends on them (its weights have shape
    ``[C, H, W]``); the other modes take any size divisible by
    ``2 ** (levels - 1)`` and use them as the default tile.
    """

    blocks: tuple[int, ...] = (32, 64, 96)
    blocks_per_set: int = 4
    n_head: int = 8
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    dropout_p: float = 0.1
    norm_mode: str = "instance"
    with_mixer: bool = True
    is_causal: bool = False
    no_residual: bool = False
    pre_channels: tuple[int, int] = (16, 32)
    time: int = 16
    height: int = 128
    width: int = 128

    def __post_init__(self) -> None:
        # Accept lists (from JSON) but store tuples, so configs stay hashable.
        for name in ("blocks", "pre_channels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"invalid CNNT configuration: {name} must be a list of channel counts, "
                                  f"got {value!r}")
            object.__setattr__(self, name, tuple(_whole(name, b) for b in value))
        for name in _INT_FIELDS:
            object.__setattr__(self, name, _whole(name, getattr(self, name)))
        for name in ("with_mixer", "is_causal", "no_residual"):
            object.__setattr__(self, name, _flag(name, getattr(self, name)))
        if not isinstance(self.norm_mode, str):
            raise ConfigError(f"invalid CNNT configuration: norm_mode must be a name, got {self.norm_mode!r}")
        try:
            object.__setattr__(self, "dropout_p", float(self.dropout_p))
        except (TypeError, ValueError):
            raise ConfigError(f"invalid CNNT configuration: dropout_p must be a number, "
                              f"got {self.dropout_p!r}") from None
        self._validate()

    @property
    def levels(self) -> int:
        return len(self.blocks)

    @property
    def size_multiple(self) -> int:
        """H and W of every input must be a multiple of this."""
        return 2 ** (self.levels - 1)

    def check_frame_size(self, height: int, width: int, what: str = "frames") -> None:
        """Refuse frames the network cannot take: the one home of this rule for inputs, tiles and patches.

        Each level halves H and W, so both must be multiples of :attr:`size_multiple`;
        layer norm fixes them when the network is built (``docs/cnnt.md`` sections 2 and 4).
        """
        if height < 1 or width < 1:
            raise ValueError(f"{what} {height} x {width}: height and width must be positive")
        m = self.size_multiple
        if height % m or width % m:
            raise ValueError(f"{what} {height} x {width} is not a multiple of {m}, which this model's "
                             f"{self.levels} levels need")
        if self.norm_mode == "layer" and (height, width) != (self.height, self.width):
            raise ValueError(f"this model uses layer norm and only takes {self.height} x {self.width} {what}, got "
                             f"{height} x {width}; other sizes need norm_mode batch, instance or mixed")

    def norm_modes(self) -> list[str]:
        """The norm of each block set, in the order down..., up..., final."""
        n_sets = 2 * self.levels - 1
        if self.norm_mode != "mixed":
            return [self.norm_mode] * n_sets
        return ["instance"] + ["batch"] * (n_sets - 2) + ["instance"]

    def _validate(self) -> None:
        self._validate_channels()
        self._validate_layers()

    @staticmethod
    def _fail(msg: str) -> None:
        raise ConfigError(f"invalid CNNT configuration: {msg}")

    def _validate_channels(self) -> None:
        fail = self._fail
        if not 2 <= len(self.blocks) <= 4:
            fail(f"blocks must list 2 to 4 channel counts, got {list(self.blocks)}")
        if any(b <= 0 for b in self.blocks):
            fail(f"channel counts must be positive, got {list(self.blocks)}")
        if self.n_head <= 0:
            fail(f"n_head must be positive, got {self.n_head}")
        for b in self.blocks:
            if b % self.n_head:
                fail(f"every channel count must be divisible by n_head={self.n_head}, got {b}")
        if len(self.pre_channels) != 2 or any(c <= 0 for c in self.pre_channels):
            fail(f"pre_channels must be two positive channel counts, got {list(self.pre_channels)}")

    def _validate_layers(self) -> None:
        fail = self._fail
        if self.blocks_per_set < 1:
            fail(f"blocks_per_set must be at least 1, got {self.blocks_per_set}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            fail(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.stride != 1 or self.padding != self.kernel_size // 2:
            fail(
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding} "
                "would change the image size, but the residual connections need it unchanged "
                f"(use stride=1, padding={self.kernel_size // 2})"
            )
        if not 0.0 <= self.dropout_p < 1.0:  # also refuses NaN
            fail(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        if self.norm_mode not in NORM_MODES:
            fail(f"norm_mode must be one of {', '.join(NORM_MODES)}, got {self.norm_mode!r}")
        if self.time < 1:
            fail(f"time must be at least 1, got {self.time}")
        m = self.size_multiple
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < m or v % m:
                fail(f"{name}={v} must be a positive multiple of {m} for {self.levels} levels")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks"] = list(self.blocks)
        d["pre_channels"] = list(self.pre_channels)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CNNTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown CNNT configuration field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> CNNTConfig:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ConfigError(f"a CNNT configuration is a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    @classmethod
    def from_reference(cls, run: dict[str, Any]) -> CNNTConfig:
        """Read the model fields of a reference run configuration (its flat JSON).

        Everything that does not shape the network (paths, optimiser, losses,
        experiment tracking) is ignored.
        """
        fields: dict[str, Any] = {}
        for name in ("blocks", "blocks_per_set", "n_head", "kernel_size", "stride", "padding",
                     "dropout_p", "norm_mode", "with_mixer", "no_residual", "time"):
            if name in run and run[name] is not None:
                fields[name] = run[name]
        if run.get("is_causal") is not None:
            fields["is_causal"] = run["is_causal"]
        for name in ("height", "width"):
            v = run.get(name)
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                fields[name] = v
        if run.get("use_conv_3D"):
            raise ConfigError("reference runs with use_conv_3D=true are not supported")
        for name in ("kernel_size", "stride", "padding"):
            v = fields.get(name)
            if isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    raise ConfigError(f"non-square {name}={list(v)} is not supported")
                fields[name] = v[0]
        return cls(**fields)

    def replace(self, **changes: Any) -> CNNTConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, CNNTConfig] = {
    # The paper's defaults: 12.3 M parameters.
    "reference": CNNTConfig(),
    # Interactive use on a laptop CPU: attention across time at every level,
    # about 25x less compute per pixel than "reference" (0.33 vs 8.1 MFLOP).
    "small": CNNTConfig(
        blocks=(16, 24, 32), blocks_per_set=1, n_head=4, pre_channels=(8, 16), dropout_p=0.0
    ),
}


def preset(name: str) -> CNNTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


__all__ = ["CNNTConfig", "ConfigError", "NORM_MODES", "PRESETS", "preset"]
