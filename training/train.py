"""fit(config) → run directory: the training loop, early stopping on validation NDCG@10, best checkpoint.

Run directory layout (everything evaluation and export need, nothing pickled):
    config.yaml          the resolved TrainConfig
    data.json            data fingerprint, counts, behaviour names, source
    item_ids.json        raw item id per internal index (0 = PAD)
    encoder_config.json  + encoder.safetensors: the best checkpoint by validation NDCG@10
    metrics.jsonl        one line per epoch: loss, validation metrics, seconds
    valid_metrics.json, test_metrics.json   of the best checkpoint
    curves.png           loss and validation NDCG@10 / HR@10 per epoch
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from training.artifact import PAD_INDEX
from training.batches import TrainBatch, causal_train_batches, masked_train_batches
from training.config import TrainConfig
from training.data import SequenceData, load_sequences
from training.evaluate import evaluate_model, item_popularity
from training.losses import bce_loss, full_softmax_loss, sampled_softmax_loss
from training.model import EncoderConfig, SequenceEncoder, load_encoder_dir, save_encoder

log = logging.getLogger(__name__)
SELECTION_METRIC = "NDCG@10"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("optim.device: cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encoder_config_for(config: TrainConfig, data: SequenceData) -> EncoderConfig:
    model = config.model
    use_attributes = model.use_attributes and data.item_attributes is not None
    return EncoderConfig(
        num_items=data.num_items,
        num_behaviors=data.num_behaviors if model.use_behaviors else 0,
        num_attributes=data.num_attributes if use_attributes else 0,
        max_attributes_per_item=data.item_attributes.shape[1] if use_attributes else 0,
        max_len=model.max_len, hidden_size=model.hidden_size, num_layers=model.num_layers,
        num_heads=model.num_heads, intermediate_size=model.intermediate_size, dropout=model.dropout,
        attention_dropout=model.attention_dropout, backbone=model.backbone, similarity=model.similarity,
        temperature=model.temperature, frequency_mix=model.frequency_mix, frequency_cutoff=model.frequency_cutoff,
    )


class NegativeSampler:
    """Draws negatives from the training item distribution and knows each one's log expected count (logQ)."""

    def __init__(self, popularity: np.ndarray, device: torch.device):
        counts = torch.as_tensor(popularity, dtype=torch.float64)
        counts[PAD_INDEX] = 0
        self.probabilities = (counts / counts.sum()).float().to(device)
        self.log_probabilities = torch.log(self.probabilities.clamp(min=1e-12))

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.multinomial(self.probabilities, count, replacement=True, generator=generator)


def batch_loss(model: SequenceEncoder, batch: TrainBatch, config: TrainConfig, sampler: NegativeSampler | None):
    hidden = model(batch.items, batch.behaviors, batch.lengths)  # (B, T, D)
    positions = batch.targets != PAD_INDEX
    user_vectors = model.project_users(hidden[positions])  # (N, D): only real positions reach the loss
    targets = batch.targets[positions]  # (N,)
    loss_name = config.optim.loss
    if loss_name == "ce":
        item_vectors = model.output_item_vectors()[: model.config.num_items + 1]
        excluded = seen_before(batch, positions, model.config.num_items) if config.optim.mask_history else None
        return full_softmax_loss(user_vectors, item_vectors, targets, excluded)
    if loss_name == "sampled":
        negatives = sampler.sample(config.optim.num_negatives)  # (M,) shared by the batch
        unique, inverse = torch.unique(torch.cat([targets, negatives]), return_inverse=True)
        vectors = model.output_item_vectors(unique)[inverse]  # only the sampled rows: O(batch), not O(catalogue)
        expected = sampler.log_probabilities + np.log(config.optim.num_negatives)
        return sampled_softmax_loss(
            user_vectors, vectors[: len(targets)], vectors[len(targets):], expected[targets], expected[negatives],
            targets.unsqueeze(1) == negatives.unsqueeze(0),
        )
    negatives = torch.randint(1, model.config.num_items + 1, targets.shape, device=targets.device)
    return bce_loss(user_vectors, model.output_item_vectors(targets), model.output_item_vectors(negatives))


def seen_before(batch: TrainBatch, positions: torch.Tensor, num_items: int) -> torch.Tensor:
    """(N, T) item indices each predicted position has already seen (its causal prefix), PAD elsewhere.

    Evaluation never ranks seen items, so excluding them from the softmax denominator trains what is evaluated;
    a prefix item equal to the target is kept (repeat purchases stay learnable).
    """
    T = batch.items.shape[1]
    steps = torch.arange(T, device=batch.items.device)
    prefix = steps.unsqueeze(0) <= steps.unsqueeze(1)  # (T, T): position t sees inputs 0..t
    seen = batch.items.unsqueeze(1).expand(-1, T, -1).masked_fill(~prefix, PAD_INDEX)  # (B, T, T)
    seen = seen[positions]  # (N, T)
    keep = (seen != batch.targets[positions].unsqueeze(1)) & (seen <= num_items)  # [MASK] inputs are not items
    return seen.masked_fill(~keep, PAD_INDEX)


def lr_factor(step: int, total_steps: int, optim) -> float:
    """Multiplier of optim.lr: linear warm-up over warmup_steps, then constant or cosine decay to 0 at total_steps."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "cosine":
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["loss"] for h in history], marker=".")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key in ("NDCG@10", "HR@10"):
        right.plot(epochs, [h["valid"][key] for h in history], marker=".", label=f"valid {key}")
    right.set(xlabel="epoch", title="validation (full ranking)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_run_metadata(run_dir: Path, config: TrainConfig, data: SequenceData) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (run_dir / "item_ids.json").write_text(json.dumps([str(x) for x in data.item_ids]))
    np.save(run_dir / "item_popularity.npy", item_popularity(data, "test").astype(np.float32))  # cold-start fallback
    info = {
        "fingerprint": data.fingerprint, "num_users": data.num_users, "num_items": data.num_items,
        "num_events": int(len(data.items)), "behavior_names": list(data.behavior_names),
        "num_attributes": data.num_attributes, "source": config.data.path or "synthetic",
    }
    (run_dir / "data.json").write_text(json.dumps(info, indent=2))


def fit(config: TrainConfig, run_dir: str | Path, data: SequenceData | None = None, progress: bool = True) -> dict:
    """Train, keep the best checkpoint by validation NDCG@10, evaluate it on test; returns the test metrics."""
    run_dir = Path(run_dir)
    seed_everything(config.optim.seed)
    if config.optim.num_threads:
        torch.set_num_threads(config.optim.num_threads)
    device = resolve_device(config.optim.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and config.optim.bf16 else None
    data = data if data is not None else load_sequences(config.data)
    write_run_metadata(run_dir, config, data)

    model = SequenceEncoder(encoder_config_for(config, data), data.item_attributes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    steps_per_epoch = -(-int(np.sum(np.diff(data.offsets) > 3)) // config.optim.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch * config.optim.max_epochs, config.optim)
    )
    sampler = NegativeSampler(item_popularity(data, "train"), device) if config.optim.loss == "sampled" else None
    rng = np.random.default_rng(config.optim.seed)
    valid_users = None
    if config.eval.valid_users and config.eval.valid_users < data.num_users:
        valid_users = np.sort(rng.choice(data.num_users, config.eval.valid_users, replace=False))

    history: list[dict] = []
    best_score, best_epoch, started = -1.0, 0, time.perf_counter()
    metrics_file = open(run_dir / "metrics.jsonl", "w")
    for epoch in range(1, config.optim.max_epochs + 1):
        model.train()
        epoch_start, total_loss, steps = time.perf_counter(), 0.0, 0
        if model.config.causal:
            batches = causal_train_batches(data, model.config, config.optim.batch_size, rng, config.model.item_dropout)
        else:
            batches = masked_train_batches(data, model.config, config.optim.batch_size, config.model.mask_probability, rng)
        for batch in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress):
            batch = batch.to(device)
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = batch_loss(model, batch, config, sampler)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
            steps += 1
        train_seconds = time.perf_counter() - epoch_start
        valid = evaluate_model(model, data, "valid", config.eval.ks, config.eval.batch_size, device, valid_users, amp_dtype)
        record = {
            "epoch": epoch, "loss": total_loss / max(steps, 1), "valid": valid, "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - epoch_start, "elapsed_seconds": time.perf_counter() - started,
        }
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        improved = valid[SELECTION_METRIC] > best_score
        if improved:
            best_score, best_epoch = valid[SELECTION_METRIC], epoch
            save_encoder(model, run_dir)
        if progress:
            tqdm.write(
                f"epoch {epoch:3d}  loss {record['loss']:.4f}  valid NDCG@10 {valid['NDCG@10']:.4f}  "
                f"HR@10 {valid['HR@10']:.4f}  {record['epoch_seconds']:.1f}s{'  *' if improved else ''}"
            )
        if epoch - best_epoch >= config.optim.patience:
            break
    metrics_file.close()
    plot_curves(history, run_dir / "curves.png")

    best = load_encoder_dir(run_dir, device)
    valid = evaluate_model(best, data, "valid", config.eval.ks, config.eval.batch_size, device, None, amp_dtype)
    test = evaluate_model(best, data, "test", config.eval.ks, config.eval.batch_size, device, None, amp_dtype)
    summary = {"best_epoch": best_epoch, "epochs_run": len(history), "seconds": time.perf_counter() - started,
               "seconds_to_best": history[best_epoch - 1]["elapsed_seconds"], "device": str(device)}
    (run_dir / "valid_metrics.json").write_text(json.dumps(valid, indent=2))
    (run_dir / "test_metrics.json").write_text(json.dumps({**test, **summary}, indent=2))
    return {**test, **summary}
