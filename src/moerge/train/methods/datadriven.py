"""LoRA initialisations computed from the task's data, all through peft 0.21's own implementations.

Each sees the run's first `init_batches` training batches (`InitData.batches` in `prepare`):
- `eva`: A = top right-singular vectors of each layer's input activations (incremental SVD over the
  batches, all non-padding tokens), B = 0; the base is unchanged. Ranks are kept uniform (rho = 1).
- `corda`: SVD of W times the covariance of its inputs; `corda_mode: ipm` (instruction-previewed:
  the adapter takes the components the task's activations use most, from task batches) or `kpm`
  (knowledge-preserving: the adapter takes the components general data uses least; give general
  text in `calibration_text`, else the task batches stand in). The base becomes the residual.
- `lora_ga`: the adapter is aligned with the SVD of the full-weight gradient estimated on the
  batches; the base absorbs the initial offset.
Residual inits are saved converted to plain rank-2r LoRA against the original base.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moerge.errors import MoergeError
from moerge.train.methods.base import Batch, InitData, LoraOptions, register
from moerge.train.methods.builtin import PeftMethod, ResidualInitMethod, _lora
from moerge.yamlconf import CommaList

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from moerge.train.config import TrainConfig


class DataInitOptions(LoraOptions):
    """LoRA whose initial factors are computed from the run's first training batches."""

    init_batches: int = Field(4, ge=1, description="training batches shown to the initialisation")


class CordaOptions(DataInitOptions):
    corda_mode: Literal["ipm", "kpm"] = Field(
        "ipm", description="ipm (instruction-previewed, fits the task) or kpm (knowledge-preserving)"
    )
    calibration_text: CommaList | None = Field(
        None, description="kpm: general text whose activations should be preserved (default: task batches)"
    )


class DataInit:
    """Mixin of the data-driven inits: they see `init_batches` training batches in `prepare`."""

    def init_batches(self, cfg: TrainConfig) -> int:
        return cfg.method_options.init_batches


def _forward_all(model: nn.Module, batches: list[Batch], *, backward: bool = False) -> None:
    """Run the batches through the model (and back, to accumulate gradients)."""
    for batch in batches:
        out = model(**batch)
        if backward:
            (out.loss / len(batches)).backward()


def _forward_rows(model: nn.Module, batches: list[Batch]) -> None:
    """One unpadded sequence at a time: peft's CorDA hooks expect a batch of one."""
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            model(input_ids=ids[mask.bool()][None])


class Eva(DataInit, PeftMethod):
    def __init__(self) -> None:
        super().__init__("eva", self.config, options=DataInitOptions)

    @staticmethod
    def config(cfg: TrainConfig):
        from peft import EvaConfig

        return _lora(cfg, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0, use_label_mask=False))

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path, data: InitData) -> nn.Module:
        import torch
        from peft import get_peft_model, initialize_lora_eva_weights

        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, self.config(cfg))
        inputs = [{k: v for k, v in b.items() if k != "labels"} for b in data.batches]
        with torch.no_grad():
            initialize_lora_eva_weights(peft_model, dataloader=inputs, show_progress_bar=False)
        return peft_model


class Corda(DataInit, ResidualInitMethod):
    def __init__(self) -> None:
        super().__init__("corda", self.config, options=CordaOptions)

    @staticmethod
    def config(cfg: TrainConfig):
        from peft.tuners.lora.config import CordaConfig

        return _lora(
            cfg, init_lora_weights="corda", corda_config=CordaConfig(corda_method=cfg.method_options.corda_mode)
        )

    def build(self, model: nn.Module, cfg: TrainConfig, data: InitData) -> nn.Module:
        import torch
        from peft import get_peft_model

        try:
            from peft.tuners.lora.corda import preprocess_corda
        except ModuleNotFoundError as exc:  # peft's corda module imports `attrs` without declaring it
            raise MoergeError(
                f"method 'corda': peft's CorDA code needs the package {exc.name!r}, which is not installed "
                "(pip install attrs)"
            ) from None
        calibration = (
            calibration_batches(data.tokenizer, cfg, model) if cfg.method_options.calibration_text else data.batches
        )
        config = self.config(cfg)
        with torch.no_grad():
            preprocess_corda(model, config, run_model=lambda: _forward_rows(model, calibration))
        return get_peft_model(model, config)


def calibration_batches(tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, model: nn.Module) -> list[Batch]:
    """`init_batches` batches of `max_length`-token blocks of the calibration text (CorDA's KPM)."""
    from moerge.data.prompts import Encoded, collate
    from moerge.train.data import text_chunks

    chunks = text_chunks(list(cfg.method_options.calibration_text or []), tokenizer, cfg.max_length)
    device = next(model.parameters()).device
    groups = [chunks[i : i + cfg.batch_size] for i in range(0, len(chunks), cfg.batch_size)][
        : cfg.method_options.init_batches
    ]
    batches = [collate([Encoded(c, c) for c in group], tokenizer.pad_token_id) for group in groups]
    return [{k: v.to(device) for k, v in batch.items() if k != "labels"} for batch in batches]


class LoraGA(DataInit, ResidualInitMethod):
    def __init__(self) -> None:
        super().__init__("lora_ga", self.config, options=DataInitOptions)

    @staticmethod
    def config(cfg: TrainConfig):
        from peft import LoraGAConfig

        return _lora(cfg, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def build(self, model: nn.Module, cfg: TrainConfig, data: InitData) -> nn.Module:
        from peft import get_peft_model, preprocess_loraga

        config = self.config(cfg)
        preprocess_loraga(model, config, train_step=lambda: _forward_all(model, data.batches, backward=True))
        return get_peft_model(model, config)


register(Eva())
register(Corda())
register(LoraGA())
