"""The sharding service: FSDP2 (`fully_shard`) of a family's model for fine-tuning under torchrun. The family
names its shard groups (`Adapter.shard_groups`); its `shardable` capability says whether it can be sharded."""

from __future__ import annotations

import torch


def shard_for_training(adapter, job: tuple[int, int], cpu_offload: bool = False,
                       activation_checkpointing: bool = False) -> None:
    """FSDP2 (`fully_shard`) for a torchrun job of job[1] ranks, after `begin_training`: each group the family
    names (`Adapter.shard_groups`; Mllama: each decoder layer, self- and cross-attention) its own shard group, the
    rest of the model the root's (kept gathered from its forward to its backward: the fused loss reads the head's
    weight after the forward). A frozen vision tower ("text", "lora") stays whole on every rank, its features
    cached before the first step (`image_features`); a training one ("all") is sharded too, in the groups the
    family names for it; the images then go through the root's forward as pixels, since FSDP2 gathers its
    groups only there. With `cpu_offload` the parameters, gradients and
    optimizer state live in CPU memory and `device` stays the GPU the model was on. Parameters in float32
    (the optimizer's copies); on a GPU bf16 compute and fp32 gradient reduction; `activation_checkpointing`:
    each decoder layer's activations recomputed in the backward pass (transformers' own checkpointing, inside
    the shard groups). Families whose `shardable` is True only (Qwen's input embeddings are made outside its
    forward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    if not adapter.shardable:
        raise ValueError(f"train: {type(adapter).__name__} cannot be sharded for fine-tuning (Mllama and the toy "
                         "can)")
    cuda = adapter.device.type == "cuda"
    adapter._compute_device = adapter.device
    mesh = init_device_mesh("cuda" if cuda else "cpu", (job[1],))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()

    def shard(module: torch.nn.Module, **kwargs) -> None:
        fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload, **kwargs)

    vision_trains = adapter.vision_trains()
    adapter.model.float()
    if activation_checkpointing:
        # transformers 5.25 renamed gradient_checkpointing_enable (an alias until v6)
        enable = getattr(adapter.model, "activation_checkpointing_enable", None) or \
            adapter.model.gradient_checkpointing_enable
        enable()
    frozen: set[torch.nn.Parameter] = set()
    if not vision_trains:
        frozen = {p for name, p in adapter.model.named_parameters() if adapter.is_vision(name)}
    for group in adapter.shard_groups(vision_trains):  # innermost first: FSDP2 shards a module's own parameters
        shard(group)
    shard(adapter.model, reshard_after_forward=False, ignored_params=frozen or None)
    adapter._sharded = job

