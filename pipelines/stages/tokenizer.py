"""The tokenizer stage's worker: BEiT's discrete VAE trained on the pretraining images, at the
view BEiT tokenizes (the crop, resized to the patch grid times the dVAE's downsampling, as
``mixmae_core/beit.py`` resizes it), with its codebook's use checked as it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from mixmae_core.optim import build_optimizer
from mixmae_core.tokenizer import (
    CodebookCollapsed, build_tokenizer, check_codebook, code_usage, save_tokenizer, tokenizer_input, usage_perplexity,
)
from pipelines.data.collate import normalize_on_device
from pipelines.data.order import Shard
from pipelines.stages.checkpoints import ENCODER_FILE
from pipelines.stages.distributed import unwrap, world_size
from pipelines.stages.task import MicroBatch, StopTraining, Task


class TokenizerTask(Task):
    logs_model = False  # BEiT's frozen targets, not a model anyone serves; its file is the stage's checkpoint

    def build(self, device: torch.device) -> nn.Module:
        self.device = device
        spec, loop = self.spec, self.job.loop
        self.view = spec.view(self.job.model)
        self.annealed_at = anneal = max(1, round(spec.anneal_fraction * loop.total_steps))
        self.step = 0
        self.usage = torch.zeros(spec.vocab_size, dtype=torch.long, device=device)
        return build_tokenizer("dvae", **spec.architecture(), anneal_steps=anneal).to(device)

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, lr, self.spec.weight_decay, tuple(self.spec.betas))

    def batches(self, name: str, shard: Shard) -> Iterator[MicroBatch]:
        for batch in self.dataset(name, shard).iter_torch_batches(
            batch_size=self.spec.micro_batch(), device="cpu", prefetch_batches=2, drop_last=True
        ):
            yield MicroBatch(batch["image"], batch["image_id"], batch["position"])

    def loss(self, model: nn.Module, batch: MicroBatch, step: int) -> tuple[torch.Tensor, int, dict]:
        self.step = step + 1
        images = normalize_on_device(batch.inputs.to(self.device, non_blocking=True))
        pixels = torch.nn.functional.interpolate(images, size=(self.view, self.view), mode="bicubic", antialias=True)
        out = model(pixels, step)
        with torch.no_grad():
            self.usage += code_usage(unwrap(model).codes(tokenizer_input(pixels)), self.spec.vocab_size)
        return out.loss, images.shape[0], out.metrics

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The codebook's use (the codes BEiT will read, the argmax) since the last measure, over
        every worker's images. Once the temperature has annealed the stage stops with the reason
        if the book collapsed (BEiT's targets would say almost nothing); before, a Gumbel sample
        outweighs logits still close together, so their argmax says little yet."""
        usage = self.usage.clone()
        if world_size() > 1:
            dist.all_reduce(usage)
        self.usage.zero_()
        if not usage.sum():
            return {}
        if self.step >= self.annealed_at:
            try:
                check_codebook(usage, self.spec.min_code_fraction)
            except CodebookCollapsed as exc:
                raise StopTraining(f"stage {self.job.name}: {exc} (pretrain.tokenizer: base_lr, anneal_fraction, "
                                   "kl_weight, vocab_size)") from None
        return {"eval/codes_used": float((usage > 0).sum()), "eval/perplexity": float(usage_perplexity(usage))}

    def export(self, model: nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
        save_tokenizer(out / ENCODER_FILE, model, source=f"mixmae-{self.job.name}")


TASK = TokenizerTask
