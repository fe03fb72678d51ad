"""The training service: what fine-tuning updates (`begin_training`, `end_training`: the vision tower frozen,
everything, or LoRA adapters merged back), the backward pass of a batch's target-token loss in micro-batches,
packed or not (`sft_backward`), and Liger's kernels on the family's text model (`apply_liger_kernels`). The
loss itself and the inputs are the adapter's (`Adapter.training_inputs`, `Adapter.target_loss`,
`Adapter.packed_training_inputs`); sharding is `models.sharding`'s."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from PIL import Image

TRAIN_MODES = ("text", "all", "lora")
# LoRA goes on the language model's projections only (vision modules have projections of the same names)
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def sft_backward(adapter, images: list[Image.Image], prompts: list[str], targets: list[str],
                 micro_batches: int = 3, pack: bool = False, given: list[str] | None = None) -> float:
    """Backward of the batch's mean target-token loss, run as `micro_batches` forward passes; returns the
    loss. `given` (optional, one text per example, "" for none): the start of each answer, read by the model
    between its prompt and its target but not trained (no loss), as `generate`'s `prefixes` are given.

    Unpacked, each example is a row of its own and the passes go over examples sorted by length, each pass
    padded only to its own longest example (in the toy mixture one batch holds 30- and 170-token examples: a
    single padded pass wastes most of its work). With `pack` (families where `packs` is True), examples are
    packed several to a row, up to the batch's longest example (`pack_rows`), each attending only to itself
    and to its own image (`packed_training_inputs`); the passes go over the rows. The loss and the
    gradients are those of the unpacked batch (tested against it in float64).

    Sharded for training (`shard_for_training`, a torchrun job of S ranks): rank r takes examples r, r + S,
    ... of the batch, in exactly `micro_batches` passes (a pass with no example of its own runs one at weight
    0: every rank must run as many as the others); the token count is summed over the ranks, and the loss
    scaled by S, as FSDP averages the ranks' gradients. With the vision tower training (`--train all`) the
    batch is not packed: sharded, the tower takes its pixels through the root's forward, one image a row, and
    one process runs the same rows."""
    indices = list(range(len(prompts)))
    given = given or [""] * len(prompts)
    job = adapter._sharded
    if job:
        indices = indices[job[0]::job[1]]
    # a training vision tower is not packed: sharded, it takes its pixels through the root's forward one
    # image a row; alone, it runs the same unpacked rows, so that any number of processes trains alike
    packing = pack and adapter.packs and not adapter.vision_trains()
    if packing:
        heads = {i: adapter.head_ids(prompts[i], None, given[i]) for i in [*indices, 0]}  # the image token, not its
        tails = {i: adapter.target_ids(targets[i]) for i in [*indices, 0]}  # features: no image needed here
        lengths = [len(heads[i]) + len(tails[i]) for i in indices]
        adapter.check_lengths([heads[i] + tails[i] for i in indices])
        rows = [[indices[k] for k in row] for row in pack_rows(lengths, max(lengths, default=1))]
        size = max(1, -(-len(rows) // max(1, micro_batches)))
        groups = [rows[k:k + size] for k in range(0, len(rows), size)]
        count = sum(len(tails[i]) for i in indices)
    else:
        order = sorted(indices, key=lambda i: len(prompts[i]) + len(given[i]) + len(targets[i]))
        size = max(1, -(-len(order) // max(1, micro_batches)))
        groups = [order[k:k + size] for k in range(0, len(order), size)]
        # the target tokens (each target's ids, its end-of-turn included), counted before any pass: a
        # pass's inputs are prepared just before it, so a training vision tower holds one pass's activations
        count = sum(len(adapter.target_ids(targets[i])) for i in indices)
    if job:
        groups += [[] for _ in range(micro_batches - len(groups))]
    tokens, scale = count, 1
    if job:
        counts = torch.tensor([float(count)], device=adapter.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(counts)
        tokens, scale = int(counts.item()), job[1]
    total = 0.0
    for group in groups:
        weight = 1.0 if group else 0.0
        if packing:
            inputs, labels = adapter.packed_training_inputs(images, group or [[0]], heads, tails)
        else:
            group = group or [0]
            inputs, labels = adapter.training_inputs([images[i] for i in group], [prompts[i] for i in group],
                                                   [targets[i] for i in group], [given[i] for i in group])
        loss_sum = adapter.target_loss(inputs, labels, reduction="sum") * weight
        (loss_sum * scale / tokens).backward()
        total += loss_sum.item()
    if job:
        summed = torch.tensor([total], device=adapter.device)
        dist.all_reduce(summed)
        total = summed.item()
    return total / tokens


def begin_training(adapter, train: str = "text", *, lora_rank: int = 16,
                   lora_alpha: float = 32.0) -> list[torch.nn.Parameter]:
    """Choose what fine-tuning updates and return those parameters: "text" freezes the vision tower (the
    default), "all" trains everything, "lora" adds LoRA adapters to the language model's projections
    (peft) and freezes the rest; `end_training` merges them back."""
    if train not in TRAIN_MODES:
        raise ValueError(f"train: expected one of {TRAIN_MODES}, got {train!r}")
    if adapter.device.type == "cuda":
        apply_liger_kernels(adapter.model, adapter.liger_patch)
        adapter.use_gpu_kernels()
    if train == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ValueError("train: 'lora' needs peft (pip install peft)") from None
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
        # peft injects the adapters into adapter.model's own modules: adapter.model stays the model to call
        adapter._peft = get_peft_model(adapter.model, config)
        return [p for p in adapter.model.parameters() if p.requires_grad]
    params = []
    for name, p in adapter.model.named_parameters():
        frozen = train == "text" and adapter.is_vision(name)
        p.requires_grad_(not frozen)
        if not frozen:
            params.append(p)
    if train == "all":
        adapter._vision_fingerprint = None  # the vision weights will change
    return params


def end_training(adapter) -> None:
    """Merge LoRA adapters into the weights (a plain checkpoint again); forget a stale vision fingerprint. A
    model sharded for training is left unmerged: its gathered weights go into a fresh copy instead."""
    if adapter._peft is not None and not adapter._sharded:
        adapter.model = adapter._peft.merge_and_unload()
        adapter._peft = None
    adapter._vision_fingerprint = None
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    adapter.model.eval()


def apply_liger_kernels(model, name: str | None) -> bool:
    """liger-kernel's RMSNorm, SwiGLU and RoPE on this model's text model, in place, once, by the family's patch
    function `name` (`Adapter.liger_patch`; None: the family has none); its
    fused loss off (fastjudge's own is used, and Liger's breaks on `MllamaForConditionalGeneration` in
    transformers 5.x). Returns whether the model is patched; without liger-kernel installed, warns and leaves
    the model as it is. Liger also swaps the family's RMSNorm and MLP classes and its rotary function
    module-wide (later models of the family in this process get them too; on CUDA they serve inference as
    well)."""
    done = getattr(model, "_fastjudge_liger", None)
    if done is not None:
        return done
    model._fastjudge_liger = False  # tried: a failure warns once
    if name is None:
        return False
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        import warnings
        warnings.warn("liger-kernel is not installed: training runs without its RMSNorm/SwiGLU/RoPE kernels")
        return False
    patch = getattr(liger, name)
    options = dict(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=False, cross_entropy=False)
    if "layer_norm" in inspect.signature(patch).parameters:
        options["layer_norm"] = False  # the vision tower's LayerNorm: not asked for, and not tested here
    try:
        patch(model=model, **options)
    except ImportError as error:  # liger 0.8.5's Qwen2-VL patch imports a class transformers 5.x lacks
        import warnings
        warnings.warn(f"liger-kernel's {name} failed ({error}): training runs without its kernels")
        return False
    model._fastjudge_liger = True
    return True



def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Examples (by index into `lengths`) packed into rows of at most `capacity` tokens, first fit in order of
    decreasing length (ties by index); an example longer than `capacity` gets a row of its own. Rows come out in
    the order they were opened, each listing its examples in the order they were placed."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


